"""Every architecture the converter accepts, end to end on vLLM's CPU backend.

A tiny random model of each architecture (with what sets it apart: Qwen2's q/k/v biases and tied
lm_head, Qwen3's per-head q/k norms, Gemma's (1 + w) norms, scaled embeddings and tied head, Gemma 2's
post-norms and soft-capped attention and logits, Gemma 3's sliding / full layers with their own rotary
tables, Phi-3's q/k/v and gate/up stored fused) is converted, generated from with vLLM
through the plugin (float32, greedy), and each generated position's top-5 logprobs are compared with
the independent reference: the Hugging Face model of the same architecture built from the dequantized
checkpoint (``quant_tools.fake_eval``, with its run-time activation transforms), its log-softmax taken in
float64 on the prompt plus vLLM's tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, assert_rotation_keeps_the_function, make_tiny_model_with_calibration

pytest.importorskip("vllm")

PROMPTS = ["The capital of France is", "def fibonacci(n):"]
GEN = 8

# model type -> (HF architecture, config keys that exercise what is particular to it). head_dim 32:
# vLLM's CPU attention has no float32 kernel for head_dim 16 (Gemma's default is 256). initializer_range
# 0.25 (0.1 for Gemma 2 / 3, whose logits it would saturate) gives peaked next-token distributions (the
# default 0.02 leaves them flat, where a comparison says little). Gemma models always tie their lm_head.
GEMMA = {"head_dim": 32, "tie_word_embeddings": True}
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", {}),
    "mistral": ("MistralForCausalLM", {}),
    "qwen2": ("Qwen2ForCausalLM", {"tie_word_embeddings": True}),  # q/k/v biases (random: see make_tiny_model)
    "qwen3": ("Qwen3ForCausalLM", {"head_dim": 32}),  # q_norm / k_norm per head
    "gemma": ("GemmaForCausalLM", GEMMA),
    "gemma2": ("Gemma2ForCausalLM", {**GEMMA, "initializer_range": 0.1}),
    "gemma3_text": ("Gemma3ForCausalLM", {**GEMMA, "initializer_range": 0.1, "sliding_window": 4}),
    "phi3": ("Phi3ForCausalLM", {}),  # qkv_proj and gate_up_proj in the checkpoint: vLLM splits them at load
}
SHAPE = {"hidden": 128, "intermediate": 224, "heads": 4, "kv_heads": 2, "initializer_range": 0.25}
ROTATABLE = ("llama", "mistral", "qwen2", "qwen3", "phi3")

# (name, converter arguments, logprob tolerance: largest difference, median difference). A16: the same
# float32 math in another order. A8 (per-token activation codes): an activation an ulp from a rounding
# boundary may round the other way in one of the two runs and move the logprobs of that position and
# every later one by a few hundredths (seen: up to 0.055, median 0.006); a wrong layer moves them by
# tenths to units.
A8_TOL = (0.15, 0.02)
CASES = [
    ("w4a16-g32-mse", ["--w-bits", "4", "--group-size", "32", "--method", "mse"], (2e-3, 1e-3)),
    ("w4a8-rot-gptq", ["--w-bits", "4", "--a-bits", "8", "--group-size", "-1", "--method", "gptq", "--rotate",
                       "--calib-samples", "4", "--calib-seqlen", "64"], A8_TOL),
    ("w4a8-gptq", ["--w-bits", "4", "--a-bits", "8", "--group-size", "-1", "--method", "gptq",
                   "--calib-samples", "4", "--calib-seqlen", "64"], A8_TOL),
]
# Calibration and activation quantization run on Llama in the SmolLM2 tests; here on the architectures
# where they meet biases, tied embeddings, q/k norms, fused linears (rotated: Qwen2 / Qwen3 / Phi-3) and
# Gemma's layers (calibrated layer by layer through each model's own modules: Gemma 2 / 3, no rotation).
RUNS = [(m, c) for m in ARCHITECTURES for c in CASES
        if c[0] == "w4a16-g32-mse" or (c[0] == "w4a8-rot-gptq" and m in ("qwen2", "qwen3", "phi3"))
        or (c[0] == "w4a8-gptq" and m in ("gemma2", "gemma3_text"))]


def test_every_supported_architecture_is_covered():
    from quant_tools.convert import SUPPORTED_ARCHITECTURES

    assert sorted(SUPPORTED_ARCHITECTURES) == sorted(arch for arch, _ in ARCHITECTURES.values())


@pytest.fixture(scope="module")
def sources(smollm2_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("arch")
    torch.manual_seed(20261207)  # the same tiny models on every run (and so the same rounding ties)
    out = {}
    for model_type, (arch, extra) in ARCHITECTURES.items():
        src, calib = make_tiny_model_with_calibration(root / model_type / "src", smollm2_dir, model_type=model_type,
                                                      dtype=torch.float32, **{**SHAPE, **extra})
        assert json.loads((src / "config.json").read_text())["architectures"] == [arch]
        out[model_type] = (src, calib)
    return out


@pytest.mark.parametrize("model_type", list(ARCHITECTURES))
def test_layer_stream_reproduces_the_hf_forward(model_type, sources):
    """The converter's calibration runs a model one decoder layer at a time (LayerStream): its embedding,
    layers (rotary tables, sliding windows, soft-caps), final norm and head give the logits of the
    transformers model's own forward (eager attention, float32) on a sequence longer than the sliding
    window of the Gemma 3 model."""
    from transformers import AutoModelForCausalLM

    from quant_tools.calibrate import LayerStream
    from quant_tools.checkpoint import HFCheckpoint

    src, _ = sources[model_type]
    gen = torch.Generator().manual_seed(torch.seed())
    ids = torch.randint(0, 49152, (2, 23), generator=gen)
    stream = LayerStream(HFCheckpoint(src))
    with torch.no_grad():
        h = stream.embed(ids)
        for i in range(len(stream.layers)):
            h = stream.run(stream.load(i), h, batch=1)
            stream.unload(i)
        got = stream.logits(h)
        model = AutoModelForCausalLM.from_pretrained(src, attn_implementation="eager", dtype=torch.float32)
        want = model(ids).logits
    assert got.shape == want.shape
    err = (got - want).abs().max().item()
    assert err <= 1e-4 * want.abs().max().item(), (model_type, err, gen.initial_seed())


def vllm_generate(model, out) -> str:
    cmd = [sys.executable, "-m", "quant_tools.generate", str(model), "--eager", "--dtype", "float32",
           "--max-model-len", "256", "--max-tokens", str(GEN), "--logprobs", "5", "--json", str(out)]
    for p in PROMPTS:
        cmd += ["--prompt", p]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout + proc.stderr


def reference_logprobs(ckpt, results) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per prompt, at each generated position, from the dequantized HF model: ([GEN, 5] top logprobs,
    [GEN] logprob of the token vLLM generated there)."""
    from quant_tools.fake_eval import install_runtime_hooks, load_model

    model, spec, tok = load_model(ckpt)
    install_runtime_hooks(model, spec)
    out = []
    with torch.no_grad():
        for r in results:
            ids = tok(r["prompt"])["input_ids"]
            logits = model(torch.tensor([ids + r["token_ids"]])).logits[0].double()
            lp = torch.log_softmax(logits, -1)[len(ids) - 1: len(ids) - 1 + GEN]
            chosen = lp.gather(1, torch.tensor(r["token_ids"]).view(-1, 1)).view(-1)
            out.append((lp.topk(5, dim=-1).values, chosen))
    return out


@pytest.mark.parametrize("model_type,case", RUNS, ids=[f"{m}-{c[0]}" for m, c in RUNS])
def test_vllm_matches_the_dequantized_hf_model(model_type, case, sources, tmp_path):
    name, args, (tol, median_tol) = case
    from quant_tools.convert import main as convert

    src, calib = sources[model_type]
    ckpt = tmp_path / name
    extra = ["--calib", str(calib)] if "gptq" in args else []
    assert convert([str(src), str(ckpt), *args, *extra, "--no-progress"]) == 0
    results_file = tmp_path / "gen.json"
    log = vllm_generate(ckpt, results_file)
    assert "quantization=bipolar" in log
    results = json.loads(results_file.read_text())
    assert [r["prompt"] for r in results] == PROMPTS
    ref = reference_logprobs(ckpt, results)
    for r, (want, chosen) in zip(results, ref):
        got = torch.tensor(r["top_logprobs"], dtype=torch.float64)
        assert got.shape == want.shape == (GEN, 5)
        # Each token vLLM chose is the reference's best there (up to the tolerance: a near-tie may go
        # either way), with the logprob the reference gives it.
        assert (want[:, 0] - chosen).max() <= tol, (model_type, name, r["token_ids"], want[:, 0], chosen)
        assert (got[:, 0] - chosen).abs().max() <= tol, (model_type, name, got[:, 0], chosen)
        diff = (got - want).abs()
        assert diff.max() <= tol, (model_type, name, r["text"], diff.max().item())
        # Far below the tolerance at most positions: differences are rounding, not a wrong layer.
        assert diff.median() <= median_tol, (model_type, name, diff.median().item())


@pytest.mark.parametrize("model_type", [m for m in ARCHITECTURES if m not in ROTATABLE])
def test_rotate_is_refused_where_it_is_not_implemented(model_type, sources, tmp_path, capsys):
    from quant_tools.convert import ROTATABLE_ARCHITECTURES, main as convert

    assert sorted(ROTATABLE_ARCHITECTURES) == sorted(ARCHITECTURES[m][0] for m in ROTATABLE)
    src, calib = sources[model_type]
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    dst = tmp_path / "out"
    assert convert([str(src), str(dst), "--w-bits", "4", "--rotate", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--rotate is not available" in err and "convert without --rotate" in err, err
    assert ARCHITECTURES[model_type][0] in err
    assert not dst.exists()
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


@pytest.mark.parametrize("kind", ["orthogonal", "hadamard"])
@pytest.mark.parametrize("model_type", ROTATABLE)
def test_rotation_leaves_the_function_unchanged(model_type, kind, sources):
    """--rotate's offline rewrite (quant_tools.rotation) plus the run-time Hadamard on down_proj's input
    computes the same logits as the original model, in float32, for every architecture it accepts: norm
    weights (made non-trivial here) folded into q/k/v (fused or not) and gate/up, q/k/v biases kept with
    their rows, v heads rotated inside a fused qkv_proj, a tied head written untied."""
    assert_rotation_keeps_the_function(sources[model_type][0], kind)


@pytest.mark.parametrize("model_type,head_dim", [("phi3", 96), ("llama", 112)])
def test_rotation_with_a_head_size_that_is_not_a_power_of_two(model_type, head_dim, tmp_path):
    """Phi-3-mini's heads of 96 take a Sylvester x Paley Hadamard matrix (8 x 12); 112, which has none,
    a random orthogonal one (o_proj takes its transpose back): the function is unchanged either way."""
    from conftest import make_tiny_model

    from quant_tools.rotation import head_rotation

    h = head_rotation(head_dim, seed=0)
    assert torch.allclose(h @ h.T, torch.eye(head_dim, dtype=h.dtype), atol=1e-12)
    src = make_tiny_model(tmp_path / "m", model_type, hidden=2 * head_dim, intermediate=256, heads=2, kv_heads=1,
                          vocab=300, dtype=torch.float32, initializer_range=0.1)
    assert_rotation_keeps_the_function(src, "orthogonal")

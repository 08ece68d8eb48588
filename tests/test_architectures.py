"""Every architecture the converter accepts, end to end on vLLM's CPU backend.

A tiny random model of each architecture (with what sets it apart: Qwen2's q/k/v biases and tied
lm_head, Qwen3's per-head q/k norms, Mistral's own model class) is converted, generated from with vLLM
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

from conftest import REPO, make_tiny_model_with_calibration

pytest.importorskip("vllm")

PROMPTS = ["The capital of France is", "def fibonacci(n):"]
GEN = 8

# model type -> (HF architecture, config keys that exercise what is particular to it). head_dim 32:
# vLLM's CPU attention has no float32 kernel for head_dim 16. initializer_range 0.25 gives peaked
# next-token distributions (the default 0.02 leaves them flat, where a comparison says little).
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", {}),
    "mistral": ("MistralForCausalLM", {}),
    "qwen2": ("Qwen2ForCausalLM", {"tie_word_embeddings": True}),  # q/k/v biases (random: see make_tiny_model)
    "qwen3": ("Qwen3ForCausalLM", {"head_dim": 32}),  # q_norm / k_norm per head
}
SHAPE = {"hidden": 128, "intermediate": 224, "heads": 4, "kv_heads": 2, "initializer_range": 0.25}

# (name, converter arguments, logprob tolerance). A16: the same float32 math in another order, so
# 2e-3. A8 (per-token activation codes): an activation an ulp from a rounding boundary may round the
# other way in one of the two runs and move a logprob by a few hundredths.
CASES = [
    ("w4a16-g32-mse", ["--w-bits", "4", "--group-size", "32", "--method", "mse"], 2e-3),
    ("w4a8-rot-gptq", ["--w-bits", "4", "--a-bits", "8", "--group-size", "-1", "--method", "gptq", "--rotate",
                       "--calib-samples", "4", "--calib-seqlen", "64"], 0.1),
]
# Rotation, calibration and activation quantization run on Llama in the SmolLM2 tests; here on the
# architectures where they meet biases, tied embeddings and q/k norms.
RUNS = [(m, c) for m in ARCHITECTURES for c in CASES if c[0].endswith("a16-g32-mse") or m in ("qwen2", "qwen3")]


def test_every_supported_architecture_is_covered():
    from quant_tools.convert import SUPPORTED_ARCHITECTURES

    assert sorted(SUPPORTED_ARCHITECTURES) == sorted(arch for arch, _ in ARCHITECTURES.values())


@pytest.fixture(scope="module")
def sources(smollm2_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("arch")
    out = {}
    for model_type, (arch, extra) in ARCHITECTURES.items():
        src, calib = make_tiny_model_with_calibration(root / model_type / "src", smollm2_dir, model_type=model_type,
                                                      dtype=torch.float32, **SHAPE, **extra)
        assert json.loads((src / "config.json").read_text())["architectures"] == [arch]
        out[model_type] = (src, calib)
    return out


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
    name, args, tol = case
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
        # Far below the tolerance at almost every position: differences are rounding, not a wrong layer.
        assert diff.median() <= 1e-3, (model_type, name, diff.median().item())

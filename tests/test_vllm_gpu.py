"""vLLM on a GPU with the CUDA kernels (skips without CUDA or vLLM).

A small random Llama with a self-made word-level tokenizer (no hub, no large files), converted to
bipolar W4A16: greedy tokens from the default engine (CUDA kernels, torch.compile, CUDA graphs)
equal those of the pure-torch backend in eager mode, except after a tie of the reference. The same
for a Gemma 2 (soft-capped attention, post-norms) and a Phi-3 (q/k/v and gate/up fused in the
checkpoint, split by vLLM at load, then repacked for the kernels).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, make_tiny_model

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("vllm")

def make_tokenizer(path):
    """The word-level tokenizer of benchmarks/load_test.py (no hub access needed); returns the vocab size."""
    from benchmarks.load_test import make_word_tokenizer

    return make_word_tokenizer(path)


# model type -> config keys particular to it (Gemma models tie their head; head_dim 64 = 512 / 8 heads).
MODEL_TYPES = {"llama": {}, "gemma2": {"head_dim": 64, "tie_word_embeddings": True}, "phi3": {}}
# vLLM refuses float16 for Gemma 2 ("numerical instability"): bfloat16 there.
MODEL_DTYPE = {"gemma2": "bfloat16"}


@pytest.fixture(scope="module", params=list(MODEL_TYPES))
def w4_model(request, tmp_path_factory):
    from quant_tools.convert import main

    root = tmp_path_factory.mktemp("gpu")
    src = root / "tiny"
    src.mkdir()
    vocab = make_tokenizer(src)
    make_tiny_model(src, request.param, hidden=512, intermediate=1408, layers=4, heads=8, kv_heads=2, vocab=vocab,
                    **MODEL_TYPES[request.param])
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(bos_token_id=1, eos_token_id=2)
    (src / "config.json").write_text(json.dumps(cfg))
    dst = root / "w4"
    assert main([str(src), str(dst), "--w-bits", "4", "--method", "mse", "--no-progress"]) == 0
    return dst, MODEL_DTYPE.get(request.param, "float16")


def generate(model, tmp_path, *extra, env=None):
    out = tmp_path / f"out-{abs(hash(extra))}.json"
    cmd = [sys.executable, "-m", "quant_tools.generate", str(model), "--max-tokens", "24", "--logprobs", "2",
           "--max-model-len", "256", "--json", str(out), "--prompt", "the capital of france is", "--prompt", "water in the river",
           "--prompt", "the first people of the north", *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, **(env or {})), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    return json.loads(out.read_text()), proc.stdout + proc.stderr


def test_cuda_kernels_match_torch_backend(w4_model, tmp_path):
    model, dtype = w4_model
    fast, log = generate(model, tmp_path, "--dtype", dtype)
    assert "kernel backend 'cuda_gemm_a16'" in log
    ref, log_ref = generate(model, tmp_path, "--dtype", dtype, "--eager", env={"VLLM_BIPOLAR_KERNEL": "torch"})
    assert "kernel backend 'torch'" in log_ref
    for r, f in zip(ref, fast):
        i = next((j for j, (a, b) in enumerate(zip(r["token_ids"], f["token_ids"])) if a != b), None)
        if i is not None:
            top = r["top_logprobs"][i]
            assert top[0] - top[1] < 0.05, (i, top, r["token_ids"], f["token_ids"])

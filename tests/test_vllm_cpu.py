"""vLLM on CPU, real engine, real model (SmolLM2-135M-Instruct): the plugin end to end.

Each engine runs in its own process (python -m quant_tools.generate) so that engines never share
state; the plugin is found through its vllm.general_plugins entry point, as for a user.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, converted, decoded_twin

pytest.importorskip("vllm")

PROMPTS = ["The capital of France is", "def fibonacci(n):", "The best way to learn a language is",
           "Water boils at"]


def run_vllm(model, *extra: str, tmp_path, max_tokens=16, env_extra=None) -> list[dict]:
    out = tmp_path / f"gen-{abs(hash((str(model),) + extra + tuple(sorted((env_extra or {}).items()))))}.json"
    cmd = [sys.executable, "-m", "quant_tools.generate", str(model), "--max-tokens", str(max_tokens),
           "--json", str(out), *extra]
    for p in PROMPTS:
        cmd += ["--prompt", p]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", **(env_extra or {}))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text()), proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def reference(smollm2_dir, tmp_path_factory):
    results, _ = run_vllm(smollm2_dir, "--eager", "--logprobs", "2", tmp_path=tmp_path_factory.mktemp("ref"))
    return results


TIE = 0.1  # nats: a reference top-2 gap this small is a coin toss for any perturbation of the weights


def first_divergence(ref: dict, got: dict) -> int | None:
    return next((i for i, (a, b) in enumerate(zip(ref["token_ids"], got["token_ids"])) if a != b), None)


def test_w8_matches_unquantized(smollm2_dir, reference, tmp_path):
    model = converted(smollm2_dir, "smollm2-w8a16", "--w-bits", "8")
    results, log = run_vllm(model, "--eager", tmp_path=tmp_path)
    assert "quantization=bipolar" in log
    exact = 0
    for ref, got in zip(reference, results):
        assert len(got["token_ids"]) == len(ref["token_ids"])
        i = first_divergence(ref, got)
        exact += i is None
        if i is None or i >= 8:
            continue
        # Before token 8 a different token is allowed only where the unquantized model itself
        # was at a tie (its two best logprobs within TIE); after a tie the texts go separate ways.
        top = ref["top_logprobs"][i]
        assert top[0] - top[1] < TIE, (i, top[:2], ref["text"], got["text"])
    assert exact >= 2, "W8 should reproduce most generations exactly"


@pytest.fixture(scope="module")
def w4_model(smollm2_dir):
    return converted(smollm2_dir, "smollm2-w4a16-g128-mse", "--w-bits", "4", "--group-size", "128",
                     "--method", "mse")


@pytest.fixture(scope="module")
def w4_torch(w4_model, tmp_path_factory):
    # Default mode (torch.compile on): the custom op's fake implementation is exercised.
    return run_vllm(w4_model, "--quantization", "bipolar", tmp_path=tmp_path_factory.mktemp("w4"))


def test_w4_mse_knows_paris(w4_torch):
    results, log = w4_torch
    assert "quantization=bipolar" in log
    assert "Paris" in results[0]["text"], results[0]["text"]
    assert all(len(r["token_ids"]) == 16 for r in results)


def test_w4_torch_dense_backend(w4_model, w4_torch, tmp_path):
    """VLLM_BIPOLAR_KERNEL=torch_dense: dequantized at load, vLLM's CPU GEMM; the torch backend's generations
    (greedy; vLLM's GEMM rounds its sums differently, so a near tie may go the other way)."""
    results, log = run_vllm(w4_model, "--quantization", "bipolar", tmp_path=tmp_path,
                            env_extra={"VLLM_BIPOLAR_KERNEL": "torch_dense"})
    assert "kernel backend 'torch_dense'" in log, log[-3000:]
    assert "Paris" in results[0]["text"], results[0]["text"]
    assert all(len(r["token_ids"]) == 16 for r in results)
    same = sum(a["token_ids"] == b["token_ids"] for a, b in zip(w4_torch[0], results))
    assert same >= 2, [(a["text"], b["text"]) for a, b in zip(w4_torch[0], results)]


def test_w4a8_generates(smollm2_dir, tmp_path):
    model = converted(smollm2_dir, "smollm2-w4a8", "--w-bits", "4", "--a-bits", "8", "--method", "mse")
    results, _ = run_vllm(model, "--eager", tmp_path=tmp_path)
    for r in results:
        assert len(r["token_ids"]) == 16 and r["text"].strip()


def test_format_version_2_generates_as_its_decoded_twin(smollm2_dir, tmp_path):
    """8-bit scale/offset codes (--format-version 2) serve exactly the weights they stand for: the same
    generations and logprobs as a version 1 checkpoint holding the decoded values."""
    v2 = converted(smollm2_dir, "smollm2-w4a16-g128-mse-v2", "--w-bits", "4", "--group-size", "128",
                   "--method", "mse", "--format-version", "2")
    twin = decoded_twin(v2, tmp_path / "twin")
    got, log = run_vllm(v2, "--eager", "--logprobs", "2", tmp_path=tmp_path)
    ref, _ = run_vllm(twin, "--eager", "--logprobs", "2", tmp_path=tmp_path)
    assert "quantization=bipolar" in log
    assert "Paris" in got[0]["text"], got[0]["text"]
    for a, b in zip(ref, got):
        assert a["token_ids"] == b["token_ids"], (a["text"], b["text"])
        assert a["top_logprobs"] == b["top_logprobs"]

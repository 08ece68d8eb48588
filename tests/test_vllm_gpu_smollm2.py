"""SmolLM2-135M conversions through vLLM on a GPU (skips without CUDA, vLLM or the checkpoints).

BIPOLAR_SMOLLM2_ROOT=DIR names a folder with converted SmolLM2-135M checkpoints in the
sub-folders w4a16, w3a16, w2a16, w4a8 and w2a4 (what ``benchmarks/device_bundle.py unpack DIR``
writes); a test whose checkpoint is not there skips. Each generation is one
``python -m quant_tools.generate`` process (one engine start), greedy, 4 prompts x 32 tokens:

- w4a16: vLLM's default GPU engine (CUDA kernels, torch.compile, CUDA graphs) against the same
  checkpoint on the pure-torch backend (``VLLM_BIPOLAR_KERNEL=torch``, eager): equal tokens, except
  that the first differing position must be a near tie of the reference (top-2 logprobs within
  BIPOLAR_SMOLLM2_TIE nats, default 0.25: bf16 logits of magnitude 8..32 come in steps of 0.0625 to
  0.125, and a different summation order may move one logit by a step); everything after it may
  differ. The log must name the backends, and "The capital of France is" must go on with "Paris".
- w3a16, w2a16, w4a8, w2a4: the default engine generates without error, finite logprobs,
  non-empty texts, on a CUDA backend.

Texts are printed (``pytest -s``) and, when OUT is set, written to $OUT/smollm2_gpu_generations.json.
Two engine starts for w4a16 and one for each other model; to stay inside a 10-minute call, run
``-k w4a16`` and ``-k "not w4a16"`` separately.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("vllm")
ROOT = os.environ.get("BIPOLAR_SMOLLM2_ROOT")
if not ROOT:
    pytest.skip("BIPOLAR_SMOLLM2_ROOT is not set (a folder with w4a16, w3a16, w2a16, w4a8, w2a4)",
                allow_module_level=True)

PROMPTS = ("The capital of France is", "def fibonacci(n):", "The best way to learn a language is", "Water boils at")
MAX_TOKENS = 32
TIE = float(os.environ.get("BIPOLAR_SMOLLM2_TIE", "0.25"))
BACKEND_RE = re.compile(r"kernel backend '([A-Za-z0-9_]+)'")


def checkpoint(name: str) -> Path:
    path = Path(ROOT) / name
    if not (path / "config.json").is_file():
        pytest.skip(f"{path} holds no checkpoint")
    return path


def generate(model: Path, tmp_path: Path, *extra: str, kernel: str | None = None) -> tuple[list[dict], str, float]:
    """(results, log, seconds) of one quant_tools.generate process."""
    out = tmp_path / f"gen-{model.name}-{kernel or 'default'}.json"
    cmd = [sys.executable, "-m", "quant_tools.generate", str(model), "--max-tokens", str(MAX_TOKENS),
           "--logprobs", "2", "--dtype", "bfloat16", "--max-model-len", "512", "--json", str(out), *extra]
    for p in PROMPTS:
        cmd += ["--prompt", p]
    env = dict(os.environ)
    env.pop("VLLM_BIPOLAR_KERNEL", None)
    if kernel:
        env["VLLM_BIPOLAR_KERNEL"] = kernel
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False)
    seconds = time.time() - t0
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n" + proc.stdout[-2000:] + proc.stderr[-6000:]
    return json.loads(out.read_text()), log, seconds


def backends(log: str) -> list[str]:
    return sorted(set(BACKEND_RE.findall(log)))


def record(key: str, entry: dict) -> None:
    """Print the texts; merge them into $OUT/smollm2_gpu_generations.json when OUT is set."""
    for r in entry["results"]:
        print(f"[{key}] {r['prompt']!r} -> {r['text']!r}")
    out = os.environ.get("OUT")
    if not out:
        return
    path = Path(out) / "smollm2_gpu_generations.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[key] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


def first_divergence(ref: dict, got: dict) -> int | None:
    a, b = ref["token_ids"], got["token_ids"]
    i = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if i is None and len(a) != len(b):
        i = min(len(a), len(b))  # one stopped (EOS) where the other went on
    return i


def top2_gap(r: dict, i: int) -> float | None:
    top = r["top_logprobs"][i] if i < len(r["top_logprobs"]) else []
    return top[0] - top[1] if len(top) >= 2 else None


def check_sane(results: list[dict]) -> None:
    assert [r["prompt"] for r in results] == list(PROMPTS)
    for r in results:
        assert 0 < len(r["token_ids"]) <= MAX_TOKENS, r
        assert r["text"], r
        assert len(r["top_logprobs"]) == len(r["token_ids"]), r
        assert all(math.isfinite(x) for pos in r["top_logprobs"] for x in pos), r["top_logprobs"]


def test_w4a16_cuda_matches_torch_backend(tmp_path):
    model = checkpoint("w4a16")
    fast, log, t_fast = generate(model, tmp_path)
    assert "kernel backend 'cuda_gemm_a16'" in log, backends(log) or log[-3000:]
    ref, log_ref, t_ref = generate(model, tmp_path, "--eager", kernel="torch")
    assert "kernel backend 'torch'" in log_ref, backends(log_ref) or log_ref[-3000:]
    check_sane(fast)
    check_sane(ref)
    comparison = []
    for r, f in zip(ref, fast):
        i = first_divergence(r, f)
        common = len(r["token_ids"]) if i is None else i
        # how far the chosen token's logprob moved on the shared prefix (informative)
        drift = max((abs(r["top_logprobs"][j][0] - f["top_logprobs"][j][0]) for j in range(common)), default=0.0)
        comparison.append({"prompt": r["prompt"], "first_difference": i,
                           "reference_top2_gap_there": None if i is None else top2_gap(r, i),
                           "max_top1_logprob_drift_before": drift})
    record("w4a16", {"model": str(model), "backends": backends(log), "seconds": round(t_fast, 1),
                     "results": fast})
    record("w4a16_torch_eager", {"model": str(model), "backends": backends(log_ref), "seconds": round(t_ref, 1),
                                 "results": ref, "comparison_with_w4a16": comparison, "tie_nats": TIE})
    for c in comparison:
        print(f"[w4a16 vs torch] {c}")
    assert "Paris" in fast[0]["text"], fast[0]["text"]
    assert "Paris" in ref[0]["text"], ref[0]["text"]
    for c, r, f in zip(comparison, ref, fast):
        if c["first_difference"] is None:
            continue
        gap = c["reference_top2_gap_there"]
        assert gap is not None and gap < TIE, (
            f"{r['prompt']!r}: CUDA and torch backends differ at token {c['first_difference']} where the reference's "
            f"top-2 gap is {gap} nats (>= {TIE}): not a tie\n  torch: {r['text']!r}\n  cuda:  {f['text']!r}")


@pytest.mark.parametrize("name", ["w3a16", "w2a16", "w4a8", "w2a4"])
def test_low_bit_generates(name, tmp_path):
    model = checkpoint(name)
    results, log, seconds = generate(model, tmp_path)
    used = backends(log)
    record(name, {"model": str(model), "backends": used, "seconds": round(seconds, 1), "results": results})
    assert used and all(b.startswith("cuda_") for b in used), used or log[-3000:]
    check_sane(results)

"""Serving under load on CPU: a small run of benchmarks/load_test.py against `vllm serve`.

The server runs a tiny random Llama converted to bipolar W4A16 (float32 activations, so batched
and single-request arithmetic agree to the last greedy token). 32 concurrent clients, short and
long prompts, streaming, non-streaming and cancelled streams: no failed request, every output
equal to the same prompt sent alone, the server alive and answering the same afterwards.

About a minute on 2 CPU cores (most of it the server start). Deselect with
``pytest -k "not serve_under_load"`` or ``VLLM_BIPOLAR_SKIP_LOAD_TEST=1``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

from benchmarks.load_test import compare, make_requests, percentile


def test_compare_verdicts():
    ref = {"text": " a b c", "tokens": [" a", " b", " c"], "top": [[-0.1, -3.0], [-0.60, -0.62], [-0.1, -4.0]]}

    def got(text, tokens, cancelled=False):
        return {"text": text, "tokens": tokens, "cancelled": cancelled}

    assert compare(ref, got(" a b c", [" a", " b", " c"]), tie=0.05) == "exact"
    assert compare(ref, got(" a x c", [" a", " x", " c"]), tie=0.05) == "tie"  # gap 0.02 at token 1
    assert compare(ref, got(" x b c", [" x", " b", " c"]), tie=0.05) == "mismatch"  # gap 2.9 at token 0
    assert compare(ref, got(" a x c", [" a", " x", " c"]), tie=0.01) == "mismatch"
    assert compare(ref, got(" a b", [" a", " b"], cancelled=True), tie=0.05) == "prefix"
    assert compare(ref, got(" x b", [" x", " b"], cancelled=True), tie=0.05) == "mismatch"
    assert compare(ref, got(" a x", [" a", " x"], cancelled=True), tie=0.05) == "tie"
    assert compare(ref, got(" a b", [" a", " b"]), tie=0.05) == "mismatch"  # ended early, not cancelled


def test_request_mix():
    from benchmarks.load_test import build_parser

    args = build_parser().parse_args(["--requests", "200", "--cancel-frac", "0.1", "--stream-frac", "0.5"])
    reqs = make_requests(args, ["p"] * 48)
    assert len(reqs) == 200
    assert not reqs[0]["stream"] and reqs[1]["stream"] and reqs[2]["cancel"]
    assert all(r["stream"] for r in reqs if r["cancel"])
    assert 5 <= sum(r["cancel"] for r in reqs) <= 40 and 60 <= sum(r["stream"] for r in reqs) <= 140
    assert percentile([1.0, 2.0, 3.0], 50) == 2.0 and percentile([1.0, 2.0], 100) == 2.0


@pytest.mark.skipif(os.environ.get("VLLM_BIPOLAR_SKIP_LOAD_TEST") == "1", reason="VLLM_BIPOLAR_SKIP_LOAD_TEST=1")
def test_serve_under_load(tmp_path):
    pytest.importorskip("vllm")
    pytest.importorskip("aiohttp")
    pytest.importorskip("psutil")
    out = tmp_path / "load.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "load_test.py"), "--tiny", str(tmp_path / "model"),
           "--clients", "32", "--requests", "160", "--max-tokens", "4", "8", "16", "--long-words", "100", "250",
           "--eager", "--json", str(out), "--startup-timeout", "600", "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert out.is_file(), log
    res = json.loads(out.read_text())
    assert res["failed"] == 0, res["failures"]
    assert res["mismatched"] == 0, res["mismatches"]
    assert res["answers_after_load"], log
    assert res["requests"] == 160 and res["clients"] == 32
    assert res["streaming"] > 0 and res["non_streaming"] > 0 and res["cancelled"] > 0
    assert res["long_prompt_requests"] > 0
    assert res["verdicts"]["prefix"] == res["cancelled"]
    assert res["verdicts"]["exact"] + res["verdicts"]["tie"] == 160 - res["cancelled"]
    assert res["rss_growth_mib"] < 0.25 * res["memory"]["rss_before_mib"], res["memory"]
    assert res["requests_per_s"] > 0 and res["latency_p99_s"] >= res["latency_p50_s"] > 0
    assert res["git_commit"] and res["server_command"].startswith("vllm serve") and res["device"] == "cpu"
    assert proc.returncode == 0 and res["passed"], log

"""`vllm serve` on CPU answers the OpenAI API correctly: benchmarks/serve_check.py on the tiny model.

A tiny random Llama converted to bipolar W4A16 (float32, eager), served on 127.0.0.1: /v1/models,
/v1/completions and /v1/chat/completions (plain and streaming, greedy texts repeatable, usage counts
consistent), bad requests answered with a 4xx while the server goes on, shutdown on SIGINT.
About 1.5 minutes on 2 CPU cores (mostly the server start). Deselect with ``-k "not serve_check"``
or ``VLLM_BIPOLAR_SKIP_SERVE_TEST=1``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

from benchmarks.serve_check import counts, usage_ok


def test_usage_rules():
    assert usage_ok({"prompt_tokens": 5, "completion_tokens": 16, "total_tokens": 21}, 16)[0]
    assert not usage_ok({"prompt_tokens": 5, "completion_tokens": 16, "total_tokens": 22}, 16)[0]
    assert not usage_ok({"prompt_tokens": 0, "completion_tokens": 16, "total_tokens": 16}, 16)[0]
    assert not usage_ok({"prompt_tokens": 5, "completion_tokens": 15, "total_tokens": 20}, 16)[0]
    assert not usage_ok(None, 16)[0]
    assert counts({"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3, "prompt_tokens_details": None}) \
        == counts({"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}) == (1, 2, 3)


@pytest.mark.skipif(os.environ.get("VLLM_BIPOLAR_SKIP_SERVE_TEST") == "1", reason="VLLM_BIPOLAR_SKIP_SERVE_TEST=1")
def test_serve_check_tiny(tmp_path):
    pytest.importorskip("vllm")
    out = tmp_path / "serve_check.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "serve_check.py"), "--tiny", str(tmp_path / "model"),
           "--eager", "--max-tokens", "8", "--json", str(out), "--startup-timeout", "600", "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
    log = proc.stdout[-6000:] + proc.stderr[-4000:]
    assert out.is_file(), log
    res = json.loads(out.read_text())
    failed = [r for r in res["checks"] if not r["ok"]]
    assert not failed, failed
    names = " | ".join(r["check"] for r in res["checks"])
    for part in ("/v1/models", "completion stream", "chat stream", "max_tokens -1", "unknown model",
                 "after the bad requests: same greedy text", "stops on SIGINT"):
        assert part in names, part
    assert res["texts"]["completion"].strip() and res["texts"]["chat"].strip()
    assert res["git_commit"] and res["server_command"].startswith("vllm serve") and res["device"] == "cpu"
    assert "--chat-template" in res["server_command"]
    assert proc.returncode == 0 and res["passed"], log

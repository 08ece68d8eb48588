"""vLLM on CPU: decode throughput of one bipolar checkpoint per kernel backend (``torch``: the bit planes
dequantized at every call; ``torch_dense``: dequantized once at load) against the unquantized model.

    python benchmarks/cpu_backends.py --bipolar .models/smollm2-w4a16-g128-mse --unquantized .models/smollm2 \
        [--backends torch torch_dense] [--batches 1 8] [--gen 32] [--out benchmarks/results/cpu_backends_smollm2.json]

One engine per (model, backend), each in its own process (``VLLM_BIPOLAR_KERNEL`` set for it). Per engine:
greedy decode of ``--gen`` tokens (ignore_eos) for each batch size, tokens/s over the generate call, the
engine start time, and the answer to "The capital of France is" (the real model says "Paris"). Rows:
``model, backend, batch, tokens_per_s, load_s, answer, token_ids`` (the batch-1 tokens, to compare
backends), ``device, threads, commit, command``. Needs vllm (CPU) in this Python; sets
VLLM_CPU_KVCACHE_SPACE=1 when unset.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

PROMPT = "The capital of France is"


def one(model: str, batches: list[int], gen: int) -> dict:
    """Runs in the child process: one engine, every batch size."""
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=model, max_model_len=512, seed=0)
    load_s = time.perf_counter() - t0
    answer = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=8))[0].outputs[0].text
    runs = {}
    for b in batches:
        params = SamplingParams(temperature=0.0, max_tokens=gen, ignore_eos=True)
        prompts = [f"{PROMPT} {i}" for i in range(b)]
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params)
        dt = time.perf_counter() - t0
        runs[b] = {"tokens_per_s": sum(len(o.outputs[0].token_ids) for o in outs) / dt,
                   "token_ids": list(outs[0].outputs[0].token_ids)}
    return {"load_s": load_s, "answer": answer, "runs": runs}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bipolar", required=True, help="bipolar checkpoint")
    ap.add_argument("--unquantized", default=None, help="the same model unquantized (baseline), optional")
    ap.add_argument("--backends", nargs="+", default=["torch", "torch_dense"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--gen", type=int, default=32, help="generated tokens per sequence")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu_backends.json"))
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child: MODEL, result JSON on stdout
    args = ap.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(one(args.one, args.batches, args.gen)), flush=True)
        return 0
    import torch
    from torch_path import run_meta, write_rows

    device, commit, command = run_meta(argv)
    engines = [(args.bipolar, b) for b in args.backends] + ([(args.unquantized, "unquantized")] if args.unquantized else [])
    rows = []
    print(f"{'backend':>12} {'batch':>5} {'tok/s':>8} {'load s':>7}  answer")
    for model, backend in engines:
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        env.pop("VLLM_BIPOLAR_KERNEL", None)
        if backend != "unquantized":
            env["VLLM_BIPOLAR_KERNEL"] = backend
        cmd = [sys.executable, str(Path(__file__).resolve()), "--bipolar", args.bipolar, "--one", model,
               "--gen", str(args.gen), "--batches", *map(str, args.batches)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{backend}: engine failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}", file=sys.stderr)
            return 1
        res = json.loads(lines[-1][len("RESULT "):])
        for b in args.batches:
            run = res["runs"][str(b)]
            print(f"{backend:>12} {b:5d} {run['tokens_per_s']:8.1f} {res['load_s']:7.1f}  {res['answer']!r}")
            rows.append({"model": Path(model).name, "backend": backend, "batch": b,
                         "tokens_per_s": run["tokens_per_s"], "load_s": res["load_s"], "answer": res["answer"],
                         "token_ids": run["token_ids"], "device": device, "threads": torch.get_num_threads(),
                         "commit": commit, "command": command})
    write_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""End-to-end vLLM benchmark: decode and prefill throughput of bipolar checkpoints against fp16, fp8 and
GPTQ-Marlin, on model shapes written by benchmarks/make_shapes.py (random weights).

    python benchmarks/e2e.py --shape llama2-7b --methods fp16 fp8 gptq W4A16 W2A16 W2A2
    python benchmarks/e2e.py --shape tiny --methods fp16 W4A16 --batches 1 2 --gen 8 --prompt 16 --prefill 64 2

One engine per method, each in its own process (GPU memory is released between them). Per method:
decode throughput (``--prompt`` random prompt tokens, ``--gen`` generated with ignore_eos, greedy)
at each ``--batches`` size, and prefill throughput (``--prefill LEN BATCH`` prompt tokens, 1
generated). Each row records vLLM's reported weight memory ("Model loading took ... GiB"), the proof
that a quantized method really ran with quantized weights. Writes benchmarks/results/e2e_<gpu>.json
rows with keys model, method, w_bits, a_bits, batch, phase, tokens_per_s, weight_gib, device,
commit, command, and prints a table with the speedup over fp16.
Methods: fp16, fp8 (vLLM's dynamic W8A8 on the fp16 model), gptq (GPTQ-Marlin W4 g128 from real
random tensors), and WxAy for bipolar (x in 1..8, y in 1..8 or 16).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def prepare(method: str, shape: str, work: Path) -> tuple[Path, dict]:
    """Checkpoint directory and LLM kwargs for one method."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from make_shapes import main as make

    if method in ("fp16", "fp8"):
        path = work / f"{shape}-fp16"
        make([str(path), "--shape", shape, "--method", "fp16"])
        return path, {"load_format": "dummy", **({"quantization": "fp8"} if method == "fp8" else {})}
    if method == "gptq":
        path = work / f"{shape}-gptq"
        if not (path / "model.safetensors.index.json").exists():
            make([str(path), "--shape", shape, "--method", "gptq"])
        return path, {"quantization": "gptq_marlin"}
    m = re.fullmatch(r"W(\d)A(\d+)", method)
    if not m:
        raise SystemExit(f"unknown method {method!r}: fp16, fp8, gptq or WxAy (bipolar)")
    w_bits, a_bits = int(m.group(1)), int(m.group(2))
    path = work / f"{shape}-bipolar-w{w_bits}a{a_bits}"
    make([str(path), "--shape", shape, "--method", "bipolar", "--w-bits", str(w_bits), "--a-bits", str(a_bits)])
    return path, {"load_format": "dummy", "quantization": "bipolar"}


def run_one(args) -> int:
    """Child process: one engine, every phase; prints one JSON line per row."""
    import random

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    path, kwargs = prepare(args.one, args.shape, Path(args.work))
    max_len = max(args.prompt + args.gen, args.prefill[0] + 1) + 16
    llm = LLM(model=str(path), max_model_len=max_len, skip_tokenizer_init=True, seed=0, enforce_eager=args.eager,
              max_num_seqs=max(max(args.batches), args.prefill[1]), **kwargs)
    vocab = llm.llm_engine.model_config.get_vocab_size()
    rng = random.Random(0)

    def prompts(n, length):
        return [TokensPrompt(prompt_token_ids=[rng.randrange(3, vocab) for _ in range(length)]) for _ in range(n)]

    def timed(ps, max_tokens):
        sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
        llm.generate(ps[:1], sp, use_tqdm=False)  # warm-up of this shape
        t0 = time.perf_counter()
        outs = llm.generate(ps, sp, use_tqdm=False)
        return time.perf_counter() - t0, sum(len(o.outputs[0].token_ids) for o in outs)

    rows = []
    for b in args.batches:
        dt, n = timed(prompts(b, args.prompt), args.gen)
        rows.append({"phase": "decode", "batch": b, "tokens_per_s": n / dt})
    length, b = args.prefill
    dt, _ = timed(prompts(b, length), 1)
    rows.append({"phase": "prefill", "batch": b, "tokens_per_s": b * length / dt})
    for r in rows:
        print("E2E_ROW " + json.dumps(r), flush=True)
    return 0


def bits_of(method: str) -> tuple[int, int]:
    m = re.fullmatch(r"W(\d)A(\d+)", method)
    if m:
        return int(m.group(1)), int(m.group(2))
    return {"fp16": (16, 16), "fp8": (8, 8), "gptq": (4, 16)}[method]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="llama2-7b", help="make_shapes.py shape: llama2-7b, llama3-8b, tiny")
    ap.add_argument("--methods", nargs="+", default=["fp16", "fp8", "gptq", "W8A16", "W4A16", "W3A16", "W2A16",
                                                     "W1A16", "W4A8", "W2A8", "W2A4", "W2A2"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64, 256])
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens of the decode runs")
    ap.add_argument("--gen", type=int, default=256, help="generated tokens of the decode runs")
    ap.add_argument("--prefill", nargs=2, type=int, default=[2048, 16], metavar=("LEN", "BATCH"))
    ap.add_argument("--eager", action="store_true", help="enforce_eager (no torch.compile / CUDA graphs)")
    ap.add_argument("--work", default="/tmp/bipolar-e2e", help="where the shape checkpoints go")
    ap.add_argument("--out", default=None)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process: one method
    args = ap.parse_args(argv)
    if args.one:
        return run_one(args)
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    gpu = "h200" if "H200" in device else ("h100" if "H100" in device else device.split()[-1].lower())
    commit = os.environ.get("BIPOLAR_COMMIT") or subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    command = " ".join([Path(sys.executable).name, *sys.argv])
    rows = []
    for method in args.methods:
        child = [sys.executable, __file__, "--one", method, "--shape", args.shape, "--work", args.work,
                 "--prompt", str(args.prompt), "--gen", str(args.gen), "--prefill", *map(str, args.prefill),
                 "--batches", *map(str, args.batches)] + (["--eager"] if args.eager else [])
        proc = subprocess.run(child, capture_output=True, text=True)
        got = [json.loads(line[8:]) for line in proc.stdout.splitlines() if line.startswith("E2E_ROW ")]
        if proc.returncode != 0 or not got:
            print(f"{method}: failed (exit {proc.returncode})\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        w_bits, a_bits = bits_of(method)
        # vLLM's engine process logs the weight memory: "Model loading took 3.52 GiB memory ..."
        loads = re.findall(r"Model loading took ([\d.]+) ?GiB", proc.stdout + proc.stderr)
        for r in got:
            r["weight_gib"] = float(loads[-1]) if loads else None
            rows.append({"model": args.shape, "method": method, "w_bits": w_bits, "a_bits": a_bits, **r,
                         "device": device, "commit": commit, "command": command})
    fp16 = {(r["phase"], r["batch"]): r["tokens_per_s"] for r in rows if r["method"] == "fp16"}
    print(f"{'method':>8} {'phase':>8} {'batch':>6} {'tok/s':>10} {'x fp16':>7} {'weights GiB':>11}")
    for r in rows:
        base = fp16.get((r["phase"], r["batch"]))
        speed = f"{r['tokens_per_s'] / base:6.2f}x" if base else f"{'-':>7}"
        gib = f"{r['weight_gib']:.2f}" if r["weight_gib"] is not None else "-"
        print(f"{r['method']:>8} {r['phase']:>8} {r['batch']:6d} {r['tokens_per_s']:10.1f} {speed} {gib:>11}")
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"e2e_{gpu}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    print(f"wrote {out}")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())

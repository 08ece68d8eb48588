"""Tensor parallelism check on a multi-GPU machine: tp=2 must generate what tp=1 generates.

    python benchmarks/tp_equivalence.py [--work DIR] [--bits 4 2] [--tp 2] [--eager]

Builds a random Llama (head counts divisible by 2, a word-level tokenizer of its own, nothing from
a hub), converts it to bipolar W4A16 and W2A16 (group 128), and generates 4 prompts x 32 tokens
greedily at tensor_parallel_size 1 and 2 through `python -m quant_tools.generate` (one engine per
process). Token sequences must match, except after a position where tp=1's top-2 logprobs are
within a tie threshold (different reduction orders may flip a near-tie). Then a model whose
down_proj shard (K = intermediate / 2 = 1440) splits a 128-channel group must fail to load with
the plugin's shard-edge error. Writes benchmarks/results/tp_equivalence_<gpu>.json with the
command, commit and device.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

PROMPTS = ["the capital of france is", "water in the river", "the first people of the north",
           "music and history of the city"]
TIE = 0.05  # logprob gap below which a divergence is a tie, not an error


def build_model(path: Path, intermediate: int) -> Path:
    from conftest import make_tiny_llama
    from load_test import make_word_tokenizer

    path.mkdir(parents=True, exist_ok=True)
    vocab = make_word_tokenizer(path)
    make_tiny_llama(path, hidden=1024, intermediate=intermediate, layers=4, heads=16, kv_heads=8, vocab=vocab)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(bos_token_id=1, eos_token_id=2)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def convert(src: Path, dst: Path, bits: int) -> Path:
    from quant_tools.convert import main

    if not (dst / "config.json").exists():
        assert main([str(src), str(dst), "--w-bits", str(bits), "--group-size", "128", "--no-progress"]) == 0
    return dst


def generate(model: Path, tp: int, out: Path, eager: bool) -> tuple[int, list | None, str]:
    cmd = [sys.executable, "-m", "quant_tools.generate", str(model), "--max-tokens", "32", "--logprobs", "2",
           "--max-model-len", "256", "--dtype", "float16", "--tensor-parallel-size", str(tp), "--json", str(out)]
    if eager:
        cmd.append("--eager")
    for prompt in PROMPTS:
        cmd += ["--prompt", prompt]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    return proc.returncode, json.loads(out.read_text()) if proc.returncode == 0 else None, log


def compare(ref: list, got: list) -> list[dict]:
    """Per prompt: first divergence (None if identical) and whether it follows a logit tie."""
    rows = []
    for r, g in zip(ref, got):
        i = next((j for j, (a, b) in enumerate(zip(r["token_ids"], g["token_ids"])) if a != b), None)
        gap = None if i is None else r["top_logprobs"][i][0] - r["top_logprobs"][i][1]
        rows.append({"prompt": r["prompt"], "diverges_at": i, "top2_gap": gap,
                     "ok": i is None or gap < TIE, "tp1": r["text"], "tp2": g["text"]})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=None, help="folder for the models (default: a temporary one)")
    ap.add_argument("--bits", nargs="+", type=int, default=[4, 2])
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--eager", action="store_true", help="enforce_eager (faster engine start, no CUDA graphs)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    import torch

    work = Path(args.work or tempfile.mkdtemp(prefix="bipolar-tp-"))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    gpus = torch.cuda.device_count()
    if gpus < args.tp:
        print(f"needs {args.tp} GPUs, found {gpus}", file=sys.stderr)
        return 2
    src = build_model(work / "random-llama", intermediate=2816)
    result = {"device": f"{gpus} x {device}", "commit": os.environ.get("BIPOLAR_COMMIT", "unknown"),
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "eager": args.eager, "models": []}
    ok = True
    for bits in args.bits:
        model = convert(src, work / f"w{bits}a16", bits)
        runs = {}
        for tp in (1, args.tp):
            rc, res, log = generate(model, tp, work / f"w{bits}-tp{tp}.json", args.eager)
            if rc != 0:
                print(log[-3000:])
                raise SystemExit(f"W{bits}A16 tp={tp}: generation failed")
            runs[tp] = res
        rows = compare(runs[1], runs[args.tp])
        ok &= all(r["ok"] for r in rows)
        result["models"].append({"w_bits": bits, "a_bits": 16, "group_size": 128, "prompts": rows})
        for r in rows:
            print(f"W{bits}A16 {'OK ' if r['ok'] else 'BAD'} diverges at {r['diverges_at']} "
                  f"(gap {r['top2_gap']}): {r['prompt']!r} -> {r['tp2'][:60]!r}")
    # shard-edge error: down_proj K = 2880 / 2 = 1440, not a multiple of the 128-channel group
    bad = convert(build_model(work / "random-llama-2880", intermediate=2880), work / "w4-2880", 4)
    rc, _, log = generate(bad, args.tp, work / "bad.json", True)
    lines = [ln for ln in log.splitlines() if "tensor-parallel" in ln or "tensor parallel" in ln]
    result["shard_edge_error"] = {"exit_code": rc, "message": lines[-1][-600:] if lines else log[-600:]}
    ok &= rc != 0 and bool(lines)
    print(f"shard edge (intermediate 2880, tp={args.tp}): exit {rc}: {result['shard_edge_error']['message'][:300]}")
    gpu = "h200" if "H200" in device else ("h100" if "H100" in device else "gpu")
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"tp_equivalence_{gpu}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    result["passed"] = bool(ok)
    out.write_text(json.dumps(result, indent=1))
    print(f"{'PASSED' if ok else 'FAILED'}; wrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

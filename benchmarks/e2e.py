"""End-to-end vLLM benchmark: decode and prefill throughput of bipolar checkpoints against fp16, fp8 and
GPTQ-Marlin, on model shapes written by benchmarks/make_shapes.py (random weights).

    python benchmarks/e2e.py --shape llama2-7b --methods fp16 fp8 gptq W8A16 --deadline-s 420 --kill-at-s 570
    python benchmarks/e2e.py --shape llama2-7b --methods W4A16 W2A16 --profile W4A16 W2A16
    python benchmarks/e2e.py --shape tiny --methods fp16 W4A16 --batches 1 2 --gen 8 --prompt 16 --prefill 64 2 --eager

One engine per method, each in its own process (GPU memory is released between them). Per method:
decode throughput (``--prompt`` random prompt tokens, ``--gen`` generated with ignore_eos, greedy)
at each ``--batches`` size, and prefill throughput (``--prefill LEN BATCH`` prompt tokens, 1
generated). CUDA graphs are captured only for ``--capture-sizes`` (default: the decode batch
sizes), which keeps an engine start short; torch.compile stays on unless ``--eager``.

Each row records vLLM's reported weight memory ("Model loading took ... GiB"), the weight memory
expected from the shape and the method's bits, the engine start time and the linear kernel vLLM
or the plugin logged (``kernel_log``): the proof that a quantized method really ran quantized.
Rows go to benchmarks/results/e2e_<gpu>.json (keys model, method, w_bits, a_bits, batch, phase,
tokens_per_s, device, commit, command and more); with ``--merge`` (default) rows of other
(model, method) pairs already in the file are kept, so a long method list can be spread over
several calls (``--deadline-s``). The file is rewritten after every method.

``--profile METHOD ...``: for those methods, after the throughput runs, one decode step at batch ``--profile-batch`` (default 1)
is profiled (torch.profiler with CUDA + CPU activities, started and stopped inside the engine's worker
through collective_rpc): per-kernel GPU time of ``--profile-steps`` decode steps, i.e. a generate of 1 + steps tokens minus
a generate of 1 token on the same prompt, grouped into categories; written to
benchmarks/results/e2e_profile_<gpu>.json.
Methods: fp16, fp8 (vLLM's dynamic W8A8 on the fp16 model), gptq (GPTQ W4 g128 from real random
tensors, quantization="gptq_marlin": vLLM picks the kernel, Machete on an H100), gptq-marlin (the same
checkpoint with linear_backend="marlin": the Marlin kernel), and WxAy for bipolar (x in 1..8, y in 1..8
or 16); WxAyv2 is the same in checkpoint format version 2 (8-bit scale/offset codes with per-row steps).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

DEFAULT_METHODS = ["fp16", "fp8", "gptq", "gptq-marlin", "W8A16", "W4A16", "W3A16", "W2A16", "W1A16", "W4A8", "W2A8", "W2A4",
                   "W2A2"]
GROUP_SIZE = 128  # make_shapes.py's default for bipolar and GPTQ
GIB = 1024 ** 3


# ---------------------------------------------------------------------------------------------- methods

def bits_of(method: str) -> tuple[int, int]:
    m = re.fullmatch(r"W(\d)A(\d+)(v2)?", method)
    if m:
        return int(m.group(1)), int(m.group(2))
    if method not in ("fp16", "fp8", "gptq", "gptq-marlin"):
        raise SystemExit(f"unknown method {method!r}: fp16, fp8, gptq, gptq-marlin or WxAy[v2] (bipolar)")
    return {"fp16": (16, 16), "fp8": (8, 8), "gptq": (4, 16), "gptq-marlin": (4, 16)}[method]


def format_version_of(method: str) -> int:
    """Checkpoint format version of a bipolar method name (WxAy: 1, WxAyv2: 2)."""
    return 2 if method.endswith("v2") else 1


def prepare(method: str, shape: str, work: Path) -> tuple[Path, dict]:
    """Checkpoint directory and LLM kwargs for one method."""
    from make_shapes import main as make

    if method in ("fp16", "fp8"):
        path = work / f"{shape}-fp16"
        make([str(path), "--shape", shape, "--method", "fp16"])
        return path, {"load_format": "dummy", **({"quantization": "fp8"} if method == "fp8" else {})}
    if method in ("gptq", "gptq-marlin"):
        path = work / f"{shape}-gptq"
        if not (path / "model.safetensors.index.json").exists():
            # In a process of its own: writing ~4 GB of random GPTQ tensors runs torch's CPU thread
            # pools in this process, and vLLM then forks its engine core from it. On the H100 the
            # engine core of this method (only) hung in init_device, allocating pinned memory
            # (vllm/v1/worker/gpu/buffer_utils.py; faulthandler stacks in
            # benchmarks/results/e2e_logs_h100/llama2-7b-gptq-hang.log): a lock held across the fork is the
            # likely cause, so the fork now happens from a process that never ran those pools.
            subprocess.run([sys.executable, str(Path(__file__).with_name("make_shapes.py")), str(path),
                            "--shape", shape, "--method", "gptq"], check=True)
        marlin = {"linear_backend": "marlin"} if method == "gptq-marlin" else {}
        return path, {"quantization": "gptq_marlin", **marlin}
    w_bits, a_bits = bits_of(method)
    version = format_version_of(method)
    path = work / (f"{shape}-bipolar-w{w_bits}a{a_bits}" + ("" if version == 1 else f"-v{version}"))
    make([str(path), "--shape", shape, "--method", "bipolar", "--w-bits", str(w_bits), "--a-bits", str(a_bits),
          "--format-version", str(version)])
    return path, {"load_format": "dummy", "quantization": "bipolar"}


# ------------------------------------------------------------------------------ expected weight memory

def weight_bytes(shape: str, method: str, group_size: int = GROUP_SIZE) -> tuple[float, float]:
    """(expected, target) bytes of a method's weights on the GPU, from the shape alone.

    Unquantized tensors (embeddings, lm_head, norms, rotary cache; every tensor for fp16) take 2 bytes per
    parameter. The decoder's linear layers take: fp8 1 byte; gptq and bipolar w_bits/8 bytes, plus
    per group of ``group_size`` input channels and output row, 2 fp16 (bipolar: scale and offset;
    gptq: the scale and the 4-bit zero point, counted as one more fp16); bipolar format version 2 (WxAyv2):
    2 bytes per group and row (8-bit codes) plus 2 fp16 steps per row. ``target`` is the issue's
    yardstick: the linears at bits/16 of their fp16 size, without scales, plus the unquantized rest.
    """
    from make_shapes import SHAPES, base_config, linear_shapes

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}")
    cfg = base_config(shape)
    h, v, layers = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    linears = [(n, k) for n, k in linear_shapes(cfg).values()]
    linear_params = layers * sum(n * k for n, k in linears)
    group_rows = layers * sum(n * -(-k // group_size) for n, k in linears)  # (group, row) pairs
    head_dim = h // cfg["num_attention_heads"]
    # embed_tokens, lm_head (untied), norms, and the rotary cos/sin cache (a buffer of max_position x head_dim)
    other_params = 2 * v * h + (2 * layers + 1) * h + cfg["max_position_embeddings"] * head_dim
    w_bits, _ = bits_of(method)
    rest = 2.0 * other_params
    if method == "fp16":
        return rest + 2.0 * linear_params, rest + 2.0 * linear_params
    target = rest + linear_params * w_bits / 8
    if method == "fp8":
        return target, target
    if format_version_of(method) == 2:
        rows = layers * sum(n for n, _ in linears)
        return target + 2.0 * group_rows + 4.0 * rows, target
    return target + 4.0 * group_rows, target


# ------------------------------------------------------------------------------------------ log parsing

# vLLM 0.26 and 0.32: "Model loading took 3.52 GiB memory and 12.3 seconds" (gpu_model_runner.py) or
# "Model loading took 3.52 GiB and 12.3 seconds" (the v2 model runner); older releases printed
# "Loading model weights took 3.52 GB". vLLM's CPU model runner prints neither.
LOAD_RE = re.compile(r"(?:Model loading|Loading model weights) took ([\d.]+) ?(GiB|GB)")
COMPILE_RE = re.compile(r"torch\.compile took ([\d.]+) s in total")
CAPTURE_RE = re.compile(r"Graph capturing finished in ([\d.]+) secs?")
KERNEL_RES = (
    re.compile(r"Using \w+ for \w+LinearMethod"),           # GPTQ/AWQ: "Using MarlinLinearKernel for AutoGPTQLinearMethod"
    re.compile(r"Selected \w+ for [\w.]+"),                  # fp8 / int8 scaled-mm kernels
    re.compile(r"bipolar: \S+ runs on kernel backend '[^']+'(?: \([^)]*\))?"),  # this plugin
)


def parse_log(text: str) -> dict:
    """Weight memory, torch.compile and graph-capture seconds, and the linear kernels chosen, from an engine log."""
    out: dict = {"weight_gib": None, "compile_s": None, "graph_capture_s": None, "kernel_log": None}
    loads = LOAD_RE.findall(text)
    if loads:
        value, unit = loads[-1]
        out["weight_gib"] = round(float(value) * (1e9 / GIB if unit == "GB" else 1.0), 3)
    if m := COMPILE_RE.findall(text):
        out["compile_s"] = float(m[-1])
    if m := CAPTURE_RE.findall(text):
        out["graph_capture_s"] = float(m[-1])
    seen: list[str] = []
    for rx in KERNEL_RES:
        for hit in rx.findall(text):
            if hit not in seen:
                seen.append(hit)
    if seen:
        out["kernel_log"] = "; ".join(seen)
    return out


# ------------------------------------------------------------------------------------------- profiling

# First match wins, so the order matters: every kernel of this plugin lives in namespace bipolar (its
# dequantize and activation-quantize kernels are not GEMMs), FlashAttention-3 kernels are cutlass
# templates. Inside CUDA graphs there is no CPU op to attribute a kernel to: names are all there is, so
# the elementwise kernels of a WpAq layer's per-token fake quantization count as "other".
CATEGORIES = [
    ("dequantize", re.compile(r"dequant", re.IGNORECASE)),
    ("act quantize", re.compile(r"quant", re.IGNORECASE)),
    ("bipolar gemm", re.compile(r"gemm_a16|gemm_mid_a16|gemv_a16|gemm_binary|bipolar", re.IGNORECASE)),
    ("attention", re.compile(r"flash|fmha|attn|attention|paged|reshape_and_cache|kv_cache|merge_attn", re.IGNORECASE)),
    ("norm/rope/activation", re.compile(r"norm|rsqrt|rotary|rope|cos_sin|silu|gelu|act_and_mul|swiglu", re.IGNORECASE)),
    ("sampling", re.compile(r"argmax|arg_max|topk|top_k|top_p|sampl|gumbel|multinomial|softmax|sort", re.IGNORECASE)),
    ("cuBLAS/gemm", re.compile(r"gemm|gemv|cublas|cutlass|nvjet|xmma|marlin|sm90_|sm80_|s16816|matmul|scaled_mm|"
                               r"splitk|\baten::(mm|addmm|bmm|baddbmm|linear)\b", re.IGNORECASE)),
    ("memcpy", re.compile(r"memcpy|memset", re.IGNORECASE)),
]


def categorize(name: str) -> str:
    for cat, rx in CATEGORIES:
        if rx.search(name):
            return cat
    return "other"


def kernel_times(prof) -> tuple[str, dict[str, list[float]]]:
    """("cuda", {kernel: [calls, us]}) from a torch.profiler run; ("cpu", {op: [calls, self us]}) when it
    recorded no GPU activity (CPU-only runs)."""
    times: dict[str, list[float]] = {}
    for e in prof.events():
        dtype = str(getattr(e, "device_type", ""))
        if not dtype.endswith("CUDA"):
            continue
        tr = getattr(e, "time_range", None)
        us = tr.elapsed_us() if tr is not None else float(getattr(e, "device_time", 0.0) or 0.0)
        t = times.setdefault(e.name, [0, 0.0])
        t[0] += 1
        t[1] += us
    if times:
        return "cuda", times
    for avg in prof.key_averages():
        us = float(getattr(avg, "self_cpu_time_total", 0.0) or 0.0)
        if us > 0:
            times[avg.key] = [avg.count, us]
    return "cpu", times


def decode_profile(first: dict[str, list[float]], full: dict[str, list[float]], steps: int) -> list[dict]:
    """Per-kernel rows of ``steps`` decode steps: a generate of 1 + steps tokens (``full``) minus a
    generate of 1 token (``first``: prompt, prefill, first token) on the same prompt."""
    rows = []
    for name, (calls, us) in full.items():
        c0, u0 = first.get(name, (0, 0.0))
        d_calls, d_us = calls - c0, us - u0
        if d_us <= 0 and d_calls <= 0:
            continue
        rows.append({"kernel": name, "category": categorize(name), "calls": int(max(d_calls, 0)),
                     "us": round(max(d_us, 0.0), 2)})
    total = sum(r["us"] for r in rows) or 1.0
    for r in rows:
        r["share"] = round(r["us"] / total, 5)
        r["per_step_us"] = round(r["us"] / steps, 3)
    rows.sort(key=lambda r: -r["us"])
    return rows


def category_shares(rows: list[dict]) -> dict[str, dict]:
    cats: dict[str, dict] = {}
    for r in rows:
        c = cats.setdefault(r["category"], {"per_step_us": 0.0, "share": 0.0})
        c["per_step_us"] = round(c["per_step_us"] + r["per_step_us"], 3)
        c["share"] = round(c["share"] + r["share"], 5)
    return dict(sorted(cats.items(), key=lambda kv: -kv[1]["share"]))


# --------------------------------------------------------------------------------------------- merging

def merge_rows(old: list[dict], new: list[dict], replaced: set[tuple[str, str]]) -> list[dict]:
    """Rows of ``old`` whose (model, method) is not in ``replaced``, then ``new``."""
    return [r for r in old if (r.get("model"), r.get("method")) not in replaced] + list(new)


def read_json(path: Path, default):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default
    except (OSError, json.JSONDecodeError) as exc:
        raise SystemExit(f"{path}: cannot read the existing results ({exc}); move it away or pass --no-merge")


def write_json(path: Path, data, mirror: str | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
    if mirror:
        Path(mirror).mkdir(parents=True, exist_ok=True)
        if (Path(mirror) / path.name).resolve() != path.resolve():  # --out inside --mirror: already there
            shutil.copy(path, Path(mirror) / path.name)


# ----------------------------------------------------------------------------------------------- child

RECORDS: Path | None = None  # the child's output file (--records), one JSON object per line


def emit(tag: str, obj) -> None:
    """One record for the parent, in a file of its own (the engine's processes share the child's stdout)."""
    with open(RECORDS, "a") as f:
        f.write(json.dumps({"tag": tag, **obj}) + "\n")
    print(f"{tag}: {json.dumps(obj)[:200]}", flush=True)


def param_bytes(model) -> int:
    """Bytes of the model's parameters and buffers, each storage once (the KV cache is neither)."""
    import torch

    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            s = t.untyped_storage()
            key = (str(t.device), s.data_ptr())
            if key not in seen:
                seen.add(key)
                total += s.nbytes()
    return total


def run_one(args) -> int:
    """Child process: one engine, every phase; writes META, ROW and PROFILE records to --records."""
    import random

    global RECORDS
    RECORDS = Path(args.records)

    t0 = time.perf_counter()
    path, kwargs = prepare(args.one, args.shape, Path(args.work))
    prepare_s = time.perf_counter() - t0

    import torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    if not args.eager:
        cc = {"cudagraph_capture_sizes": sorted(set(args.capture_sizes))}
        if args.no_compile:  # no inductor; full CUDA graphs (which need no compilation) for uniform decode batches
            cc.update(mode=0, cudagraph_mode="FULL_DECODE_ONLY")
        kwargs["compilation_config"] = cc
    max_len = max(args.prompt + args.gen, args.prefill[0] + 1, args.prompt + 1 + args.profile_steps) + 16
    t1 = time.perf_counter()
    llm = LLM(model=str(path), max_model_len=max_len, skip_tokenizer_init=True, seed=0, enforce_eager=args.eager,
              max_num_seqs=max(max(args.batches), args.prefill[1]), **kwargs)
    engine_start_s = time.perf_counter() - t1
    try:
        import e2e  # by reference: pickle finds e2e.param_bytes in the engine's process (benchmarks/ on PYTHONPATH)

        param_gib = round(sum(llm.apply_model(e2e.param_bytes)) / GIB, 6)
    except Exception as exc:  # noqa: BLE001 - informational only (needs VLLM_ALLOW_INSECURE_SERIALIZATION=1 multiprocess)
        print(f"apply_model failed: {exc}", file=sys.stderr)
        param_gib = None
    emit("META", {"device": device_name(),  # nvidia-smi: no CUDA context in this (front-end) process
                  "vllm": getattr(vllm, "__version__", "?"), "torch": torch.__version__,
                  "prepare_s": round(prepare_s, 1), "engine_start_s": round(engine_start_s, 1),
                  "param_gib": param_gib, "in_process": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"})
    vocab = llm.llm_engine.model_config.get_vocab_size()
    rng = random.Random(0)

    def prompts(n, length):
        return [TokensPrompt(prompt_token_ids=[rng.randrange(3, vocab) for _ in range(length)]) for _ in range(n)]

    def params(max_tokens):
        return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)

    def timed(b, length, max_tokens, tokens_of):
        """Median tokens/s of --repeats generates of b fresh prompts (after a warm-up of the same shape): one
        generate at batch 1 is ~1 s, and host time between decode steps varies by 10% from run to run."""
        sp = params(max_tokens)
        llm.generate(prompts(1, length), sp, use_tqdm=False)  # warm-up, a prompt of its own
        rates, times = [], []
        for _ in range(max(1, args.repeats)):
            ps = prompts(b, length)
            t = time.perf_counter()
            outs = llm.generate(ps, sp, use_tqdm=False)
            dt = time.perf_counter() - t
            rates.append(tokens_of(outs) / dt)
            times.append(round(dt, 3))
        return {"tokens_per_s": statistics.median(rates), "tokens_per_s_runs": [round(r, 2) for r in rates],
                "seconds": times}

    for b in args.batches:
        got = timed(b, args.prompt, args.gen, lambda outs: sum(len(o.outputs[0].token_ids) for o in outs))
        emit("ROW", {"phase": "decode", "batch": b, **got})
    length, b = args.prefill
    emit("ROW", {"phase": "prefill", "batch": b, **timed(b, length, 1, lambda outs: b * length)})

    if args.do_profile:
        try:
            emit("PROFILE", decode_step_profile(llm, params(1), params(1 + args.profile_steps),
                                                prompts(args.profile_batch, args.prompt), args.profile_steps))
        except Exception as exc:  # noqa: BLE001 - the throughput rows above stand without it
            import traceback

            traceback.print_exc()
            emit("PROFILE_ERROR", {"error": f"{type(exc).__name__}: {exc}"})
    return 0


def decode_step_profile(llm, first, full, prompt: list, steps: int) -> dict:
    """``steps`` decode steps at batch ``len(prompt)``: torch.profiler around a generate of 1 + steps tokens (``full``) and
    one of 1 token (``first``) on the same prompt, per kernel the difference; wall time per step unprofiled.

    The profiler runs where the kernels are launched, in the engine's worker, started and stopped by
    ``collective_rpc`` (functions of this module, pickled by reference), so the engine keeps its own
    process layout; with ``--profile-in-process`` the worker is this process."""
    import e2e  # by reference: the worker imports benchmarks/e2e.py (on PYTHONPATH) to find these functions

    def wall(sp):
        t = time.perf_counter()
        llm.generate(prompt, sp, use_tqdm=False)
        return time.perf_counter() - t

    wall(full)  # warm-up (and the prompt's blocks in the prefix cache, for every run below alike)
    t_first = statistics.median(wall(first) for _ in range(3))
    t_full = statistics.median(wall(full) for _ in range(3))
    got = []
    for sp in (first, full):
        llm.collective_rpc(e2e.worker_profile_start)
        try:
            llm.generate(prompt, sp, use_tqdm=False)
        finally:
            got.append(llm.collective_rpc(e2e.worker_profile_stop)[0])
    rows = decode_profile(got[0]["times"], got[1]["times"], steps)
    return {"steps": steps, "batch": len(prompt), "prompt": len(prompt[0]["prompt_token_ids"]), "source": got[1]["source"],
            "step_ms": round((t_full - t_first) / steps * 1e3, 4),
            "busy_us_per_step": round(sum(r["per_step_us"] for r in rows), 2), "kernels": rows}


_PROFILER = None  # the worker's running torch.profiler (worker_profile_start / worker_profile_stop)


def worker_profile_start(worker=None) -> bool:
    """In the engine's worker (collective_rpc): start torch.profiler, CPU + CUDA activities."""
    global _PROFILER
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    _PROFILER = profile(activities=acts)
    _PROFILER.start()
    return True


def worker_profile_stop(worker=None) -> dict:
    """In the engine's worker: stop the profiler; {"source": "cuda" | "cpu", "times": {name: [calls, us]}}."""
    global _PROFILER
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    prof, _PROFILER = _PROFILER, None
    prof.stop()
    source, times = kernel_times(prof)
    return {"source": source, "times": times}


# ---------------------------------------------------------------------------------------------- parent

def device_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], check=False,
                             capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return "cpu"


def gpu_label(device: str) -> str:
    if "H200" in device:
        return "h200"
    if "H100" in device:
        return "h100"
    return device.split()[-1].lower() if device else "cpu"


def git_commit() -> str:
    if os.environ.get("BIPOLAR_COMMIT"):
        return os.environ["BIPOLAR_COMMIT"]
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], check=False, capture_output=True,
                          text=True)
    if head.returncode != 0:
        return "unknown"
    dirty = subprocess.run(["git", "-C", str(ROOT), "diff", "--quiet", "HEAD", "--", "csrc", "vllm_bipolar"],
                           check=False, capture_output=True).returncode != 0
    return head.stdout.strip() + ("-dirty" if dirty else "")


def method_order(method: str) -> int:
    return DEFAULT_METHODS.index(method) if method in DEFAULT_METHODS else len(DEFAULT_METHODS)


def weight_check(r: dict) -> str:
    ratio = r.get("weight_ratio")
    if ratio is None:
        return "-"
    return "ok" if abs(ratio - 1.0) <= 0.10 else "OFF"


def print_tables(rows: list[dict]) -> None:
    """Throughput (tokens/s and speedup over fp16 of the same model) and one line per method on weights."""
    if not rows:
        return
    cols = sorted({(r["phase"], r["batch"]) for r in rows}, key=lambda c: (c[0] != "decode", c[1]))
    fp16 = {(r["model"], r["phase"], r["batch"]): r["tokens_per_s"] for r in rows if r["method"] == "fp16"}
    cell: dict = {}
    for r in rows:
        cell[(r["model"], r["method"], r["phase"], r["batch"])] = r
    pairs = sorted({(r["model"], r["method"]) for r in rows}, key=lambda p: (p[0], method_order(p[1]), p[1]))
    head = " ".join(f"{(p[:3] + ' b' + str(b)):>17}" for p, b in cols)
    print(f"\ntokens/s (x fp16)\n{'model':>10} {'method':>7} {head}")
    in_process = False
    for model, method in pairs:
        label = method
        if any(r.get("in_process") for r in rows if (r["model"], r["method"]) == (model, method)):
            label, in_process = method + "*", True
        cells = []
        for phase, b in cols:
            r = cell.get((model, method, phase, b))
            if r is None:
                cells.append(f"{'-':>17}")
                continue
            base = fp16.get((model, phase, b))
            x = f"{r['tokens_per_s'] / base:5.2f}x" if base else f"{'-':>6}"
            cells.append(f"{r['tokens_per_s']:10.1f} {x}")
        print(f"{model:>10} {label:>7} " + " ".join(cells))
    if in_process:
        print("* engine in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0, --profile-in-process)")
    print(f"\nweights (GiB): vLLM's 'Model loading took' (log), the model's parameter bytes (params), expected "
          f"from the shape (w_bits/8 per linear weight + 2 fp16 per group of {GROUP_SIZE} and row, 2 bytes elsewhere) "
          f"and the issue's target (no scales); check: the measured figure (log, else params) within 10% of expected\n"
          f"{'model':>10} {'method':>7} {'log':>8} {'params':>8} {'expect':>8} {'ratio':>6} {'target':>8} {'ratio':>6} "
          f"{'check':>5} {'start s':>7} {'commit':>14}  kernel")
    off = []
    for model, method in pairs:
        r = next(x for x in rows if (x["model"], x["method"]) == (model, method))

        def f(key, fmt, width, r=r):
            v = r.get(key)
            return format(v, fmt) if isinstance(v, (int, float)) else f"{'-':>{width}}"

        measured = r.get("weight_gib") if r.get("weight_gib") is not None else r.get("param_gib")
        t_ratio = measured / r["target_gib"] if measured and r.get("target_gib") else None
        check = weight_check(r)
        if check == "OFF":
            off.append(f"{model}/{method} ({r['weight_ratio']:.2f}x)")
        kern = (r.get("kernel_log") or "-")[:90]
        print(f"{model:>10} {method:>7} {f('weight_gib', '8.3f', 8)} {f('param_gib', '8.3f', 8)} "
              f"{f('expected_gib', '8.3f', 8)} {f('weight_ratio', '6.2f', 6)} {f('target_gib', '8.3f', 8)} "
              f"{(format(t_ratio, '6.2f') if t_ratio else '-'):>6} {check:>5} {f('engine_start_s', '7.1f', 7)} "
              f"{r.get('commit', '-')!s:>14}  {kern}")
    if off:
        print("weight memory not within 10% of expected: " + ", ".join(off))


def print_profile(summary: dict, kernels: list[dict], top: int = 12) -> None:
    print(f"\ndecode-step profile {summary['model']}/{summary['method']} (batch {summary.get('batch', 1)}, "
          f"{summary['steps']} steps, "
          f"{summary['source']}): step {summary['step_ms']:.3f} ms wall, "
          f"{summary['busy_us_per_step']:.1f} us busy per step")
    for cat, c in summary["categories"].items():
        print(f"  {cat:>22} {c['per_step_us']:10.1f} us/step {100 * c['share']:6.1f}%")
    print(f"  {'share':>6} {'us/step':>9} {'calls/step':>10} {'category':>20}  kernel")
    for r in kernels[:top]:
        print(f"  {100 * r['share']:5.1f}% {r['per_step_us']:9.2f} {r['calls'] / summary['steps']:10.2f} "
              f"{r['category']:>20}  {r['kernel'][:100]}")


def run_method(args, method: str, timeout: float | None, log_path: Path) -> tuple[int | str, str, list[dict]]:
    """Run one method's child process; (exit status or 'timeout', its log text, its records)."""
    records = log_path.with_suffix(".records.jsonl")
    records.unlink(missing_ok=True)
    child = [sys.executable, __file__, "--one", method, "--records", str(records), "--shape", args.shape,
             "--work", args.work,
             "--prompt", str(args.prompt), "--gen", str(args.gen), "--prefill", *map(str, args.prefill),
             "--batches", *map(str, args.batches), "--capture-sizes", *map(str, args.capture_sizes),
             "--profile-steps", str(args.profile_steps), "--profile-batch", str(args.profile_batch),
             "--repeats", str(args.repeats)]
    child += (["--eager"] if args.eager else []) + (["--no-compile"] if args.no_compile else [])
    # apply_model(param_bytes) into the engine's process: pickled by reference to this module
    path = os.pathsep.join([str(ROOT / "benchmarks")] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    # PYTHONFAULTHANDLER: on a timeout the group gets SIGABRT first, and every Python process of the
    # method (this script's child and vLLM's engine core) writes all its threads' stacks into the log:
    # where an engine start hangs.
    env = dict(os.environ, VLLM_ALLOW_INSECURE_SERIALIZATION="1", PYTHONPATH=path, PYTHONFAULTHANDLER="1")
    if method in args.profile:
        child.append("--do-profile")
        if args.profile_in_process:
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core and worker in the child process
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(child, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            status: int | str = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            status = "timeout"
            _stop_group(proc.pid, signal.SIGABRT, 10)  # stacks into the log (faulthandler), then SIGKILL
    # whatever of the engine outlived the child (its engine-core process) would hold GPU memory that the
    # next method's engine start counts on
    _stop_group(proc.pid, signal.SIGKILL, 30)
    got = [json.loads(line) for line in records.read_text().splitlines()] if records.exists() else []
    return status, log_path.read_text(errors="replace"), got


def _stop_group(pgid: int, sig: int, wait_s: float) -> None:
    """Send sig to the child's process group (its own session) and wait until the group is gone."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return
    end = time.monotonic() + wait_s
    while time.monotonic() < end:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    if sig != signal.SIGKILL:
        _stop_group(pgid, signal.SIGKILL, wait_s)


def main(argv=None) -> int:
    t_start = time.monotonic()
    wall_start = time.time()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="llama2-7b", help="make_shapes.py shape: llama2-7b, llama3-8b, tiny")
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64, 256])
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens of the decode runs")
    ap.add_argument("--gen", type=int, default=256, help="generated tokens of the decode runs")
    ap.add_argument("--prefill", nargs=2, type=int, default=[2048, 16], metavar=("LEN", "BATCH"))
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed generates per (phase, batch); rows give the median tokens/s and every run's")
    ap.add_argument("--capture-sizes", nargs="+", type=int, default=None,
                    help="CUDA graph batch sizes to capture (compilation_config cudagraph_capture_sizes); "
                         "default: the --batches sizes")
    ap.add_argument("--eager", action="store_true", help="enforce_eager (no torch.compile / CUDA graphs)")
    ap.add_argument("--no-compile", action="store_true",
                    help="torch.compile off (compilation mode 0) but full CUDA graphs for decode batches "
                         "(cudagraph_mode FULL_DECODE_ONLY): a shorter engine start when the budget is tight")
    ap.add_argument("--merge", action=argparse.BooleanOptionalAction, default=True,
                    help="keep rows of other (model, method) pairs already in --out (default on)")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="skip methods that would start later than this many seconds after this script started")
    ap.add_argument("--kill-at-s", type=float, default=None,
                    help="stop a method still running this many seconds after this script started (reported failed)")
    ap.add_argument("--clock-start", type=float, default=None, metavar="EPOCH",
                    help="count --deadline-s and --kill-at-s from this Unix time (e.g. $(date +%%s) taken at the "
                         "start of a device call, before its setup) instead of from this script's start")
    ap.add_argument("--profile", nargs="*", default=[], metavar="METHOD",
                    help="methods (of --methods) whose decode step (at --profile-batch) is profiled after their runs")
    ap.add_argument("--profile-steps", type=int, default=16, help="decode steps in the profile")
    ap.add_argument("--profile-batch", type=int, default=1, help="sequences decoded together in the profile")
    ap.add_argument("--profile-in-process", action="store_true",
                    help="run the profiled methods' engines in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0): a "
                         "fallback should vLLM refuse to run this script's profiler functions in its engine process")
    ap.add_argument("--work", default="/tmp/bipolar-e2e", help="where the shape checkpoints go")
    ap.add_argument("--log-dir", default=None, help="one engine log per method (default: WORK/logs)")
    ap.add_argument("--out", default=None, help="results JSON (default benchmarks/results/e2e_<gpu>.json); the "
                                                "profile goes next to it as e2e_profile_<gpu>.json")
    ap.add_argument("--mirror", default=None, help="also copy the result files here after every method (e.g. $OUT)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process: one method
    ap.add_argument("--do-profile", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--records", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.capture_sizes is None:
        args.capture_sizes = sorted(set(args.batches))
    if args.one:
        return run_one(args)
    if args.clock_start is not None:
        t_start -= wall_start - args.clock_start  # the clock runs from then

    for m in args.methods:
        bits_of(m)  # refuses unknown names before anything runs
    stray = [m for m in args.profile if m not in args.methods]
    if stray:
        print(f"--profile {' '.join(stray)}: not in --methods, not profiled", file=sys.stderr)
    device = device_name()
    gpu = gpu_label(device)
    commit = git_commit()
    command = " ".join([Path(sys.executable).name, *(sys.argv if argv is None else [__file__, *argv])])
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"e2e_{gpu}.json")
    prof_out = out.with_name(out.name.replace("e2e_", "e2e_profile_", 1) if out.name.startswith("e2e_")
                             else out.stem + "_profile.json")
    rows = read_json(out, []) if args.merge else []
    profile = read_json(prof_out, {"steps": [], "kernels": []}) if args.merge else {"steps": [], "kernels": []}
    log_dir = Path(args.log_dir or Path(args.work) / "logs")
    done, failed, skipped = [], [], []
    for method in args.methods:
        elapsed = time.monotonic() - t_start
        if args.deadline_s is not None and elapsed > args.deadline_s:
            skipped.append(method)
            print(f"{method}: skipped (would start at {elapsed:.0f} s, after --deadline-s {args.deadline_s:.0f})",
                  flush=True)
            continue
        timeout = None if args.kill_at_s is None else args.kill_at_s - elapsed
        if timeout is not None and timeout <= 0:
            skipped.append(method)
            print(f"{method}: skipped (past --kill-at-s)", flush=True)
            continue
        t_method = time.monotonic()
        status, text, records = run_method(args, method, timeout, log_dir / f"{args.shape}-{method}.log")
        method_s = time.monotonic() - t_method
        lines = text.splitlines()
        got = [{k: v for k, v in r.items() if k != "tag"} for r in records if r["tag"] == "ROW"]
        meta = next((r for r in records if r["tag"] == "META"), {})
        prof = next((r for r in records if r["tag"] == "PROFILE"), None)
        log_name = log_dir / f"{args.shape}-{method}.log"
        if len(got) != len(args.batches) + 1:
            # incomplete: the rows already in the file for this method stay
            failed.append(method)
            tail = "\n".join(lines[-40:])
            print(f"{method}: failed ({'timed out' if status == 'timeout' else f'exit {status}'}, {method_s:.0f} s, "
                  f"{len(got)} of {len(args.batches) + 1} rows: {got}; log {log_name})\n{tail}", file=sys.stderr,
                  flush=True)
            continue
        if status != 0:  # every row came: a failure at shutdown
            print(f"{method}: exit {status} after its last row (kept; log {log_name})", file=sys.stderr, flush=True)
        w_bits, a_bits = bits_of(method)
        info = parse_log(text)
        expected, target = weight_bytes(args.shape, method)
        common = {"model": args.shape, "method": method, "w_bits": w_bits, "a_bits": a_bits}
        extra = {
            "weight_gib": info["weight_gib"], "expected_gib": round(expected / GIB, 6),
            "target_gib": round(target / GIB, 6),
            "param_gib": meta.get("param_gib"), "weight_from": None, "weight_ratio": None,
            "kernel_log": info["kernel_log"],
            "engine_start_s": meta.get("engine_start_s"), "compile_s": info["compile_s"],
            "graph_capture_s": info["graph_capture_s"], "prepare_s": meta.get("prepare_s"),
            "method_s": round(method_s, 1), "prompt": args.prompt, "gen": args.gen, "eager": args.eager,
            "compile": not (args.eager or args.no_compile),
            "capture_sizes": None if args.eager else args.capture_sizes, "in_process": meta.get("in_process"),
            "vllm": meta.get("vllm"), "torch": meta.get("torch"),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        # the check uses vLLM's figure; the parameter bytes only where vLLM logs none (its CPU runner)
        measured = info["weight_gib"] if info["weight_gib"] is not None else extra["param_gib"]
        if measured is not None:
            extra["weight_from"] = "log" if info["weight_gib"] is not None else "params"
            extra["weight_ratio"] = round(measured * GIB / expected, 3)
        new = [{**common, **r, "device": meta.get("device", device), "commit": commit, "command": command, **extra}
               for r in got]
        rows = merge_rows(rows, new, {(args.shape, method)})
        write_json(out, rows, args.mirror)
        done.append(method)
        weights = (f"weights {measured:.3f} GiB ({extra['weight_from']}), {extra['weight_ratio']:.2f}x expected"
                   if measured is not None else "weights not measured")
        print(f"{method}: {len(got)} rows, engine start {meta.get('engine_start_s')} s, {method_s:.0f} s in all, "
              f"{weights}; {info['kernel_log'] or 'no kernel line in the log'}", flush=True)
        if prof is not None:
            key = {(args.shape, method)}
            summary = {**common, "steps": prof["steps"], "batch": prof["batch"], "prompt": prof["prompt"],
                       "source": prof["source"], "step_ms": prof["step_ms"],
                       "busy_us_per_step": prof["busy_us_per_step"], "categories": category_shares(prof["kernels"]),
                       "device": meta.get("device", device), "commit": commit, "command": command}
            kernels = [{**common, **k} for k in prof["kernels"]]
            profile = {"steps": merge_rows(profile.get("steps", []), [summary], key),
                       "kernels": merge_rows(profile.get("kernels", []), kernels, key)}
            write_json(prof_out, profile, args.mirror)
            print_profile(summary, kernels)
        elif method in args.profile:
            err = next((r["error"] for r in records if r["tag"] == "PROFILE_ERROR"), "see the log")
            print(f"{method}: no profile ({err}; log {log_name})", file=sys.stderr, flush=True)
    print_tables(rows)
    print(f"\nwrote {out}" + (f" and {prof_out}" if profile.get("steps") else "") +
          f"; this call: {len(done)} done, {len(failed)} failed, {len(skipped)} skipped, "
          f"{time.monotonic() - t_start:.0f} s")
    if skipped:
        print("SKIPPED (run them in another call; --merge keeps these rows): " + " ".join(skipped))
    if failed:
        print("FAILED: " + " ".join(failed))
    return 1 if failed or not done and not skipped else 0


if __name__ == "__main__":
    sys.exit(main())

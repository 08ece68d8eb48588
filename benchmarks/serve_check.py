"""Does `vllm serve DST --quantization bipolar` answer the OpenAI API correctly? A functional check.

    python benchmarks/serve_check.py [--model DST | --tiny DIR] [--device cpu|cuda] [--dtype D]
        [--max-model-len 512] [--max-tokens 16] [--eager] [--chat-template FILE] [--serve-arg ARG]
        [--json FILE]

Starts the OpenAI-compatible server on a free port of 127.0.0.1 (the server start, stop and tiny
model of benchmarks/load_test.py), waits for /health, then checks with plain HTTP (urllib):

- ``GET /v1/models`` lists the served model;
- ``POST /v1/completions``, non-streaming: status 200, non-empty text, ``max_tokens`` tokens
  (``ignore_eos``), usage prompt + completion = total and completion = the tokens returned; the
  same request again gives the same greedy text; streaming: the chunks put together give the same
  text, the stream ends with ``[DONE]`` and its usage chunk equals the non-streaming usage;
- ``POST /v1/chat/completions``, non-streaming and streaming, the same checks on the assistant
  message;
- bad requests (``max_tokens`` -1, a prompt longer than ``--max-model-len``, an unknown model)
  get a 4xx with an error body, and the server then still answers /health and the first request
  with the same text;
- the server stops on SIGINT (then SIGKILL after a timeout).

Prints a table and writes JSON (command, git commit, device, every check) to
``benchmarks/results/serve_check_<device>.json`` (``--json`` elsewhere). Exit status 0 when every
check passed, 1 otherwise, 2 when the server did not start. Without ``--model`` a tiny random
Llama with a word-level tokenizer is built and converted to bipolar W4A16; its tokenizer has no
chat template, so a one-line template is written and passed with ``--chat-template`` (a model with
its own template, like SmolLM2-Instruct, needs none). GPU example:
``python benchmarks/serve_check.py --model /tmp/bipolar-models/w4a16 --device cuda``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.load_test import (
    WORDS,
    Server,
    build_tiny_model,
    default_device,
    device_description,
    free_port,
    git_commit,
    serve_command,
    server_env,
)

SERVED_NAME = "bipolar-under-test"
TINY_CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
PROMPT_REAL = "The capital of France is"
CHAT_REAL = "What is the capital of France? Answer in one word."


# ---- HTTP -----------------------------------------------------------------------------------------
def http(base: str, method: str, path: str, body: dict | None = None, timeout: float = 300) -> tuple[int, object]:
    """(status, parsed JSON or text); 4xx/5xx come back as a status, not an exception."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    text = raw.decode(errors="replace")
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def stream(base: str, path: str, body: dict, timeout: float = 300) -> tuple[int, list[dict], bool, str]:
    """POST a streaming request: (status, the JSON chunks, whether it ended with [DONE], error text)."""
    req = urllib.request.Request(base + path, data=json.dumps(dict(body, stream=True)).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    chunks, done = [], False
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    done = True
                    break
                chunks.append(json.loads(payload))
            return r.status, chunks, done, ""
    except urllib.error.HTTPError as e:
        return e.code, chunks, done, e.read().decode(errors="replace")[:500]
    except (OSError, ValueError) as e:
        return 0, chunks, done, f"{type(e).__name__}: {e}"


def wait_healthy(base: str, server: Server, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if not server.alive():
            raise RuntimeError(f"the server exited with status {server.proc.returncode} while starting:\n"
                               + server.log_tail())
        with contextlib.suppress(OSError), urllib.request.urlopen(base + "/health", timeout=5) as r:
            if r.status == 200:
                return time.monotonic() - t0
        time.sleep(1.0)
    raise RuntimeError(f"the server did not answer /health within {timeout:.0f} s:\n" + server.log_tail())


# ---- checks ---------------------------------------------------------------------------------------
class Checks:
    def __init__(self):
        self.rows: list[dict] = []

    def add(self, name: str, ok: bool, detail: object = "") -> bool:
        self.rows.append({"check": name, "ok": bool(ok), "detail": detail if isinstance(detail, (str, int, float))
                          else json.dumps(detail, default=str)[:400]})
        return bool(ok)

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(r["ok"] for r in self.rows)


def usage_ok(usage: dict | None, completion_tokens: int) -> tuple[bool, str]:
    if not isinstance(usage, dict):
        return False, f"no usage: {usage!r}"
    p, c, t = usage.get("prompt_tokens"), usage.get("completion_tokens"), usage.get("total_tokens")
    ok = isinstance(p, int) and p > 0 and c == completion_tokens and t == p + c
    return ok, f"prompt {p} + completion {c} = total {t}; expected completion {completion_tokens}"


def counts(usage: dict | None) -> tuple | None:
    """The token counts of a usage object (streams and plain responses differ in the optional details)."""
    if not isinstance(usage, dict):
        return None
    return tuple(usage.get(k) for k in ("prompt_tokens", "completion_tokens", "total_tokens"))


def check_stream(ck, what: str, base: str, path: str, req: dict, timeout: float, piece, ref_text: str,
                 ref_usage: dict | None) -> str:
    """The streaming form of a request: ends with [DONE], same text (`piece` takes a chunk's choice to
    its text) and usage as the non-streaming answer (ref_text, ref_usage); returns the text."""
    status, chunks, done, err = stream(base, path, dict(req, stream_options={"include_usage": True}), timeout)
    text = "".join(piece(c["choices"][0]) or "" for c in chunks if c.get("choices"))
    usage = next((c["usage"] for c in reversed(chunks) if c.get("usage")), None)
    ck.add(f"{what}: HTTP 200, ends with [DONE]", status == 200 and done and not err,
           f"HTTP {status}, {len(chunks)} chunks, [DONE] {done} {err}")
    ck.add(f"{what}: same text as non-streaming", text == ref_text and bool(ref_text),
           "same" if text == ref_text else f"{text!r} vs {ref_text!r}")
    ck.add(f"{what}: usage equals non-streaming usage",
           ref_usage is not None and counts(usage) is not None and counts(usage) == counts(ref_usage),
           f"{counts(usage)} vs {counts(ref_usage)} (prompt, completion, total)")
    return text


def run_checks(base: str, server: Server, prompt: str, chat_text: str, max_tokens: int, max_model_len: int,
               timeout: float) -> tuple[Checks, dict]:
    ck, texts = Checks(), {}

    # /v1/models
    status, models = http(base, "GET", "/v1/models", timeout=timeout)
    ids = [m.get("id") for m in models.get("data", [])] if isinstance(models, dict) else []
    ck.add("GET /v1/models lists the model", status == 200 and SERVED_NAME in ids, f"HTTP {status}, ids {ids}")

    # completions
    req = {"model": SERVED_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
           "ignore_eos": True, "logprobs": 1}
    status, first = http(base, "POST", "/v1/completions", req, timeout)
    ok = status == 200 and isinstance(first, dict) and bool(first.get("choices"))
    ck.add("completion: HTTP 200", ok, f"HTTP {status}" + ("" if ok else f": {str(first)[:300]}"))
    text = first["choices"][0].get("text", "") if ok else ""
    n_tok = len((first["choices"][0].get("logprobs") or {}).get("tokens") or []) if ok else -1
    texts["completion"] = text
    ck.add("completion: non-empty text", bool(text.strip()), repr(text[:200]))
    ck.add("completion: max_tokens tokens (ignore_eos)", n_tok == max_tokens, f"{n_tok} of {max_tokens}")
    good, why = usage_ok(first.get("usage") if ok else None, n_tok)
    ck.add("completion: usage consistent", good, why)
    status2, again = http(base, "POST", "/v1/completions", req, timeout)
    text2 = again["choices"][0].get("text") if status2 == 200 and isinstance(again, dict) else None
    ck.add("completion: identical request, identical greedy text", ok and text2 == text,
           "same" if text2 == text else f"{text!r} vs {text2!r}")

    # completions, streaming
    texts["completion_stream"] = check_stream(ck, "completion stream", base, "/v1/completions", req, timeout,
                                              lambda choice: choice.get("text"), text,
                                              first.get("usage") if ok else None)

    # chat completions
    creq = {"model": SERVED_NAME, "messages": [{"role": "user", "content": chat_text}], "max_tokens": max_tokens,
            "temperature": 0.0, "ignore_eos": True, "logprobs": True}
    status, chat = http(base, "POST", "/v1/chat/completions", creq, timeout)
    cok = status == 200 and isinstance(chat, dict) and bool(chat.get("choices"))
    ck.add("chat: HTTP 200", cok, f"HTTP {status}" + ("" if cok else f": {str(chat)[:300]}"))
    msg = (chat["choices"][0].get("message") or {}) if cok else {}
    content = msg.get("content") or ""
    c_tok = len((chat["choices"][0].get("logprobs") or {}).get("content") or []) if cok else -1
    texts["chat"] = content
    ck.add("chat: assistant message, non-empty", msg.get("role") == "assistant" and bool(content.strip()),
           f"role {msg.get('role')!r}, {content[:200]!r}")
    ck.add("chat: max_tokens tokens (ignore_eos)", c_tok == max_tokens, f"{c_tok} of {max_tokens}")
    good, why = usage_ok(chat.get("usage") if cok else None, c_tok)
    ck.add("chat: usage consistent", good, why)
    status2, chat2 = http(base, "POST", "/v1/chat/completions", creq, timeout)
    content2 = ((chat2["choices"][0].get("message") or {}).get("content")
                if status2 == 200 and isinstance(chat2, dict) else None)
    ck.add("chat: identical request, identical greedy text", cok and content2 == content,
           "same" if content2 == content else f"{content!r} vs {content2!r}")
    texts["chat_stream"] = check_stream(ck, "chat stream", base, "/v1/chat/completions", creq, timeout,
                                        lambda choice: (choice.get("delta") or {}).get("content"), content,
                                        chat.get("usage") if cok else None)

    # bad requests: a 4xx with an error body, and the server goes on
    too_long = " ".join(WORDS[i % len(WORDS)] for i in range(2 * max_model_len + 8))
    for what, bad, path in (("max_tokens -1", dict(req, max_tokens=-1), "/v1/completions"),
                            (f"prompt over --max-model-len {max_model_len}", dict(req, prompt=too_long),
                             "/v1/completions"),
                            ("unknown model", dict(req, model="no-such-model"), "/v1/completions"),
                            ("chat without messages", {"model": SERVED_NAME, "max_tokens": 4},
                             "/v1/chat/completions")):
        status, err_body = http(base, "POST", path, bad, timeout)
        has_error = isinstance(err_body, dict) and ("error" in err_body or "detail" in err_body or
                                                    "message" in err_body or "object" in err_body)
        ck.add(f"bad request ({what}): 4xx with an error body", 400 <= status < 500 and has_error,
               f"HTTP {status}: {str(err_body)[:200]}")
    health = None
    with contextlib.suppress(OSError), urllib.request.urlopen(base + "/health", timeout=30) as r:
        health = r.status
    ck.add("after the bad requests: /health 200", server.alive() and health == 200,
           f"alive {server.alive()}, /health {health}")
    status3, after = http(base, "POST", "/v1/completions", req, timeout)
    text3 = after["choices"][0].get("text") if status3 == 200 and isinstance(after, dict) else None
    ck.add("after the bad requests: same greedy text", ok and text3 == text,
           "same" if text3 == text else f"HTTP {status3}: {text3!r} vs {text!r}")
    return ck, texts


# ---- main -----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python benchmarks/serve_check.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="converted bipolar checkpoint to serve (default: build a tiny random one)")
    ap.add_argument("--tiny", help="directory for the tiny model (default: a temporary directory)")
    ap.add_argument("--quantization", default="bipolar", help="--quantization for vllm serve ('none': leave it out)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None,
                    help="result label (default: cuda when nvidia-smi sees a GPU, else cpu)")
    ap.add_argument("--dtype", default=None, help="--dtype (default: float32 for the tiny model, else auto)")
    ap.add_argument("--max-model-len", type=int, default=512, help="--max-model-len (default 512)")
    ap.add_argument("--max-tokens", type=int, default=16, help="max_tokens of every request (default 16)")
    ap.add_argument("--prompt", help="completion prompt (default: plain words; 'The capital of France is' for --model)")
    ap.add_argument("--chat-template", help="--chat-template FILE for vllm serve (default: a one-line template for "
                                            "the tiny model, none for --model)")
    ap.add_argument("--eager", action="store_true", help="--enforce-eager (faster start on CPU)")
    ap.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                    help="extra argument for vllm serve (repeatable), e.g. --serve-arg=--max-num-seqs=16")
    ap.add_argument("--startup-timeout", type=float, default=900, help="seconds to wait for /health (default 900)")
    ap.add_argument("--request-timeout", type=float, default=300, help="seconds per request (default 300)")
    ap.add_argument("--stop-timeout", type=float, default=60, help="seconds from SIGINT to SIGKILL (default 60)")
    ap.add_argument("--json", help="where to write the results (default benchmarks/results/serve_check_<device>.json)")
    ap.add_argument("--log", help="server log file (default next to the JSON)")
    return ap


def format_table(res: dict) -> str:
    w = max(len(r["check"]) for r in res["checks"])
    lines = [f"model   {res['model']}", f"device  {res['device_description']}", f"server  {res['server_command']}",
             f"start   {res['server_start_s']:.0f} s", ""]
    lines += [f"{r['check']:<{w}}  {'ok  ' if r['ok'] else 'FAIL'}  {r['detail']}" for r in res["checks"]]
    lines += ["", "texts: " + json.dumps(res["texts"]),
              (f"verdict: {'PASS' if res['passed'] else 'FAIL'} ({sum(r['ok'] for r in res['checks'])} of "
               f"{len(res['checks'])} checks)")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t_start = time.time()
    device = args.device or default_device()
    tmp = None
    extra = list(args.serve_arg)
    if args.model:
        model = Path(args.model).absolute()
    else:
        root = Path(args.tiny) if args.tiny else Path(tmp := tempfile.mkdtemp(prefix="bipolar-serve-"))
        model = build_tiny_model(root)
    chat_template = args.chat_template
    if chat_template is None and not args.model:
        chat_template = str(model.parent / "tiny-chat-template.jinja")
        Path(chat_template).write_text(TINY_CHAT_TEMPLATE)
    if chat_template:
        extra += ["--chat-template", str(Path(chat_template).absolute())]
    dtype = args.dtype or ("auto" if args.model else "float32")
    prompt = args.prompt or (PROMPT_REAL if args.model else "the capital of france is")
    chat_text = CHAT_REAL if args.model else "the first people of the north"
    out_json = Path(args.json) if args.json else REPO / "benchmarks" / "results" / f"serve_check_{device}.json"
    out_json.parent.mkdir(parents=True, exist_ok=True)
    log_path = Path(args.log) if args.log else out_json.with_suffix(".server.log")
    port = free_port()
    cmd, shown = serve_command(model, port, SERVED_NAME, dtype, args.max_model_len, args.quantization, args.eager,
                               extra)
    print("server:", shown, flush=True)
    server = Server(cmd, server_env(device), log_path)
    base = f"http://127.0.0.1:{port}"
    try:
        start_s = wait_healthy(base, server, args.startup_timeout)
        print(f"server healthy after {start_s:.0f} s", flush=True)
        checks, texts = run_checks(base, server, prompt, chat_text, args.max_tokens, args.max_model_len,
                                   args.request_timeout)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        server.stop(args.stop_timeout)
        return 2
    except BaseException:
        server.stop(args.stop_timeout)
        raise
    t_stop = time.monotonic()
    exit_status = server.stop(args.stop_timeout)
    stop_s = time.monotonic() - t_stop
    checks.add("server stops on SIGINT", stop_s < args.stop_timeout, f"exit status {exit_status} after {stop_s:.1f} s")
    res = {
        "passed": checks.passed, "checks": checks.rows, "texts": texts, "model": str(model), "device": device,
        "device_description": device_description(device), "dtype": dtype, "max_tokens": args.max_tokens,
        "prompt": prompt, "chat_message": chat_text, "chat_template": chat_template,
        "git_commit": git_commit(),
        "command": " ".join([sys.executable, *sys.argv] if argv is None else [sys.executable, __file__, *argv]),
        "server_command": shown, "server_start_s": start_s, "server_exit_status": exit_status,
        "server_stop_s": stop_s, "server_log": str(log_path), "seconds": time.time() - t_start,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out_json.write_text(json.dumps(res, indent=2, default=str))
    print(format_table(res))
    print(f"wrote {out_json}")
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if checks.passed else 1


if __name__ == "__main__":
    sys.exit(main())

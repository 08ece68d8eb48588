"""Accuracy of a (bipolar or plain) checkpoint with lm-eval's vLLM backend, without hub downloads.

    python -m quant_tools.evaluate MODEL [--tasks wikitext2_local_small ...] [--text FILE]
        [--max-model-len 2048] [--batch-size auto] [--eager] [--limit N] [--json FILE]

Tasks come from ``quant_tools/lm_eval_tasks`` (rolling word perplexity over a local WikiText-2
text file, see ``wikitext_local.py`` for which part is evaluated) and from lm-eval's own
registry. A checkpoint whose config.json has a bipolar ``quantization_config`` runs with
``quantization=bipolar``. Runs on whatever vLLM platform is installed; on CPU
VLLM_CPU_KVCACHE_SPACE defaults to 1 (GiB). Needs ``pip install lm-eval``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TASK_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
DEFAULT_TEXT = REPO.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
DEFAULT_TASKS = ("wikitext2_local_small",)


class EvaluateError(RuntimeError):
    """Bad input: the message says what to fix."""


def _task_dir(text: Path, tmp: Path) -> Path:
    """A copy of the shipped tasks whose data file is ``text`` (absolute path, any working dir)."""
    for f in TASK_DIR.iterdir():
        if f.suffix == ".py":
            shutil.copy(f, tmp / f.name)
        elif f.suffix == ".yaml":
            body = f.read_text().replace("../shared/data/wikitext-2/valid.txt", json.dumps(str(text)))
            (tmp / f.name).write_text(body)
    return tmp


def quantization_of(model: str) -> str | None:
    cfg_path = Path(model) / "config.json"
    if not cfg_path.is_file():
        raise EvaluateError(f"{model}: no config.json; pass a checkpoint directory (e.g. one written by "
                            "quant_tools.convert)")
    qc = json.loads(cfg_path.read_text()).get("quantization_config") or {}
    return qc.get("quant_method")


def _alias_vllm_cpu_metadata() -> None:
    """lm-eval's vllm backend asks importlib.metadata for the version of "vllm"; the CPU build
    installs as "vllm-cpu". Import that backend with the name answered by vllm-cpu's version, for
    that module only (vLLM's own platform detection must keep seeing the real metadata)."""
    import importlib.metadata as md

    try:
        md.version("vllm")
        return
    except md.PackageNotFoundError:
        pass
    try:
        cpu_version = md.version("vllm-cpu")
    except md.PackageNotFoundError:
        return
    from vllm.platforms import current_platform

    _ = current_platform.device_type  # resolve vLLM's platform from the real metadata first
    original = md.version

    def version(name):
        return cpu_version if name == "vllm" else original(name)

    md.version = version
    try:
        import lm_eval.models.vllm_causallms as backend
    finally:
        md.version = original
    backend.version = version


def evaluate(model: str, tasks: list[str], text: str | os.PathLike = DEFAULT_TEXT, max_model_len: int = 2048,
             batch_size: str = "auto", eager: bool = True, limit: int | None = None,
             dtype: str = "auto") -> dict:
    """Run lm-eval (vllm backend); returns {task: {metric: value}} plus timing."""
    text = Path(text).absolute()
    if not text.is_file():
        raise EvaluateError(f"--text {text}: no such file; pass a plain-text file (WikiText-2 style, e.g. "
                            "../shared/data/wikitext-2/valid.txt)")
    quant = quantization_of(model)
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
        _alias_vllm_cpu_metadata()
    except ImportError as e:
        raise EvaluateError(f"lm-eval is not installed ({e}); run `pip install lm-eval` in this environment") from e
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_args = {"pretrained": str(Path(model).absolute()), "max_model_len": max_model_len,
                  "enforce_eager": eager, "dtype": dtype}
    if quant:
        model_args["quantization"] = quant
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="bipolar-tasks-") as tmp:
        tm = TaskManager(include_path=str(_task_dir(text, Path(tmp))))
        missing = [t for t in tasks if t not in tm.all_tasks]
        if missing:
            local = sorted(t for t in tm.all_tasks if t.startswith("wikitext2_local"))
            raise EvaluateError(f"--tasks {missing}: unknown task(s); the local ones are {local}")
        out = lm_eval.simple_evaluate(model="vllm", model_args=model_args, tasks=list(tasks),
                                      batch_size=batch_size, limit=limit, task_manager=tm)
    results = {t: {k.split(",")[0]: v for k, v in r.items() if isinstance(v, (int, float)) and "stderr" not in k}
               for t, r in out["results"].items()}
    return {"model": str(model), "quantization": quant, "results": results, "seconds": time.time() - t0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m quant_tools.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="checkpoint directory")
    ap.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS),
                    help="lm-eval tasks (default wikitext2_local_small; wikitext2_local = the whole held-out half)")
    ap.add_argument("--text", default=str(DEFAULT_TEXT), help=f"text file of the local tasks (default {DEFAULT_TEXT})")
    ap.add_argument("--max-model-len", type=int, default=2048, help="context window of the rolling perplexity")
    ap.add_argument("--batch-size", default="auto")
    ap.add_argument("--no-eager", action="store_true", help="let vLLM compile (slow start on CPU)")
    ap.add_argument("--limit", type=int, default=None, help="documents per task (debugging)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)
    try:
        res = evaluate(args.model, args.tasks, args.text, args.max_model_len, args.batch_size,
                       not args.no_eager, args.limit, args.dtype)
    except EvaluateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for task, metrics in res["results"].items():
        print(task, " ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))
    print(f"({res['seconds']:.1f} s including engine start)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

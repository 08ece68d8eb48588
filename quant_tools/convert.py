"""Convert a Hugging Face checkpoint to a bipolar-INT checkpoint (format version 1).

    python -m quant_tools.convert SRC DST --w-bits B [--a-bits A] [--group-size G] [--symmetric]
        [--method rtn|mse] [--skip NAME ...] [--layer-bits NAME=BITS ...] [--overwrite]
        [--max-shard-size SIZE] [--no-progress]

Every linear layer of the decoder (q/k/v/o and gate/up/down projections of model.layers.*) is
quantized; embeddings, norms and lm_head are copied unchanged. SRC is only read. DST is written
to a temporary directory next to it and renamed into place at the end: an interrupted run leaves
no DST. See README.md for the flags and the checkpoint layout.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import signal
import sys
import time
from pathlib import Path


from vllm_bipolar.format import (A16, BipolarConfigError, BipolarQuantSpec, pack_codes, quantize_weight)
from vllm_bipolar.format.spec import DEFAULT_PACKED_MODULES, DEFAULT_SKIP, QUANTIZERS

from .checkpoint import (SUPPORTED_DTYPES, CheckpointError, HFCheckpoint, ShardedWriter, atomic_output_dir,
                         copy_aux_files)

# Architectures whose decoder linears vLLM builds from the q/k/v/o and gate/up/down modules below.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_DECODER_WEIGHT = re.compile(r"^(?P<module>(?:model\.)?layers\.\d+\.(?:.+\.)?(?P<leaf>[A-Za-z0-9_]+))\.weight$")


class ConvertError(RuntimeError):
    """A conversion option or the source model is not usable; the message says how to fix it."""


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}; use e.g. 2GB, 500MB")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))


def parse_layer_bits(items: list[str]) -> dict[str, int]:
    out = {}
    for item in items:
        name, sep, bits = item.rpartition("=")
        if not sep or not name or not bits.strip().lstrip("-").isdigit():
            raise ConvertError(f"--layer-bits {item!r}: expected NAME=BITS, e.g. model.layers.0.mlp.down_proj=4")
        out[name.strip()] = int(bits)
    return out


def linear_modules(ckpt: HFCheckpoint) -> list[str]:
    """Module names of the decoder linear layers, in checkpoint order; errors on unknown 2-D weights."""
    archs = ckpt.config.get("architectures") or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise ConvertError(f"{ckpt.path}: architecture {archs or 'unknown'} is not supported; supported: "
                           f"{list(SUPPORTED_ARCHITECTURES)}")
    modules, unknown = [], []
    for name in ckpt.names():
        m = _DECODER_WEIGHT.match(name)
        if not m:
            continue
        if m.group("leaf") in LINEAR_NAMES:
            modules.append(m.group("module"))
        elif not m.group("leaf").endswith("norm"):
            unknown.append(name)
    if unknown:
        raise ConvertError(f"unsupported layer type(s) in the decoder: {unknown[:5]}; only "
                           f"{list(LINEAR_NAMES)} linears can be quantized (use a supported architecture)")
    if not modules:
        raise ConvertError(f"{ckpt.path}: found no decoder linear layers (…{LINEAR_NAMES[0]}.weight)")
    return modules


def check_fused_bits(spec: BipolarQuantSpec, modules: list[str]) -> None:
    """vLLM fuses q/k/v and gate/up into one layer: their shards must share bits and skip status."""
    present = set(modules)
    for fused, parts in DEFAULT_PACKED_MODULES.items():
        for mod in modules:
            head, _, leaf = mod.rpartition(".")
            if leaf != parts[0]:
                continue
            names = [f"{head}.{p}" for p in parts if f"{head}.{p}" in present]
            bits = {n: spec.bits_for(n) for n in names}
            skips = {n: spec.is_skipped(n) for n in names}
            if len(set(bits.values())) > 1 or len(set(skips.values())) > 1:
                raise ConvertError(
                    f"{head}.{fused}: vLLM runs {names} as one fused layer, so they need the same bits and "
                    f"skip status; got bits {bits}, skipped {skips}. Give them equal --layer-bits / --skip.")


def convert(src: str, dst: str, spec: BipolarQuantSpec, method: str = "rtn", overwrite: bool = False,
            max_shard_bytes: int = 2 * 1024**3, progress: bool = True) -> dict:
    """Convert SRC to DST; returns the summary dict (also printed by the CLI)."""
    from tqdm import tqdm

    t0 = time.time()
    src_path = Path(src).absolute()
    dst_path = Path(dst).absolute()
    if dst_path == src_path or src_path in dst_path.parents:
        raise ConvertError(f"DST {dst_path} must not be SRC or inside it; SRC is never modified")
    ckpt = HFCheckpoint(src_path)
    if ckpt.config.get("quantization_config"):
        qm = ckpt.config["quantization_config"].get("quant_method", "?")
        raise ConvertError(f"{src_path} is already quantized ({qm}); convert an unquantized fp16/bf16/fp32 checkpoint")
    modules = linear_modules(ckpt)
    unknown = sorted(set(spec.layer_bits) - set(modules))
    if unknown:
        raise ConvertError(f"--layer-bits names module(s) not in the model: {unknown[:5]}; "
                           f"e.g. {modules[0]}")
    check_fused_bits(spec, modules)
    to_quantize = {m for m in modules if not spec.is_skipped(m)}
    # Record only the layer_bits that differ from w_bits and name quantized layers.
    layer_bits = {m: b for m, b in spec.layer_bits.items() if m in to_quantize and b != spec.w_bits}

    stats = collections.Counter()
    src_bytes = ckpt.size_bytes()
    with atomic_output_dir(dst_path, overwrite=overwrite) as tmp:
        writer = ShardedWriter(tmp, max_shard_bytes)
        bar = tqdm(total=len(to_quantize), desc="quantizing", unit="layer", disable=not progress,
                   file=sys.stderr)
        for name, t in ckpt.iter_tensors():
            module = name[:-len(".weight")] if name.endswith(".weight") else None
            if module not in to_quantize:
                writer.add(name, t)
                continue
            if t.dtype not in SUPPORTED_DTYPES:
                raise ConvertError(f"{name}: dtype {t.dtype} is not supported; expected fp16, bf16 or fp32")
            bits = spec.bits_for(module)
            try:
                q = quantize_weight(t, bits, spec.group_size, spec.symmetric, method, dtype=t.dtype)
            except ValueError as e:
                raise ConvertError(f"{name}: {e}") from e
            outs = {"qweight": pack_codes(q.codes, bits), "scales": q.scales, "zeros": q.zeros}
            for suffix, tensor in outs.items():
                if tensor is not None:
                    writer.add(f"{module}.{suffix}", tensor)
                    stats["linear_dst_bytes"] += tensor.numel() * tensor.element_size()
            stats["linear_src_bytes"] += t.numel() * t.element_size()
            stats[bits] += 1
            bar.update(1)
            bar.set_postfix_str(module.split(".", 1)[-1][-32:])
        bar.close()
        writer.close()
        config = dict(ckpt.config)
        config["quantization_config"] = BipolarQuantSpec(
            w_bits=spec.w_bits, a_bits=spec.a_bits, group_size=spec.group_size, symmetric=spec.symmetric,
            modules_to_not_convert=spec.modules_to_not_convert, layer_bits=layer_bits, method=method).to_dict()
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        copied = copy_aux_files(src_path, tmp)
        dst_bytes = writer.total_bytes
    linear_src, linear_dst = stats.pop("linear_src_bytes", 0), stats.pop("linear_dst_bytes", 0)
    return {
        "src": str(src_path), "dst": str(dst_path), "layers": sum(stats.values()),
        "layers_by_bits": dict(sorted(stats.items())), "skipped": len(modules) - len(to_quantize),
        "linear_src_bytes": linear_src, "linear_dst_bytes": linear_dst,
        "src_bytes": src_bytes, "dst_bytes": dst_bytes, "ratio": src_bytes / max(dst_bytes, 1),
        "seconds": time.time() - t0, "copied": copied,
        "quantization_config": config["quantization_config"],
    }


def format_summary(s: dict) -> str:
    mib = 1024**2
    bits = ", ".join(f"{n} x {b}-bit" for b, n in s["layers_by_bits"].items())
    return (f"converted {s['layers']} linear layers ({bits}; {s['skipped']} kept in full precision)\n"
            f"size: {s['src_bytes'] / mib:.1f} MiB -> {s['dst_bytes'] / mib:.1f} MiB "
            f"({s['ratio']:.2f}x smaller); quantized layers {s['linear_src_bytes'] / mib:.1f} MiB -> "
            f"{s['linear_dst_bytes'] / mib:.1f} MiB ({s['linear_src_bytes'] / max(s['linear_dst_bytes'], 1):.2f}x)\n"
            f"time: {s['seconds']:.1f} s\n"
            f"wrote {s['dst']}")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m quant_tools.convert", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="Hugging Face checkpoint directory (config.json + safetensors); never modified")
    ap.add_argument("dst", help="output directory; must not exist unless --overwrite")
    ap.add_argument("--w-bits", type=int, required=True, help="weight bits, 1..8")
    ap.add_argument("--a-bits", type=int, default=A16,
                    help="activation bits 1..8 (dynamic per-token quantization at run time), or 16 "
                         "for weight-only quantization (default 16)")
    ap.add_argument("--group-size", type=int, default=128,
                    help="input channels per scale/offset group: a multiple of 32, or -1 for one group "
                         "per row (default 128; with --a-bits < 16: -1 or a multiple of 128)")
    ap.add_argument("--symmetric", action="store_true",
                    help="no per-group offsets (w = s*v); default: offsets (w = z + s*v), more accurate")
    ap.add_argument("--method", choices=QUANTIZERS, default="rtn",
                    help="rtn: round to nearest on the min/max (absmax if --symmetric) grid; mse: per-group "
                         "search over clip ratio with least-squares refit of scale/offset (default rtn)")
    ap.add_argument("--skip", nargs="+", default=[], metavar="NAME",
                    help="module names (dotted prefix components) to keep in full precision, in addition "
                         "to lm_head, e.g. --skip model.layers.0 down_proj")
    ap.add_argument("--layer-bits", nargs="+", default=[], metavar="NAME=BITS",
                    help="per-layer weight bits, e.g. model.layers.0.mlp.down_proj=8")
    ap.add_argument("--overwrite", action="store_true", help="replace DST if it exists (only once the new one is complete)")
    ap.add_argument("--max-shard-size", type=parse_size, default=parse_size("2GB"),
                    help="largest safetensors shard (default 2GB)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)  # so `kill` cleans up the temporary output too
    try:
        spec = BipolarQuantSpec(
            w_bits=args.w_bits, a_bits=args.a_bits, group_size=args.group_size, symmetric=args.symmetric,
            modules_to_not_convert=tuple(dict.fromkeys(list(DEFAULT_SKIP) + args.skip)),
            layer_bits=parse_layer_bits(args.layer_bits))
        summary = convert(args.src, args.dst, spec, method=args.method, overwrite=args.overwrite,
                          max_shard_bytes=args.max_shard_size, progress=not args.no_progress)
    except (BipolarConfigError, ConvertError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: writing {args.dst} failed: {e.strerror or e} ({getattr(e, 'filename', '') or ''}); "
              f"nothing was written and {args.src} is untouched", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted: nothing was written to {args.dst}", file=sys.stderr)
        return 130
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

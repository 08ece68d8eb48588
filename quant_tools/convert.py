"""Convert a Hugging Face checkpoint to a bipolar-INT checkpoint (format version 1, or 2 with 8-bit scales).

    python -m quant_tools.convert SRC DST --w-bits B [--a-bits A] [--group-size G] [--symmetric]
        [--method rtn|mse] [--format-version 1|2] [--skip NAME ...] [--layer-bits NAME=BITS ...] [--overwrite]
        [--max-shard-size SIZE] [--no-progress]

Every linear layer of the decoder (q/k/v/o and gate/up/down projections of model.layers.*) is
quantized; embeddings, norms and lm_head are copied unchanged. SRC is only read. DST is written
to a temporary directory next to it and renamed into place at the end: an interrupted run leaves
no DST. See README.md for the flags and the checkpoint layout.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import re
import signal
import sys
import time
from pathlib import Path

import torch

from vllm_bipolar.format import (A16, BipolarConfigError, BipolarQuantSpec, pack_codes, quantize_weight)
from vllm_bipolar.format.spec import (DECODER_LINEARS, DEFAULT_PACKED_MODULES, DEFAULT_SKIP, FORMAT_VERSION,
                                      MAX_BITS, METHODS, MIN_BITS, SUPPORTED_FORMAT_VERSIONS)

from .checkpoint import (SUPPORTED_DTYPES, CheckpointError, HFCheckpoint, ShardedWriter, atomic_output_dir,
                         copy_aux_files)

# Architectures whose residual stream --rotate can rotate: RMSNorm as x / rms(x) * w (w folded into the next
# linears) and no norm on a block's output.
ROTATABLE_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                           "Phi3ForCausalLM")
# Architectures whose decoder linears vLLM builds from the q/k/v/o and gate/up/down modules below (Phi-3
# stores q/k/v and gate/up fused; vLLM splits them at load): the rotatable ones and Gemma. Gemma's norms
# scale by (1 + w), its lm_head is the embedding (vLLM cannot load the separate rotated head that folding
# the final norm needs), and Gemma 2 / 3 normalise the attention and MLP outputs before adding them to the
# residual, which no rotation commutes with.
SUPPORTED_ARCHITECTURES = ROTATABLE_ARCHITECTURES + ("GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM")
_DECODER_WEIGHT = re.compile(r"^(?P<module>(?:model\.)?layers\.\d+\.(?:.+\.)?(?P<leaf>[A-Za-z0-9_]+))\.weight$")


DEFAULT_CALIB = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2" / "valid.txt"


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


def parse_min_bits(items: list[str]) -> dict[str, int]:
    out = {}
    for item in items:
        name, sep, bits = item.rpartition("=")
        if not sep or not name or not bits.strip().isdigit():
            raise ConvertError(f"--min-bits {item!r}: expected NAME=BITS, e.g. down_proj=3 or model.layers.0=4")
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
        if m.group("leaf") in DECODER_LINEARS:
            modules.append(m.group("module"))
        elif not m.group("leaf").endswith("norm"):
            unknown.append(name)
    if unknown:
        raise ConvertError(f"unsupported layer type(s) in the decoder: {unknown[:5]}; only "
                           f"{list(DECODER_LINEARS)} linears can be quantized (use a supported architecture)")
    if not modules:
        raise ConvertError(f"{ckpt.path}: found no decoder linear layers (…{DECODER_LINEARS[0]}.weight)")
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


@dataclasses.dataclass
class Calibration:
    """Options of the calibrated methods, mixed precision and the rotation (see quant_tools.calibrate)."""
    text: str = str(DEFAULT_CALIB)
    samples: int = 128
    seqlen: int = 512
    seed: int = 0
    damp: float = 0.01
    act_order: bool | None = None
    avg_bits: float | None = None
    bit_set: tuple[int, ...] = (2, 3, 4, 8)
    sensitivity: str | None = None
    rotate: bool = False
    rotation: str = "orthogonal"  # residual rotation of --rotate: "orthogonal" or "hadamard"
    a_clip_ratio: float | str | None = None  # a float in (0, 1], "auto" (searched), or None
    refit: bool = False  # --refit-scales
    fp_targets: bool = False  # --fp-targets
    sensitivity_measure: str = "fisher"  # --sensitivity-measure fisher|loss|kl
    sensitivity_samples: int = 4  # windows of the measured loss (--sensitivity-measure loss)
    sensitivity_calib_samples: int | None = None  # GPTQ windows of the --avg-bits measurement (None: samples)
    sensitivity_refine: int = 0  # --sensitivity-refine N: rounds of re-measurement at the operating point
    allocate_by: str = "unit"  # --allocate-by unit|type|block
    min_bits: dict[str, int] = dataclasses.field(default_factory=dict)  # --min-bits NAME=BITS


def _check_calibration(spec: BipolarQuantSpec, method: str, cal: Calibration) -> None:
    from .calibrate import CALIBRATED_METHODS, CalibOptions

    calibrated = method in CALIBRATED_METHODS
    if cal.avg_bits is not None:
        if not calibrated:
            raise ConvertError(f"--avg-bits needs calibration data to measure sensitivities; use --method "
                               f"{' or '.join(CALIBRATED_METHODS)}")
        if spec.layer_bits:
            raise ConvertError("--avg-bits assigns every layer's bits itself; drop --layer-bits")
        if any(not MIN_BITS <= b <= MAX_BITS for b in cal.bit_set) or len(set(cal.bit_set)) != len(cal.bit_set):
            raise ConvertError(f"--bit-set {list(cal.bit_set)}: expected distinct widths {MIN_BITS}..{MAX_BITS}, "
                               "e.g. --bit-set 2 3 4 8")
        if any(not MIN_BITS <= b <= MAX_BITS for b in cal.min_bits.values()):
            raise ConvertError(f"--min-bits {cal.min_bits}: widths must lie in {MIN_BITS}..{MAX_BITS}")
        allowed = [b for b in cal.bit_set if b >= spec.w_bits]
        if not allowed or not min(allowed) <= cal.avg_bits <= max(allowed):
            raise ConvertError(
                f"--avg-bits {cal.avg_bits}: with --w-bits {spec.w_bits} (the lowest width) and --bit-set "
                f"{list(cal.bit_set)} the average must lie in [{min(allowed, default=spec.w_bits)}, "
                f"{max(allowed, default=spec.w_bits)}]; change --avg-bits, --w-bits or --bit-set")
        if cal.sensitivity_calib_samples is not None and cal.sensitivity_calib_samples < 1:
            raise ConvertError(f"--sensitivity-calib-samples {cal.sensitivity_calib_samples}: need at least 1 window")
        if cal.sensitivity_refine < 0:
            raise ConvertError(f"--sensitivity-refine {cal.sensitivity_refine}: expected a number of rounds >= 0")
        if cal.sensitivity_refine and cal.sensitivity_measure not in ("loss", "kl"):
            raise ConvertError("--sensitivity-refine re-measures the loss at the operating point; use "
                               "--sensitivity-measure kl (or loss)")
        if cal.sensitivity_refine and cal.allocate_by != "unit":
            raise ConvertError("--sensitivity-refine works on single units; drop --allocate-by "
                               f"{cal.allocate_by}")
    elif cal.min_bits or cal.allocate_by != "unit" or cal.sensitivity_calib_samples is not None or cal.sensitivity_refine:
        flag = ("--min-bits" if cal.min_bits else "--allocate-by" if cal.allocate_by != "unit"
                else "--sensitivity-calib-samples" if cal.sensitivity_calib_samples is not None
                else "--sensitivity-refine")
        raise ConvertError(f"{flag} shapes the --avg-bits allocation; add --avg-bits")
    if calibrated:
        try:
            CalibOptions(text=Path(cal.text), samples=cal.samples, seqlen=cal.seqlen, damp=cal.damp).check()
        except ValueError as e:
            raise ConvertError(str(e)) from e
        if method.endswith("_int") and spec.symmetric:
            raise ConvertError(f"--method {method} uses the INT grid with a zero point (asymmetric); drop --symmetric")
    elif cal.act_order or cal.refit or cal.fp_targets:
        flag = "--act-order" if cal.act_order else ("--refit-scales" if cal.refit else "--fp-targets")
        raise ConvertError(f"{flag} applies to the calibrated methods (gptq, gptq_int), not --method {method}")
    if cal.a_clip_ratio is not None:
        if spec.a_bits == A16:
            raise ConvertError("--a-clip-ratio clips quantized activations; it needs --a-bits 1..8")
        if cal.a_clip_ratio == "auto" and not calibrated:
            raise ConvertError(f"--a-clip-ratio auto searches on calibration data; use --method "
                               f"{' or '.join(CALIBRATED_METHODS)}, or give a ratio such as --a-clip-ratio 0.9")


def convert(src: str, dst: str, spec: BipolarQuantSpec, method: str = "rtn", overwrite: bool = False,
            max_shard_bytes: int = 2 * 1024**3, progress: bool = True, calibration: Calibration | None = None) -> dict:
    """Convert SRC to DST; returns the summary dict (also printed by the CLI)."""
    from tqdm import tqdm

    from .calibrate import CALIBRATED_METHODS
    cal = calibration or Calibration()
    _check_calibration(spec, method, cal)

    t0 = time.time()
    src_path = Path(src).absolute()
    dst_path = Path(dst).absolute()
    # Resolved (symlinks followed): DST replaced with --overwrite must not take SRC with it.
    src_real, dst_real = src_path.resolve(), dst_path.resolve()
    if dst_real == src_real or src_real in dst_real.parents or dst_real in src_real.parents:
        raise ConvertError(f"DST {dst_path} must not be SRC, inside it or contain it ({src_path}); SRC is never "
                           "modified: choose a separate destination directory")
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
    calibrated = method in CALIBRATED_METHODS
    rotation = None
    if cal.rotate:
        from .rotation import ONLINE_HADAMARD, ResidualRotation

        archs = ckpt.config.get("architectures") or []
        if not any(a in ROTATABLE_ARCHITECTURES for a in archs):
            raise ConvertError(f"--rotate is not available for {archs}: it is implemented for "
                               f"{list(ROTATABLE_ARCHITECTURES)} only (Gemma's norms do not let a rotation of the "
                               "residual stream be folded into the weights); "
                               "convert without --rotate (--method gptq with a smaller --group-size is the accuracy "
                               "lever there)")

        spec = dataclasses.replace(spec, online_hadamard=ONLINE_HADAMARD, rotation=cal.rotation)
        try:
            rotation = ResidualRotation(ckpt.config, ckpt.get, seed=cal.seed,
                                        down_is_quantized=lambda m: m in to_quantize, kind=cal.rotation)
        except (KeyError, ValueError) as e:
            raise ConvertError(f"--rotate: {e}") from e

    def transformed(name, t):
        return t if rotation is None else rotation.transform(name, t)

    if isinstance(cal.a_clip_ratio, float):
        spec = dataclasses.replace(spec, a_clip_ratio=cal.a_clip_ratio)
    stream = ids = None
    avg_bits = None
    log = (lambda msg: print(msg, file=sys.stderr)) if progress else (lambda msg: None)
    if calibrated:
        from .calibrate import CalibOptions, LayerStream, calibration_windows

        opts = CalibOptions(text=Path(cal.text), samples=cal.samples, seqlen=cal.seqlen, seed=cal.seed,
                            damp=cal.damp, act_order=cal.act_order, refit=cal.refit,
                            fp_targets=cal.fp_targets)
        try:
            ids = calibration_windows(src_path, opts)
        except ValueError as e:
            raise ConvertError(str(e)) from e
        stream = LayerStream(ckpt, transformed)
        if cal.a_clip_ratio == "auto":
            from .calibrate import search_clip_ratio

            ratio, losses = search_clip_ratio(stream, spec, ids, to_quantize, opts.batch, log)
            print(f"--a-clip-ratio auto: {ratio} (calibration next-token loss per ratio: {losses})", file=sys.stderr)
            spec = dataclasses.replace(spec, a_clip_ratio=ratio)
        if cal.avg_bits is not None:
            layer_bits_auto, avg_bits = _auto_bits(stream, spec, method, opts, ids, to_quantize, cal, src_path, log)
            spec = dataclasses.replace(spec, layer_bits=layer_bits_auto)
            check_fused_bits(spec, modules)
    # Record only the layer_bits that differ from w_bits and name quantized layers.
    layer_bits = {m: b for m, b in spec.layer_bits.items() if m in to_quantize and b != spec.w_bits}

    stats = collections.Counter()
    src_bytes = ckpt.size_bytes()
    with atomic_output_dir(dst_path, overwrite=overwrite) as tmp:
        writer = ShardedWriter(tmp, max_shard_bytes)
        bar = tqdm(total=len(to_quantize), desc="quantizing", unit="layer", disable=not progress,
                   file=sys.stderr)

        def add_quantized(module, q, src_bytes):
            outs = {"qweight": pack_codes(q.codes, q.bits), **q.stored()}
            for suffix, tensor in outs.items():
                if tensor is not None:
                    writer.add(f"{module}.{suffix}", tensor)
                    stats["linear_dst_bytes"] += tensor.numel() * tensor.element_size()
            stats["linear_src_bytes"] += src_bytes
            stats["linear_params"] += q.codes.numel()
            stats[q.bits] += 1
            bar.update(1)
            bar.set_postfix_str(module.split(".", 1)[-1][-32:])

        if calibrated:
            from .calibrate import calibrated_layers

            dtype = ckpt.get(f"{next(iter(sorted(to_quantize)))}.weight").dtype
            try:
                for module, q in calibrated_layers(stream, spec, method, opts, ids, to_quantize, dtype, log):
                    add_quantized(module, q, q.codes.numel() * dtype.itemsize)
            except ValueError as e:
                raise ConvertError(str(e)) from e
        for name, t in ckpt.iter_tensors():
            module = name[:-len(".weight")] if name.endswith(".weight") else None
            if module not in to_quantize:
                writer.add(name, transformed(name, t).to(t.dtype).contiguous() if rotation else t)
                continue
            if t.dtype not in SUPPORTED_DTYPES:
                raise ConvertError(f"{name}: dtype {t.dtype} is not supported; expected fp16, bf16 or fp32")
            if calibrated:
                continue
            bits = spec.bits_for(module)
            try:
                q = quantize_weight(transformed(name, t).to(torch.float32), bits, spec.group_size, spec.symmetric,
                                    method, dtype=t.dtype, format_version=spec.format_version)
            except ValueError as e:
                raise ConvertError(f"{name}: {e}") from e
            add_quantized(module, q, t.numel() * t.element_size())
        config = dict(ckpt.config)
        if rotation is not None and rotation.tied:
            writer.add("lm_head.weight", rotation.untied_lm_head().to(ckpt.get("model.embed_tokens.weight").dtype))
            config["tie_word_embeddings"] = False
        bar.close()
        writer.close()
        config["quantization_config"] = BipolarQuantSpec(
            w_bits=spec.w_bits, a_bits=spec.a_bits, group_size=spec.group_size, symmetric=spec.symmetric,
            format_version=spec.format_version,
            modules_to_not_convert=spec.modules_to_not_convert, layer_bits=layer_bits, method=method,
            online_hadamard=spec.online_hadamard, rotation=spec.rotation,
            avg_bits=None if avg_bits is None else round(avg_bits, 4), a_clip_ratio=spec.a_clip_ratio).to_dict()
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        copied = copy_aux_files(src_path, tmp)
        dst_bytes = writer.total_bytes
    linear_src, linear_dst = stats.pop("linear_src_bytes", 0), stats.pop("linear_dst_bytes", 0)
    linear_params = stats.pop("linear_params", 0)
    return {
        "src": str(src_path), "dst": str(dst_path), "layers": sum(stats.values()),
        "layers_by_bits": dict(sorted(stats.items())), "skipped": len(modules) - len(to_quantize),
        "linear_src_bytes": linear_src, "linear_dst_bytes": linear_dst,
        "bits_per_weight": 8 * linear_dst / max(linear_params, 1),
        "src_bytes": src_bytes, "dst_bytes": dst_bytes, "ratio": src_bytes / max(dst_bytes, 1),
        "seconds": time.time() - t0, "copied": copied, "avg_bits": avg_bits,
        "quantization_config": config["quantization_config"],
    }


def _auto_bits(stream, spec, method, opts, ids, to_quantize, cal, src_path, log):
    """--avg-bits: measure each unit's loss estimate per width, then allocate (quant_tools.calibrate)."""
    from .calibrate import (allocate_bits, average_bits, calibration_windows, load_or_profile, sensitivity_profile)

    # The profile covers the whole --bit-set (so one profile serves every --w-bits floor); the
    # allocation uses the widths >= --w-bits.
    full_set = tuple(sorted(cal.bit_set))
    bit_set = tuple(b for b in full_set if b >= spec.w_bits)
    if cal.sensitivity_calib_samples is not None and cal.sensitivity_calib_samples != cal.samples:
        # the measurement's GPTQ runs on its own (usually fewer) windows, drawn like the GPTQ windows
        opts = dataclasses.replace(opts, samples=cal.sensitivity_calib_samples)
        ids = calibration_windows(src_path, opts)
    fisher_ids = ids[: max(1, min(len(ids), 16))]
    key = {"src": str(src_path), "method": method, "a_bits": spec.a_bits, "group_size": spec.group_size,
           "symmetric": spec.symmetric, "bit_set": list(full_set), "calib": str(Path(cal.text).absolute()),
           "samples": opts.samples, "seqlen": cal.seqlen, "seed": cal.seed, "damp": cal.damp,
           "act_order": cal.act_order, "rotate": cal.rotate, "skip": sorted(spec.modules_to_not_convert)}
    if cal.rotate and cal.rotation != "orthogonal":
        key["rotation"] = cal.rotation
    if cal.refit:
        key["refit"] = True
    if spec.clips_activations():
        key["a_clip_ratio"] = spec.a_clip_ratio
    dtype = stream.ckpt.get(f"{min(to_quantize)}.weight").dtype
    if cal.sensitivity_measure in ("loss", "kl"):
        key["measure"] = cal.sensitivity_measure
        key["loss_samples"] = cal.sensitivity_samples
        # the scoring windows: drawn with another seed, so that they are not the GPTQ windows
        loss_opts = dataclasses.replace(opts, seed=opts.seed + 1)
        loss_ids = calibration_windows(src_path, loss_opts, samples=cal.sensitivity_samples)
        layer_bits, units = _measured_bits(stream, spec, method, opts, ids, loss_ids, to_quantize, full_set, bit_set,
                                           dtype, cal, key, log)
    else:
        units = load_or_profile(cal.sensitivity, key, lambda: sensitivity_profile(
            stream, spec, method, opts, ids, fisher_ids, to_quantize, full_set, dtype, log))
        layer_bits = None
    if layer_bits is None:
        try:
            layer_bits = allocate_bits(units, cal.avg_bits, bit_set, min_bits=cal.min_bits, by=cal.allocate_by)
        except ValueError as e:
            raise ConvertError(str(e)) from e
    params = {m: p for u in units.values() for m, p in zip(u["modules"], u["module_params"])}
    return layer_bits, average_bits(layer_bits, params)


def _measured_bits(stream, spec, method, opts, ids, loss_ids, to_quantize, full_set, bit_set, dtype, cal, key, log):
    """--sensitivity-measure loss|kl (+ --sensitivity-refine): (layer_bits or None, units). The profile
    and the refinement's history are cached in --sensitivity (the refinement under its own key: it
    depends on --avg-bits, the allowed widths and --min-bits)."""
    from .calibrate import HeldModel, read_profile, refine_allocation, write_profile

    saved = read_profile(cal.sensitivity, key)
    units = saved.get("units")
    rkey = None
    if cal.sensitivity_refine:
        rkey = {"avg_bits": cal.avg_bits, "bit_set": list(bit_set), "min_bits": cal.min_bits}
    ref = saved.get("refine", {})
    history = ref.get("history") if rkey is not None and ref.get("key") == rkey else None
    # a saved refinement serves when it ran as many rounds as asked, or stopped by itself before that
    complete = history is not None and (ref.get("done") or len(history) - 1 >= cal.sensitivity_refine)
    if history is not None and len(history) - 1 > cal.sensitivity_refine:  # fewer rounds asked: a prefix
        history = [dict(h) for h in history[:cal.sensitivity_refine + 1]]
        for h in history:
            h.pop("best", None)
        min(history, key=lambda h: h["score"])["best"] = True
    if units is None or (rkey is not None and not complete):
        model = HeldModel(stream, spec, method, opts, ids, loss_ids, to_quantize, full_set, dtype,
                          cal.sensitivity_measure, log)
        try:
            if units is None:
                units = model.profile(full_set)
                saved = {"key": key, "units": units}
                write_profile(cal.sensitivity, saved)
            if rkey is not None:
                def save(hist, done):
                    saved["refine"] = {"key": rkey, "history": hist, "done": done}
                    write_profile(cal.sensitivity, saved)
                try:
                    history = refine_allocation(model, units, cal.avg_bits, bit_set, cal.sensitivity_refine,
                                                min_bits=cal.min_bits, log=log, history=history, save=save)
                except ValueError as e:
                    raise ConvertError(str(e)) from e
        finally:
            model.close()
    if history is None:
        return None, units
    return next(h for h in history if h.get("best"))["layer_bits"], units


def format_summary(s: dict) -> str:
    mib = 1024**2
    bits = ", ".join(f"{n} x {b}-bit" for b, n in s["layers_by_bits"].items())
    return (f"converted {s['layers']} linear layers ({bits}; {s['skipped']} kept in full precision)\n"
            f"size: {s['src_bytes'] / mib:.1f} MiB -> {s['dst_bytes'] / mib:.1f} MiB "
            f"({s['ratio']:.2f}x smaller); quantized layers {s['linear_src_bytes'] / mib:.1f} MiB -> "
            f"{s['linear_dst_bytes'] / mib:.1f} MiB ({s['linear_src_bytes'] / max(s['linear_dst_bytes'], 1):.2f}x), "
            f"{s['bits_per_weight']:.3f} bits per weight with scales and offsets (format version "
            f"{s['quantization_config']['format_version']})\n"
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
    ap.add_argument("--format-version", type=int, choices=SUPPORTED_FORMAT_VERSIONS, default=FORMAT_VERSION,
                    help="checkpoint layout: 1 stores each group's scale and offset in the model dtype (16 bits "
                         "each); 2 stores them as 8-bit codes with one step per output row (0.125 instead of "
                         "0.25 bits per weight at group size 128; same accuracy, weights fitted to the "
                         "8-bit grid) (default %(default)s)")
    ap.add_argument("--method", choices=METHODS, default="rtn",
                    help="rtn: round to nearest on the min/max (absmax if --symmetric) grid; mse: per-group "
                         "search over clip ratio with least-squares refit of scale/offset; gptq: calibrated "
                         "second-order quantization on the bipolar grid (continuous offsets, scale search, "
                         "act-order); gptq_int: GPTQ as published on the INT grid with an integer zero point "
                         "(baseline) (default rtn)")
    cal = ap.add_argument_group("calibration (--method gptq / gptq_int, --avg-bits)")
    cal.add_argument("--calib", default=str(DEFAULT_CALIB),
                     help="plain-text calibration file; WikiText-style files are cut into articles and only "
                          f"the first half is used (default {DEFAULT_CALIB})")
    cal.add_argument("--calib-samples", type=int, default=128, help="token windows (default 128)")
    cal.add_argument("--calib-seqlen", type=int, default=512, help="tokens per window (default 512)")
    cal.add_argument("--seed", type=int, default=0, help="seed of the window draw and of --rotate (default 0)")
    cal.add_argument("--damp", type=float, default=0.01,
                     help="Hessian dampening, a fraction of its mean diagonal (default 0.01)")
    cal.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                     help="quantize columns by decreasing activation energy (default: on for gptq, off for gptq_int)")
    cal.add_argument("--refit-scales", action="store_true",
                     help="after GPTQ has chosen a layer's codes, refit each row's scales and offsets by least "
                          "squares on its output error over the calibration inputs (kept per row where it helps)")
    cal.add_argument("--fp-targets", action="store_true",
                     help="fit every linear to the full-precision model's outputs of that linear from the quantized "
                          "model's inputs (after activation quantization): GPTQ runs on W C Hq^-1 (C = X^T Xq, Hq = "
                          "Xq^T Xq) instead of W, so the weights also absorb the activation quantization error and "
                          "that of the layers before; one more forward pass per layer")
    cal.add_argument("--avg-bits", type=float, default=None,
                     help="mixed precision: measure each layer's sensitivity and assign widths from --bit-set "
                          "(at least --w-bits) so that the parameter-weighted mean is at most this")
    cal.add_argument("--bit-set", type=int, nargs="+", default=[2, 3, 4, 8], metavar="B",
                     help="widths --avg-bits may assign (default 2 3 4 8)")
    cal.add_argument("--sensitivity-measure", choices=("fisher", "loss", "kl"), default="fisher",
                     help="--avg-bits' loss estimate per layer and width: fisher (diagonal Fisher information of "
                          "the outputs x GPTQ's output error, one backward pass), loss (the measured increase of "
                          "the next-token loss on --sensitivity-samples other calibration windows with that layer "
                          "alone quantized: one forward pass of the rest of the model per layer and width; holds "
                          "the model in memory) or kl (likewise, the mean KL divergence of the next-token "
                          "distributions from the full-precision model's: no sampling noise of the loss difference) "
                          "(default fisher)")
    cal.add_argument("--sensitivity-samples", type=int, default=4, metavar="N",
                     help="windows of --sensitivity-measure loss / kl (default 4)")
    cal.add_argument("--sensitivity-refine", type=int, default=0, metavar="N",
                     help="with --sensitivity-measure kl / loss: up to N rounds that re-measure every layer's "
                          "loss at each width with all other layers at the current allocation's widths "
                          "(interactions included), re-solve the allocation on those changes and keep the new "
                          "one while its measured loss as a whole drops (cached in --sensitivity) (default 0)")
    cal.add_argument("--sensitivity-calib-samples", type=int, default=None, metavar="N",
                     help="calibration windows of the GPTQ runs inside the --avg-bits measurement (drawn like "
                          "--calib-samples' windows, same seed); the final quantization still uses --calib-samples. "
                          "Lets a costly measurement made with few windows (its --sensitivity cache) serve a "
                          "conversion calibrated on more (default: --calib-samples)")
    cal.add_argument("--allocate-by", choices=("unit", "type", "block"), default="unit",
                     help="--avg-bits' decision units: unit (each layer's q/k/v, o, gate/up and down choose their "
                          "own width), type (one width per unit type for all layers, e.g. every down_proj; the "
                          "per-layer loss estimates are summed, which averages out their noise) or block (one width "
                          "per decoder layer) (default unit)")
    cal.add_argument("--min-bits", nargs="+", default=[], metavar="NAME=BITS",
                     help="--avg-bits floors: modules matching NAME (whole dotted components, e.g. down_proj, "
                          "model.layers.0) get at least BITS (the widest floor of a fused unit applies to all of "
                          "it); the rest of the budget is allocated as usual")
    cal.add_argument("--sensitivity", default=None, metavar="FILE",
                     help="cache of the --avg-bits sensitivity measurement: reused when made with the same "
                          "settings, else measured and written")
    ap.add_argument("--rotate", action="store_true",
                    help="outlier treatment: rotate the residual stream offline (random orthogonal), Hadamard "
                         "on v/o heads, and a block Hadamard on down_proj inputs applied at run time "
                         "(quantization_config online_hadamard); the full-precision function is unchanged")
    ap.add_argument("--rotation", choices=("orthogonal", "hadamard"), default=None,
                    help="the residual rotation of --rotate (implies --rotate): a seeded random orthogonal matrix "
                         "(default) or a randomized Hadamard matrix diag(+-1) H (hidden size 2^a x a Paley order)")
    ap.add_argument("--a-clip-ratio", type=_clip_ratio, default=None, metavar="R|auto",
                    help="with --a-bits < 16: clip each token's activations at R (0 < R <= 1) times their absolute "
                         "maximum before the per-token quantization (quantization_config a_clip_ratio, applied by "
                         "the plugin at run time); auto: the ratio of 1.0, 0.95, ..., 0.7 with the least "
                         "next-token loss on the calibration windows (full-precision weights) (default: no clipping)")
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


def _clip_ratio(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        r = float(text)
    except ValueError:
        r = -1.0
    if not 0 < r <= 1:
        raise argparse.ArgumentTypeError(f"invalid clip ratio {text!r}: expected a number in (0, 1] or 'auto'")
    return r


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)  # so `kill` cleans up the temporary output too
    try:
        spec = BipolarQuantSpec(
            w_bits=args.w_bits, a_bits=args.a_bits, group_size=args.group_size, symmetric=args.symmetric,
            format_version=args.format_version,
            modules_to_not_convert=tuple(dict.fromkeys(list(DEFAULT_SKIP) + args.skip)),
            layer_bits=parse_layer_bits(args.layer_bits))
        calibration = Calibration(text=args.calib, samples=args.calib_samples, seqlen=args.calib_seqlen,
                                  seed=args.seed, damp=args.damp, act_order=args.act_order, avg_bits=args.avg_bits,
                                  bit_set=tuple(args.bit_set), sensitivity=args.sensitivity,
                                  rotate=args.rotate or args.rotation is not None,
                                  rotation=args.rotation or "orthogonal", a_clip_ratio=args.a_clip_ratio,
                                  refit=args.refit_scales, fp_targets=args.fp_targets,
                                  sensitivity_measure=args.sensitivity_measure,
                                  sensitivity_samples=args.sensitivity_samples,
                                  sensitivity_calib_samples=args.sensitivity_calib_samples,
                                  sensitivity_refine=args.sensitivity_refine,
                                  allocate_by=args.allocate_by, min_bits=parse_min_bits(args.min_bits))
        summary = convert(args.src, args.dst, spec, method=args.method, overwrite=args.overwrite,
                          max_shard_bytes=args.max_shard_size, progress=not args.no_progress,
                          calibration=calibration)
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

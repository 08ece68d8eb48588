"""End-to-end tuning of a bipolar checkpoint's scales and offsets against its full-precision model.

    python -m quant_tools.tune SRC CKPT DST [--steps-per-epoch ...] [--epochs 1] [--lr 1e-3] ...

The converter fits each layer on its own (GPTQ: the layer's output error on calibration inputs);
at 2-3 bits the errors of 200 layers add up in ways no single layer sees. This pass keeps every
code the converter chose and fits only the per-group scale s and offset z of all quantized layers
together, to make the quantized model's next-token distributions match the full-precision model's:
the loss is the KL divergence KL(p_SRC || p_quantized), averaged over the positions of calibration
windows (the same calibration part of the text as the converter's, never the evaluation part).
It is the scale-only end-to-end stage of quantization-aware tuning (EfficientQAT's E2E-QP): the
codes are integers and stay fixed, so the result is again a checkpoint of the same format and size.

Parametrization: s = s0 (1 + a), z = z0 + |s0| b per group, a = b = 0 at the start, so Adam's steps
are fractions of each group's own scale whatever the layer's magnitude. The weights seen by the
forward are z + s v (v the odd-integer code values), with the checkpoint's run-time input transforms
(online Hadamard; quantized activations pass gradients straight through). The tuned s and z are
rounded to what the checkpoint stores when written (its scale dtype; in format version 2 the codes of
CKPT's per-row steps, which stay as they are).

SRC must be the model CKPT was converted from (same vocabulary and layers); a rotated CKPT
(``--rotate``) computes the same function as SRC, so SRC is the reference either way. CKPT is never
modified; DST is written atomically (a temporary directory renamed into place), with every tensor
but the scales and offsets copied unchanged, and ``tuning.json`` recording the options and the KL
before and after (on the training windows and on ``--val-samples`` other windows).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import signal
import sys
import time
from pathlib import Path

import torch

from vllm_bipolar.format import BipolarQuantSpec
from vllm_bipolar.format.group_params import GROUP_TENSORS, ParamGrid, decode_tensors, module_tensors, stored_tensors
from vllm_bipolar.format.packing import max_level, unpack_codes
from vllm_bipolar.format.quantize import effective_group, num_groups
from vllm_bipolar.format.spec import BipolarConfigError

from .calibrate import CalibOptions, CalibrationError, attention_implementation, calibration_windows
from .checkpoint import CheckpointError, ShardedWriter, atomic_output_dir
from .convert import DEFAULT_CALIB, _raise_interrupt
from .fake_eval import install_runtime_hooks, load_model, read_tensors


COMPUTE = {"bfloat16": torch.bfloat16, "float32": None}  # --compute: autocast dtype (None: plain float32)


class TuneError(RuntimeError):
    """Bad inputs or options of the tuning pass; the message says what to fix."""


class TunedLinear:
    """One quantized linear's weight as a function of trainable per-group (a, b): z + s v with
    s = s0 (1 + a) and z = z0 + |s0| b, installed as a forward pre-hook that sets ``module.weight``."""

    def __init__(self, module: torch.nn.Linear, qweight: torch.Tensor, scales: torch.Tensor,
                 zeros: torch.Tensor | None, group_size: int, grid: ParamGrid):
        n, k = module.out_features, module.in_features
        bits = qweight.shape[0]
        self.group = effective_group(k, group_size)
        self.groups = num_groups(k, group_size)
        self.k, self.dtype, self.grid = k, scales.dtype, grid
        v = unpack_codes(qweight, k).to(torch.float32) * 2 - max_level(bits)
        # [N, G, g]: the last group zero-padded, so the weight is one broadcast multiply-add
        self.values = torch.nn.functional.pad(v, (0, self.groups * self.group - k)).view(n, self.groups, self.group)
        self.s0 = scales.to(torch.float32)
        self.z0 = None if zeros is None else zeros.to(torch.float32)
        self.a = torch.zeros_like(self.s0, requires_grad=True)
        self.b = None if zeros is None else torch.zeros_like(self.s0, requires_grad=True)
        del module.weight  # the Parameter; the hook sets a computed tensor in its place
        self.handle = module.register_forward_pre_hook(self._set_weight)

    def params(self) -> list[torch.Tensor]:
        return [self.a] + ([] if self.b is None else [self.b])

    def scales_offsets(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        s = self.s0 * (1 + self.a)
        z = None if self.z0 is None else self.z0 + self.s0.abs() * self.b
        return s, z

    def weight(self) -> torch.Tensor:
        s, z = self.scales_offsets()
        w = self.values * s[..., None]
        if z is not None:
            w = w + z[..., None]
        return w.reshape(w.shape[0], -1)[:, :self.k]

    def _set_weight(self, module, args):
        module.weight = self.weight()

    def stored(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(s, z) rounded to what the checkpoint stores (its dtype; in format version 2 the codes of
        the CKPT's row steps), as written to DST."""
        with torch.no_grad():
            s, z = self.scales_offsets()
            s = self.grid.scale(s).to(self.dtype)
            return s, None if z is None else self.grid.offset(z).to(self.dtype)

    def stored_tensors(self) -> dict[str, torch.Tensor | None]:
        return stored_tensors(*self.stored(), self.grid)

    def round_to_stored(self) -> None:
        """Start from the stored (s, z) (a = b = 0 again), so the forward computes what DST holds."""
        s, z = self.stored()
        self.s0, self.z0 = s.to(torch.float32), None if z is None else z.to(torch.float32)
        with torch.no_grad():
            for p in self.params():
                p.zero_()


def kl_to_reference(logits: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(p_ref || p) of next-token distributions (``ref_logp``: log-probs)."""
    logp = torch.log_softmax(logits.float(), -1)
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean()


def _check_pair(src: Path, ckpt: Path, dst: Path) -> BipolarQuantSpec:
    for p, what in ((src, "SRC"), (ckpt, "CKPT")):
        if not (p / "config.json").is_file():
            raise TuneError(f"{what} {p}: no config.json; pass a checkpoint directory")
    cfg = json.loads((ckpt / "config.json").read_text())
    qc = cfg.get("quantization_config")
    if not qc or qc.get("quant_method") != "bipolar":
        raise TuneError(f"CKPT {ckpt} is not a bipolar checkpoint (no bipolar quantization_config); convert it "
                        "first with python -m quant_tools.convert")
    src_cfg = json.loads((src / "config.json").read_text())
    if src_cfg.get("quantization_config"):
        raise TuneError(f"SRC {src} is quantized; pass the full-precision model CKPT was converted from")
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size"):
        if src_cfg.get(key) != cfg.get(key):
            raise TuneError(f"SRC and CKPT differ in {key} ({src_cfg.get(key)} vs {cfg.get(key)}): SRC must be the "
                            "model CKPT was converted from")
    for p in (src, ckpt):
        pr, dr = p.resolve(), dst.resolve()
        if dr == pr or pr in dr.parents or dr in pr.parents:
            raise TuneError(f"DST {dst} must not be {p}, inside it or contain it; inputs are never modified")
    try:
        return BipolarQuantSpec.from_dict(qc)
    except BipolarConfigError as e:
        raise TuneError(f"CKPT {ckpt}: {e}") from e


def tune(src: str, ckpt: str, dst: str, text: str | Path = DEFAULT_CALIB, samples: int = 128, seqlen: int = 512,
         seed: int = 0, epochs: int = 1, batch: int = 4, lr: float = 3e-3, val_samples: int = 8,
         overwrite: bool = False, progress: bool = True, compute: str = "bfloat16") -> dict:
    """Tune CKPT's scales/offsets against SRC; write DST. Returns the record written to tuning.json."""
    from tqdm import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM

    src_p, ckpt_p, dst_p = Path(src).absolute(), Path(ckpt).absolute(), Path(dst).absolute()
    spec = _check_pair(src_p, ckpt_p, dst_p)
    if dst_p.exists() and not overwrite:  # before the tuning, not after it
        raise TuneError(f"{dst_p} already exists; choose another destination or pass --overwrite")
    if epochs < 1 or batch < 1 or samples < 1 or val_samples < 0 or not lr > 0:
        raise TuneError(f"--epochs {epochs}, --batch {batch}, --samples {samples} must be >= 1, --val-samples "
                        f"{val_samples} >= 0 and --lr {lr} > 0")
    t0 = time.time()
    try:
        ids = calibration_windows(src_p, CalibOptions(text=Path(text), samples=samples, seqlen=seqlen, seed=seed))
        val = calibration_windows(src_p, CalibOptions(text=Path(text), samples=max(val_samples, 1), seqlen=seqlen,
                                                      seed=seed + 1))[:val_samples]
    except (CalibrationError, ValueError) as e:
        raise TuneError(str(e)) from e

    attn = attention_implementation(AutoConfig.from_pretrained(str(src_p)))  # eager where logits are soft-capped
    reference = AutoModelForCausalLM.from_pretrained(str(src_p), dtype=torch.float32, attn_implementation=attn).eval()
    model, _, _ = load_model(ckpt_p)
    tensors = read_tensors(ckpt_p)
    tuned: dict[str, TunedLinear] = {}
    for name, t in tensors.items():
        if name.endswith(".qweight"):
            module = name[: -len(".qweight")]
            group = module_tensors(tensors, module)
            scales, zeros = decode_tensors(group)
            grid = ParamGrid(scales.dtype, group.get("scales_step"), group.get("zeros_step"))
            tuned[module] = TunedLinear(model.get_submodule(module), t, scales, zeros, spec.group_size, grid)
    if not tuned:
        raise TuneError(f"CKPT {ckpt_p} has no quantized layers (.qweight tensors)")
    for p in model.parameters():
        p.requires_grad_(False)
    hooks = install_runtime_hooks(model, spec, straight_through=True)
    params = [p for t in tuned.values() for p in t.params()]

    if compute not in COMPUTE:
        raise TuneError(f"--compute {compute}: expected one of {sorted(COMPUTE)}")
    autocast = COMPUTE[compute]

    def forward(net, x):
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            return net(x).logits

    def reference_logp(x):
        with torch.no_grad():
            return torch.log_softmax(forward(reference, x).float(), -1)

    def mean_kl(windows) -> float:
        if not len(windows):
            return float("nan")
        with torch.no_grad():
            return sum(float(kl_to_reference(forward(model, windows[i:i + batch]), reference_logp(windows[i:i + batch])))
                       * len(windows[i:i + batch]) for i in range(0, len(windows), batch)) / len(windows)

    val_before = mean_kl(val)
    steps = epochs * math.ceil(len(ids) / batch)
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / steps)  # linear decay to 0
    g = torch.Generator().manual_seed(seed)
    curve = []
    bar = tqdm(total=steps, desc="tuning scales", unit="step", disable=not progress, file=sys.stderr)
    for epoch in range(epochs):
        order = torch.randperm(len(ids), generator=g)
        for i in range(0, len(ids), batch):
            x = ids[order[i:i + batch]]
            loss = kl_to_reference(forward(model, x), reference_logp(x))
            if not torch.isfinite(loss):
                raise TuneError(f"the KL became {float(loss)} at step {len(curve)}; lower --lr (now {lr})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            curve.append(round(loss.item(), 6))
            bar.update(1)
            bar.set_postfix_str(f"KL {curve[-1]:.4f}")
    bar.close()
    for t in tuned.values():  # what DST holds: s and z rounded to the checkpoint's dtype
        t.round_to_stored()
    val_after = mean_kl(val)
    record = {"src": str(src_p), "ckpt": str(ckpt_p), "calib": str(text), "samples": samples, "seqlen": seqlen,
              "seed": seed, "epochs": epochs, "batch": batch, "lr": lr, "steps": steps, "compute": compute,
              "train_kl_first_steps": curve[: max(1, steps // 10)], "train_kl_last_steps": curve[-max(1, steps // 10):],
              "val_samples": val_samples, "val_kl_before": val_before, "val_kl_after": val_after,
              "seconds": round(time.time() - t0, 1)}
    for h in hooks:
        h.remove()

    with atomic_output_dir(dst_p, overwrite=overwrite) as tmp:
        writer = ShardedWriter(tmp)
        for name, t in tensors.items():
            module, _, kind = name.rpartition(".")
            if module in tuned and kind in GROUP_TENSORS[2]:
                t = tuned[module].stored_tensors()[kind]
            writer.add(name, t)
        writer.close()
        for f in ckpt_p.iterdir():  # config, tokenizer and the rest, as CKPT has them
            if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
                shutil.copy2(f, tmp / f.name)
        (tmp / "tuning.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m quant_tools.tune", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="the full-precision checkpoint CKPT was converted from (the reference); never modified")
    ap.add_argument("ckpt", help="bipolar checkpoint (quant_tools.convert output); never modified")
    ap.add_argument("dst", help="output directory; must not exist unless --overwrite")
    ap.add_argument("--calib", default=str(DEFAULT_CALIB),
                    help="plain-text file; windows come from its calibration part, as the converter's (default: %(default)s)")
    ap.add_argument("--samples", type=int, default=128, help="training windows (default 128)")
    ap.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the window draw and order (default 0)")
    ap.add_argument("--epochs", type=int, default=1, help="passes over the windows (default 1)")
    ap.add_argument("--batch", type=int, default=4, help="windows per optimizer step (default 4)")
    ap.add_argument("--lr", type=float, default=3e-3,
                    help="Adam learning rate of the relative scale/offset changes, decayed linearly to 0 (default 3e-3)")
    ap.add_argument("--compute", choices=sorted(COMPUTE), default="bfloat16",
                    help="matmul precision of both models' forward and backward: bfloat16 (CPU autocast; AMX where "
                         "the CPU has it) or float32 (default bfloat16); the scales are kept and updated in float32")
    ap.add_argument("--val-samples", type=int, default=8,
                    help="other windows (seed + 1) whose KL is reported before and after (default 8; 0: none)")
    ap.add_argument("--overwrite", action="store_true", help="replace DST if it exists (only once the new one is complete)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        rec = tune(args.src, args.ckpt, args.dst, args.calib, args.samples, args.seqlen, args.seed, args.epochs,
                   args.batch, args.lr, args.val_samples, args.overwrite, not args.no_progress, args.compute)
    except (TuneError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: nothing was written to {args.dst}", file=sys.stderr)
        return 130
    print(f"tuned {args.ckpt} -> {args.dst} in {rec['seconds']} s ({rec['steps']} steps): KL on {args.val_samples} "
          f"held-out windows {rec['val_kl_before']:.5f} -> {rec['val_kl_after']:.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

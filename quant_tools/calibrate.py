"""Calibrated conversion: layer-by-layer GPTQ-style quantization on calibration text, and the
sensitivity measurement behind ``--avg-bits`` (mixed precision).

Streaming: the model is built on the meta device and one decoder layer at a time is loaded from
the checkpoint (float32), so memory holds one layer's weights plus the calibration activations
entering it ([samples, seqlen, hidden]). For each layer:

 1. run the layer on its inputs (the outputs of the already-quantized layers before it) and
    accumulate the input second moment H = mean x x^T of each linear (q/k/v share one H, gate/up
    share one), after the run-time input transforms (online Hadamard, activation quantization
    when a_bits < 16) so H describes what the quantized model's kernels will see;
 2. quantize each linear with :func:`quant_tools.gptq.gptq_quantize` (q/k/v and gate/up as one
    stacked matrix: GPTQ treats rows independently, so this equals separate runs);
 3. put the dequantized weights in and run the layer again: its outputs feed the next layer.

Calibration text: token windows of ``seqlen`` drawn (seeded) from the calibration part of the
file, i.e. the first half of its articles (``quant_tools/lm_eval_tasks/wikitext_local.py``); the
evaluation tasks read only the second half. A file without WikiText article headings is used whole.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from vllm_bipolar.format import BipolarQuantSpec
from vllm_bipolar.format.quantize import QuantizedWeight, clip_activations, fake_quantize_activations
from vllm_bipolar.format.spec import A16
from vllm_bipolar.format.transforms import block_hadamard, hadamard_block

from .gptq import gptq_quantize
from .lm_eval_tasks.wikitext_local import calibration_text, detokenize, split_articles

# method -> grid and default act-order. "gptq": bipolar grid with a continuous offset, a per-group
# scale search weighted by the inverse Hessian, act-order. "gptq_int": GPTQ as published (signed
# INT grid with an integer zero point from min/max, no search, no act-order).
CALIBRATED_METHODS = {"gptq": ("bipolar", True), "gptq_int": ("int", False)}
DEFAULT_BIT_SET = (2, 3, 4, 8)
EXTRAPOLATE_ABOVE = 5  # --avg-bits measures widths up to this and extrapolates wider ones
# Linears that share an input (one Hessian, one unit of the bit allocation), per decoder layer.
UNITS = (("qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
         ("o", ("self_attn.o_proj",)),
         ("gate_up", ("mlp.gate_proj", "mlp.up_proj")),
         ("down", ("mlp.down_proj",)))
# The same units where the checkpoint stores q/k/v and gate/up fused (Phi-3).
FUSED_UNITS = (("qkv", ("self_attn.qkv_proj",)),
               ("o", ("self_attn.o_proj",)),
               ("gate_up", ("mlp.gate_up_proj",)),
               ("down", ("mlp.down_proj",)))


def layer_units(layer: torch.nn.Module) -> tuple:
    """UNITS or FUSED_UNITS, as the decoder layer (a transformers module) has its linears."""
    return FUSED_UNITS if hasattr(layer.self_attn, "qkv_proj") else UNITS


class CalibrationError(ValueError):
    """Bad calibration input or options; the message says what to fix."""


@dataclasses.dataclass
class CalibOptions:
    text: Path
    samples: int = 128
    seqlen: int = 512
    seed: int = 0
    damp: float = 0.01
    act_order: bool | None = None  # None: the method's default
    batch: int = 8  # windows per forward call
    refit: bool = False  # least-squares refit of each row's scales/offsets after GPTQ (gptq_quantize)
    fp_targets: bool = False  # fit the full-precision model's outputs (see fp_target_weights)

    def check(self) -> None:
        if not Path(self.text).is_file():
            raise CalibrationError(f"--calib {self.text}: no such file; pass a plain-text file (e.g. "
                                   "../shared/data/wikitext-2/valid.txt)")
        if self.samples < 1 or self.seqlen < 16:
            raise CalibrationError(f"--calib-samples {self.samples} / --calib-seqlen {self.seqlen}: need at "
                                   "least 1 sample of at least 16 tokens (defaults 128 x 512)")
        if not 0 < self.damp <= 1:
            raise CalibrationError(f"--damp {self.damp}: expected a fraction of the mean Hessian diagonal in (0, 1]")


def calibration_windows(tokenizer_dir: Path, opts: CalibOptions, samples: int | None = None) -> torch.Tensor:
    """[samples, seqlen] token ids drawn (seeded) from the calibration part of ``opts.text``."""
    from transformers import AutoTokenizer

    opts.check()
    raw = Path(opts.text).read_text(encoding="utf-8", errors="replace")
    part = calibration_text(raw) if len(split_articles(raw)) >= 2 else raw
    try:
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except Exception as e:
        raise CalibrationError(f"{tokenizer_dir}: cannot load the tokenizer ({e}); calibration needs the "
                               "source checkpoint's tokenizer files") from e
    ids = torch.tensor(tok(detokenize(part))["input_ids"], dtype=torch.long)
    n = samples or opts.samples
    if ids.numel() < opts.seqlen + 1:
        raise CalibrationError(f"--calib {opts.text}: its calibration part has {ids.numel()} tokens, fewer "
                               f"than --calib-seqlen {opts.seqlen}; use a longer text or a shorter window")
    g = torch.Generator().manual_seed(opts.seed)
    starts = torch.randint(0, ids.numel() - opts.seqlen, (n,), generator=g)
    return torch.stack([ids[s:s + opts.seqlen] for s in starts.tolist()])


def attention_implementation(cfg) -> str:
    """transformers' attention for a faithful float32 forward of ``cfg``'s model: "eager" where the model
    soft-caps its attention logits (Gemma 2; transformers' sdpa path drops the cap), else "sdpa"."""
    return "eager" if getattr(cfg, "attn_logit_softcapping", None) else "sdpa"


class LayerStream:
    """A decoder (Llama, Mistral, Qwen2/3, Gemma 1/2/3) whose layers are loaded from the checkpoint one at a
    time, each run as the model runs it: causal attention, limited to the layer's sliding window where it
    has one (Mistral; the sliding layers of Gemma 2 / 3 and Qwen2 / 3) and the window is shorter than the
    sequence."""

    def __init__(self, ckpt, transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.ckpt = ckpt
        self.transform = transform
        cfg = AutoConfig.from_pretrained(str(ckpt.path))
        cfg._attn_implementation = attention_implementation(cfg)
        self.config = cfg
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
        self.layers = model.model.layers
        self.norm = model.model.norm
        self.rotary = type(model.model.rotary_emb)(config=cfg)
        # Gemma 3 keeps one rotary table per attention type (sliding / full), chosen by each layer's type.
        self.rotary_by_layer_type = "layer_type" in inspect.signature(self.rotary.forward).parameters
        # Gemma models multiply the embeddings by sqrt(hidden size) and Gemma 2 soft-caps the logits.
        self.embed_scale = cfg.hidden_size ** 0.5 if cfg.model_type in ("gemma", "gemma2", "gemma3_text") else 1.0
        self.logit_softcap = getattr(cfg, "final_logit_softcapping", None)
        self._head: torch.Tensor | None = None
        names = set(ckpt.names())
        self.base = "model." if any(n.startswith("model.layers.") for n in names) else ""

    def tensor(self, name: str) -> torch.Tensor:
        t = self.ckpt.get(name)
        if self.transform is not None:
            t = self.transform(name, t)
        return t.to(torch.float32)

    def layer_prefix(self, i: int) -> str:
        return f"{self.base}layers.{i}"

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        e = torch.nn.functional.embedding(ids, self.tensor(f"{self.base}embed_tokens.weight"))
        return e * self.embed_scale if self.embed_scale != 1.0 else e

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Next-token logits of final hidden states ``h`` [..., d]: the model's own final norm, the lm_head
        (the embedding where they are tied) and its logit soft-cap, if any."""
        if self._head is None:
            name = "lm_head.weight" if "lm_head.weight" in self.ckpt.weight_map else f"{self.base}embed_tokens.weight"
            self.norm.to_empty(device="cpu")
            self.norm.load_state_dict({k: self.tensor(f"{self.base}norm.{k}") for k in self.norm.state_dict()})
            self.norm.float()
            self._head = self.tensor(name)
        z = self.norm(h) @ self._head.T
        return z if self.logit_softcap is None else torch.tanh(z / self.logit_softcap) * self.logit_softcap

    def load(self, i: int) -> torch.nn.Module:
        layer = self.layers[i]
        keys = list(layer.state_dict())
        state = {k: self.tensor(f"{self.layer_prefix(i)}.{k}") for k in keys}
        layer.to_empty(device="cpu")
        layer.load_state_dict(state)
        return layer.float()

    def unload(self, i: int) -> None:
        self.layers[i].to("meta")

    def sliding_window(self, layer: torch.nn.Module) -> int | None:
        attn = layer.self_attn
        if hasattr(attn, "sliding_window"):  # None on full-attention layers
            return attn.sliding_window
        return getattr(self.config, "sliding_window", None) if self.config.model_type == "mistral" else None

    def call(self, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """One decoder layer on hidden states ``x`` [B, T, d] (positions 0..T-1)."""
        t = x.shape[1]
        pos = torch.arange(t)[None, :]
        pe = self.rotary(x, pos, layer.self_attn.layer_type) if self.rotary_by_layer_type else self.rotary(x, pos)
        # No mask: sdpa's causal attention over the whole sequence. Eager attention (Gemma 2) masks only
        # what it is given, so it always gets the causal mask.
        mask, window = None, self.sliding_window(layer)
        if (window is not None and window < t) or self.config._attn_implementation == "eager":
            i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
            keep = (j <= i) & (i - j < (window or t))
            mask = torch.zeros(t, t, dtype=x.dtype).masked_fill_(~keep, float("-inf"))[None, None]
        y = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=pe)
        return y[0] if isinstance(y, tuple) else y

    def run(self, layer: torch.nn.Module, xs: torch.Tensor, batch: int) -> torch.Tensor:
        return torch.cat([self.call(layer, xs[b:b + batch]) for b in range(0, xs.shape[0], batch)])


def _submodule(layer: torch.nn.Module, path: str) -> torch.nn.Module:
    for part in path.split("."):
        layer = getattr(layer, part)
    return layer


def runtime_input(x: torch.Tensor, block: int, a_bits: int, clip: float | None) -> torch.Tensor:
    """A quantized linear's input as its kernels see it: the online block Hadamard (``block`` > 0),
    then, with quantized activations, clipping at ``clip`` x each token's absmax (None: none) and
    per-token quantize-dequantize (the plugin: BipolarLinearMethod.apply, then the backend)."""
    if block:
        x = block_hadamard(x, block)
    if a_bits != A16:
        x2 = x.reshape(-1, x.shape[-1])
        if clip is not None:
            x2 = clip_activations(x2, clip)
        x = fake_quantize_activations(x2, a_bits).reshape(x.shape)
    return x


def _install_runtime_hooks(layer, prefix: str, spec: BipolarQuantSpec, quantized: set[str],
                           act_quant: bool = True) -> list:
    """Pre-hooks reproducing the run-time input transforms of the quantized linears (online
    Hadamard, activation clipping, then per-token activation quantization), so calibration sees
    what the kernels see."""
    clip = spec.a_clip_ratio if spec.clips_activations() else None
    handles = []
    for _, members in layer_units(layer):
        for rel in members:
            name = f"{prefix}.{rel}"
            if name not in quantized:
                continue
            block = hadamard_block(_submodule(layer, rel).in_features) if spec.has_online_hadamard(name) else 0
            a_bits = spec.a_bits if act_quant else A16
            if not block and a_bits == A16:
                continue

            def hook(mod, args, block=block, a_bits=a_bits):
                return (runtime_input(args[0], block, a_bits, clip),) + tuple(args[1:])

            handles.append(_submodule(layer, rel).register_forward_pre_hook(hook))
    return handles


def _capture_inputs(layer, units: list[tuple[str, tuple[str, ...]]]) -> tuple[dict, list]:
    """Forward pre-hooks keeping each unit's (transformed) inputs, one [tokens, K] tensor per call."""
    kept = {u: [] for u, _ in units}
    handles = []
    for unit, members in units:
        def hook(mod, args, unit=unit):
            kept[unit].append(args[0].reshape(-1, args[0].shape[-1]).to(torch.float32))
        handles.append(_submodule(layer, members[0]).register_forward_pre_hook(hook))
    return kept, handles


def _collect_hessians(layer, units: list[tuple[str, tuple[str, ...]]],
                      fp_inputs: dict | None = None) -> tuple[dict, list]:
    """Forward pre-hooks accumulating sum x x^T (float64) and the token count at the first member
    of each unit (registered after the run-time hooks, so they see transformed inputs). With
    ``fp_inputs`` (the full-precision model's inputs of the same batches, in call order) also the
    cross moment sum x_fp^T x ("c")."""
    stats = {u: {"h": None, "n": 0, "c": None, "calls": 0} for u, _ in units}
    handles = []
    for unit, members in units:
        def hook(mod, args, unit=unit):
            x = args[0].reshape(-1, args[0].shape[-1]).to(torch.float32)
            st = stats[unit]
            xtx = (x.T @ x).to(torch.float64)
            st["h"] = xtx if st["h"] is None else st["h"] + xtx
            if fp_inputs is not None:
                ctx = (fp_inputs[unit][st["calls"]].T @ x).to(torch.float64)
                st["c"] = ctx if st["c"] is None else st["c"] + ctx
            st["calls"] += 1
            st["n"] += x.shape[0]
        handles.append(_submodule(layer, members[0]).register_forward_pre_hook(hook))
    return stats, handles


# Ridge of --fp-targets' fit, a fraction of the mean diagonal of H_q. Measured on SmolLM2-135M
# (W4A4, Hadamard rotation, clip 0.8; fitted on 16 x 512 calibration tokens, error against the
# full-precision outputs on 8 x 512 others, layers 0-2): 0.01 overfits down_proj (error x1.02-1.37),
# 0.1 gives x0.44-0.54 on q/k/v, x0.80-0.87 on gate/up, x0.56-0.89 on o_proj, x0.91-1.02 on down_proj.
FP_TARGET_DAMP = 0.1


def fp_target_weights(w: torch.Tensor, h_q: torch.Tensor, cross: torch.Tensor, damp: float) -> torch.Tensor:
    """The weights W* that best map the quantized model's inputs X_q to the full-precision model's
    outputs X W^T of this linear (X its inputs in the full-precision model, rows = tokens), kept
    near W: argmin_V ||X W^T - X_q V^T||^2 + lambda ||V - W||^2 = W (C + lambda I)(H_q + lambda I)^-1
    with C = X^T X_q and H_q = X_q^T X_q (both per token), lambda = ``damp`` x mean diag H_q. The
    ridge pulls towards W, not 0: input directions the calibration data hardly visits keep W's
    weights. Since ||X W^T - X_q Q^T||^2 = ||X_q (W* - Q)^T||^2 + const (up to the ridge), GPTQ on
    W* with the Hessian H_q then minimises the error against the full-precision outputs: the
    weights also compensate the error of the activation quantizer and of the quantized layers before."""
    k = h_q.shape[0]
    lam = damp * torch.diagonal(h_q).mean().clamp_min(1e-12)
    eye = torch.eye(k, dtype=torch.float64)
    hd = h_q.to(torch.float64) + lam * eye
    # W* = W (C + lam I) Hd^-1  <=>  Hd W*^T = (C + lam I)^T W^T (Hd symmetric)
    sol = torch.linalg.solve(hd, (cross.to(torch.float64) + lam * eye).T @ w.to(torch.float64).T)
    return sol.T.to(torch.float32)


def _quantize_unit(layer, prefix: str, members: tuple[str, ...], h: torch.Tensor, bits: int,
                   spec: BipolarQuantSpec, method: str, opts: CalibOptions, dtype: torch.dtype,
                   cross: torch.Tensor | None = None):
    """GPTQ on the stacked weights of a unit; returns ({module: QuantizedWeight}, row errors, dequant).
    ``cross``: X^T X_q (per token) of the unit's full-precision and quantized-model inputs: fit the
    full-precision outputs (:func:`fp_target_weights`)."""
    grid, ao_default = CALIBRATED_METHODS[method]
    act_order = ao_default if opts.act_order is None else opts.act_order
    mods = [_submodule(layer, rel) for rel in members]
    w = torch.cat([m.weight.detach() for m in mods])
    if cross is not None:
        w = fp_target_weights(w, h, cross, FP_TARGET_DAMP)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # GPTQ's column loop is many small ops: threads only add overhead
    try:
        res = gptq_quantize(w, h, bits, spec.group_size, grid=grid, symmetric=spec.symmetric,
                            act_order=act_order, damp=opts.damp, dtype=dtype, refit=opts.refit,
                            format_version=spec.format_version)
    finally:
        torch.set_num_threads(threads)
    out, row = {}, 0
    q = res.qweight
    for rel, m in zip(members, mods):
        n = m.weight.shape[0]
        out[f"{prefix}.{rel}"] = QuantizedWeight(
            codes=q.codes[row:row + n], scales=q.scales[row:row + n],
            zeros=None if q.zeros is None else q.zeros[row:row + n], bits=bits, group_size=q.group_size,
            grid=None if q.grid is None else q.grid.rows(slice(row, row + n)))
        row += n
    return out, res


def calibrated_layers(stream: LayerStream, spec: BipolarQuantSpec, method: str, opts: CalibOptions,
                      ids: torch.Tensor, quantized: set[str], dtype: torch.dtype,
                      log: Callable[[str], None] = lambda s: None) -> Iterator[tuple[str, QuantizedWeight]]:
    """Yield (module, QuantizedWeight) for every quantized linear, layer by layer (see module doc)."""
    with torch.no_grad():
        xs = stream.embed(ids)
        xs_fp = xs if opts.fp_targets else None
        for i in range(len(stream.layers)):
            t0 = time.time()
            prefix = stream.layer_prefix(i)
            layer = stream.load(i)
            units = [(u, m) for u, m in layer_units(layer) if f"{prefix}.{m[0]}" in quantized]
            fp_inputs = None
            if opts.fp_targets:  # the full-precision model's inputs of each unit, batch by batch
                fp_runtime = _install_runtime_hooks(layer, prefix, spec, quantized, act_quant=False)
                fp_inputs, fp_handles = _capture_inputs(layer, units)
                xs_fp_next = stream.run(layer, xs_fp, opts.batch)
                for hnd in fp_handles + fp_runtime:
                    hnd.remove()
            runtime = _install_runtime_hooks(layer, prefix, spec, quantized)
            stats, handles = _collect_hessians(layer, units, fp_inputs)
            stream.run(layer, xs, opts.batch)
            for hnd in handles:
                hnd.remove()
            for unit, members in units:
                st = stats[unit]
                bits = spec.bits_for(f"{prefix}.{members[0]}")
                cross = st["c"] / st["n"] if opts.fp_targets else None
                qws, res = _quantize_unit(layer, prefix, members, st["h"] / st["n"], bits, spec, method, opts, dtype,
                                          cross)
                row = 0
                for rel in members:
                    mod = _submodule(layer, rel)
                    n = mod.weight.shape[0]
                    mod.weight.copy_(res.dequant[row:row + n])
                    row += n
                yield from qws.items()
            xs = stream.run(layer, xs, opts.batch)
            if opts.fp_targets:
                xs_fp = xs_fp_next
            for hnd in runtime:
                hnd.remove()
            stream.unload(i)
            log(f"layer {i}: {time.time() - t0:.1f} s")


CLIP_CANDIDATES = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def _next_token_loss(stream: LayerStream, h: torch.Tensor, ids: torch.Tensor) -> float:
    """Mean next-token cross entropy of final hidden states ``h`` [B, T, d] (final norm + lm_head)."""
    total = 0.0
    for b in range(h.shape[0]):
        logits = stream.logits(h[b][:-1])
        total += float(torch.nn.functional.cross_entropy(logits, ids[b, 1:], reduction="sum"))
    return total / ids[:, 1:].numel()


def search_clip_ratio(stream: LayerStream, spec: BipolarQuantSpec, ids: torch.Tensor, quantized: set[str],
                      batch: int, log: Callable[[str], None] = lambda s: None,
                      candidates: tuple[float, ...] = CLIP_CANDIDATES, samples: int = 8) -> tuple[float, dict]:
    """``--a-clip-ratio auto``: the activation clip ratio with the least next-token loss on (the first
    ``samples``) calibration windows, the model run with full-precision (rotated) weights and its
    run-time input transforms (online Hadamard, clipping at each candidate ratio, per-token
    activation quantization). One streamed pass: each layer is loaded once and run once per candidate."""
    ids = ids[:samples]
    specs = {r: dataclasses.replace(spec, a_clip_ratio=r) for r in candidates}
    with torch.no_grad():
        x0 = stream.embed(ids)
        hs = {r: x0 for r in candidates}
        for i in range(len(stream.layers)):
            layer = stream.load(i)
            for r in candidates:
                handles = _install_runtime_hooks(layer, stream.layer_prefix(i), specs[r], quantized)
                hs[r] = stream.run(layer, hs[r], batch)
                for hnd in handles:
                    hnd.remove()
            stream.unload(i)
        losses = {r: _next_token_loss(stream, hs[r], ids) for r in candidates}
    best = min(candidates, key=lambda r: (losses[r], -r))
    return best, {str(r): round(v, 5) for r, v in losses.items()}


# ---- mixed precision (--avg-bits) ---------------------------------------------------------------

def output_fisher(stream: LayerStream, spec: BipolarQuantSpec, quantized: set[str], ids: torch.Tensor,
                  batch: int) -> dict[str, torch.Tensor]:
    """Mean squared gradient of the next-token loss w.r.t. each decoder linear's outputs, per
    output channel (diagonal Fisher information of the outputs), by a streamed backward pass:
    the forward keeps only each layer's input hidden state, the backward reloads one layer at a
    time, recomputes it and propagates the gradient (gradient checkpointing per layer)."""
    with torch.no_grad():
        hs = [stream.embed(ids)]
        for i in range(len(stream.layers)):
            layer = stream.load(i)
            runtime = _install_runtime_hooks(layer, stream.layer_prefix(i), spec, quantized, act_quant=False)
            hs.append(stream.run(layer, hs[-1], batch))
            for hnd in runtime:
                hnd.remove()
            stream.unload(i)
    h_last = hs[-1].detach().requires_grad_(True)
    n_tokens = ids[:, 1:].numel()
    for b in range(0, ids.shape[0], 2):  # a few sequences at a time: the logits are vocab-wide
        logits = stream.logits(h_last[b:b + 2, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 ids[b:b + 2, 1:].reshape(-1), reduction="sum") / n_tokens
        loss.backward()
    grad = h_last.grad
    fisher: dict[str, torch.Tensor] = {}
    for i in reversed(range(len(stream.layers))):
        prefix = stream.layer_prefix(i)
        layer = stream.load(i)
        handles = _install_runtime_hooks(layer, prefix, spec, quantized, act_quant=False)
        for _, members in layer_units(layer):
            for rel in members:
                name = f"{prefix}.{rel}"

                def fwd(mod, args, out, name=name):
                    def acc(g):
                        sq = g.detach().to(torch.float64).pow(2).reshape(-1, g.shape[-1]).sum(0)
                        fisher[name] = fisher.get(name, 0) + sq
                    out.register_hook(acc)
                handles.append(_submodule(layer, rel).register_forward_hook(fwd))
        new_grad = torch.zeros_like(hs[i])
        for b in range(0, ids.shape[0], batch):
            x = hs[i][b:b + batch].detach().requires_grad_(True)
            y = stream.call(layer, x)
            y.backward(grad[b:b + batch])
            new_grad[b:b + batch] = x.grad
        for hnd in handles:
            hnd.remove()
        grad = new_grad
        stream.unload(i)
    n_all = ids.numel()
    return {k: v / n_all for k, v in fisher.items()}


def _measured_widths(bit_set: tuple[int, ...]) -> list[int]:
    """The widths that get a GPTQ run: all, except those above EXTRAPOLATE_ABOVE when a narrower one
    is in the set (see :func:`_extrapolated`)."""
    narrow = [b for b in bit_set if b <= EXTRAPOLATE_ABOVE]
    return sorted(narrow if narrow else bit_set)


def _extrapolated(loss: dict[int, float], bit_set: tuple[int, ...]) -> dict[str, float]:
    """``loss`` (per measured width) for every width of ``bit_set``, keyed by str(width). Rounding noise
    scales as step^2 = 4^-bits: a width not measured gets the widest measured loss x 4^(widest - bits)
    (the wide widths' losses are negligible next to the narrow ones, so no GPTQ is run for them)."""
    widest = max(loss)
    return {str(b): loss[b] if b in loss else loss[widest] * 4.0 ** (widest - b) for b in sorted(bit_set)}


def _unit_entry(layer, prefix: str, members: tuple[str, ...]) -> dict:
    """A sensitivity profile's record of a unit, without its losses: modules and parameter counts."""
    sizes = [_submodule(layer, rel).weight.numel() for rel in members]
    return {"modules": [f"{prefix}.{rel}" for rel in members], "params": sum(sizes), "module_params": sizes}


def sensitivity_profile(stream: LayerStream, spec: BipolarQuantSpec, method: str, opts: CalibOptions,
                        ids: torch.Tensor, fisher_ids: torch.Tensor, quantized: set[str], bit_set: tuple[int, ...],
                        dtype: torch.dtype, log: Callable[[str], None] = lambda s: None) -> dict:
    """Per unit (q/k/v, o, gate/up, down of each layer): parameter count and the estimated increase
    of the loss at each width in ``bit_set``: sum over output channels of Fisher x squared output
    error, the output errors measured after GPTQ at that width on the full-precision model's inputs."""
    fisher = output_fisher(stream, spec, quantized, fisher_ids, opts.batch)
    log("fisher: done")
    units_out = {}
    with torch.no_grad():
        xs = stream.embed(ids)
        for i in range(len(stream.layers)):
            prefix = stream.layer_prefix(i)
            layer = stream.load(i)
            runtime = _install_runtime_hooks(layer, prefix, spec, quantized)
            units = [(u, m) for u, m in layer_units(layer) if f"{prefix}.{m[0]}" in quantized]
            stats, handles = _collect_hessians(layer, units)
            xs_next = stream.run(layer, xs, opts.batch)
            for hnd in handles + runtime:
                hnd.remove()
            for unit, members in units:
                h = stats[unit]["h"] / stats[unit]["n"]
                f = torch.cat([fisher[f"{prefix}.{rel}"] for rel in members])
                err = {}
                for bits in _measured_widths(bit_set):
                    _, res = _quantize_unit(layer, prefix, members, h, bits, spec, method, opts, dtype)
                    err[bits] = float((f * res.row_error).sum())
                units_out[f"{prefix}.{members[0]}"] = {**_unit_entry(layer, prefix, members),
                                                       "loss": _extrapolated(err, bit_set)}
            xs = xs_next
            stream.unload(i)
            log(f"profile layer {i}")
    return units_out


SENSITIVITY_MEASURES = ("fisher", "loss", "kl")


class HeldModel:
    """The whole model held in memory (float32, run-time input transforms installed) for the measured
    sensitivity (``--sensitivity-measure loss|kl``) and its refinement at the operating point
    (``--sensitivity-refine``): every unit quantized by GPTQ at each measured width (Hessian from the
    full-precision model's inputs over ``ids``), the full-precision hidden states of the scoring
    windows ``loss_ids`` at every layer input, and a score of final hidden states:

    * ``loss``: the mean next-token cross entropy on ``loss_ids``;
    * ``kl``: the mean KL divergence KL(p_fp || p) of the next-token distributions from the
      full-precision model's (0 for the full-precision model). The expected increase of the
      next-token loss on text the model fits, without the sampling noise of the loss difference
      on a few windows (a perturbation that shifts the probabilities of tokens that happen to occur
      can lower the loss by chance; it cannot lower the KL divergence).

    Widths above ``EXTRAPOLATE_ABOVE`` get no GPTQ run: in :meth:`set_unit` they take the full-precision
    weights (their rounding error is ~4^-(bits-4) of 4-bit's, far below the measurement noise)."""

    def __init__(self, stream: LayerStream, spec: BipolarQuantSpec, method: str, opts: CalibOptions,
                 ids: torch.Tensor, loss_ids: torch.Tensor, quantized: set[str], bit_set: tuple[int, ...],
                 dtype: torch.dtype, measure: str = "loss", log: Callable[[str], None] = lambda s: None):
        if measure not in ("loss", "kl"):
            raise CalibrationError(f"measure {measure!r}: expected 'loss' or 'kl'")
        self.stream, self.opts, self.loss_ids, self.measure, self.log = stream, opts, loss_ids, measure, log
        self.n_layers = len(stream.layers)
        self.layers, self.runtime = [], []
        self.quant: dict[str, dict[int, torch.Tensor]] = {}  # unit -> width -> dequantized stacked weights
        self.fp: dict[str, torch.Tensor] = {}  # unit -> full-precision stacked weights
        self.unit_layer: dict[str, int] = {}
        self.members: dict[str, tuple[str, ...]] = {}
        self.entries: dict[str, dict] = {}  # unit -> modules and parameter counts
        with torch.no_grad():
            xs, self.hs = stream.embed(ids), [stream.embed(loss_ids)]
            for i in range(self.n_layers):
                prefix = stream.layer_prefix(i)
                layer = stream.load(i)
                self.layers.append(layer)
                units = [(u, m) for u, m in layer_units(layer) if f"{prefix}.{m[0]}" in quantized]
                self.runtime += _install_runtime_hooks(layer, prefix, spec, quantized)
                stats, handles = _collect_hessians(layer, units)
                xs = stream.run(layer, xs, opts.batch)
                for hnd in handles:
                    hnd.remove()
                self.hs.append(stream.run(layer, self.hs[-1], opts.batch))
                for unit, members in units:
                    h = stats[unit]["h"] / stats[unit]["n"]
                    name = f"{prefix}.{members[0]}"
                    self.unit_layer[name], self.members[name] = i, members
                    self.entries[name] = _unit_entry(layer, prefix, members)
                    self.fp[name] = torch.cat([_submodule(layer, rel).weight.detach().clone() for rel in members])
                    self.quant[name] = {}
                    for bits in _measured_widths(bit_set):
                        _, res = _quantize_unit(layer, prefix, members, h, bits, spec, method, opts, dtype)
                        self.quant[name][bits] = res.dequant
                log(f"measure: quantized layer {i}")
            del xs
            self.ref = [self._logprobs(self.hs[-1][b]) for b in range(loss_ids.shape[0])] if measure == "kl" else None
            self.base = self.score(self.hs[-1])

    def _logprobs(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.stream.logits(x[:-1]).double(), -1)  # float64: KL is a small difference

    @torch.no_grad()
    def score(self, h: torch.Tensor) -> float:
        """The measure of final hidden states ``h`` [B, T, d]: mean next-token loss or mean KL from the
        full-precision model's distributions (per predicted token)."""
        if self.measure == "loss":
            return _next_token_loss(self.stream, h, self.loss_ids)
        total = 0.0
        for b in range(h.shape[0]):
            lq, lp = self._logprobs(h[b]), self.ref[b]
            total += float((lp.exp() * (lp - lq)).sum())
        return total / (h.shape[0] * (h.shape[1] - 1))

    def set_unit(self, name: str, bits: int | None) -> None:
        """Put the unit's weights at ``bits`` (None, or a width without a GPTQ run: full precision)."""
        w = self.quant[name].get(bits, self.fp[name]) if bits is not None else self.fp[name]
        row = 0
        with torch.no_grad():
            for rel in self.members[name]:
                m = _submodule(self.layers[self.unit_layer[name]], rel)
                m.weight.copy_(w[row:row + m.weight.shape[0]])
                row += m.weight.shape[0]

    def run_from(self, i: int, h: torch.Tensor) -> torch.Tensor:
        for j in range(i, self.n_layers):
            h = self.stream.run(self.layers[j], h, self.opts.batch)
        return h

    def profile(self, bit_set: tuple[int, ...]) -> dict:
        """Per unit and width: the measure's increase with that unit alone quantized (every other unit
        in full precision); non-increasing in the width, floored (a measured gain is noise), widths
        above EXTRAPOLATE_ABOVE extrapolated (:func:`_extrapolated`)."""
        floor0 = 1e-9 * self.base if self.measure == "loss" else 1e-12
        units_out = {}
        with torch.no_grad():
            for name in self.quant:
                i = self.unit_layer[name]
                measured = {}
                for bits in self.quant[name]:
                    self.set_unit(name, bits)
                    measured[bits] = self.score(self.run_from(i, self.hs[i])) - self.base
                self.set_unit(name, None)
                floor, loss = floor0, {}
                for bits in sorted(measured, reverse=True):  # wide to narrow: non-increasing in width
                    floor = max(floor, measured[bits])
                    loss[bits] = floor
                units_out[name] = {**self.entries[name], "loss": _extrapolated(loss, bit_set)}
                self.log(f"measure: {name} {units_out[name]['loss']}")
        return units_out

    def operating_point(self, layer_bits: dict[str, int]) -> tuple[float, list[torch.Tensor]]:
        """Every unit at its width of ``layer_bits`` (module -> bits): the score and the hidden states
        of the scoring windows at every layer input."""
        for name in self.quant:
            self.set_unit(name, layer_bits[self.entries[name]["modules"][0]])
        hq = [self.hs[0]]
        with torch.no_grad():
            for j in range(self.n_layers):
                hq.append(self.stream.run(self.layers[j], hq[-1], self.opts.batch))
        return self.score(hq[-1]), hq

    def local_profile(self, layer_bits: dict[str, int], bit_set: tuple[int, ...]) -> tuple[float, dict]:
        """Sensitivities at the operating point ``layer_bits``: per unit and width of ``bit_set``, the
        change of the measure when that unit alone moves to that width and every other unit keeps its
        width (0 at its own width; negative where a wider width helps). Made non-increasing in the
        width. Returns (the operating point's score, profile in the form of :meth:`profile`)."""
        base, hq = self.operating_point(layer_bits)
        units_out = {}
        with torch.no_grad():
            for name in self.quant:
                i = self.unit_layer[name]
                own = layer_bits[self.entries[name]["modules"][0]]
                measured = {own: 0.0}
                for bits in bit_set:
                    if bits != own:
                        self.set_unit(name, bits)
                        measured[bits] = self.score(self.run_from(i, hq[i])) - base
                self.set_unit(name, own)
                floor, loss = -math.inf, {}
                for bits in sorted(measured, reverse=True):
                    floor = max(floor, measured[bits])
                    loss[str(bits)] = floor
                units_out[name] = {**self.entries[name], "loss": loss}
                self.log(f"refine: {name} at {own} bits {loss}")
        return base, units_out

    def close(self) -> None:
        for hnd in self.runtime:
            hnd.remove()
        for i in range(self.n_layers):
            self.stream.unload(i)


def measured_sensitivity(stream: LayerStream, spec: BipolarQuantSpec, method: str, opts: CalibOptions,
                         ids: torch.Tensor, loss_ids: torch.Tensor, quantized: set[str], bit_set: tuple[int, ...],
                         dtype: torch.dtype, log: Callable[[str], None] = lambda s: None,
                         measure: str = "loss") -> dict:
    """``--sensitivity-measure loss|kl``: per unit and width, the measured increase of the next-token loss
    (or of the KL divergence from the full-precision model's next-token distributions) on the windows
    ``loss_ids`` when that unit alone is quantized (GPTQ at that width, Hessian from the
    full-precision model's inputs over ``ids``) and every other layer stays in full precision.

    Same output as :func:`sensitivity_profile`. Holds every decoder layer in memory (the Fisher
    profile streams them), fine for small models. Widths above ``EXTRAPOLATE_ABOVE`` are
    extrapolated by 4^-bits from the widest measured one; each unit's losses are made
    non-increasing in the width and at least 1e-9 of the base loss (KL: 1e-12) (a measured gain is
    noise). See :class:`HeldModel`."""
    model = HeldModel(stream, spec, method, opts, ids, loss_ids, quantized, bit_set, dtype, measure, log)
    try:
        return model.profile(bit_set)
    finally:
        model.close()


def refine_allocation(model: HeldModel, units: dict, avg_bits: float, bit_set: tuple[int, ...], rounds: int,
                      min_bits: dict[str, int] | None = None, log: Callable[[str], None] = lambda s: None,
                      history: list[dict] | None = None,
                      save: Callable[[list[dict], bool], None] = lambda h, done: None) -> list[dict]:
    """``--sensitivity-refine N``: the allocation of ``units`` (each unit measured alone, the rest of the
    model in full precision) re-solved at its operating point, up to ``rounds`` times.

    The knapsack adds the units' losses as if they were independent, but at 2-3 bits a unit's cost
    depends on what the other units' errors have already done. Each round measures every unit's
    change of the measure at every width of ``bit_set`` with all other units at the best allocation's
    widths so far (:meth:`HeldModel.local_profile`: a first-order expansion around the operating
    point, interactions included), solves the same knapsack on those changes, and scores the new
    allocation as a whole. The rounds stop when the allocation repeats or its score is not lower than
    the best so far. Returns the history, [{"layer_bits", "score"}], the first entry the plain
    allocation and the best one marked ``"best": True``. ``history``: a saved history to go on from
    (its rounds count); ``save(history, done)`` is called after every round."""
    if history:
        history = [dict(h) for h in history]
    else:
        alloc = allocate_bits(units, avg_bits, bit_set, min_bits=min_bits)
        score, _ = model.operating_point(alloc)
        history = [{"layer_bits": alloc, "score": score}]
        log(f"refine: round 0 score {score:.6f}")
    for h in history:
        h.pop("best", None)
    best = min(range(len(history)), key=lambda k: history[k]["score"])
    done = False
    for r in range(len(history) - 1, rounds):
        _, local = model.local_profile(history[best]["layer_bits"], bit_set)
        new = allocate_bits(local, avg_bits, bit_set, min_bits=min_bits)
        if any(new == h["layer_bits"] for h in history):
            log(f"refine: round {r + 1} repeats an allocation; stop")
            done = True
            break
        score, _ = model.operating_point(new)
        history.append({"layer_bits": new, "score": score})
        changed = sum(new[m] != history[best]["layer_bits"][m] for m in new)
        log(f"refine: round {r + 1} score {score:.6f} ({changed} modules changed)")
        if score >= history[best]["score"]:
            done = True
            break
        best = len(history) - 1
        history[best]["best"] = True
        save(history, False)
        history[best].pop("best")
    history[best]["best"] = True
    save(history, done)
    return history


ALLOCATE_BY = ("unit", "type", "block")
_LAYER_PREFIX = re.compile(r"^(?P<block>(?:.+\.)?layers\.\d+)\.(?P<rel>.+)$")


def _component_match(pattern: str, name: str) -> bool:
    """``pattern``'s dotted components appear contiguously in ``name`` (``down_proj``,
    ``model.layers.0``, ``layers.3.mlp``), the matching rule of --skip."""
    p, n = pattern.split("."), name.split(".")
    return any(n[i:i + len(p)] == p for i in range(len(n) - len(p) + 1))


def pool_units(units: dict, by: str) -> dict:
    """The allocation's decision units: ``unit`` (each fused unit of each layer: q/k/v, o, gate/up,
    down), ``type`` (all layers' units of one type share a width: params and losses summed over the
    layers) or ``block`` (all units of one decoder layer share a width). Summing the per-layer loss
    estimates of a type or a block averages out their measurement noise; a width then costs the
    whole group's parameters."""
    if by not in ALLOCATE_BY:
        raise CalibrationError(f"--allocate-by {by!r}: expected one of {ALLOCATE_BY}")
    if by == "unit":
        return units
    pooled: dict[str, dict] = {}
    for name, u in units.items():
        m = _LAYER_PREFIX.match(name)
        key = name if m is None else (m.group("rel") if by == "type" else m.group("block"))
        p = pooled.setdefault(key, {"modules": [], "params": 0, "module_params": [], "loss": {}})
        p["modules"] += u["modules"]
        p["module_params"] += u["module_params"]
        p["params"] += u["params"]
        for b, v in u["loss"].items():
            p["loss"][b] = p["loss"].get(b, 0.0) + v
    return pooled


def allocate_bits(units: dict, avg_bits: float, bit_set: tuple[int, ...], min_bits: dict[str, int] | None = None,
                  by: str = "unit") -> dict[str, int]:
    """Widths per module minimising the summed loss estimates with sum(params * bits) at most
    avg_bits * sum(params): a multiple-choice knapsack solved exactly by dynamic programming over
    the bit budget (in units of the gcd of the parameter counts, coarsened to at most 40,000
    steps with sizes rounded up, which can only under-spend).

    ``min_bits``: {NAME: B}, the modules matching NAME (dotted components) get at least B bits (the
    widest floor of a unit's modules applies to the whole unit). ``by``: the decision units
    (:func:`pool_units`)."""
    units = pool_units(units, by)
    names = list(units)
    params = [units[n]["params"] for n in names]
    total = sum(params)
    floors = []
    for n in names:
        f = max([b for pat, b in (min_bits or {}).items() for m in units[n]["modules"] if _component_match(pat, m)],
                default=min(bit_set))
        if f > max(bit_set):
            raise CalibrationError(f"--min-bits: {units[n]['modules'][0]} must get {f} bits, more than the widest "
                                   f"of --bit-set {list(bit_set)}")
        floors.append(f)
    quantum = 0
    for p in params:
        quantum = math.gcd(quantum, p)
    max_steps = 40000
    if total * max(bit_set) // quantum > max_steps:
        quantum = math.ceil(total * max(bit_set) / max_steps)
    sizes = [math.ceil(p / quantum) for p in params]
    budget = math.floor(avg_bits * total / quantum + 1e-9)
    least = sum(size * min(b for b in bit_set if b >= f) for size, f in zip(sizes, floors))
    if least > budget:
        if min_bits:
            raise CalibrationError(f"--avg-bits {avg_bits}: the --min-bits floors alone need more bits than that "
                                   f"(at least {least * quantum / total:.3f}); lower the floors or raise --avg-bits")
        raise CalibrationError(f"--avg-bits {avg_bits}: even {min(bit_set)} bits everywhere exceeds the budget; "
                               f"use --avg-bits >= {min(bit_set)}")
    inf = float("inf")
    best = torch.full((budget + 1,), inf, dtype=torch.float64)
    best[0] = 0.0
    choice = []
    for n, size, floor in zip(names, sizes, floors):
        new = torch.full_like(best, inf)
        pick = torch.full((budget + 1,), -1, dtype=torch.int8)
        for bi, bits in enumerate(bit_set):
            cost = size * bits
            if cost > budget or bits < floor:
                continue
            cand = torch.full_like(best, inf)
            cand[cost:] = best[:budget + 1 - cost] + units[n]["loss"][str(bits)]
            better = cand < new
            new = torch.where(better, cand, new)
            pick = torch.where(better, torch.full_like(pick, bi), pick)
        best = new
        choice.append(pick)
    spent = int(torch.argmin(best))
    out = {}
    for n, size, pick in reversed(list(zip(names, sizes, choice))):
        bits = bit_set[int(pick[spent])]
        for m in units[n]["modules"]:
            out[m] = bits
        spent -= size * bits
    return out


def average_bits(layer_bits: dict[str, int], params: dict[str, int]) -> float:
    return sum(params[m] * b for m, b in layer_bits.items()) / sum(params[m] for m in layer_bits)


def load_or_profile(path: Path | None, key: dict, compute: Callable[[], dict]) -> dict:
    """The sensitivity profile from ``path`` when it was made with the same ``key``, else computed
    (and written to ``path`` when given)."""
    if path is not None and Path(path).is_file():
        try:
            saved = json.loads(Path(path).read_text())
        except json.JSONDecodeError:
            saved = {}
        if saved.get("key") == key:
            return saved["units"]
        print(f"note: {path} was made with other settings; measuring the sensitivities again", file=sys.stderr)
    units = compute()
    if path is not None:
        Path(path).write_text(json.dumps({"key": key, "units": units}, indent=1))
    return units


def read_profile(path: Path | None, key: dict) -> dict:
    """The saved sensitivity cache at ``path`` ({"key", "units", "refine"?}) when made with ``key``, else {}."""
    if path is None or not Path(path).is_file():
        return {}
    try:
        saved = json.loads(Path(path).read_text())
    except json.JSONDecodeError:
        return {}
    if saved.get("key") != key:
        print(f"note: {path} was made with other settings; measuring the sensitivities again", file=sys.stderr)
        return {}
    return saved


def write_profile(path: Path | None, saved: dict) -> None:
    if path is not None:
        Path(path).write_text(json.dumps(saved, indent=1))

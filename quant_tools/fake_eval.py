"""Fast perplexity of a bipolar checkpoint without vLLM: its weights dequantized into a Hugging Face
model (float32) with the run-time input transforms of ``quantization_config`` as forward hooks
(online Hadamard, activation clipping and per-token activation quantization), the same functions
the plugin's pure-torch backend runs. For exploring quantization settings on a small CPU machine;
the published numbers come from lm-eval through vLLM (``quant_tools.evaluate``).

    python -m quant_tools.fake_eval MODEL [--text FILE] [--articles 2] [--calib] [--a-clip-ratio R ...]
        [--mix NAME=CKPT ...]

Word perplexity as the ``wikitext2_local*`` tasks compute it: lm-eval's rolling windows
(``max_length - 2`` tokens, one token of context) over each evaluation article, the
log-likelihoods summed and divided by the article's WikiText word count. ``--calib`` scores
windows of the calibration part instead (for searches that must not look at the evaluation text).
``--a-clip-ratio`` overrides the checkpoint's clip ratio (several values: one evaluation each).
``--mix`` takes some layers from other checkpoints of the same rotation (screening an allocation).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from vllm_bipolar.format import BipolarQuantSpec, dequantize_packed
from vllm_bipolar.format.group_params import GROUP_TENSORS, decode_tensors, module_tensors
from vllm_bipolar.format.spec import A16
from vllm_bipolar.format.transforms import hadamard_block

from .calibrate import FUSED_UNITS, UNITS, _component_match, attention_implementation, runtime_input
from .lm_eval_tasks.wikitext_local import calibration_text, detokenize, evaluation_articles

DEFAULT_TEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2" / "valid.txt"


def mix_sources(path: str | Path, mix: list[tuple[str, str]]) -> dict[str, Path]:
    """Module name -> the checkpoint its weights come from: ``path`` unless a (NAME, CKPT) entry of
    ``mix`` matches the module (whole dotted components; later entries win)."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    n_layers = cfg["num_hidden_layers"]
    out = {}
    for i in range(n_layers):
        for rel in (rel for _, members in UNITS + FUSED_UNITS for rel in members):
            name = f"model.layers.{i}.{rel}"
            out[name] = Path(path)
            for pat, src in mix:
                if _component_match(pat, name):
                    out[name] = Path(src)
    return out


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    tensors = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for name in sf.keys():  # noqa: SIM118 - safe_open has no __iter__
                tensors[name] = sf.get_tensor(name)
    return tensors


def load_model(path: str | Path, mix: list[tuple[str, str]] | None = None):
    """(HF model in float32 with dequantized weights, spec or None, tokenizer). ``mix``: (NAME, CKPT)
    pairs, the decoder linears matching NAME dequantized from CKPT instead (a checkpoint made with the
    same rotation and seed), to screen a mixed-precision allocation without converting it."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    cfg_dict = json.loads((path / "config.json").read_text())
    qc = cfg_dict.get("quantization_config")
    spec = BipolarQuantSpec.from_dict(qc) if qc else None
    cfg = AutoConfig.from_pretrained(str(path))
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg._attn_implementation = attention_implementation(cfg)
    model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
    tensors = read_tensors(path)
    sources = mix_sources(path, mix) if mix else {}
    others: dict[Path, tuple[dict, BipolarQuantSpec]] = {}
    for src in set(sources.values()) - {path}:
        other_qc = json.loads((src / "config.json").read_text())["quantization_config"]
        others[src] = (read_tensors(src), BipolarQuantSpec.from_dict(other_qc))
    state = {}
    for name, t in tensors.items():
        if name.endswith(".qweight"):
            module = name[: -len(".qweight")]
            mod = model.get_submodule(module)
            src_t, src_spec = others.get(sources.get(module, path), (tensors, spec))
            scales, zeros = decode_tensors(module_tensors(src_t, module))
            w = dequantize_packed(src_t[f"{module}.qweight"], scales, zeros, mod.in_features, src_spec.group_size)
            state[f"{module}.weight"] = w
        elif not name.endswith(tuple(f".{n}" for n in GROUP_TENSORS[2])):
            state[name] = t.to(torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"{path}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if cfg.tie_word_embeddings:
        model.tie_weights()
    model.eval()
    return model, spec, AutoTokenizer.from_pretrained(str(path))


def install_runtime_hooks(model, spec: BipolarQuantSpec | None, a_clip_ratio: float | None = None,
                          act_only: tuple[str, ...] | None = None, straight_through: bool = False) -> list:
    """Forward pre-hooks applying each quantized linear's run-time input transforms (``act_only``:
    quantize the activations only of the modules matching one of these names, for diagnosis;
    ``straight_through``: the activation quantizer's gradient passed straight through, for training
    through the hooks; the online Hadamard is linear and differentiable as it is)."""
    handles = []
    if spec is None:
        return handles
    ratio = spec.a_clip_ratio if a_clip_ratio is None else a_clip_ratio
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or spec.is_skipped(name) or "layers." not in name:
            continue
        block = hadamard_block(mod.in_features) if spec.has_online_hadamard(name) else 0
        aq = act_only is None or any(a in name for a in act_only)

        a_bits = spec.a_bits if aq else A16
        clip = ratio if ratio is not None and ratio < 1 else None

        def hook(m, args, block=block, a_bits=a_bits):
            if not straight_through:
                return (runtime_input(args[0], block, a_bits, clip),) + tuple(args[1:])
            x = runtime_input(args[0], block, A16, None)
            if a_bits != A16:
                x = x + (runtime_input(x, 0, a_bits, clip) - x).detach()
            return (x,) + tuple(args[1:])

        handles.append(mod.register_forward_pre_hook(hook))
    return handles


def rolling_windows(tokens: list[int], prefix: int, max_length: int = 2048) -> list[tuple[list[int], list[int]]]:
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    return [make_disjoint_window(w) for w in get_rolling_token_windows(
        token_list=tokens, prefix_token=prefix, max_seq_len=max_length - 2, context_len=1)]


@torch.no_grad()
def loglikelihood(model, windows) -> float:
    total = 0.0
    for ctx, cont in windows:
        ids = torch.tensor([ctx + cont[:-1]])
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        tgt = torch.tensor(cont)
        total += float(logp[-len(cont):].gather(1, tgt[:, None]).sum())
    return total


def word_perplexity(model, tok, text: str, articles: int = 2, calib: bool = False, max_length: int = 2048) -> float:
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if calib:  # calibration part, cut into pseudo-documents of ~3k tokens
        ids = tok(detokenize(calibration_text(text)), add_special_tokens=False)["input_ids"]
        docs = [(ids[i * 3000:(i + 1) * 3000], None) for i in range(articles)]
        ll = sum(loglikelihood(model, rolling_windows(d, prefix, max_length)) for d, _ in docs)
        return math.exp(-ll / sum(len(d) for d, _ in docs))  # token perplexity
    ll, words = 0.0, 0
    for page in evaluation_articles(text, articles):
        ids = tok(detokenize(page), add_special_tokens=False)["input_ids"]
        ll += loglikelihood(model, rolling_windows(ids, prefix, max_length))
        words += len(page.split())
    return math.exp(-ll / words)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m quant_tools.fake_eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--text", default=str(DEFAULT_TEXT))
    ap.add_argument("--articles", type=int, default=2)
    ap.add_argument("--calib", action="store_true", help="score the calibration part (token perplexity)")
    ap.add_argument("--a-clip-ratio", type=float, nargs="+", default=[None])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--mix", nargs="+", default=[], metavar="NAME=CKPT",
                    help="take the decoder linears matching NAME (whole dotted components, e.g. down_proj, "
                         "model.layers.0) from the bipolar checkpoint CKPT, converted with the same rotation and "
                         "seed (later entries win): screens a mixed-precision allocation without converting it")
    ap.add_argument("--act-only", nargs="+", default=None, metavar="NAME",
                    help="quantize activations only at modules whose name contains one of these (diagnosis)")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    mix = [tuple(m.split("=", 1)) for m in args.mix]
    if any(len(m) != 2 for m in mix):
        ap.error("--mix: expected NAME=CKPT")
    model, spec, tok = load_model(args.model, mix)
    text = Path(args.text).read_text(encoding="utf-8", errors="replace")
    for r in args.a_clip_ratio:
        handles = install_runtime_hooks(model, spec, r, tuple(args.act_only) if args.act_only else None)
        ppl = word_perplexity(model, tok, text, args.articles, args.calib)
        for h in handles:
            h.remove()
        print(json.dumps({"model": args.model, "a_clip_ratio": r, "calib": args.calib, "act_only": args.act_only,
                          "mix": args.mix, "ppl": ppl}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

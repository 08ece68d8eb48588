"""Checkpoints of real model shapes for benchmarks, without real weights.

    python benchmarks/make_shapes.py DST --shape llama2-7b --method bipolar --w-bits 4 [--a-bits 16] [--format-version 2]
    python benchmarks/make_shapes.py DST --shape llama3-8b --method fp16
    python benchmarks/make_shapes.py DST --shape llama2-7b --method gptq      # real GPTQ tensors (random)

fp16 and bipolar write config.json only (vLLM's load_format="dummy" then makes random weights; the
bipolar plugin's parameters start as zeros, i.e. valid planes, and dummy scales are small finite
numbers). GPTQ needs real tensors, or vLLM falls back to fp16-sized weights: that mode writes
random packed int4 weights in the GPTQ layout (qweight [K/8, N], qzeros, scales, g_idx) with fp16
embeddings and norms, as safetensors shards. Shapes: llama2-7b, llama3-8b, and tiny (for tests).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rope_theta=10000.0),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    "tiny": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=2048, rope_theta=10000.0),
}
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def base_config(shape: str) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "float16",
            "hidden_act": "silu", "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "bos_token_id": 1,
            "eos_token_id": 2, **SHAPES[shape]}


def linear_shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    """module suffix -> (N out, K in)."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    return {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
            "self_attn.o_proj": (h, h), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}


def write_gptq(dst: Path, cfg: dict, group_size: int) -> None:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    shard, index, size, nshard = {}, {}, 0, 0

    def flush():
        nonlocal shard, size, nshard
        if shard:
            name = f"model-{nshard:05d}.safetensors"
            save_file(shard, str(dst / name), metadata={"format": "pt"})
            index.update({k: name for k in shard})
            shard, size, nshard = {}, 0, nshard + 1

    def add(name, t):
        nonlocal size
        shard[name] = t.contiguous()
        size += t.numel() * t.element_size()
        if size > 2 * 1024 ** 3:
            flush()

    add("model.embed_tokens.weight", (torch.randn(v, h, generator=g) * 0.02).half())
    add("lm_head.weight", (torch.randn(v, h, generator=g) * 0.02).half())
    add("model.norm.weight", torch.ones(h, dtype=torch.float16))
    # One random tensor set per linear shape, cloned into every layer: drawing 0.8 G random words per
    # 7B model took minutes on the GPU machine's CPU; the benchmark only needs valid, non-constant codes.
    per_shape = {}
    for suffix, (n, k) in linear_shapes(cfg).items():
        groups = k // group_size
        per_shape[suffix] = {
            "qweight": torch.randint(-2 ** 31, 2 ** 31 - 1, (k // 8, n), generator=g, dtype=torch.int64).to(torch.int32),
            "qzeros": torch.full((groups, n // 8), 0x77777777, dtype=torch.int32),
            "scales": (torch.rand(groups, n, generator=g) * 0.002 + 0.001).half(),
            "g_idx": (torch.arange(k) // group_size).to(torch.int32)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        add(f"{p}.input_layernorm.weight", torch.ones(h, dtype=torch.float16))
        add(f"{p}.post_attention_layernorm.weight", torch.ones(h, dtype=torch.float16))
        for suffix, tensors in per_shape.items():
            for key, t in tensors.items():
                add(f"{p}.{suffix}.{key}", t.clone())  # safetensors refuses shared storage
    flush()
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dst")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    ap.add_argument("--method", choices=["fp16", "bipolar", "gptq"], default="bipolar")
    ap.add_argument("--w-bits", type=int, default=4)
    ap.add_argument("--a-bits", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--format-version", type=int, choices=(1, 2), default=1,
                    help="bipolar checkpoint format version (2: 8-bit scale/offset codes with per-row steps)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    dst = Path(args.dst)
    dst.mkdir(parents=True, exist_ok=True)
    cfg = base_config(args.shape)
    if args.method == "bipolar":
        from vllm_bipolar.format import BipolarQuantSpec

        spec = BipolarQuantSpec(w_bits=args.w_bits, a_bits=args.a_bits, group_size=args.group_size,
                                format_version=args.format_version)
        cfg["quantization_config"] = spec.to_dict()
    elif args.method == "gptq":
        cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": args.group_size,
                                      "desc_act": False, "sym": True, "checkpoint_format": "gptq"}
        write_gptq(dst, cfg, args.group_size)
    (dst / "config.json").write_text(json.dumps(cfg, indent=1))
    print(f"wrote {dst} ({args.shape}, {args.method}{'' if args.method == 'fp16' else f' W{args.w_bits}'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

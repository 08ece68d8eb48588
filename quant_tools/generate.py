"""Greedy generation with vLLM from a (bipolar or plain) checkpoint: a smoke test for a conversion.

    python -m quant_tools.generate MODEL [--prompt TEXT ...] [--max-tokens N] [--eager]
        [--dtype auto|bfloat16|float16] [--max-model-len N] [--quantization NAME]
        [--logprobs N] [--json FILE] [--tensor-parallel-size N]

Runs on whatever vLLM platform is installed (CPU or GPU). On CPU set VLLM_CPU_KVCACHE_SPACE
(GiB of KV cache, e.g. 1); this tool defaults it to 1 when unset.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

DEFAULT_PROMPTS = ("The capital of France is", "def fibonacci(n):", "The best way to learn a language is",
                   "Water boils at")


def generate(model: str, prompts: list[str], max_tokens: int = 16, eager: bool = False, dtype: str = "auto",
             max_model_len: int = 512, quantization: str | None = None, logprobs: int = 0,
             tensor_parallel_size: int = 1) -> list[dict]:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, dtype=dtype, max_model_len=max_model_len, enforce_eager=eager,
              quantization=quantization, seed=0, tensor_parallel_size=tensor_parallel_size)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=logprobs or None)
    outs = llm.generate(prompts, params)
    results = []
    for o in outs:
        c = o.outputs[0]
        r = {"prompt": o.prompt, "text": c.text, "token_ids": list(c.token_ids)}
        if logprobs:  # per position: the top candidates' logprobs, best first
            r["top_logprobs"] = [sorted((lp.logprob for lp in pos.values()), reverse=True) for pos in c.logprobs]
        results.append(r)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m quant_tools.generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="checkpoint directory (a bipolar one selects the plugin by its quant_method)")
    ap.add_argument("--prompt", action="append", help="prompt (repeatable; default: four built-in prompts)")
    ap.add_argument("--max-tokens", type=int, default=16, help="tokens to generate per prompt (default 16)")
    ap.add_argument("--eager", action="store_true", help="enforce_eager: skip torch.compile and CUDA graphs")
    ap.add_argument("--dtype", default="auto", help="activation dtype (default auto: the checkpoint's)")
    ap.add_argument("--max-model-len", type=int, default=512, help="context length to reserve (default 512)")
    ap.add_argument("--quantization", default=None, help="quantization method to insist on, e.g. bipolar")
    ap.add_argument("--logprobs", type=int, default=0, help="record the top-N logprobs per generated token (JSON)")
    ap.add_argument("--json", help="also write the results (text and token ids) to this file")
    ap.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs to shard the model over (default 1)")
    args = ap.parse_args(argv)
    t0 = time.time()
    results = generate(args.model, args.prompt or list(DEFAULT_PROMPTS), args.max_tokens, args.eager,
                       args.dtype, args.max_model_len, args.quantization, args.logprobs, args.tensor_parallel_size)
    for r in results:
        print(f"{r['prompt']!r} -> {r['text']!r}")
    print(f"({time.time() - t0:.1f} s including engine start)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

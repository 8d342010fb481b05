"""The transformers baselines on the same checkpoint and workload as ``lmport bench``.

- ``generate`` at batch 1: one 512-token prompt, then ``--b1-output-len`` new tokens.
- ``generate_batch`` (transformers' continuous batching): ``--num-requests`` prompts of
  ``--input-len`` random token ids, ``--output-len`` new tokens each, timed as one call.

    python benchmarks/hf_baseline.py --model /tmp/ckpt/llama3-8b --json hf.json
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time

import torch

from lmport.bench.dataset import random_prompts

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU only to try the script on a tiny model


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def prompts_for(tokenizer, num: int, input_len: int, seed: int) -> list[list[int]]:
    special = set(tokenizer.all_special_ids)
    special |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
    return [r.prompt_ids for r in random_prompts(num, input_len, 1, len(tokenizer), seed=seed, exclude=special)]


@torch.inference_mode()
def generate_batch1(model, prompt: list[int], new_tokens: int) -> dict:
    ids = torch.tensor([prompt], device=model.device)
    mask = torch.ones_like(ids)
    kwargs = dict(attention_mask=mask, do_sample=False, pad_token_id=0)
    model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kwargs)  # warm-up
    sync()
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
    sync()
    seconds = time.perf_counter() - start
    generated = out.shape[1] - ids.shape[1]
    return {"output_tokens": int(generated), "seconds": seconds, "output_tok_s": generated / seconds}


def generate_batch(model, prompts: list[list[int]], new_tokens: int) -> dict:
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=model.config.eos_token_id, pad_token_id=0)
    kwargs = {"generation_config": config}
    if "progress_bar" in inspect.signature(model.generate_batch).parameters:
        kwargs["progress_bar"] = False
    sync()
    start = time.perf_counter()
    outputs = model.generate_batch(inputs=prompts, **kwargs)
    sync()
    seconds = time.perf_counter() - start
    tokens = sum(len(o.generated_tokens) for o in outputs.values())
    errors = [o.error for o in outputs.values() if getattr(o, "error", None)]
    # the span from the first request's creation to the last one's end leaves out the
    # manager's warm-up (cache allocation, graph capture), as a server's start-up is left out
    created = [o.created_time for o in outputs.values() if getattr(o, "created_time", None)]
    ended = [o.lifespan[1] for o in outputs.values() if getattr(o, "lifespan", (-1, -1))[1] > 0]
    active = max(ended) - min(created) if created and ended and max(ended) > min(created) else seconds
    return {
        "requests": len(prompts), "completed": len(outputs) - len(errors), "output_tokens": tokens,
        "seconds": seconds, "output_tok_s_whole_call": tokens / seconds,
        "active_seconds": active, "output_tok_s": tokens / active, "errors": errors[:3],
        "note": "output_tok_s: tokens over the requests' active span (warm-up excluded); "
                "output_tok_s_whole_call: over the whole generate_batch call",
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--b1-output-len", type=int, default=64)
    parser.add_argument("--skip", default="", help="comma list of parts to skip: b1, batch")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import transformers

    skip = set(filter(None, args.skip.split(",")))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16, attn_implementation="sdpa").to(DEVICE).eval()
    result = {"gpu": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu", "model": args.model, "transformers": transformers.__version__,
              "load_s": time.perf_counter() - start, "input_len": args.input_len}  # fmt: skip
    print(f"loaded {args.model} in {result['load_s']:.1f} s", flush=True)

    def save() -> None:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)

    if "b1" not in skip:
        try:
            result["generate_b1"] = generate_batch1(model, prompts_for(tokenizer, 1, args.input_len, 7)[0], args.b1_output_len)
            print(f"generate, batch 1: {result['generate_b1']['output_tok_s']:.1f} tok/s", flush=True)
        except Exception as exc:
            result["generate_b1"] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"generate, batch 1 failed: {exc}", flush=True)
        save()
    if "batch" not in skip:
        try:
            prompts = prompts_for(tokenizer, args.num_requests, args.input_len, 11)
            result["generate_batch"] = generate_batch(model, prompts, args.output_len)
            r = result["generate_batch"]
            print(f"generate_batch: {r['requests']} x {args.input_len} in / {args.output_len} out: "
                  f"{r['output_tok_s']:.1f} output tok/s over {r['active_seconds']:.1f} s of requests "
                  f"({r['output_tok_s_whole_call']:.1f} over the whole {r['seconds']:.1f} s call)", flush=True)  # fmt: skip
        except Exception as exc:
            result["generate_batch"] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"generate_batch failed: {exc}", flush=True)
        save()
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Build a random-weight bf16 checkpoint of a real model shape, with a tokenizer, offline.

    python benchmarks/make_checkpoint.py llama3-8b /tmp/ckpt/llama3-8b
    python benchmarks/make_checkpoint.py llama3.2-1b /tmp/ckpt/llama3.2-1b

Shapes: see ``lmport.bench.checkpoint.SHAPES``. Weights are drawn on the GPU when there is
one; the EOS output row is zero so greedy decoding never stops early.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from lmport.bench.checkpoint import SHAPES, llama_config, parameter_count, write_random_checkpoint


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("path")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    path = Path(args.path)
    config = llama_config(args.shape)
    marker = path / "lmport-checkpoint.json"
    if marker.exists() and json.loads(marker.read_text()).get("shape") == args.shape:
        print(f"{path}: {args.shape} checkpoint already there")
        return 0
    start = time.perf_counter()
    write_random_checkpoint(config, path, dtype=torch.bfloat16, seed=args.seed)
    params = parameter_count(config)
    marker.write_text(json.dumps({"shape": args.shape, "parameters": params, "dtype": "bfloat16"}))
    print(f"{path}: {args.shape}, {params / 1e9:.2f} B parameters, bf16, built in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

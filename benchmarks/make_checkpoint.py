"""Build a random-weight bf16 checkpoint of a real model shape, with a tokenizer, offline.

    python benchmarks/make_checkpoint.py llama3-8b /tmp/ckpt/llama3-8b
    python benchmarks/make_checkpoint.py llama3.2-1b /tmp/ckpt/llama3.2-1b
    python benchmarks/make_checkpoint.py --like MODEL_DIR /tmp/ckpt/NAME

Shapes: see ``lmport.bench.checkpoint.SHAPES``. Weights are drawn on the GPU when there is
one; the EOS output row is zero so greedy decoding never stops early. ``--like`` takes the
config and the tokenizer files of a local model folder (any architecture transformers
builds; a ``tokenizer.json.gz`` is unpacked) and draws transformers' own initialisation:
a real tokenizer where the benchmark needs one (structured output's grammars need real
token strings) with weights that need not travel.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from lmport.bench.checkpoint import SHAPES, llama_config, parameter_count, write_random_checkpoint


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json", "tokenizer.model")


def write_random_like(source: Path, path: Path, seed: int) -> int:
    """``source``'s config and tokenizer, random bf16 weights (transformers' init); returns the parameter count."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source)
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, path / name)
        elif (source / f"{name}.gz").exists():
            with gzip.open(source / f"{name}.gz", "rb") as packed, open(path / name, "wb") as out:
                shutil.copyfileobj(packed, out)
    return sum(p.numel() for p in model.parameters())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", nargs="?", choices=sorted(SHAPES), help="a shape of lmport.bench.checkpoint.SHAPES")
    parser.add_argument("path")
    parser.add_argument("--like", type=Path, default=None, help="instead of a shape: a local model folder's config and tokenizer")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    path = Path(args.path)
    if args.like is not None:
        start = time.perf_counter()
        params = write_random_like(args.like, path, args.seed)
        print(f"{path}: like {args.like}, {params / 1e9:.2f} B parameters, bf16, built in {time.perf_counter() - start:.1f} s")
        return 0
    if args.shape is None:
        parser.error("name a shape or give --like")
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

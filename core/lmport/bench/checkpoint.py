"""Random-weight checkpoints of real model shapes, with a tokenizer, built offline for benchmarks.

Speed depends on shapes, not on trained values, so a benchmark can serve random weights:
tensors are drawn straight into safetensors shards (on a GPU when there is one: an 8B model
takes seconds, not the minutes of ``from_config`` initialisation on a CPU). The tokenizer is a
WordLevel vocabulary of the right size (``t0``, ``t1`` ... plus Llama-3-style special tokens),
so prompts of token ids decode and re-encode one to one.

The EOS row of the output projection is zero: with random weights some other logit is always
larger, so greedy decoding never stops early, even on a server that ignores ``ignore_eos``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

# Llama 3's reserved range: ids from 128000 up are special (BOS 128000, EOS 128001).
LLAMA3_SPECIAL_START = 128000
SHAPES: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=14336, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
    ),
    "llama3.2-1b": dict(
        hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        intermediate_size=8192, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
    ),
}  # fmt: skip


def llama_config(shape: str | dict[str, Any]):
    from transformers import LlamaConfig

    fields = SHAPES[shape] if isinstance(shape, str) else shape
    return LlamaConfig(architectures=["LlamaForCausalLM"], **fields)


def parameter_count(config) -> int:
    return sum(t.numel() for _, t in _parameter_shapes(config))


def _parameter_shapes(config) -> list[tuple[str, torch.Tensor]]:
    """(name, meta tensor) of every tensor a checkpoint of ``config`` holds (tied ones once)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    return [(n, t) for n, t in model.state_dict().items() if not (tied and n == "lm_head.weight")]


def save_wordlevel_tokenizer(path: str | Path, vocab_size: int, *, bos_id: int, eos_id: int, special_start: int | None = None) -> Any:
    """A WordLevel tokenizer of ``vocab_size`` ids: ``t<i>`` for ordinary ids, special tokens
    from ``special_start`` on (and at ``bos_id``/``eos_id``). Saved where transformers finds it."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special_start = vocab_size if special_start is None else special_start
    names = {i: f"t{i}" for i in range(vocab_size)}
    for k, i in enumerate(range(special_start, vocab_size)):
        names[i] = f"<|reserved_special_token_{k}|>"
    names[bos_id], names[eos_id] = "<|begin_of_text|>", "<|end_of_text|>"
    specials = sorted({bos_id, eos_id, *range(special_start, vocab_size)})
    unk = next(i for i in range(vocab_size) if i not in specials)
    tokenizer = Tokenizer(models.WordLevel(vocab={name: i for i, name in names.items()}, unk_token=names[unk]))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens([AddedToken(names[i], special=True, normalized=False) for i in specials])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=names[bos_id], eos_token=names[eos_id], unk_token=names[unk]
    )
    fast.save_pretrained(str(path))
    return fast


def write_random_checkpoint(
    config,
    path: str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device | None = None,
    std: float = 0.02,
    seed: int = 0,
    shard_bytes: int = 4 << 30,
    tokenizer: bool = True,
) -> Path:
    """Write ``config``'s weights drawn from N(0, std) (norms 1, EOS output row 0) as safetensors
    shards with an index, plus config, generation config and (by default) a tokenizer."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gen = torch.Generator(device=device).manual_seed(seed)
    element = torch.empty((), dtype=dtype).element_size()
    eos = config.eos_token_id if isinstance(config.eos_token_id, int) else None
    output_rows = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"

    # shard plan first, so file names can say "-of-N"
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, meta in _parameter_shapes(config):
        nbytes = meta.numel() * element
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, meta))
        size += nbytes
    weight_map, total = {}, 0
    for index, shard in enumerate(shards, start=1):
        filename = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, meta in shard:
            if meta.dim() == 1 and "norm" in name:
                tensor = torch.ones(meta.shape, dtype=dtype, device=device)
            elif meta.dim() == 1:  # biases
                tensor = torch.zeros(meta.shape, dtype=dtype, device=device)
            else:
                tensor = (torch.randn(meta.shape, generator=gen, device=device) * std).to(dtype)
            if name == output_rows and eos is not None:
                tensor[eos] = 0  # greedy decoding never picks EOS (see the module docstring)
            tensors[name] = tensor.cpu().contiguous()
            weight_map[name] = filename
            total += tensor.numel() * element
        save_file(tensors, str(path / filename), metadata={"format": "pt"})
        del tensors
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    setattr(config, "dtype" if hasattr(config, "dtype") else "torch_dtype", dtype)  # transformers 5 / 4.x
    config.save_pretrained(str(path))
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id).save_pretrained(str(path))
    if tokenizer:
        special_start = LLAMA3_SPECIAL_START if config.vocab_size > LLAMA3_SPECIAL_START else None
        save_wordlevel_tokenizer(path, config.vocab_size, bos_id=config.bos_token_id, eos_id=eos if eos is not None else 0,
                                 special_start=special_start)  # fmt: skip
    return path

"""Tiny checkpoints for the transformers fallback, and transformers as the oracle.

``olmo2`` has no native module, so the engine serves it through the fallback; the others have
native modules now (lmport.models) and are loaded through ``load_fallback`` directly, which
still serves them (that is how an architecture without a native module runs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from lmport.plugins import PluginHost
from lmport.testing.hf_oracle import hf_greedy_generate
from lmport.testing.tiny_models import widen_init
from lmport.testing.tiny_tokenizer import train_tiny_tokenizer
from lmport.testing.torch_threads import one_torch_thread  # noqa: F401  (autouse: one intra-op thread)

VOCAB = 384  # room for the byte-level BPE: 256 bytes, 3 specials and some merges
COMMON = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0, max_position_embeddings=256)


def gemma3_config():
    from transformers import Gemma3TextConfig

    # explicit head_dim (32, not hidden/heads = 16), GQA, sliding and full layers, a window of 5
    return Gemma3TextConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, sliding_window=5, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"], **COMMON,
    )


def qwen2_config():
    from transformers import Qwen2Config

    return Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, **COMMON)


def gemma2_config():
    from transformers import Gemma2Config

    # attention soft-cap and final logit soft-cap low enough to bite on these logits
    return Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=1, head_dim=16, sliding_window=4, attn_logit_softcapping=2.0,
                        final_logit_softcapping=3.0, **COMMON)


def granite_config():
    from transformers import GraniteConfig

    # Granite divides logits by logits_scaling and scales attention by attention_multiplier
    return GraniteConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, logits_scaling=0.5, attention_multiplier=0.2,
                         embedding_multiplier=2.0, residual_multiplier=0.5, **COMMON)


def olmo2_config():
    from transformers import Olmo2Config

    # post-norm blocks and a full-width QK-norm: no native module
    return Olmo2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, **COMMON)


def t5_config():
    from transformers import T5Config

    return T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
                    decoder_start_token_id=0, pad_token_id=0, eos_token_id=2, bos_token_id=1)


def bart_config():
    from transformers import BartConfig

    # an encoder-decoder with no native module (T5 has one): the transformers seq2seq executor runs it
    return BartConfig(vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                      decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=256,
                      decoder_start_token_id=2, forced_bos_token_id=None, forced_eos_token_id=None,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip


CONFIGS: dict[str, Callable] = {
    "bart": bart_config,
    "gemma3": gemma3_config,
    "qwen2": qwen2_config,
    "gemma2": gemma2_config,
    "granite": granite_config,
    "olmo2": olmo2_config,
    "t5": t5_config,
}


@pytest.fixture(scope="session")
def cpu_host() -> PluginHost:
    host = PluginHost(environ={}, load_entry_points=False).load()
    host.select_backend()
    return host


@pytest.fixture(scope="session")
def fallback_checkpoint(tmp_path_factory) -> Callable[[str], tuple[Path, Any]]:
    """``(path, transformers model with eager attention)`` of a tiny random checkpoint (with a
    trained tokenizer saved next to it), built once."""
    built: dict[str, tuple[Path, Any]] = {}

    def build(name: str) -> tuple[Path, Any]:
        if name not in built:
            from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

            config = CONFIGS[name]()
            auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
            path = tmp_path_factory.mktemp(f"fallback-{name}")
            torch.manual_seed(0)
            model = auto.from_config(config)
            widen_init(model, std=0.08)
            model.save_pretrained(path)
            train_tiny_tokenizer(VOCAB).save_pretrained(path)
            oracle = auto.from_pretrained(path, attn_implementation="eager").eval()
            built[name] = (path, oracle)
        return built[name]

    return build


@pytest.fixture
def oracle_greedy() -> Callable[[Any, list[int], int], list[int]]:
    """transformers' ``generate``, greedy, exactly ``max_new_tokens`` (no EOS stop)."""
    return lambda hf_model, prompt, max_new_tokens: hf_greedy_generate(hf_model, prompt, max_new_tokens)[0]


def _llama_cpp_rope_order(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """q/k rows as llama.cpp's converter stores them for Llama (transformers undoes this on load)."""
    return weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_tiny_gguf(hf_model: Any, tokenizer: Any, path: Path) -> None:
    """A Qwen2 or Llama model as an F32 GGUF file, tensor names from gguf-py's map and Llama's
    q/k rows in llama.cpp's order (what llama.cpp writes), with ``tokenizer`` (a byte-level
    BPE) as its vocabulary and merges."""
    import json

    import gguf
    import numpy as np

    config = hf_model.config
    arch = {"qwen2": gguf.MODEL_ARCH.QWEN2, "llama": gguf.MODEL_ARCH.LLAMA}[config.model_type]
    rope_theta = getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"]
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_context_length(config.max_position_embeddings)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    assert [i for _, i in vocab] == list(range(config.vocab_size))
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([3 if token in tokenizer.all_special_tokens else 1 for token, _ in vocab])  # 3: control
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    for name, tensor in hf_model.state_dict().items():
        projection = name.split(".")[-2]
        if arch == gguf.MODEL_ARCH.LLAMA and projection in heads:
            tensor = _llama_cpp_rope_order(tensor, heads[projection])
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), tensor.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def build_tiny_gguf(model_type: str, folder: Path) -> tuple[Path, Any, Any]:
    """``(path of a .gguf, transformers model, tokenizer)``: a tiny random ``model_type``
    ("qwen2" or "llama") written as an F32 GGUF with the byte-level BPE of
    ``lmport.testing.tiny_tokenizer``."""
    pytest.importorskip("gguf")
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = train_tiny_tokenizer()
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=256, tie_word_embeddings=False,
                                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    oracle = AutoModelForCausalLM.from_config(config).eval()
    widen_init(oracle)
    path = folder / f"tiny-{model_type}-f32.gguf"
    write_tiny_gguf(oracle, tokenizer, path)
    return path, oracle, tokenizer


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> tuple[Path, Any, Any]:
    """A tiny Qwen2 GGUF: see :func:`build_tiny_gguf`."""
    return build_tiny_gguf("qwen2", tmp_path_factory.mktemp("tiny-gguf"))


@pytest.fixture(scope="session")
def tiny_llama_gguf(tmp_path_factory) -> tuple[Path, Any, Any]:
    """A tiny Llama GGUF (a family lmport has natively): see :func:`build_tiny_gguf`."""
    return build_tiny_gguf("llama", tmp_path_factory.mktemp("tiny-llama-gguf"))

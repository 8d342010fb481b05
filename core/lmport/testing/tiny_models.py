"""Tiny random-weight checkpoints of every seed architecture, built from transformers configs.

No hub exists on test machines: tests build these, save them as safetensors and compare the
engine with ``transformers`` on them. The init is widened (normal, std 0.08 by default) so
that greedy choices are not near-ties.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

VOCAB = 384
COMMON = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _llama():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=512, **COMMON)


def _llama_rope_scaled():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, max_position_embeddings=512,
                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                       **COMMON)


def _mistral():
    from transformers import MistralConfig

    return MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512, sliding_window=7, **COMMON)


def _mixtral():
    from transformers import MixtralConfig

    return MixtralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512, num_local_experts=4,
                         num_experts_per_tok=2, sliding_window=None, **COMMON)


def _gpt2():
    from transformers import GPT2Config

    return GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=512, **COMMON)


def _gpt_neox():
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         rotary_pct=0.25, use_parallel_residual=True, max_position_embeddings=512, **COMMON)


def _opt():
    from transformers import OPTConfig

    return OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64,
                     max_position_embeddings=512, **COMMON)


def _galactica():
    from transformers import OPTConfig

    # Galactica is OPT without biases-free quirks: learned positions, pre-LN, ReLU, no embed projection
    return OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64,
                     max_position_embeddings=512, enable_bias=True, activation_function="gelu",
                     **COMMON)


def _opt_350m():
    from transformers import OPTConfig

    # opt-350m's layout: post-LayerNorm blocks, no final norm, embeddings narrower than the model
    return OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32,
                     max_position_embeddings=512, do_layer_norm_before=False, **COMMON)


def _bloom():
    from transformers import BloomConfig

    return BloomConfig(hidden_size=64, n_layer=2, n_head=4, **COMMON)


def _bloom_6_heads():
    from transformers import BloomConfig

    # a head count that is not a power of two takes ALiBi's interleaved extra slopes
    return BloomConfig(hidden_size=48, n_layer=2, n_head=6, **COMMON)


def _falcon_7b():
    from transformers import FalconConfig

    return FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, multi_query=True,
                        parallel_attn=True, new_decoder_architecture=False, bias=False, alibi=False, **COMMON)


def _falcon_40b():
    from transformers import FalconConfig

    return FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2,
                        new_decoder_architecture=True, parallel_attn=True, bias=False, alibi=False, **COMMON)


def _falcon_rw():
    from transformers import FalconConfig

    # falcon-rw-1b's layout: ALiBi instead of rotary, one KV head per query head, sequential blocks, biases
    return FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, multi_query=False,
                        parallel_attn=False, new_decoder_architecture=False, bias=True, alibi=True, **COMMON)


def _mpt():
    from transformers import MptConfig

    return MptConfig(d_model=64, n_layers=2, n_heads=4, expansion_ratio=2, max_seq_len=512, **COMMON)


def _mpt_12_heads():
    from transformers import MptConfig

    # 12 heads: MPT's interleaved slopes for a non-power-of-2 count differ from BLOOM's here (at 6 they agree)
    return MptConfig(d_model=48, n_layers=2, n_heads=12, expansion_ratio=4, max_seq_len=512, **COMMON)


def _gpt_bigcode():
    from transformers import GPTBigCodeConfig

    return GPTBigCodeConfig(n_embd=64, n_layer=2, n_head=4, n_positions=512, multi_query=True, **COMMON)


def _phi():
    from transformers import PhiConfig

    return PhiConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     partial_rotary_factor=0.5, max_position_embeddings=512, **COMMON)


def _gpt_neox_serial():
    from transformers import GPTNeoXConfig

    # Pythia-style blocks without the parallel residual (attention output feeds the MLP's norm)
    return GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         rotary_pct=0.25, use_parallel_residual=False, max_position_embeddings=512, **COMMON)


def _gpt_bigcode_mha():
    from transformers import GPTBigCodeConfig

    # multi-head StarCoder variant: per-head K/V, c_attn laid out per head
    return GPTBigCodeConfig(n_embd=64, n_layer=2, n_head=4, n_positions=512, multi_query=False, **COMMON)


def _llama_rope_linear():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=512,
                       rope_scaling={"rope_type": "linear", "factor": 4.0}, **COMMON)


def _llama_rope_dynamic():
    from transformers import LlamaConfig

    # dynamic NTK changes the frequencies once a sequence passes max_position_embeddings=16
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=16,
                       rope_scaling={"rope_type": "dynamic", "factor": 2.0}, **COMMON)


def _gemma2():
    from transformers import Gemma2Config

    # alternating window-4 and global layers; soft-caps low enough to bite on these logits
    return Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, sliding_window=4, query_pre_attn_scalar=24,
                        attn_logit_softcapping=2.0, final_logit_softcapping=3.0, max_position_embeddings=512,
                        **COMMON)


def _gemma3():
    from transformers import Gemma3TextConfig

    # explicit head_dim (32, not 64 / 4), one KV head, window 5; the global layers' RoPE has its own
    # base and a linear scaling, the local ones plain RoPE of base 10k
    rope = {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 100000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
    return Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=1, head_dim=32, sliding_window=5, query_pre_attn_scalar=24,
                            layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
                            rope_parameters=rope, max_position_embeddings=512, **COMMON)


def _qwen2():
    from transformers import Qwen2Config

    return Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=512, **COMMON)


def _qwen2_sliding():
    from transformers import Qwen2Config

    # the layers from max_window_layers on attend through a window of 6 (off in released checkpoints)
    return Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=512, use_sliding_window=True,
                       sliding_window=6, max_window_layers=1, **COMMON)


def _qwen3():
    from transformers import Qwen3Config

    # explicit head_dim (32, not 64 / 4) as in the released models, QK-norm
    return Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=32, max_position_embeddings=512, **COMMON)


def _phi3(original_max_positions: int = 128):
    from transformers import Phi3Config

    # LongRoPE: short factors up to original_max_positions, long ones past them; partial rotary
    # 0.75 as in Phi-4-mini (head_dim 16: 6 frequencies)
    factors = {"short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5], "long_factor": [1.5, 2.0, 3.0, 4.0, 6.0, 8.0]}
    return Phi3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=4 * original_max_positions,
                      original_max_position_embeddings=original_max_positions, partial_rotary_factor=0.75,
                      rope_scaling={"rope_type": "longrope", **factors}, sliding_window=None, **COMMON)



def _phi3_window():
    from transformers import Phi3Config

    # Phi-3-mini-4k style: every layer windowed (2047 there, 7 here), plain RoPE
    return Phi3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=512, sliding_window=7, **COMMON)


def _granite():
    from transformers import GraniteConfig

    # every multiplier away from one, so each one shows
    return GraniteConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, logits_scaling=0.5, attention_multiplier=0.2,
                         embedding_multiplier=2.0, residual_multiplier=0.5, max_position_embeddings=512, **COMMON)


# name -> (config factory, AutoModel class name)
TINY_MODELS: dict[str, Callable] = {
    "llama": _llama,
    "llama-rope-scaled": _llama_rope_scaled,
    "mistral": _mistral,
    "mixtral": _mixtral,
    "gpt2": _gpt2,
    "gpt_neox": _gpt_neox,
    "opt": _opt,
    "galactica": _galactica,
    "bloom": _bloom,
    "falcon-7b": _falcon_7b,
    "falcon-40b": _falcon_40b,
    "mpt": _mpt,
    "gpt_bigcode": _gpt_bigcode,
    "phi": _phi,
    "opt-350m": _opt_350m,
    "bloom-6-heads": _bloom_6_heads,
    "falcon-rw": _falcon_rw,
    "mpt-12-heads": _mpt_12_heads,
    "gpt_neox-serial": _gpt_neox_serial,
    "gpt_bigcode-mha": _gpt_bigcode_mha,
    "llama-rope-linear": _llama_rope_linear,
    "llama-rope-dynamic": _llama_rope_dynamic,
    "gemma2": _gemma2,
    "gemma3": _gemma3,
    "qwen2": _qwen2,
    "qwen2-sliding": _qwen2_sliding,
    "qwen3": _qwen3,
    "phi3": _phi3,
    "phi3-window": _phi3_window,
    "granite": _granite,
}


def widen_init(model: torch.nn.Module, std: float = 0.08, seed: int = 0) -> None:
    """Re-draw every weight from N(0, std) (norm weights stay near 1) so greedy picks are clear."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1 and ("norm" in name or "ln" in name) and name.endswith("weight"):
                param.copy_(1.0 + torch.randn(param.shape, generator=gen) * std)
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def make_checkpoint(name: str, path: str | Path, *, std: float = 0.08, seed: int = 0, config=None):
    """Build the tiny ``name`` model with random weights, save it to ``path``; return the HF model."""
    from transformers import AutoModelForCausalLM

    config = config or TINY_MODELS[name]()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    widen_init(model, std=std, seed=seed)
    model.eval()
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    return model


def t5_config(flan: bool, vocab_size: int = VOCAB):
    """A tiny T5 (v1.0: relu, tied head) or FLAN-T5 / T5 v1.1 (gated-gelu, untied head).

    ``relative_attention_max_distance`` 8 with 8 buckets: prompts of a dozen tokens reach the
    far (logarithmic and clamped) buckets.
    """
    from transformers import T5Config

    common = dict(vocab_size=vocab_size, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_decoder_layers=2, num_heads=4,
                  relative_attention_num_buckets=8, relative_attention_max_distance=8,
                  decoder_start_token_id=0, pad_token_id=0, eos_token_id=2, bos_token_id=1)  # fmt: skip
    if flan:
        return T5Config(feed_forward_proj="gated-gelu", tie_word_embeddings=False, **common)
    return T5Config(feed_forward_proj="relu", tie_word_embeddings=True, **common)


def make_t5_checkpoint(path: str | Path, *, flan: bool, std: float = 0.08, seed: int = 0, tokenizer: bool = True):
    """Save a tiny random T5 (with a trained byte-level tokenizer) to ``path``; return the HF model
    reloaded with eager attention (the oracle)."""
    from transformers import AutoModelForSeq2SeqLM

    from lmport.testing.tiny_tokenizer import train_tiny_tokenizer

    torch.manual_seed(seed)
    model = AutoModelForSeq2SeqLM.from_config(t5_config(flan))
    widen_init(model, std=std, seed=seed)
    model.save_pretrained(path)
    if tokenizer:
        train_tiny_tokenizer(VOCAB).save_pretrained(path)
    return AutoModelForSeq2SeqLM.from_pretrained(path, attn_implementation="eager").eval()

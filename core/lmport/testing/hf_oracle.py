"""transformers' own greedy ``generate``: the oracle the engine, model, fallback and server
tests compare lmport's tokens and logprobs with."""

from __future__ import annotations

from typing import Any

import torch


@torch.inference_mode()
def hf_greedy_generate(
    hf_model: Any, prompt: list[int], max_new_tokens: int, *, stop_at_eos: bool = False
) -> tuple[list[int], list[torch.Tensor]]:
    """``hf_model``'s greedy new tokens for one unpadded ``prompt``, and each step's logits (float32).

    By default EOS is switched off for the call, as lmport's ``ignore_eos`` does, so exactly
    ``max_new_tokens`` come back; ``stop_at_eos`` keeps the model's EOS (the EOS token is then
    the last one returned). An encoder-decoder model's tokens are its decoder's, after the
    decoder start token.
    """
    config = hf_model.generation_config
    saved = config.eos_token_id
    if not stop_at_eos:
        config.eos_token_id = None  # passing eos_token_id=None to generate() would mean "the config's"
    try:
        out = hf_model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    finally:
        config.eos_token_id = saved
    start = 1 if hf_model.config.is_encoder_decoder else len(prompt)
    tokens = out.sequences[0, start:].tolist()
    if not stop_at_eos:
        assert len(tokens) == max_new_tokens, (len(tokens), max_new_tokens)
    return tokens, [step[0].float() for step in out.logits]

"""A small byte-level BPE tokenizer, trained in the test: tiny checkpoints need a real
tokenizer and no hub exists on test machines.

``<pad>``, ``<s>``, ``</s>`` sit at ids 0, 1, 2, the special ids of the configs in
:mod:`lmport.testing.tiny_models`; ``chat=True`` adds ChatML's turn tokens (ids 3, 4) and a
ChatML chat template, for the server's chat routes.
"""

from __future__ import annotations

from typing import Any

from lmport.testing.tiny_models import VOCAB

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paged attention keeps the KV cache in fixed-size blocks.",
    "Continuous batching lets requests join and leave every step.",
    "Servers stream tokens to their clients as server-sent events.",
    "A chat template turns messages into one prompt for the model.",
    "héllo wörld, ünïcode text ☃ and emoji 🙂 split over byte tokens",
] * 20

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_tiny_tokenizer(vocab_size: int = VOCAB, chat: bool = False) -> Any:
    """A ``PreTrainedTokenizerFast`` of at most ``vocab_size`` tokens (see the module doc)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    extra = CHATML_TOKENS if chat else ()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[*SPECIAL_TOKENS, *extra],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    if tok.get_vocab_size() > vocab_size:  # the byte alphabet and the specials alone do not fit
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level BPE ({tok.get_vocab_size()} tokens)")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", additional_special_tokens=list(extra)
    )
    if chat:
        fast.chat_template = CHATML_TEMPLATE
    return fast

"""Incremental detokenization: turn one new token at a time into new, complete text.

Decoding a single token is wrong in two ways: a multi-byte UTF-8 character may be split over
several byte-level tokens (each alone decodes to U+FFFD), and SentencePiece-style tokenizers
decide a token's leading space from its neighbours. So each step decodes a short window of
tokens twice, once up to the last emitted token (the prefix) and once including the new ones,
and emits the difference, but only when it does not end in an incomplete character. The
window starts a few tokens into the prompt so the first generated token sees its context:
after the prompt "The capital is", a generated "▁Paris" streams as " Paris" (what TGI and
vLLM send), so that prompt + streamed text reads right. With an empty prompt, or with a
byte-level BPE tokenizer, the concatenated stream equals ``tokenizer.decode(output_ids)``.
"""

from __future__ import annotations

import weakref
from typing import Any

REPLACEMENT = "\ufffd"
# How many prompt tokens of context the first generated token is decoded with (vLLM uses 5).
PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Streams the text of one sequence's generated tokens.

    ``push(token_id)`` returns the text the new token completes ("" while a character is still
    incomplete or the token has no text, e.g. a skipped special token); ``flush()`` returns
    whatever is still held back when the sequence ends. ``text`` is everything emitted so far.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = list(prompt_token_ids)
        self._num_prompt = len(self._ids)
        self._read_offset = len(self._ids)  # tokens before this are already emitted (or prompt)
        self._prefix_offset = self._window_start()  # start of the decode window
        self._prefix_text: str | None = None  # decode of ids[prefix_offset:read_offset], cached
        self.text = ""

    @property
    def output_token_ids(self) -> list[int]:
        return self._ids[self._num_prompt :]

    def _window_start(self) -> int:
        """A few prompt tokens back, moved further back while that cuts a character in two:
        byte-fallback decoders turn a whole run of byte pieces into U+FFFD when it starts
        mid-character, and the window's text must be a prefix of the longer window's."""
        start = max(self._read_offset - PROMPT_CONTEXT_TOKENS, 0)
        limit = max(self._read_offset - 4 * PROMPT_CONTEXT_TOKENS, 0)
        while start > limit and self._decode(self._ids[start : self._read_offset]).lstrip().startswith(REPLACEMENT):
            start -= 1
        return start

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _pending_text(self) -> tuple[str, str]:
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        return self._prefix_text, self._decode(self._ids[self._prefix_offset :])

    def push(self, token_id: int) -> str:
        """Add one generated token; return the new complete text it makes available."""
        self._ids.append(int(token_id))
        prefix_text, full_text = self._pending_text()
        if len(full_text) <= len(prefix_text) or full_text.endswith(REPLACEMENT):
            return ""  # no text yet, or a character still waits for its next bytes
        return self._emit(full_text[len(prefix_text) :])

    def flush(self) -> str:
        """The text still held back (an incomplete character stays as U+FFFD, as decode shows it)."""
        if self._read_offset == len(self._ids):
            return ""
        prefix_text, full_text = self._pending_text()
        if len(full_text) <= len(prefix_text):
            return ""
        return self._emit(full_text[len(prefix_text) :])

    def _emit(self, new_text: str) -> str:
        # the new window starts where the old one ended, so its prefix is what was just read
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._prefix_text = None
        self.text += new_text
        return new_text


_token_text_cache: "weakref.WeakKeyDictionary[Any, dict[int, str]]" = weakref.WeakKeyDictionary()


def token_text(tokenizer: Any, token_id: int) -> str:
    """One token's own text, for per-token details (``TokenInfo.text``, top tokens).

    Special tokens keep their text; a SentencePiece word-start token keeps its leading space
    (decode alone would strip it); a token holding part of a UTF-8 character reads U+FFFD.
    Cached per tokenizer: top-n tokens ask for the same ids every step.
    """
    try:
        cache = _token_text_cache.setdefault(tokenizer, {})
    except TypeError:  # a tokenizer that cannot be weakly referenced: no cache
        cache = {}
    text = cache.get(token_id)
    if text is None:
        text = tokenizer.decode([int(token_id)], skip_special_tokens=False)
        piece = tokenizer.convert_ids_to_tokens(int(token_id))
        if isinstance(piece, str) and piece.startswith("\u2581") and not text.startswith(" "):
            text = " " + text
        cache[token_id] = text
    return text

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

Cost per token: the window's start stays put while it is short, so the text of its prefix is
the previous step's full decode and one decode per token is enough (a second one each time
the window slides, every ``WINDOW_TOKENS`` or so). For a Hugging Face fast tokenizer the
decodes call the Rust tokenizer directly: the Python ``decode`` wrapper cost more than the
decode itself (this runs for every sequence on every step).
"""

from __future__ import annotations

import weakref
from functools import partial
from typing import Any, Callable

REPLACEMENT = "\ufffd"
# How many prompt tokens of context the first generated token is decoded with (vLLM uses 5).
PROMPT_CONTEXT_TOKENS = 5
# The decode window slides forward once it spans more tokens than this: longer windows cost
# more per decode, shorter ones slide (and decode their prefix again) more often.
WINDOW_TOKENS = 16


def _owner(cls: type, name: str) -> type | None:
    return next((klass for klass in cls.__mro__ if name in vars(klass)), None)


_backend_cache: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()


def _rust_tokenizer(tokenizer: Any) -> Any:
    """:func:`_find_rust_tokenizer`, remembered per tokenizer (it walks the class's MRO)."""
    try:
        return _backend_cache[tokenizer]
    except KeyError:
        backend = _backend_cache[tokenizer] = _find_rust_tokenizer(tokenizer)
        return backend
    except TypeError:  # not weakly referenceable: no cache
        return _find_rust_tokenizer(tokenizer)


def _find_rust_tokenizer(tokenizer: Any) -> Any:
    """The ``tokenizers.Tokenizer`` whose ``decode`` gives exactly ``tokenizer.decode``'s text, or None.

    That holds for a Hugging Face fast tokenizer whose class keeps the library's ``decode`` and
    ``_decode`` and for which the clean-up of tokenization spaces does not apply (it is off, or
    transformers skips it for a BPE model); anything else keeps its own ``decode``.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover - tokenizers is a dependency
        return None
    if not isinstance(backend, Tokenizer):
        return None
    cls = type(tokenizer)
    base = _owner(cls, "backend_tokenizer")
    decode_owner = _owner(cls, "decode")
    if _owner(cls, "_decode") is not base or decode_owner is None or issubclass(decode_owner, base):
        return None  # a subclass (or the base of an older transformers) decodes its own way
    if getattr(tokenizer, "clean_up_tokenization_spaces", False):
        # transformers >= 5 skips the clean-up for BPE models unless forced; before, it applied it
        forced = getattr(tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", None)
        if forced is None or forced or type(backend.model).__name__ != "BPE":
            return None
    return backend


def make_decoder(tokenizer: Any, skip_special_tokens: bool) -> Callable[[list[int]], str]:
    """``ids -> text``, the same text as ``tokenizer.decode(ids, skip_special_tokens=...)``."""
    backend = _rust_tokenizer(tokenizer)
    target = backend if backend is not None else tokenizer
    return partial(target.decode, skip_special_tokens=skip_special_tokens)


class IncrementalDetokenizer:
    """Streams the text of one sequence's generated tokens.

    ``push(token_id)`` returns the text the new token completes ("" while a character is still
    incomplete or the token has no text, e.g. a skipped special token); ``flush()`` returns
    whatever is still held back when the sequence ends. ``text`` is everything emitted so far.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._decode = make_decoder(tokenizer, skip_special_tokens)
        self._ids: list[int] = list(prompt_token_ids)
        self._num_prompt = len(self._ids)
        self._read_offset = len(self._ids)  # tokens before this are already emitted (or prompt)
        self._prefix_offset = self._window_start()  # start of the decode window
        self._prefix_text: str | None = None  # decode of ids[prefix_offset:read_offset], cached
        self._pieces: list[str] = []  # the emitted texts, joined into ``text`` when asked for

    @property
    def text(self) -> str:
        """Everything emitted so far (joined on demand: appending to one string would copy it per token)."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

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

    def _pending_text(self) -> tuple[str, str]:
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        return self._prefix_text, self._decode(self._ids[self._prefix_offset :])

    def push(self, token_id: int) -> str:
        """Add one generated token; return the new complete text it makes available."""
        self._ids.append(int(token_id))
        prefix_text, full_text = self._pending_text()
        return self._accept(prefix_text, full_text)

    def _windows(self) -> list[list[int]]:
        """The id windows :meth:`_pending_text` would decode now (the prefix only when not cached)."""
        full = self._ids[self._prefix_offset :]
        if self._prefix_text is None:
            return [self._ids[self._prefix_offset : self._read_offset], full]
        return [full]

    def _accept(self, prefix_text: str, full_text: str) -> str:
        self._prefix_text = prefix_text
        if len(full_text) <= len(prefix_text) or full_text.endswith(REPLACEMENT):
            return ""  # no text yet, or a character still waits for its next bytes
        return self._emit(prefix_text, full_text)

    def flush(self) -> str:
        """The text still held back (an incomplete character stays as U+FFFD, as decode shows it)."""
        if self._read_offset == len(self._ids):
            return ""
        prefix_text, full_text = self._pending_text()
        if len(full_text) <= len(prefix_text):
            return ""
        return self._emit(prefix_text, full_text)

    def _emit(self, prefix_text: str, full_text: str) -> str:
        new_text = full_text[len(prefix_text) :]
        self._pieces.append(new_text)
        if len(self._ids) - self._prefix_offset > WINDOW_TOKENS:
            # slide: the new window starts where the last read one did, so the tokens just
            # emitted are the context of the next ones; its prefix text is decoded on next use
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            self._prefix_text = None
        else:
            # same start: the window's prefix is now everything read, and its text is known
            self._read_offset = len(self._ids)
            self._prefix_text = full_text
        return new_text


def push_batch(detokenizers: list["IncrementalDetokenizer"], token_ids: list[int]) -> list[str | Exception]:
    """:meth:`IncrementalDetokenizer.push` for many sequences at once.

    With a Rust tokenizer every window of the step is decoded in one ``decode_batch`` call
    (Rust, in parallel, without the GIL) instead of one Python->Rust call per sequence: under
    load this runs for every running sequence on every step. A sequence whose decode fails
    gets its exception in its slot, so only that sequence fails.
    """
    results: list[str | Exception] = [""] * len(detokenizers)
    groups: dict[tuple[int, bool], list[int]] = {}
    for i, (detokenizer, token_id) in enumerate(zip(detokenizers, token_ids)):
        backend = _rust_tokenizer(detokenizer.tokenizer)
        if backend is None:
            results[i] = _push_one(detokenizer, token_id)
            continue
        detokenizer._ids.append(int(token_id))
        groups.setdefault((id(backend), detokenizer.skip_special_tokens), []).append(i)
    for (_, skip), members in groups.items():
        windows, spans = [], []
        for i in members:
            w = detokenizers[i]._windows()
            spans.append((len(windows), len(w)))
            windows.extend(w)
        try:
            texts = _rust_tokenizer(detokenizers[members[0]].tokenizer).decode_batch(windows, skip_special_tokens=skip)
        except Exception:  # one bad window: decode them one by one, so only its sequence fails
            for i in members:
                detokenizer = detokenizers[i]
                try:
                    results[i] = detokenizer._accept(*detokenizer._pending_text())
                except Exception as exc:
                    results[i] = exc
            continue
        for i, (start, count) in zip(members, spans):
            detokenizer = detokenizers[i]
            prefix = detokenizer._prefix_text if count == 1 else texts[start]
            results[i] = detokenizer._accept(prefix, texts[start + count - 1])
    return results


def _push_one(detokenizer: IncrementalDetokenizer, token_id: int) -> str | Exception:
    try:
        return detokenizer.push(token_id)
    except Exception as exc:
        return exc


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
        backend = _rust_tokenizer(tokenizer)
        if backend is not None:
            text = backend.decode([int(token_id)], skip_special_tokens=False)
            piece = backend.id_to_token(int(token_id))
        else:
            text = tokenizer.decode([int(token_id)], skip_special_tokens=False)
            piece = tokenizer.convert_ids_to_tokens(int(token_id))
        if isinstance(piece, str) and piece.startswith("\u2581") and not text.startswith(" "):
            text = " " + text
        cache[token_id] = text
    return text

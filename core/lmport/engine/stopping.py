"""When a sequence stops: an EOS token, a stop token or string, or its token budget."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from lmport.engine.api import FinishReason, SamplingParams


class StopCriteria:
    """Checks one sequence after each generated token.

    ``check`` takes the token just generated, how many tokens the sequence has generated so
    far (this one included) and its whole output text so far (the detokenizer's ``text``).
    Stop strings are searched only in the part of the text that could hold a match the last
    check had not seen: the new text plus the ``longest stop - 1`` characters before it. After
    a ``"stop_sequence"`` on a string, ``stop_match`` says which string and where it begins, so
    the caller can cut the text there (OpenAI leaves the stop string out, TGI keeps it).

    The order of checks: EOS, stop token ids, stop strings, then length; a token that is both
    the last allowed and an EOS finishes as ``"eos_token"``.
    """

    def __init__(self, params: SamplingParams, eos_token_ids: set[int]):
        self.params = params
        self.eos_token_ids = frozenset(() if params.ignore_eos else eos_token_ids)
        self.stop_token_ids = frozenset(params.stop_token_ids)
        self.stop_strings = tuple(s for s in params.stop if s)
        self._longest_stop = max((len(s) for s in self.stop_strings), default=0)
        self._checked_chars = 0  # text before this index cannot start a new match
        self.stop_match: tuple[str, int] | None = None

    def check(self, token_id: int, num_generated: int, output_text: str) -> FinishReason | None:
        if token_id in self.eos_token_ids:
            return "eos_token"
        if token_id in self.stop_token_ids:
            return "stop_sequence"
        if self.stop_strings and len(output_text) > self._checked_chars:
            if self._find_stop_string(output_text):
                return "stop_sequence"
        if num_generated >= self.params.max_new_tokens:
            return "length"
        return None

    def _find_stop_string(self, text: str) -> bool:
        window_start = max(self._checked_chars - self._longest_stop + 1, 0)
        self._checked_chars = len(text)
        best: tuple[str, int] | None = None
        for stop in self.stop_strings:
            at = text.find(stop, window_start)
            if at >= 0 and (best is None or at < best[1]):
                best = (stop, at)
        self.stop_match = best
        return best is not None


def _as_ids(value: Any) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    if isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
        return {int(v) for v in value if v is not None}
    return set()


def eos_token_ids(model_path: str | Path | None, tokenizer: Any, hf_config: Any) -> set[int]:
    """Every id that ends generation for this model: ``generation_config.json``'s
    ``eos_token_id`` (an int or a list, e.g. Llama 3's ``<|eot_id|>`` next to
    ``<|end_of_text|>``), the model config's (or its text config's) and the tokenizer's."""
    ids: set[int] = set()
    if model_path is not None:
        generation_config = Path(model_path) / "generation_config.json"
        if generation_config.is_file():
            try:
                ids |= _as_ids(json.loads(generation_config.read_text()).get("eos_token_id"))
            except (OSError, ValueError):
                pass  # a broken generation config only loses its extra EOS ids
    if hf_config is not None:
        ids |= _as_ids(getattr(hf_config, "eos_token_id", None))
        get_text_config = getattr(hf_config, "get_text_config", None)
        if callable(get_text_config):
            ids |= _as_ids(getattr(get_text_config(), "eos_token_id", None))
    if tokenizer is not None:
        ids |= _as_ids(getattr(tokenizer, "eos_token_id", None))
    return ids

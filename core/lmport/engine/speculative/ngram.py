"""Prompt lookup (n-gram) proposals: the tokens that followed the sequence's last n-gram the
last time it occurred in the sequence's own tokens (prompt and output).

TGI's ``--speculate N`` without a Medusa/MLP head in the checkpoint speculates this way (its
version matches only the last token); here the longest suffix of ``max_n`` .. ``min_n``
tokens that occurred before wins, and of its occurrences the most recent one. When the
continuation runs into the suffix itself (a cycle shorter than ``k``), it is continued
periodically: repetitive text proposes full runs.

Nothing here touches a device: a proposal is host work on the token list, O(length) in numpy.
"""

from __future__ import annotations

import numpy as np

DEFAULT_MAX_NGRAM = 3
DEFAULT_MIN_NGRAM = 1


class NgramProposer:
    """Proposes up to ``k`` tokens per sequence by prompt lookup (no model, no state)."""

    def __init__(self, max_n: int = DEFAULT_MAX_NGRAM, min_n: int = DEFAULT_MIN_NGRAM) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram sizes need 1 <= min_n <= max_n, got {min_n}..{max_n}")
        self.max_n = max_n
        self.min_n = min_n

    def propose(self, token_ids: list[int], k: int) -> list[int]:
        """Up to ``k`` tokens to follow ``token_ids``; empty when no suffix occurred before."""
        length = len(token_ids)
        if k <= 0 or length < self.min_n + 1:
            return []
        tokens = np.asarray(token_ids, dtype=np.int64)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            end = find_last_earlier(tokens, n)
            if end is not None:
                return continuation(token_ids, end, k)
        return []


def find_last_earlier(tokens: np.ndarray, n: int) -> int | None:
    """The end (exclusive) of the most recent earlier occurrence of the last ``n`` tokens, or None.

    An occurrence starts at ``i`` in ``0 .. length - n - 1`` (the suffix itself, at
    ``length - n``, is not one of them).
    """
    length = tokens.shape[0]
    starts = length - n  # candidate starts 0 .. starts-1
    if starts <= 0:
        return None
    suffix = tokens[length - n :]
    match = tokens[:starts] == suffix[0]
    for j in range(1, n):
        match &= tokens[j : starts + j] == suffix[j]
    hits = np.flatnonzero(match)
    return int(hits[-1]) + n if hits.size else None


def continuation(token_ids: list[int], end: int, k: int) -> list[int]:
    """``k`` tokens from ``token_ids[end:]``, continued periodically once they reach the end."""
    length = len(token_ids)
    out: list[int] = []
    for j in range(k):
        pos = end + j
        out.append(token_ids[pos] if pos < length else out[pos - length])
    return out

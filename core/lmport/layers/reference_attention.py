"""The reference attention: plain torch over the paged cache, correct on any device.

It is what the CPU backend runs, what ``--disable-custom-kernels`` runs everywhere, and what
a backend without a kernel for some spec (a sliding window on ROCm) falls back to. Other
backends' kernels are tested against it. Scores are computed in float32.

Sequences with several new tokens (prompts, prompt chunks) are attended one by one, each KV
head against its group of query heads (K/V are not repeated per query head); the one-token
rows of a causal self-attention step (decodes, one or many) all at once, over their block tables
gathered into one padded ``[rows, blocks * block_size, kv_heads, head_dim]`` view with the
lengths and the window as a mask: a loop of ~10 small ops per sequence and layer costs more
than the math on a CPU once 16 sequences decode together. Per-token key ranges of a cross spec
(``spec.key_ranges``) are a mask built on the device from ``metadata.key_ranges``, no host read.
"""

from __future__ import annotations

import torch

from lmport.layers.attention import AttentionBackend, AttentionMetadata, KVCache


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: KVCache, slot_mapping: torch.Tensor) -> None:
    """Scatter this step's K/V rows into their cache slots; slots of -1 are skipped.

    Without a host sync: a boolean mask would cost three per layer on a GPU (its result's size
    depends on the data). Instead every skipped row repeats the write of the step's first
    written row, the same data into the same slot, which changes nothing; in a step with no
    written row at all, they write slot 0's own content back into it.
    """
    if slot_mapping.numel() == 0:
        return
    key_cache, value_cache = kv_cache
    num_kv_heads, head_dim = key_cache.shape[-2:]
    slots = slot_mapping.long()
    written = slots >= 0
    first = written.to(torch.uint8).argmax().view(1)  # the first written row (0 when none is)
    first_written = written.index_select(0, first).view(1, 1, 1)
    stand_in = slots.index_select(0, first).clamp_(min=0)  # the slot skipped rows write to
    target = torch.where(written, slots, stand_in)
    for cache, rows in ((key_cache, key), (value_cache, value)):
        flat = cache.view(-1, num_kv_heads, head_dim)
        rows = rows.to(flat.dtype)
        repeat = torch.where(first_written, rows.index_select(0, first), flat.index_select(0, stand_in))
        flat.index_copy_(0, target, torch.where(written.view(-1, 1, 1), rows, repeat))


def gather_sequence_kv(kv_cache: KVCache, block_table: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``seq_len`` cached K and V rows of one sequence, ``[seq_len, kv_heads, head_dim]``."""
    key_cache, value_cache = kv_cache
    block_size = key_cache.shape[1]
    num_blocks = -(-seq_len // block_size)
    blocks = block_table[:num_blocks].long()
    k = key_cache[blocks].flatten(0, 1)[:seq_len]
    v = value_cache[blocks].flatten(0, 1)[:seq_len]
    return k, v


class ReferenceAttention(AttentionBackend):
    name = "reference"
    is_reference = True

    def __init__(self, spec):
        super().__init__(spec)
        self._slopes = None

    @classmethod
    def supports(cls, spec) -> bool:
        return True  # every feature of the contract: cross-attention and position bias included

    def forward(self, query, key, value, kv_cache: KVCache, metadata: AttentionMetadata, position_bias=None) -> torch.Tensor:
        spec = self.spec
        if key is not None:  # a cross layer's K/V were written at the encoder step
            write_kv_cache(key, value, kv_cache, metadata.slot_mapping)
        causal = spec.causal and spec.kind != "cross"
        out = torch.empty_like(query)
        group = spec.num_heads // spec.num_kv_heads
        starts = metadata.query_start_loc_host
        batched: set[int] = set()
        if causal and not spec.alibi_slopes and position_bias is None:
            decodes = [i for i in range(metadata.num_seqs) if starts[i + 1] - starts[i] == 1]
            if decodes:
                self._decode_rows(query, kv_cache, metadata, decodes, out)
                batched = set(decodes)
        for i, seq_len in enumerate(metadata.seq_lens_host):
            q_start, q_end = starts[i], starts[i + 1]
            q_len = q_end - q_start
            if q_len == 0 or i in batched:
                continue
            k, v = gather_sequence_kv(kv_cache, metadata.block_tables[i], seq_len)
            # grouped: the ``group`` query heads of each KV head as one [group * q_len, d] matrix
            # (head h reads KV head h // group), so K/V are never repeated per query head
            q = query[q_start:q_end].float().reshape(q_len, spec.num_kv_heads, group, spec.head_dim)
            q = q.permute(1, 2, 0, 3).reshape(spec.num_kv_heads, group * q_len, spec.head_dim)
            k = k.float().transpose(0, 1)  # [kv_heads, seq_len, d]
            v = v.float().transpose(0, 1)
            scores = torch.matmul(q, k.transpose(1, 2)).view(spec.num_heads, q_len, seq_len) * spec.scale
            if spec.logits_soft_cap:
                scores = spec.logits_soft_cap * torch.tanh(scores / spec.logits_soft_cap)
            q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)[:, None]
            k_pos = torch.arange(seq_len, device=query.device)[None, :]
            distance = q_pos - k_pos  # >= 0 for keys at or before the query
            allowed = distance >= 0 if causal else torch.ones_like(distance, dtype=torch.bool)
            if spec.sliding_window:
                allowed = allowed & (distance < spec.sliding_window)
            if spec.key_ranges and metadata.key_ranges is not None:  # per query token: its own key range
                ranges = metadata.key_ranges[q_start:q_end].to(query.device)
                allowed = allowed & (k_pos >= ranges[:, :1]) & (k_pos < ranges[:, 1:])
            if spec.alibi_slopes:
                scores = scores - self._alibi_slopes(query.device)[:, None, None] * distance.float()
            if position_bias is not None:
                index = distance.clamp(0, position_bias.shape[1] - 1)
                scores = scores + position_bias.float()[:, index]
            scores = scores.masked_fill(~allowed, float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            if spec.key_ranges:  # a query that attends nothing (an empty range) gets zeros, not NaN
                probs = probs.masked_fill(~allowed.any(dim=-1, keepdim=True), 0.0)
            probs = probs.view(spec.num_kv_heads, group * q_len, seq_len)
            attended = torch.matmul(probs, v).view(spec.num_heads, q_len, spec.head_dim)
            out[q_start:q_end] = attended.transpose(0, 1).to(out.dtype)
        return out

    def _decode_rows(self, query, kv_cache: KVCache, metadata: AttentionMetadata, seqs: list[int], out) -> None:
        """One query token for each sequence in ``seqs``, attended together (see the module doc)."""
        spec = self.spec
        key_cache, value_cache = kv_cache
        block_size = key_cache.shape[1]
        device = query.device
        # what depends only on the step (rows, block tables, the mask): built by the first layer, kept
        # in ``metadata.prepared`` for the others (layers of the same window share it)
        key = ("reference-decode", block_size, spec.sliding_window, len(seqs))
        plan = metadata.prepared.get(key)
        if plan is None:
            plan = metadata.prepared[key] = self._decode_plan(metadata, seqs, block_size, device)
        rows, tables, width, masked_scores, masked_values = plan
        n = len(seqs)
        k = key_cache[tables].view(n, width, spec.num_kv_heads, spec.head_dim).float()
        v = value_cache[tables].view(n, width, spec.num_kv_heads, spec.head_dim).float()
        group = spec.num_heads // spec.num_kv_heads
        q = query.index_select(0, rows).float().view(n, spec.num_kv_heads, group, spec.head_dim)
        scores = torch.einsum("nkgd,nlkd->nkgl", q, k) * spec.scale
        if spec.logits_soft_cap:
            scores = spec.logits_soft_cap * torch.tanh(scores / spec.logits_soft_cap)
        scores = scores.masked_fill(masked_scores, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        # Slots past a sequence's length hold whatever the cache had (NaN in the kernel tests):
        # a zero probability times NaN is NaN, so those values are zeroed, not only masked.
        v = v.masked_fill(masked_values, 0.0)
        attended = torch.einsum("nkgl,nlkd->nkgd", probs, v).reshape(n, spec.num_heads, spec.head_dim)
        out.index_copy_(0, rows, attended.to(out.dtype))

    def _decode_plan(self, metadata: AttentionMetadata, seqs: list[int], block_size: int, device):
        """``(rows, block tables, width, masked scores, masked values)`` of a decode step's rows: the
        masks are True where a key is not attended, shaped for the scores and for the values."""
        lengths = [metadata.seq_lens_host[i] for i in seqs]
        blocks = -(-max(lengths) // block_size)
        index = torch.tensor(seqs, device=device)
        rows = torch.tensor([metadata.query_start_loc_host[i] for i in seqs], device=device)
        tables = metadata.block_tables.index_select(0, index)[:, :blocks].long()
        width = blocks * block_size
        seq_lens = torch.tensor(lengths, device=device)[:, None]
        k_pos = torch.arange(width, device=device)[None, :]
        allowed = k_pos < seq_lens  # the query is the last token: every cached key is at or before it
        if self.spec.sliding_window:
            allowed = allowed & (seq_lens - 1 - k_pos < self.spec.sliding_window)
        return rows, tables, width, ~allowed[:, None, None, :], ~allowed[:, :, None, None]

    def _alibi_slopes(self, device: torch.device) -> torch.Tensor:
        if self._slopes is None or self._slopes.device != device:
            self._slopes = torch.tensor(self.spec.alibi_slopes, dtype=torch.float32, device=device)
        return self._slopes

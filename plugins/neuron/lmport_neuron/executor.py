"""The Neuron whole-model executor: optimum-neuron's compiled ``NeuronModelForCausalLM`` behind
``lmport_model_executor``, with continuous batching inside the compiled batch (TGI's Neuron
backend's scheme).

The compiled model holds one KV row per batch slot. Each sequence takes a free slot at its
prefill (``seq_ids`` name the slots) and keeps it until it is released; the engine plans
fixed slots (the backend flags no continuous batching), so a step either prefills new
sequences into free slots while the others pause, or decodes every running sequence.
Prompts are padded to a context-length bucket (powers of two from 16 to the compiled sequence
length); decode feeds one token per slot. Logits come back to the host and the core's sampler
samples them (with the request's parameters, seeds and penalties).

Everything the library is asked for goes through ``self.model``: ``model(input_ids,
attention_mask=, position_ids=, seq_ids=, sampling_params=)`` and ``model.neuron_config``
(``batch_size``, ``sequence_length``, ``tp_degree``). The tests run it against stand-in
optimum-neuron / torch_neuronx / neuronx_distributed modules on the CPU.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from lmport.executor import ExecutorOutput, ModelExecutor
from lmport.layers.attention import KVCacheSpec
from lmport.planning import BucketRange
from lmport.whole_model import CompiledShape, SequenceStates, SlotTable, check_compiled_shape, sample_rows

log = logging.getLogger(__name__)

MIN_CONTEXT_BUCKET = 16
PAD_TOKEN = 0


class NeuronExecutor(ModelExecutor):
    """Runs a compiled optimum-neuron causal LM for the engine (see the module doc)."""

    takes_plan = True

    def __init__(self, model: Any, config: Any, block_size: int = 16) -> None:
        self.model = model
        neuron_config = model.neuron_config
        self.compiled_shape = CompiledShape(int(neuron_config.batch_size), int(neuron_config.sequence_length))
        check_compiled_shape(config, self.compiled_shape, "neuron")
        self.block_size = block_size
        self.slots = SlotTable(self.compiled_shape.batch_size)
        self.states = SequenceStates()
        self.context_buckets = BucketRange(min(MIN_CONTEXT_BUCKET, self.compiled_shape.sequence_length),
                                           self.compiled_shape.sequence_length)
        self.warmup: dict[str, Any] = {}
        self.calls = 0

    # ------------------------------------------------------------------ setup

    def kv_cache_spec(self) -> KVCacheSpec:
        """The engine's bookkeeping only: the compiled model holds the KV cache itself."""
        return KVCacheSpec(0, 1, 1, self.block_size, torch.float32)

    def initialize_cache(self, num_blocks: int) -> None:
        self.warm_up()

    def warm_up(self) -> dict[str, Any]:
        """Run every context bucket once, and a decode, so nothing compiles or loads lazily
        under the first requests; logs and returns what ran and how long it took."""
        started = time.monotonic()
        longest = self.compiled_shape.sequence_length - 1
        buckets = self.context_buckets.values(longest)
        for length in buckets:
            ids = torch.full((1, length), PAD_TOKEN, dtype=torch.int64)
            mask = (torch.arange(length) < min(length, longest)).to(torch.int64).view(1, -1)
            self._call(ids, mask, torch.arange(length).view(1, -1), [0], last=[min(length, longest) - 1])
        position = min(buckets[-1], longest)
        self._call(torch.full((1, 1), PAD_TOKEN, dtype=torch.int64), None, torch.tensor([[position]]), [0])
        seconds = time.monotonic() - started
        self.warmup = {"context_buckets": list(buckets), "decode": 1, "seconds": seconds}
        log.info("neuron: warmed up %d context buckets %s and decode in %.2f s", len(buckets), list(buckets), seconds)
        return self.warmup

    # ------------------------------------------------------------------ one step

    @torch.inference_mode()
    def execute(self, plan: Any) -> ExecutorOutput:
        self.states.update(plan)
        for seq_id in plan.released_seq_ids:  # finished, aborted or preempted: its compiled KV row is free
            self.slots.release(seq_id)
        entries = plan.entries
        prefill = [e.is_prefill for e in entries]
        if any(prefill) and not all(prefill):
            raise RuntimeError("neuron: a step mixes prefill and decode; the engine must plan fixed slots")
        logits = self._prefill(entries) if all(prefill) else self._decode(entries)
        sampling = [i for i, e in enumerate(entries) if e.sample]
        sampled: list = [None] * len(entries)
        if sampling:
            tokens = sample_rows(logits[sampling], [entries[i].seq_id for i in sampling], self.states)
            for i, token in zip(sampling, tokens):
                sampled[i] = token
        return ExecutorOutput(sampled=sampled, prompt_logprobs=[None] * len(entries))

    def _prefill(self, entries: list) -> torch.Tensor:
        """Whole prompts into free slots, right-padded to the context bucket of the longest."""
        for e in entries:
            if e.start != 0:
                raise RuntimeError(f"neuron: sequence {e.seq_id} prefills from position {e.start}; the compiled "
                                   "model takes whole prompts (no chunked prefill, no prefix cache)")
        longest = max(e.num_new_tokens for e in entries)
        if longest >= self.compiled_shape.sequence_length:
            raise RuntimeError(f"neuron: a {longest}-token prompt does not fit the compiled sequence length "
                               f"{self.compiled_shape.sequence_length}")
        length = self.context_buckets.bucket(longest)
        ids = torch.full((len(entries), length), PAD_TOKEN, dtype=torch.int64)
        mask = torch.zeros((len(entries), length), dtype=torch.int64)
        for row, e in enumerate(entries):
            ids[row, : e.num_new_tokens] = torch.tensor(e.token_ids, dtype=torch.int64)
            mask[row, : e.num_new_tokens] = 1
        positions = torch.arange(length).expand(len(entries), length).contiguous()
        slots = [self.slots.assign(e.seq_id) for e in entries]
        # the last real token's logits of each row
        return self._call(ids, mask, positions, slots, last=[e.num_new_tokens - 1 for e in entries])

    def _decode(self, entries: list) -> torch.Tensor:
        ids = torch.tensor([[e.token_ids[0]] for e in entries], dtype=torch.int64)
        positions = torch.tensor([[e.start] for e in entries], dtype=torch.int64)
        if int(positions.max()) >= self.compiled_shape.sequence_length:
            raise RuntimeError(f"neuron: position {int(positions.max())} is past the compiled sequence length "
                               f"{self.compiled_shape.sequence_length}")
        return self._call(ids, None, positions, [self.slots.slot_of(e.seq_id) for e in entries])

    def _call(self, ids, mask, positions, slots: list[int], last: list[int] | None = None) -> torch.Tensor:
        """One model call with rows sorted by slot (as optimum-neuron wants them); logits in the given order."""
        order = sorted(range(len(slots)), key=slots.__getitem__)
        index = torch.tensor(order)
        sampling_params = torch.tensor([[1, 1.0, 1.0]] * len(slots))  # top_k, top_p, temperature: sampled on the host
        out = self.model(
            ids[index],
            attention_mask=None if mask is None else mask[index],
            position_ids=positions[index],
            seq_ids=torch.tensor([slots[i] for i in order], dtype=torch.int64),
            sampling_params=sampling_params,
        )
        self.calls += 1
        logits = out.logits
        if last is not None and logits.shape[1] > 1:
            logits = logits[torch.arange(len(order)), torch.tensor([last[i] for i in order])]
        else:
            logits = logits[:, -1]
        restored = torch.empty_like(index)
        restored[index] = torch.arange(len(order))
        return logits[restored].float()

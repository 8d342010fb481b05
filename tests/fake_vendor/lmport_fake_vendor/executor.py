"""The vendor's whole-model engine (profile ``executor``): what a compiled-graph stack plugs in
through ``lmport_model_executor``.

Its "compiled model" is the checkpoint's transformers model on the CPU with one KV cache per
slot of a fixed batch. It receives each step as a :class:`lmport.plan.StepPlan` and returns
sampled tokens; the core still schedules, tokenizes, stops and serves.
"""

from __future__ import annotations

import torch

from lmport.executor import ExecutorOutput, ModelExecutor
from lmport.layers.attention import KVCacheSpec
from lmport.whole_model import CompiledShape, SequenceStates, SlotTable, check_compiled_shape, sample_rows


class FakeCompiledExecutor(ModelExecutor):
    takes_plan = True  # steps arrive as lmport.plan.StepPlan (plain data)

    def __init__(self, path: str, config) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        # "compiled" for the asked shape; a real stack would read it from its compiled artifact
        self.compiled_shape = CompiledShape(config.max_batch_size or 2, config.max_total_tokens or 64)
        check_compiled_shape(config, self.compiled_shape, "fake")
        self.slots = SlotTable(self.compiled_shape.batch_size)
        self.states = SequenceStates()
        self.caches: dict[int, object] = {}  # slot -> the model's KV cache

    def kv_cache_spec(self) -> KVCacheSpec:
        return KVCacheSpec(0, 1, 1, 16, torch.float32)  # bookkeeping only: the engine keeps no K/V

    def initialize_cache(self, num_blocks: int) -> None:
        pass

    @torch.inference_mode()
    def execute(self, plan) -> ExecutorOutput:
        from transformers import DynamicCache

        self.states.update(plan)
        for seq_id in plan.released_seq_ids:
            self.caches.pop(self.slots.used.get(seq_id), None)
            self.slots.release(seq_id)
        rows, logits = [], []
        for i, entry in enumerate(plan.entries):
            slot = self.slots.assign(entry.seq_id)
            if entry.start == 0:
                self.caches[slot] = DynamicCache()
            out = self.model(torch.tensor([entry.token_ids]), past_key_values=self.caches[slot], use_cache=True)
            if entry.sample:
                rows.append(i)
                logits.append(out.logits[0, -1])
        sampled = [None] * len(plan.entries)
        if rows:
            tokens = sample_rows(torch.stack(logits), [plan.entries[i].seq_id for i in rows], self.states)
            for i, token in zip(rows, tokens):
                sampled[i] = token
        return ExecutorOutput(sampled=sampled, prompt_logprobs=[None] * len(plan.entries))

"""The core's paged executor: runs a native :class:`CausalLM` over the flat batch and samples.

Per step: build the flat batch on the host and copy it over without blocking, run the model
(or replay a captured decode graph), compute logits only for the rows that need them, sample
on the device, and bring every result to the host in one copy at the end: ``execute`` waits
for that copy; ``launch`` (async scheduling) returns a :class:`PendingStep` at once, whose
sampled tokens the next step can read on the device before the host has seen them.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from lmport.engine.batch import FlatBatch, _send, build_flat_batch, new_sequence
from lmport.executor import ExecutorOutput, ModelExecutor, PromptLogprobs, SampledToken
from lmport.engine.sampling.prompt_logprobs import compute_prompt_logprobs
from lmport.engine.sampling.sampler import Sampler
from lmport.engine.sampling.state import SamplingRow, make_generator
from lmport.engine.speculative.rejection import verify
from lmport.layers.attention import CROSS, Attention, AttentionMetadata, KVCache, KVCacheSpec
from lmport.models.base import CausalLM, EncoderBatch, ImageTextLM
from lmport.plan import NewSequence, StepPlan, as_plan
from lmport.runtime import DeviceRuntime

log = logging.getLogger(__name__)

DEFAULT_GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 32)  # TGI's default --cuda-graphs


class PagedModelRunner(ModelExecutor):
    """Runs one :class:`CausalLM` on the paged KV cache for the engine.

    ``host`` (a :class:`~lmport.plugins.PluginHost`) allocates the cache and may supply a
    decode graph runner and the device runtime; without one the cache is plain zeros in the
    logical layout.

    It runs :class:`~lmport.plan.StepPlan` values (``takes_plan``; an engine ``ScheduledStep``
    is turned into its plan) and keeps per-sequence state from each plan's delta: sampling
    parameters, the tokens it sampled, each seeded sequence's ``generator`` (made on first use,
    on its device), images and encoder input; the last launched step's samples stay on the
    device for the next step's decode tokens.
    """

    takes_plan = True

    def __init__(
        self,
        model: CausalLM,
        *,
        block_size: int,
        device: torch.device | str,
        kv_cache_dtype: torch.dtype,
        host: Any = None,
        config: Any = None,
        max_batch_size: int | None = None,
        shape_buckets: Any = None,
    ) -> None:
        self.model = model
        # a static-shape backend's buckets (lmport.planning.ShapeBuckets): every step is padded to them
        self.shape_buckets = shape_buckets
        self.block_size = block_size
        self.device = torch.device(device)
        self.kv_cache_dtype = kv_cache_dtype
        self.host = host
        self.config = config
        self.max_batch_size = max_batch_size
        self.sampler = Sampler()
        self.runtime: DeviceRuntime = (host.device_runtime(self.device) if host is not None and hasattr(host, "device_runtime")
                                       else None) or DeviceRuntime(self.device)  # fmt: skip
        self._states: dict[int, _SequenceState] = {}
        self._last: PendingStep | None = None  # the last launched step: its samples feed the next one
        self.kv_caches: list[KVCache] = []
        self.graph_runner = None
        # Llava-next writes image features over token embeddings (ImageTextLM); a cross-attention
        # model (Idefics) reads its images in the encoder step and says so with ``accepts_images``
        self._embeds_images = isinstance(model, ImageTextLM)
        self.accepts_images = self._embeds_images or bool(getattr(model, "accepts_images", False))
        # per sequence: its images' features, encoded at its first prefill chunk that needs them
        # and kept until its last image token is in the cache (a preempted one encodes again)
        self._image_features: dict[int, torch.Tensor] = {}
        groups = model.kv_cache_specs() if hasattr(model, "kv_cache_specs") else []
        self.kv_groups = tuple(groups)
        self._cross_groups = [i for i, g in enumerate(groups) if g.kind == CROSS]
        self._encoded: set[int] = set()  # sequences whose cross-attention K/V are written
        # every self-attention layer windowed (and no cross group): the block manager may give back
        # blocks that left the widest window; None keeps every block
        windows = [m.spec.sliding_window for m in model.modules() if isinstance(m, Attention) and m.spec.kind == "self"]
        all_windowed = bool(windows) and all(windows) and not self._cross_groups
        self.kv_window: int | None = max(windows) if all_windowed else None
        # attention backends with per-step state, one per (KV group, metadata key)
        keyed: dict = {}
        for m in model.modules():
            if isinstance(m, Attention) and m.backend.metadata_key is not None:
                keyed.setdefault((m.kv_group, m.backend.metadata_key), m.backend)
        self._keyed_backends = [(group, backend) for (group, _), backend in keyed.items()]

    # ------------------------------------------------------------------ setup

    def kv_cache_spec(self) -> KVCacheSpec:
        num_layers, num_kv_heads, head_dim = self.model.kv_cache_shape()
        if self.kv_groups:
            shapes = {(g.num_kv_heads, g.head_dim) for g in self.kv_groups}
            if len(shapes) != 1:
                raise ValueError(f"KV cache groups of different page shapes {sorted(shapes)} are not supported yet")
            num_layers = max(
                sum(len(g.layers) for g in self.kv_groups if g.kind != CROSS),
                max((len(self.kv_groups[i].layers) for i in self._cross_groups), default=0),
            )
        return KVCacheSpec(num_layers, num_kv_heads, head_dim, self.block_size, self.kv_cache_dtype, self.kv_groups)

    def initialize_cache(self, num_blocks: int) -> None:
        spec = self.kv_cache_spec()
        caches = self.host.allocate_kv_cache(spec, num_blocks, self.device) if self.host is not None else None
        if caches is None:
            shape = (num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
            caches = [
                (torch.zeros(shape, dtype=spec.dtype, device=self.device), torch.zeros(shape, dtype=spec.dtype, device=self.device))
                for _ in range(spec.num_layers)
            ]
        self.kv_caches = _map_groups(caches, self.kv_groups) if self.kv_groups else caches
        self._setup_graphs()

    def prepare_sequence(self, seq) -> None:
        """An encoder-decoder model moves the prompt to the encoder (see ``ModelExecutor``)."""
        prepare = getattr(self.model, "prepare_sequence", None)
        if prepare is not None:
            prepare(seq)

    def _setup_graphs(self) -> None:
        if self.host is None or self.config is None or self.config.cuda_graphs == ():
            return
        if not self.host.capabilities().graph_capture:
            return
        runner = self.host.graph_runner(self.model, self.config)
        if runner is None:
            return
        # --cuda-graphs wins; else the backend's own buckets; else TGI's default list
        sizes = list(self.config.cuda_graphs or getattr(runner, "default_batch_sizes", None) or DEFAULT_GRAPH_BATCH_SIZES)
        if self.max_batch_size:
            sizes = [s for s in sizes if s <= self.max_batch_size] or [min(sizes)]
        log.info("capturing decode graphs for batch sizes %s", sizes)
        runner.capture(self.kv_caches, sorted(sizes))
        self.graph_runner = runner

    # ------------------------------------------------------------------ per-sequence state

    def _sync(self, step) -> StepPlan:
        """``step`` as a plan, with this runner's per-sequence state brought up to its delta."""
        plan = as_plan(step)
        for seq_id in plan.released_seq_ids:  # blocks freed: what the cache held for it is gone
            self._image_features.pop(seq_id, None)
            self._encoded.discard(seq_id)
        self.release(plan.finished_seq_ids)
        for new in plan.new:
            if new.seq_id not in self._states:
                self._states[new.seq_id] = _SequenceState(new)
        if plan is not step:  # an engine step (or a hand-made one in a test): sequences it never announced
            for entry in step.entries:
                if entry.seq.seq_id not in self._states:
                    self._states[entry.seq.seq_id] = _SequenceState(new_sequence(entry.seq))
        return plan

    def release(self, seq_ids) -> None:
        """Forget finished sequences now (the plan delta of a step that never ran)."""
        for seq_id in seq_ids:
            self._states.pop(seq_id, None)
            self._image_features.pop(seq_id, None)
            self._encoded.discard(seq_id)

    # ------------------------------------------------------------------ one step

    @torch.inference_mode()
    def execute(self, step) -> ExecutorOutput:
        plan = self._sync(step)
        batch = self._flat_batch(plan)
        self._feed_placeholders(plan, batch, None, None)
        sampled_pos, prompt_pos, prompt_top_n, results = self._run(plan, batch)
        if results is None:  # only prompt chunks that sample nothing
            none = [None] * len(plan.entries)
            return ExecutorOutput(sampled=list(none), prompt_logprobs=list(none))
        host = _to_host(results)  # the step's one device -> host sync
        return self._unpack(plan, batch, sampled_pos, prompt_pos, prompt_top_n, host)

    supports_async_scheduling = True
    supports_late_tokens = True  # launch(..., before_sample=fn): fn runs after the forward is queued, before sampling

    @torch.inference_mode()
    def launch(
        self, step, feed: list[tuple[int, int]] = (), previous: "PendingStep | None" = None,
        before_sample: Callable[[], None] | None = None,
    ) -> "PendingStep":
        """Start ``step`` without waiting for it (async scheduling); ``result()`` waits.

        ``feed`` pairs (entry index, row of ``previous.token_ids``): that entry is one decode
        token the host does not know yet, taken on the device from the previous step's samples
        (``previous`` None: the step this runner launched last). The results come back through
        one non-blocking copy into pinned host memory. ``before_sample`` (the engine's: read the
        previous step's tokens, which advances the grammars) runs once the forward pass is queued,
        before the step samples.
        """
        plan = self._sync(step)
        batch = self._flat_batch(plan)
        self._feed_placeholders(plan, batch, feed, previous if previous is not None else self._last)
        sampled_pos, prompt_pos, prompt_top_n, results = self._run(plan, batch, before_sample)
        pending = PendingStep(self, plan, batch, sampled_pos, prompt_pos, prompt_top_n, results)
        self._last = pending
        return pending

    def _flat_batch(self, plan: StepPlan) -> FlatBatch:
        batch = build_flat_batch(plan, self.block_size, self.runtime)
        if self.shape_buckets is not None:
            from lmport.engine.static_shapes import pad_flat_batch

            batch = pad_flat_batch(batch, self.shape_buckets)
        return batch

    def _feed_placeholders(self, plan: StepPlan, batch: FlatBatch, feed, previous) -> None:
        if not feed:
            return
        if previous is None or previous.token_ids is None:
            raise RuntimeError("a step feeds tokens of a previous step that this runner did not launch")
        starts = batch.metadata.query_start_loc_host
        dst, src = _send([[starts[i] for i, _ in feed], [row for _, row in feed]], torch.int64, self.runtime)
        batch.input_ids[dst] = previous.token_ids[src]

    def _run(self, plan: StepPlan, batch: FlatBatch, before_sample: Callable[[], None] | None = None):
        """Forward, logits and sampling, all left on the device."""
        encoder = None
        if self._cross_groups:
            encoder = self._cross_metadata(plan, batch)
        if self._keyed_backends:  # each backend's per-step state, once per step (not per layer)
            meta = batch.metadata
            for group, backend in self._keyed_backends:
                target = meta.group(group)
                if backend.metadata_key not in target.prepared:
                    target.prepared[backend.metadata_key] = backend.prepare_metadata(target)
        inputs_embeds = self._image_embeds(plan, batch) if self._embeds_images else None
        sampled_pos = [i for i, r in enumerate(batch.sample_rows) if r is not None]
        rows = [self._sampling_row(self._states[plan.entries[i].seq_id]) for i in sampled_pos]
        if before_sample is None:
            self.sampler.begin(rows)  # grammar masks: computed on the host while the forward runs
        hidden = self._forward(batch, inputs_embeds, encoder)
        prompt_pos = [i for i, r in enumerate(batch.prompt_rows) if len(r)]
        if not sampled_pos and not prompt_pos and not batch.verify_entries:
            return sampled_pos, prompt_pos, 0, None
        logits = self.model.compute_logits(hidden[batch.logits_indices])
        results: list[torch.Tensor | None] = []
        if before_sample is not None:
            before_sample()  # the previous step's tokens (the device runs this forward meanwhile)
        if sampled_pos:
            only = not prompt_pos and not batch.verify_entries
            sample_logits = logits if only else logits[batch.sample_index]  # else all rows sample
            out = self.sampler.sample(sample_logits, rows)
            results += [out.token_ids, out.logprobs, out.top_ids, out.top_logprobs]
        prompt_top_n = 0
        if prompt_pos:
            prompt_top_n = max(self._states[plan.entries[i].seq_id].params.top_n_tokens for i in prompt_pos)
            prompt_logits = logits[batch.prompt_index]
            results += list(compute_prompt_logprobs(prompt_logits, batch.prompt_targets, prompt_top_n))
        if batch.verify_entries:
            results += self._verify(plan, batch, logits[batch.verify_index])
        return sampled_pos, prompt_pos, prompt_top_n, results

    def _verify(self, plan: StepPlan, batch: FlatBatch, logits: torch.Tensor) -> list[torch.Tensor | None]:
        """The speculative entries' tokens (:func:`~lmport.engine.speculative.rejection.verify`):
        ``[tokens, num_accepted, logprobs, top ids, top logprobs]``, each ``[rows * (K + 1), ...]``
        flat but for ``num_accepted``. ``logits`` holds each entry's ``k + 1`` rows, in order."""
        entries = [plan.entries[i] for i in batch.verify_entries]
        counts = [e.num_draft_tokens for e in entries]
        rows = [self._sampling_row(self._states[e.seq_id]) for e in entries]
        # the plain sampler's processing (temperature, top-k, top-p ...), row by row: every
        # position of a row is processed as that row's one sampled position would be
        processed = self.sampler.process(logits, [row for row, k in zip(rows, counts) for _ in range(k + 1)])
        log_probs = torch.log_softmax(processed, dim=-1)
        width = max(counts) + 1
        index, drafts, offset = [], [], 0
        for entry, k in zip(entries, counts):
            index.extend(offset + min(j, k) for j in range(width))  # padding repeats the last row
            drafts.extend(entry.token_ids[-k:] + [0] * (width - 1 - k))
            offset += k + 1
        index_t, drafts_t = _send([index, drafts], torch.int64, self.runtime)
        padded = log_probs[index_t].view(len(entries), width, -1)
        top_n = max(r.params.top_n_tokens for r in rows)
        out = verify(padded, drafts_t.view(len(entries), width - 1), counts, [r.params.do_sample for r in rows],
                     [r.generator for r in rows], top_n=top_n)  # fmt: skip
        top_ids = out.top_ids.reshape(-1, out.top_ids.shape[-1]) if out.top_ids is not None else None
        top_lps = out.top_logprobs.reshape(-1, out.top_logprobs.shape[-1]) if out.top_logprobs is not None else None
        return [out.token_ids.reshape(-1), out.num_accepted, out.logprobs.reshape(-1), top_ids, top_lps]

    def _forward(self, batch: FlatBatch, inputs_embeds: torch.Tensor | None = None, encoder: EncoderBatch | None = None) -> torch.Tensor:
        meta = batch.metadata
        if inputs_embeds is not None:
            return self.model(batch.input_ids, batch.positions, self.kv_caches, meta, inputs_embeds=inputs_embeds)
        if encoder is not None:  # a step that encodes: never a captured graph
            return self.model(batch.input_ids, batch.positions, self.kv_caches, meta, encoder=encoder)
        if self.graph_runner is not None and meta.is_decode_only and self.graph_runner.can_run(meta):
            return self.graph_runner.run(batch.input_ids, batch.positions, self.kv_caches, meta)
        return self.model(batch.input_ids, batch.positions, self.kv_caches, meta)

    def _image_embeds(self, plan: StepPlan, batch: FlatBatch) -> torch.Tensor | None:
        """The step's input embeddings with image features written over the image tokens this
        step feeds; None when it feeds none (then the model embeds the ids itself)."""
        embeds = None
        for i, entry in enumerate(plan.entries):
            images = self._states[entry.seq_id].images
            if images is None or not entry.is_prefill:
                continue
            begin, end = entry.start, entry.start + entry.num_new_tokens
            rows: list[int] = []
            feature_rows: list[int] = []
            offset = 0  # features of the images before this one
            row0 = batch.metadata.query_start_loc_host[i] - begin
            for start, stop in images.spans:
                lo, hi = max(start, begin), min(stop, end)
                if lo < hi:
                    rows.extend(range(row0 + lo, row0 + hi))
                    feature_rows.extend(range(offset + lo - start, offset + hi - start))
                offset += stop - start
            if not rows:
                continue
            seq_id = entry.seq_id
            features = self._image_features.get(seq_id)
            if features is None:
                features = self.model.encode_images(images)
                if features.shape[0] != offset:
                    raise RuntimeError(f"the images gave {features.shape[0]} features for {offset} image tokens")
                self._image_features[seq_id] = features
            if end >= images.spans[-1][1]:  # its last image token is fed now
                del self._image_features[seq_id]
            if embeds is None:
                embeds = self.model.embed_input_ids(batch.input_ids)
            index = torch.tensor([rows, feature_rows], dtype=torch.int64).to(self.device, non_blocking=True)
            embeds[index[0]] = features[index[1]].to(embeds.dtype)
        return embeds

    def _cross_metadata(self, plan: StepPlan, batch: FlatBatch) -> EncoderBatch | None:
        """Add each cross group's metadata to the step's; the encoder's batch for sequences not encoded yet.

        A sequence is encoded once per admission: a preempted one (its cross blocks freed) is
        released, forgotten here, and encoded again when it comes back.
        """
        meta = batch.metadata
        bs = self.block_size
        entries = plan.entries
        states = [self._states[e.seq_id] for e in entries]
        lens = [state.cross_kv_len for state in states]
        width = max((len(e.cross_block_table) for e in entries), default=0)
        tables = [e.cross_block_table + [0] * (width - len(e.cross_block_table)) for e in entries]
        new = [i for i, e in enumerate(entries) if e.seq_id not in self._encoded and states[i].cross_kv_len]
        enc_ids: list[int] = []
        enc_slots: list[int] = []
        enc_starts = [0]
        for i in new:
            if isinstance(states[i].encoder_input, list):  # token ids (T5); other inputs go as they are
                enc_ids.extend(states[i].encoder_input)
            table = entries[i].cross_block_table
            enc_slots.extend(table[p // bs] * bs + p % bs for p in range(states[i].cross_kv_len))
            enc_starts.append(len(enc_slots))
        segments = [lens, [b for row in tables for b in row]]
        if any(state.cross_key_ranges is not None for state in states):
            segments.append(_key_ranges(entries, states))  # in the same copy to the device
        lens_t, tables_t, *ranges = _send(segments, torch.int32, self.runtime)
        cross = AttentionMetadata(
            query_start_loc=meta.query_start_loc,
            seq_lens=lens_t,
            block_tables=tables_t.view(len(entries), width),
            slot_mapping=meta.slot_mapping[:0],
            query_start_loc_host=meta.query_start_loc_host,
            seq_lens_host=lens,
            max_query_len=meta.max_query_len,
            max_seq_len=max(lens, default=0),
            block_size=bs,
        )
        if ranges:
            cross.key_ranges = ranges[0].view(-1, 2)
        meta.groups = [cross if g.kind == CROSS else meta for g in self.kv_groups]
        if not new:
            return None
        self._encoded.update(entries[i].seq_id for i in new)
        ids_t, slots_t = _send([enc_ids, enc_slots], torch.int64, self.runtime)
        inputs = [states[i].encoder_input for i in new]
        return EncoderBatch(input_ids=ids_t, slot_mapping=slots_t, query_start_loc_host=enc_starts, inputs=inputs)

    def _sampling_row(self, state: "_SequenceState") -> SamplingRow:
        if state.generator is None and state.seed is not None and state.params.do_sample:
            state.generator = make_generator(state.seed, self.device)
        return SamplingRow(state.params, state.prompt_token_ids, state.output_token_ids, state.generator, state.processors)

    def _unpack(self, plan: StepPlan, batch, sampled_pos, prompt_pos, prompt_top_n, host) -> ExecutorOutput:
        entries = plan.entries
        sampled: list[SampledToken | None] = [None] * len(entries)
        prompt: list[PromptLogprobs | None] = [None] * len(entries)
        if sampled_pos:
            token_ids, logprobs, top_ids, top_lps = host[:4]
            host = host[4:]
            for j, i in enumerate(sampled_pos):
                state = self._states.get(entries[i].seq_id)
                n = state.params.top_n_tokens if state is not None else 0
                top = _top_tokens(top_ids, top_lps, j, n)
                token = int(token_ids[j])
                sampled[i] = SampledToken(token, logprobs[j], top)
                if state is not None:
                    state.output_token_ids.append(token)  # what a penalty reads next time
        if prompt_pos:
            logprobs, top_ids, top_lps = host[:3]
            k = 0
            for i in prompt_pos:
                entry, rows = entries[i], batch.prompt_rows[i]
                state = self._states.get(entry.seq_id)
                n = state.params.top_n_tokens if state is not None else 0
                tops = [_top_tokens(top_ids, top_lps, k + r, n) for r in range(len(rows))]
                positions = list(entry.prompt_rows())
                prompt[i] = PromptLogprobs(positions, logprobs[k : k + len(rows)], tops)
                k += len(rows)
            host = host[3:]
        runs = self._unpack_verify(plan, batch, host, sampled) if batch.verify_entries else None
        return ExecutorOutput(sampled=sampled, prompt_logprobs=prompt, runs=runs)

    def _unpack_verify(self, plan: StepPlan, batch, host, sampled) -> list[list[SampledToken] | None]:
        token_ids, num_accepted, logprobs, top_ids, top_lps = host
        runs: list[list[SampledToken] | None] = [None] * len(plan.entries)
        width = len(token_ids) // len(batch.verify_entries)
        for r, i in enumerate(batch.verify_entries):
            state = self._states.get(plan.entries[i].seq_id)
            n = state.params.top_n_tokens if state is not None else 0
            run = []
            for j in range(r * width, r * width + int(num_accepted[r]) + 1):
                run.append(SampledToken(int(token_ids[j]), logprobs[j], _top_tokens(top_ids, top_lps, j, n)))
            if state is not None:
                state.output_token_ids.extend(t.token_id for t in run)
            runs[i] = run
            sampled[i] = run[0]
        return runs


def _top_tokens(top_ids, top_lps, row: int, n: int) -> list[tuple[int, float]]:
    """Row ``row``'s best ``n`` (id, logprob) pairs from the host copies ([] when none were asked)."""
    return list(zip(map(int, top_ids[row][:n]), top_lps[row][:n])) if n and top_ids is not None else []


def _key_ranges(entries, states) -> list[int]:
    """Every token's cross key range of this step, flat ``[start0, end0, start1, ...]``: a
    position past its sequence's ``cross_key_ranges`` (the generated tokens) takes the last one."""
    flat: list[int] = []
    for entry, state in zip(entries, states):
        table = state.cross_key_ranges
        if table is None:
            flat.extend((0, state.cross_kv_len) * entry.num_new_tokens)
            continue
        last = len(table) - 1
        for p in range(entry.start, entry.start + entry.num_new_tokens):
            flat.extend(table[min(p, last)])
    return flat


class _SequenceState:
    """What the runner keeps per sequence between steps (from the plan's ``new`` delta)."""

    __slots__ = ("params", "prompt_token_ids", "output_token_ids", "seed", "generator", "images", "encoder_input",
                 "cross_kv_len", "cross_key_ranges", "processors")  # fmt: skip

    def __init__(self, new: NewSequence) -> None:
        self.params = new.params
        self.prompt_token_ids = new.prompt_token_ids
        self.output_token_ids = list(new.output_token_ids)
        self.seed = new.seed
        self.generator = None
        self.images = new.images
        self.encoder_input = new.encoder_input
        self.cross_kv_len = new.cross_kv_len
        self.cross_key_ranges = new.cross_key_ranges
        self.processors = new.processors


def _map_groups(physical: list[KVCache], groups) -> list[KVCache]:
    """The model's flat per-layer list: token groups' layers on their own tensors, in order; a
    cross group's layers on the same tensors again (its blocks are never theirs at once)."""
    num_layers = 1 + max(layer for g in groups for layer in g.layers)
    flat: list[KVCache | None] = [None] * num_layers
    token_layers = sorted(layer for g in groups if g.kind != CROSS for layer in g.layers)
    for i, layer in enumerate(token_layers):
        flat[layer] = physical[i]
    for g in groups:
        if g.kind == CROSS:
            for i, layer in enumerate(sorted(g.layers)):
                flat[layer] = physical[i]
    return flat


class PendingStep:
    """A launched step: its sampled tokens on the device, its results on their way to the host.

    ``token_ids`` (int64, one row per sampling entry, in entry order; None if nothing samples)
    stays on the device for the next step to read; ``sample_row[i]`` is entry ``i``'s row.
    ``result()`` waits for the copy (an event on a GPU; on the CPU it is done already) and
    returns the :class:`ExecutorOutput`.
    """

    def __init__(self, runner, step, batch, sampled_pos, prompt_pos, prompt_top_n, results) -> None:
        self._runner = runner
        self._args = (step, batch, sampled_pos, prompt_pos, prompt_top_n)
        self.sample_row = {i: j for j, i in enumerate(sampled_pos)}
        self.token_ids = results[0] if results is not None and sampled_pos else None
        self._results = results
        self._host = self._event = None
        self._output: ExecutorOutput | None = None
        if results is not None:
            self._host, self._event = _start_copy(results, runner.runtime)

    def result(self) -> ExecutorOutput:
        if self._output is None:
            step, batch, sampled_pos, prompt_pos, prompt_top_n = self._args
            if self._results is None:
                none = [None] * len(step.entries)
                self._output = ExecutorOutput(sampled=list(none), prompt_logprobs=list(none))
            else:
                if self._event is not None:
                    self._event.synchronize()
                host = _split(self._host.tolist(), self._results)
                self._output = self._runner._unpack(step, batch, sampled_pos, prompt_pos, prompt_top_n, host)
            self._results = self._host = self._event = None
        return self._output


def _start_copy(tensors: list[torch.Tensor | None], runtime: DeviceRuntime) -> tuple[torch.Tensor, Any]:
    """Pack ``tensors`` into one float64 buffer and start copying it to (pinned) host memory."""
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors if t is not None])
    return runtime.start_copy_to_host(flat)


def _to_host(tensors: list[torch.Tensor | None]) -> list[list | None]:
    """Bring several small device tensors to the host with one copy (one sync).

    Everything is packed into one float64 buffer (token ids stay exact below 2**53) and split
    back into nested lists.
    """
    present = [t for t in tensors if t is not None]
    if not present:
        return [None] * len(tensors)
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in present])
    return _split(flat.cpu().tolist(), tensors)


def _split(values: list[float], tensors: list[torch.Tensor | None]) -> list[list | None]:
    """Cut the flat ``values`` back into one (nested) list per tensor of ``tensors``."""
    out: list[list | None] = []
    offset = 0
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        size = t.numel()
        chunk = values[offset : offset + size]
        offset += size
        if t.dim() == 2:
            width = t.shape[1]
            chunk = [chunk[r * width : (r + 1) * width] for r in range(t.shape[0])]
        out.append(chunk)
    return out

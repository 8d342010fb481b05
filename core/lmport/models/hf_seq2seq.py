"""Encoder-decoder checkpoints without a native module (BART ...) through transformers, as a :class:`ModelExecutor`.

T5 is native (:mod:`lmport.models.t5`: paged decoder, a cross-attention KV group, batched
decode); this executor serves the other encoder-decoder architectures, and keeps
transformers' own cache per sequence: it encodes a prompt once, when the
scheduler first asks that sequence for a token, then feeds the decoder one token per step
with that sequence's ``past_key_values``. Each step loops over its sequences (batch size 1
each) and samples all of them together with the core's batched sampler.

The engine still schedules with KV blocks: :meth:`kv_cache_spec` prices a token like one
decoder layer stack's K/V, so blocks over the prompt stand for the cross-attention cache and
blocks over the output for the self-attention cache. No block memory is allocated;
transformers allocates its caches as sequences grow.

A sequence the engine releases (finished, aborted, preempted) drops its state; when a
preempted one comes back, it is re-encoded and its generated tokens are fed again.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any

import torch

from lmport.engine.batch import ScheduledStep
from lmport.executor import ExecutorOutput, ModelExecutor, SampledToken
from lmport.engine.sampling.sampler import Sampler
from lmport.engine.sampling.state import SamplingRow, make_generator
from lmport.layers.attention import KVCacheSpec

log = logging.getLogger(__name__)


@dataclass
class _SequenceState:
    encoder_outputs: Any
    past_key_values: Any = None
    num_fed: int = 0  # decoder tokens (start token included) already in past_key_values


def decoder_cache_shape(config: Any) -> tuple[int, int, int]:
    """``(layers, kv heads, head_dim)`` of the decoder, across T5-style and BART-style config names."""
    layers = getattr(config, "num_decoder_layers", None) or getattr(config, "decoder_layers", None) or config.num_hidden_layers
    heads = getattr(config, "decoder_attention_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "d_kv", None) or config.hidden_size // heads
    return int(layers), int(heads), int(head_dim)


class HFSeq2SeqExecutor(ModelExecutor):
    """Runs a transformers ``*ForConditionalGeneration`` (``AutoModelForSeq2SeqLM``) for the engine."""

    def __init__(self, hf_model: Any, *, device: torch.device, dtype: torch.dtype, block_size: int):
        self.model = hf_model
        self.device = torch.device(device)
        self.dtype = dtype
        self.block_size = block_size
        config = hf_model.config
        start = getattr(config, "decoder_start_token_id", None)
        if start is None:
            start = getattr(hf_model.generation_config, "decoder_start_token_id", None)
        if start is None:
            raise ValueError(f"{type(hf_model).__name__} has no decoder_start_token_id in its config")
        self.decoder_start_token_id = int(start)
        self.sampler = Sampler()
        self.states: dict[int, _SequenceState] = {}
        # transformers 5.x renames ``past_key_values`` to ``cache`` (argument and output field)
        forward_args = inspect.signature(hf_model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in forward_args else "past_key_values"

    def kv_cache_spec(self) -> KVCacheSpec:
        layers, heads, head_dim = decoder_cache_shape(self.model.config)
        return KVCacheSpec(layers, heads, head_dim, self.block_size, self.dtype)

    def initialize_cache(self, num_blocks: int) -> None:
        """Nothing to allocate: the blocks only bound how many tokens the scheduler admits."""

    @torch.inference_mode()
    def execute(self, step: ScheduledStep) -> ExecutorOutput:
        for seq_id in step.released_seq_ids:
            self.states.pop(seq_id, None)
        sampled_pos = [i for i, e in enumerate(step.entries) if e.sample]
        sampled: list[SampledToken | None] = [None] * len(step.entries)
        if sampled_pos:
            seqs = [step.entries[i].seq for i in sampled_pos]
            logits = torch.stack([self._next_logits(seq) for seq in seqs])
            out = self.sampler.sample(logits, [self._sampling_row(seq) for seq in seqs])
            token_ids, logprobs = out.token_ids.tolist(), out.logprobs.tolist()
            top_ids = out.top_ids.tolist() if out.top_ids is not None else None
            top_lps = out.top_logprobs.tolist() if out.top_logprobs is not None else None
            for j, i in enumerate(sampled_pos):
                n = seqs[j].params.top_n_tokens
                top = list(zip(top_ids[j][:n], top_lps[j][:n])) if n and top_ids is not None else []
                sampled[i] = SampledToken(token_ids[j], logprobs[j], top)
        # the prompt is the encoder's input: there are no prompt-token logprobs to report
        return ExecutorOutput(sampled=sampled, prompt_logprobs=[None] * len(step.entries))

    def _next_logits(self, seq: Any) -> torch.Tensor:
        state = self.states.get(seq.seq_id)
        if state is None:
            prompt = torch.tensor([seq.prompt_token_ids], dtype=torch.int64, device=self.device)
            state = self.states[seq.seq_id] = _SequenceState(self.model.get_encoder()(input_ids=prompt, return_dict=True))
        decoder_ids = [self.decoder_start_token_id, *seq.output_token_ids]
        new = torch.tensor([decoder_ids[state.num_fed :]], dtype=torch.int64, device=self.device)
        out = self.model(
            encoder_outputs=state.encoder_outputs,
            decoder_input_ids=new,
            use_cache=True,
            return_dict=True,
            **{self._cache_kwarg: state.past_key_values},
        )
        state.past_key_values = getattr(out, self._cache_kwarg)
        state.num_fed = len(decoder_ids)
        return out.logits[0, -1].float()

    def _sampling_row(self, seq: Any) -> SamplingRow:
        if seq.generator is None and seq.seed is not None and seq.params.do_sample:
            seq.generator = make_generator(seq.seed, self.device)
        # as in transformers' generate, penalties see the decoder's tokens, not the encoder's input
        return SamplingRow(seq.params, [self.decoder_start_token_id], seq.output_token_ids, seq.generator, seq.processors)


def load_seq2seq(info: Any, host: Any, dtype: torch.dtype, device: torch.device, trust_remote_code: bool) -> HFSeq2SeqExecutor:
    """``AutoModelForSeq2SeqLM`` for ``info``, wrapped as an executor."""
    from transformers import AutoModelForSeq2SeqLM

    from lmport.models.hf_fallback import checkpoint_kwargs

    kwargs = checkpoint_kwargs(info, dtype, trust_remote_code)
    hf_model = AutoModelForSeq2SeqLM.from_pretrained(str(info.path), **kwargs).to(device).eval()
    block_size = host.capabilities().default_block_size
    log.warning(
        "%s runs through the transformers seq2seq fallback (its own cache per sequence, one sequence at a "
        "time); it works, but it is not optimized", info.architecture,
    )
    return HFSeq2SeqExecutor(hf_model, device=device, dtype=dtype, block_size=block_size)

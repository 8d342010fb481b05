"""The core's constrained-decoding backend: llguidance (Microsoft's Rust grammar engine).

- The tokenizer's vocabulary (llguidance's ``LLTokenizer``, a token trie) is built once per
  (tokenizer, logits width, EOS ids) and cached for the life of the process; the engine and the
  server start building it on a background thread when they start (:func:`prepare_vocabulary`).
- A constraint is compiled once (an ``LLMatcher`` in its start state, cached, least recently
  used out past :data:`MAX_CACHED_GRAMMARS`); each sequence gets a cheap copy of it.
- JSON schemas are compiled with compact separators (``whitespace_flexible: false``), so a
  model cannot pad a document with whitespace forever; a schema may override that with
  llguidance's ``x-guidance`` options.
- Masks of a step's constrained rows are computed in one call over llguidance's thread pool,
  started (``begin``) before the model's forward pass on a helper thread, and waited for
  when the sampler applies them, so mask work overlaps the forward pass.
- A sequence whose constraint is complete (or broken) may take only an EOS token.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Sequence

import numpy as np
import torch

from lmport.engine.api import Constraint
from lmport.engine.constraints import ProcessorContext
from lmport.engine.errors import RequestValidationError

MAX_CACHED_GRAMMARS = 256
JSON_DEFAULTS = {"whitespace_flexible": False}
ANY_JSON_OBJECT = '{"type": "object"}'

_lock = threading.Lock()
_build_lock = threading.Lock()
_tokenizers: dict[tuple, tuple[Any, Any]] = {}  # key -> (the transformers tokenizer, kept alive; LLTokenizer)
_grammars: "OrderedDict[tuple, Any]" = OrderedDict()  # (tokenizer key, kind, value) -> LLMatcher template
_executor: Any = None
_helper: ThreadPoolExecutor | None = None


def _llguidance():
    try:
        import llguidance
        import llguidance.hf  # noqa: F401
    except ImportError as exc:  # a core dependency; only a broken install lacks it
        raise RequestValidationError(f"constrained decoding needs the llguidance package ({exc})") from exc
    return llguidance


def ll_tokenizer(context: ProcessorContext) -> tuple[tuple, Any]:
    """(cache key, LLTokenizer) for ``context``'s tokenizer, built on first use."""
    tokenizer = context.tokenizer
    size = len(tokenizer) if hasattr(tokenizer, "__len__") else None
    n_vocab = max(context.vocab_size or 0, size or 0) or None
    eos = tuple(context.eos_token_ids) or ((tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ())
    key = (id(tokenizer), n_vocab, eos)
    any_variant = context.vocab_size is None and not context.eos_token_ids  # a compile check: any build of it will do
    with _build_lock:  # one build per vocabulary, however many requests wait for it
        with _lock:
            found = _tokenizers.get(key)
            if found is not None and found[0] is tokenizer:
                return key, found[1]
            for other, (owner, built) in _tokenizers.items():
                if any_variant and owner is tokenizer:
                    return other, built
        llg = _llguidance()
        try:
            built = llg.hf.from_tokenizer(tokenizer, n_vocab=n_vocab, eos_token=list(eos) or None)
        except ValueError as exc:  # a slow (Python) tokenizer
            raise RequestValidationError(f"constrained decoding is not supported for this model's tokenizer: {exc}") from exc
        with _lock:
            _tokenizers[key] = (tokenizer, built)
    return key, built


def prepare_vocabulary(context: ProcessorContext) -> threading.Thread:
    """Build ``context``'s vocabulary on a daemon thread now (a 262k-token vocabulary takes
    seconds), so the first constrained request does not wait for it."""

    def build() -> None:
        try:
            ll_tokenizer(context)
        except Exception:  # a tokenizer llguidance cannot take: the first constrained request says so
            pass

    thread = threading.Thread(target=build, name="lmport-grammar-vocabulary", daemon=True)
    thread.start()
    return thread


def grammar_text(constraint: Constraint) -> str:
    """The constraint as an llguidance grammar (JSON text); ValueError for a malformed schema."""
    from llguidance import LLMatcher

    kind, value = constraint.kind, constraint.value
    if kind == "json_schema":
        try:
            schema = json.loads(value)
        except json.JSONDecodeError as exc:
            raise RequestValidationError(f"the JSON schema is not valid JSON: {exc}") from exc
        if not isinstance(schema, (dict, bool)):
            raise RequestValidationError("a JSON schema must be an object (or a boolean)")
        return LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_DEFAULTS)
    if kind == "json_object":
        return LLMatcher.grammar_from_json_schema(ANY_JSON_OBJECT, defaults=JSON_DEFAULTS)
    if kind == "regex":
        return LLMatcher.grammar_from_regex(value)
    if kind == "lark":
        return LLMatcher.grammar_from_lark(value)
    raise RequestValidationError(f"unknown constraint kind {kind!r}")


def compile_template(constraint: Constraint, context: ProcessorContext) -> Any:
    """The constraint's matcher in its start state (cached); RequestValidationError naming what fails."""
    tok_key, tokenizer = ll_tokenizer(context)
    key = (tok_key, constraint.kind, constraint.value)
    with _lock:
        template = _grammars.get(key)
        if template is not None:
            _grammars.move_to_end(key)
            return template
    llg = _llguidance()
    try:
        grammar = grammar_text(constraint)
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
    except (ValueError, TypeError, RuntimeError) as exc:  # what llguidance raises for input it cannot take
        raise RequestValidationError(f"the {_what(constraint)} cannot be used for constrained decoding: {exc}") from exc
    if is_error:
        raise RequestValidationError(f"the {_what(constraint)} cannot be used for constrained decoding: {_first_line(messages)}")
    template = llg.LLMatcher(tokenizer, grammar, log_level=0)
    if template.is_error():
        raise RequestValidationError(f"the {_what(constraint)} cannot be used for constrained decoding: {template.get_error()}")
    with _lock:
        _grammars[key] = template
        while len(_grammars) > MAX_CACHED_GRAMMARS:
            _grammars.popitem(last=False)
    return template


def _what(constraint: Constraint) -> str:
    return {"json_schema": "JSON schema", "json_object": "JSON object format", "regex": "regex", "lark": "grammar"}[constraint.kind]


def _first_line(messages: list[str]) -> str:
    """llguidance's message without the echo of the source it adds (``  1 | ...`` and a caret)."""
    lines = [line.strip() for m in messages for line in m.splitlines()]
    kept = [line for line in lines if line and not re.match(r"^(\d+ \||\^)", line)]
    return " ".join(kept) or "unknown error"


def llguidance_processor(constraint: Constraint, context: ProcessorContext) -> "LLGuidanceProcessor":
    """A new processor for one sequence (a copy of the cached compiled constraint)."""
    template = compile_template(constraint, context)
    _, tokenizer = ll_tokenizer(context)
    return LLGuidanceProcessor(template.deep_copy(), tokenizer.vocab_size, tokenizer.eos_token)


def _pool() -> tuple[Any, ThreadPoolExecutor]:
    global _executor, _helper
    with _lock:
        if _executor is None:
            _executor = _llguidance().LLExecutor()
            _helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmport-masks")
    return _executor, _helper  # type: ignore[return-value]


class _MaskJob:
    """The bitmasks of one batch of processors, computed on the helper thread."""

    def __init__(self, processors: Sequence["LLGuidanceProcessor"]) -> None:
        self.processors = list(processors)
        words = (max(p.vocab_size for p in processors) + 31) // 32
        self.bitmask = torch.zeros((len(processors), words), dtype=torch.int32)
        executor, helper = _pool()
        self.future: Future = helper.submit(self._fill, executor)

    def _fill(self, executor: Any) -> None:
        rows, words = self.bitmask.shape
        matchers = [(p.matcher, i) for i, p in enumerate(self.processors)]
        executor.unsafe_compute_mask_ptr(matchers, self.bitmask.data_ptr(), words * 4, rows)
        words_u32 = self.bitmask.numpy().view(np.uint32)
        for i, p in enumerate(self.processors):
            if p.end_token_ids and p.matcher.is_accepting():
                for token in p.end_token_ids:
                    if token < p.vocab_size:
                        words_u32[i, token // 32] |= np.uint32(1 << (token % 32))

    def result(self) -> torch.Tensor:
        self.future.result()
        return self.bitmask


class LLGuidanceProcessor:
    """One sequence's llguidance matcher (see the module doc)."""

    needs_host_tokens = True

    def __init__(self, matcher: Any, vocab_size: int, eos_token: int) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.eos_token = eos_token
        self.end_token_ids: tuple[int, ...] = ()  # beside EOS, allowed once the grammar accepts
        self._job: _MaskJob | None = None

    def allow_ending_with(self, token_ids: Sequence[int]) -> None:
        """Let ``token_ids`` (a request's stop token ids) end the sequence once the grammar accepts."""
        self.end_token_ids = tuple(int(t) for t in token_ids)

    def advance(self, token_id: int) -> None:
        self._job = None
        if not self.matcher.is_stopped():
            self.matcher.consume_token(int(token_id))  # a disallowed token puts it in an error state (then: EOS only)

    @property
    def is_accepting(self) -> bool:
        return bool(self.matcher.is_accepting())

    @classmethod
    def begin(cls, processors: Sequence["LLGuidanceProcessor"]) -> None:
        job = _MaskJob(processors)
        for p in processors:
            p._job = job

    @classmethod
    def apply(cls, logits: torch.Tensor, processors: Sequence["LLGuidanceProcessor"]) -> torch.Tensor:
        job = processors[0]._job
        if job is None or job.processors != list(processors):
            job = _MaskJob(processors)
        bitmask = job.result()
        for p in processors:
            p._job = None
        return apply_bitmask(logits, bitmask)


_BITS = torch.arange(32, dtype=torch.int32)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """``logits`` with ``-inf`` where the packed ``[rows, words]`` int32 ``bitmask`` has a 0 bit
    (bit ``i % 32`` of word ``i // 32`` is token ``i``); columns past the mask are disallowed."""
    device = logits.device
    if logits.is_cpu:  # numpy unpacks bits ~15x faster than torch's shifts on the host
        allowed = torch.from_numpy(np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little").view(bool))
    else:  # unpacked on the device: only the packed words cross the bus
        words = bitmask.to(device, non_blocking=True)
        allowed = ((words[:, :, None] >> _BITS.to(device)) & 1).bool().reshape(words.shape[0], -1)
    vocab = logits.shape[-1]
    if allowed.shape[1] < vocab:
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]), value=False)
    return logits.masked_fill(~allowed[:, :vocab], float("-inf"))

"""Constraints as data: compile-checking (the 422 path) and the ``lmport_logits_processors`` hook."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from lmport.engine.api import Constraint, SamplingParams
from lmport.engine.constraints import LogitsProcessor, ProcessorContext, check_constraint, resolve_processor
from lmport.engine.errors import RequestValidationError
from lmport.engine.sampling.llguidance_backend import LLGuidanceProcessor, apply_bitmask
from lmport.hookspecs import hookimpl
from lmport.plugins import PluginHost
from lmport.testing.tiny_tokenizer import train_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return train_tiny_tokenizer()


def test_constraint_is_plain_picklable_data():
    params = SamplingParams(constraint=Constraint("json_schema", '{"type": "object"}'))
    assert pickle.loads(pickle.dumps(params)) == params
    assert SamplingParams().constraint is None


@pytest.mark.parametrize(
    "constraint",
    [
        Constraint("json_schema", json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}})),
        Constraint("json_object"),
        Constraint("regex", r"[a-z]+\d{2}"),
        Constraint("lark", 'start: "yes" | "no"'),
    ],
)
def test_valid_constraints_compile(tokenizer, constraint):
    check_constraint(constraint, tokenizer)
    assert isinstance(resolve_processor(constraint, ProcessorContext(tokenizer)), LogitsProcessor)


@pytest.mark.parametrize(
    "constraint, named",
    [
        (Constraint("json_schema", json.dumps({"not": {"type": "string"}})), '"not"'),
        (Constraint("json_schema", json.dumps({"type": "string", "format": "no-such-format"})), "no-such-format"),
        (Constraint("json_schema", "{not json"), "not valid JSON"),
        (Constraint("json_schema", "[1, 2]"), "must be an object"),
        (Constraint("regex", "[a-z"), "unclosed character class"),
        (Constraint("lark", "start: undefined_rule"), "undefined_rule"),
    ],
)
def test_uncompilable_constraints_are_refused_naming_the_feature(tokenizer, constraint, named):
    with pytest.raises(RequestValidationError, match="cannot be used|not valid JSON|must be an object") as info:
        check_constraint(constraint, tokenizer)
    assert named in str(info.value)


def test_regex_mask_allows_exactly_the_continuations(tokenizer):
    proc = resolve_processor(Constraint("regex", "ab|abc"), ProcessorContext(tokenizer, eos_token_ids=(2,)))
    for token in tokenizer.encode("ab"):
        proc.advance(token)
    logits = torch.zeros(1, len(tokenizer))
    masked = type(proc).apply(logits, [proc])
    allowed = {i for i in range(len(tokenizer)) if masked[0, i] > float("-inf")}
    assert 2 in allowed  # "ab" is complete: EOS may end it
    assert all(tokenizer.decode([i]).startswith("c") for i in allowed - {2})


def test_a_requests_stop_token_ends_a_constraint_only_once_it_accepts(tokenizer):
    """A chat template's end-of-turn id, not in the model's EOS list, may end a finished grammar."""
    proc = resolve_processor(Constraint("regex", "ab|abc"), ProcessorContext(tokenizer, eos_token_ids=(2,)))
    end_of_turn = 7
    proc.allow_ending_with((end_of_turn,))

    def allowed() -> set[int]:
        masked = type(proc).apply(torch.zeros(1, len(tokenizer)), [proc])
        return {i for i in range(len(tokenizer)) if masked[0, i] > float("-inf")}

    first, *rest = tokenizer.encode("ab")
    proc.advance(first)
    if rest:  # "a" alone does not match: neither EOS nor the stop token yet
        assert end_of_turn not in allowed() and 2 not in allowed()
    for token in rest:
        proc.advance(token)
    assert {2, end_of_turn} <= allowed()


def test_apply_bitmask_disallows_columns_past_the_mask():
    bitmask = torch.tensor([[0b101]], dtype=torch.int32)
    out = apply_bitmask(torch.zeros(1, 40), bitmask)
    assert [i for i in range(40) if out[0, i] == 0] == [0, 2]


class _Everything:
    """A processor that allows every token (what a third-party backend would supply)."""

    needs_host_tokens = False

    def advance(self, token_id):
        pass

    @classmethod
    def begin(cls, processors):
        pass

    @classmethod
    def apply(cls, logits, processors):
        return logits


class _RegexOnlyPlugin:
    @hookimpl
    def lmport_logits_processors(self, constraint, context):
        return _Everything() if constraint.kind == "regex" else None


def test_lmport_logits_processors_hook_overrides_the_core_backend(tokenizer):
    host = PluginHost({}, load_entry_points=False).load()
    host.register(_RegexOnlyPlugin(), "regex-only")
    context = ProcessorContext(tokenizer)
    assert isinstance(resolve_processor(Constraint("regex", "a"), context, host), _Everything)
    # a kind the plugin leaves alone falls through to the core's llguidance backend
    assert isinstance(resolve_processor(Constraint("json_object"), context, host), LLGuidanceProcessor)

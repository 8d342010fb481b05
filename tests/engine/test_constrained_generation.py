"""Constrained decoding through the whole engine (tiny random llama, the trained byte-level BPE).

Every finished output parses and validates against its schema (``jsonschema``) or fullmatches
its regex; free requests batched with constrained ones get exactly the tokens they get alone;
``n > 1`` and seeds; a stop string inside a constrained output; an abort mid-constraint frees
every block and matcher; async scheduling gives the synchronous engine's outputs.
"""

from __future__ import annotations

import gc
import json
import re
import weakref

import jsonschema
import pytest

from lmport.engine.api import Constraint, GenerationRequest, SamplingParams
from lmport.engine.errors import RequestValidationError
from lmport.engine.sampling.llguidance_backend import LLGuidanceProcessor

# small documents, so a random model finishes them well within the token budget
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
    },
    "required": ["name", "age", "ok", "color"],
    "additionalProperties": False,
}
CHOICE = {"anyOf": [{"type": "integer", "minimum": -5, "maximum": 5}, {"enum": ["yes", "no"]}]}
REGEX = r"(cat|dog)-[0-9]{2}"
BUDGET = 64


def json_params(schema, **kw) -> SamplingParams:
    kw.setdefault("max_new_tokens", BUDGET)
    return SamplingParams(constraint=Constraint("json_schema", json.dumps(schema)), **kw)


def run(engine, requests: list[GenerationRequest]) -> dict[str, list]:
    outs = engine.generate(requests)
    assert engine.block_manager.num_used_blocks == 0
    return outs


def texts(outputs) -> dict[int, tuple[str, str]]:
    """index -> (whole text, finish reason)."""
    got: dict[int, list] = {}
    for o in outputs:
        entry = got.setdefault(o.index, ["", None])
        entry[0] += o.text
        if o.finished:
            entry[1] = o.finish_reason
    return {i: (t, r) for i, (t, r) in got.items()}


def tokens(outputs) -> dict[int, list[int]]:
    got: dict[int, list[int]] = {}
    for o in outputs:
        got.setdefault(o.index, []).extend(t.token_id for t in o.tokens)
    return got


def assert_valid_json(text: str, reason: str, schema) -> None:
    assert reason == "eos_token", (text, reason)
    jsonschema.validate(json.loads(text), schema)


@pytest.fixture
def engine(make_engine):
    return make_engine("llama")[0]


def test_json_schema_outputs_validate_greedy_and_sampled(engine, random_prompts):
    prompts = random_prompts([5, 9, 3, 7])
    requests = [GenerationRequest("g0", tuple(prompts[0]), json_params(PERSON))]
    requests += [GenerationRequest("g1", tuple(prompts[1]), json_params(CHOICE))]
    requests += [GenerationRequest(f"s{i}", tuple(p), json_params(PERSON, do_sample=True, temperature=1.5, seed=i, top_p=0.9))
                 for i, p in enumerate(prompts[2:])]  # fmt: skip
    outs = run(engine, requests)
    for rid, schema in (("g0", PERSON), ("g1", CHOICE), ("s0", PERSON), ("s1", PERSON)):
        text, reason = texts(outs[rid])[0]
        assert_valid_json(text, reason, schema)


def test_regex_and_json_object_outputs(engine, random_prompts):
    p = random_prompts([6, 4])
    requests = [
        GenerationRequest("re", tuple(p[0]), SamplingParams(max_new_tokens=BUDGET, constraint=Constraint("regex", REGEX))),
        GenerationRequest("obj", tuple(p[1]), SamplingParams(max_new_tokens=BUDGET, do_sample=True, seed=3,
                                                            constraint=Constraint("json_object"))),
    ]  # fmt: skip
    outs = run(engine, requests)
    text, reason = texts(outs["re"])[0]
    assert reason == "eos_token" and re.fullmatch(REGEX, text), text
    text, reason = texts(outs["obj"])[0]
    if reason == "eos_token":  # an unbounded object may run to the budget with a random model
        assert isinstance(json.loads(text), dict)
    else:
        assert reason == "length" and text.startswith("{")


def test_free_requests_batched_with_constrained_ones_are_token_identical(make_engine, random_prompts):
    prompts = random_prompts([5, 8, 6, 4], seed=1)
    free = [GenerationRequest(f"f{i}", tuple(p), SamplingParams(max_new_tokens=12, ignore_eos=True)) for i, p in enumerate(prompts[:2])]
    free.append(GenerationRequest("fs", tuple(prompts[2]), SamplingParams(max_new_tokens=12, do_sample=True, seed=7, ignore_eos=True)))
    alone = run(make_engine("llama")[0], free)
    engine = make_engine("llama")[0]
    seen_batches = []
    execute = engine.executor.execute
    engine.executor.execute = lambda step: seen_batches.append({e.request_id for e in step.entries}) or execute(step)
    constrained = [GenerationRequest("c0", tuple(prompts[3]), json_params(PERSON)),
                   GenerationRequest("c1", tuple(prompts[0]), SamplingParams(max_new_tokens=BUDGET, constraint=Constraint("regex", REGEX)))]  # fmt: skip
    mixed = run(engine, constrained + free)
    assert any({"c0", "f0", "fs"} <= batch for batch in seen_batches)  # they did share steps
    for rid in ("f0", "f1", "fs"):
        assert tokens(mixed[rid]) == tokens(alone[rid]), rid
    assert_valid_json(*texts(mixed["c0"])[0], PERSON)


def test_n_sequences_and_seeds(engine, random_prompts):
    prompt = tuple(random_prompts([5], seed=2)[0])
    params = json_params(PERSON, do_sample=True, temperature=2.0, seed=11, n=3)
    first = run(engine, [GenerationRequest("a", prompt, params)])["a"]
    again = run(engine, [GenerationRequest("b", prompt, params)])["b"]
    got = texts(first)
    assert sorted(got) == [0, 1, 2]
    for text, reason in got.values():
        assert_valid_json(text, reason, PERSON)
    assert texts(again) == got  # the same seed gives the same documents
    assert len({text for text, _ in got.values()}) > 1  # seed + i: the sequences differ


def test_stop_sequence_inside_a_constrained_output(engine, random_prompts):
    prompt = tuple(random_prompts([5])[0])
    outs = run(engine, [GenerationRequest("s", prompt, json_params(PERSON, stop=('"age"',)))])["s"]
    text, reason = texts(outs)[0]
    assert reason == "stop_sequence" and text.endswith('"age"') and text.startswith("{")


def test_max_new_tokens_ending_mid_document_finishes_with_length(engine, random_prompts):
    prompt = tuple(random_prompts([5])[0])
    outs = run(engine, [GenerationRequest("l", prompt, json_params(PERSON, max_new_tokens=4))])["l"]
    text, reason = texts(outs)[0]
    assert reason == "length" and text.startswith("{") and sum(len(o.tokens) for o in outs) == 4


def test_abort_mid_constraint_frees_blocks_and_matchers(engine, random_prompts):
    prompt = tuple(random_prompts([7])[0])
    engine.add_request(GenerationRequest("x", prompt, json_params(PERSON, n=2)))
    matchers = [weakref.ref(s.processors[0]) for s in engine._requests["x"]]
    assert all(isinstance(m(), LLGuidanceProcessor) for m in matchers)
    engine.step()
    engine.step()
    engine.abort("x")
    assert not engine.has_unfinished() and engine.block_manager.num_used_blocks == 0
    engine.step()  # the scheduler drops what it held
    gc.collect()
    assert all(m() is None for m in matchers)


def test_an_uncompilable_constraint_is_refused_before_anything_is_queued(engine, random_prompts):
    bad = SamplingParams(constraint=Constraint("json_schema", json.dumps({"not": {}})))
    with pytest.raises(RequestValidationError, match='"not"'):
        engine.add_request(GenerationRequest("bad", tuple(random_prompts([4])[0]), bad))
    assert not engine.has_unfinished()


def test_async_scheduling_gives_the_synchronous_outputs(make_engine, random_prompts):
    prompts = random_prompts([5, 8, 6], seed=4)

    def requests():
        return [GenerationRequest("c", tuple(prompts[0]), json_params(PERSON, do_sample=True, seed=5)),
                GenerationRequest("f", tuple(prompts[1]), SamplingParams(max_new_tokens=10, ignore_eos=True)),
                GenerationRequest("r", tuple(prompts[2]), SamplingParams(max_new_tokens=BUDGET, constraint=Constraint("regex", REGEX)))]  # fmt: skip

    sync = run(make_engine("llama")[0], requests())
    engine = make_engine("llama", async_scheduling=True)[0]
    assert engine.async_scheduling
    launch, late = engine.executor.launch, []

    def spy(step, feed=(), previous=None, **kw):  # the grammar's tokens are read inside the next launch
        late.append("before_sample" in kw)
        return launch(step, feed, previous, **kw)

    engine.executor.launch = spy
    got = run(engine, requests())
    assert sum(late) > 5  # steps were launched ahead of the constrained rows' tokens (async kept running)
    for rid in ("c", "f", "r"):
        assert tokens(got[rid]) == tokens(sync[rid]), rid
    assert_valid_json(*texts(got["c"])[0], PERSON)

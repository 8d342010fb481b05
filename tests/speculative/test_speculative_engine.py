"""Speculative decoding through the whole engine (scheduler, runner, output processing) on CPU.

Greedy output equals the plain engine's and transformers' token for token, with n-gram lookup,
with a draft identical to the target (every draft accepted) and with a different draft (nearly
every draft rejected); stops inside an accepted run end exactly where the plain engine ends;
speculative and plain rows share batches; preemption and aborts give every block back.
"""

from __future__ import annotations

import pytest
import torch

from lmport.engine.api import GenerationRequest, SamplingParams
from lmport.testing.engine_driver import run_staggered
from lmport.testing.hf_oracle import hf_greedy_generate

MAX_NEW = 16
CYCLE = [5, 6, 7, 8, 9, 10]


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    randoms = [torch.randint(3, 384, (n,), generator=gen).tolist() for n in (5, 30, 17, 1)]
    return randoms + [CYCLE * 4]  # a repetitive prompt: n-gram lookup proposes whole runs


def tokens(outputs: list) -> list[int]:
    return [t.token_id for o in outputs for t in o.tokens]


def greedy_requests(max_new: int = MAX_NEW, **params) -> list[GenerationRequest]:
    p = SamplingParams(max_new_tokens=max_new, ignore_eos=True, top_n_tokens=2, **params)
    return [GenerationRequest(f"r{i}", tuple(prompt), p) for i, prompt in enumerate(prompts())]


SPECULATION = {
    "ngram": dict(speculate=3),
    "same-draft": dict(speculative_model="target"),
    "other-draft": dict(speculative_model="draft", speculate=2),
}


def speculative_settings(name: str, checkpoints) -> dict:
    settings = dict(SPECULATION[name])
    if "speculative_model" in settings:
        settings["speculative_model"] = str(checkpoints[settings["speculative_model"]])
    return settings


@pytest.fixture(scope="module")
def plain_outputs(make_engine):
    return run_staggered(make_engine(), greedy_requests())


@pytest.mark.parametrize("name", list(SPECULATION))
def test_greedy_equals_the_plain_engine_and_transformers(name, make_engine, checkpoints, plain_outputs):
    engine = make_engine(**speculative_settings(name, checkpoints))
    got = run_staggered(engine, greedy_requests())
    for i, prompt in enumerate(prompts()):
        rid = f"r{i}"
        assert tokens(got[rid]) == tokens(plain_outputs[rid]), (name, rid)
        expected, _ = hf_greedy_generate(checkpoints["hf_model"], prompt, MAX_NEW)
        assert tokens(got[rid]) == expected, (name, rid)
        lps = [t.logprob for o in got[rid] for t in o.tokens]
        plain_lps = [t.logprob for o in plain_outputs[rid] for t in o.tokens]
        assert lps == pytest.approx(plain_lps, abs=1e-4)
        tops = [[tid for tid, _, _ in t.top_tokens] for o in got[rid] for t in o.tokens]
        assert tops == [[tid for tid, _, _ in t.top_tokens] for o in plain_outputs[rid] for t in o.tokens]
        assert "".join(o.text for o in got[rid]) == "".join(o.text for o in plain_outputs[rid])
        assert got[rid][-1].finish_reason == "length" and got[rid][-1].num_generated_tokens == MAX_NEW
    extra = engine.stats().extra
    assert extra["spec_verify_rows"] > 0 and extra["spec_draft_tokens"] > 0
    if name == "same-draft":
        assert extra["spec_accepted_tokens"] == extra["spec_draft_tokens"]  # the overhead ceiling: all kept
        assert engine.num_steps < sum(MAX_NEW for _ in prompts()) // 2
    if name == "ngram":
        assert extra["spec_accepted_tokens"] > 0
    assert engine.block_manager.num_used_blocks == 0


@pytest.mark.parametrize("max_new", [1, 2, 3, 5, 6])
def test_max_new_tokens_inside_a_run(max_new, make_engine, checkpoints, plain_outputs):
    engine = make_engine(speculative_model=str(checkpoints["target"]), speculate=4)
    got = run_staggered(engine, greedy_requests(max_new), gap=0)
    for rid, outs in got.items():
        assert tokens(outs) == tokens(plain_outputs[rid])[:max_new]
        assert outs[-1].finished and outs[-1].finish_reason == "length"


@pytest.mark.parametrize("stop", ["token", "eos", "string"])
def test_stops_inside_an_accepted_run_end_there(stop, make_engine, checkpoints, plain_outputs):
    """Every draft is accepted (the draft is the target), so the stop falls inside a run."""
    stops = {}
    requests = []
    for i, prompt in enumerate(prompts()):
        rid = f"r{i}"
        plain = tokens(plain_outputs[rid])
        at = 5 + i % 3  # the stop token's position in the output
        params = dict(max_new_tokens=MAX_NEW, top_n_tokens=2)
        if stop == "token":
            params["stop_token_ids"] = (plain[at],)
        elif stop == "string":
            text = "".join(o.text for o in plain_outputs[rid])
            params["stop"] = (text[len(text) // 2 : len(text) // 2 + 2],)
        else:
            stops[rid] = plain[at]
        requests.append(GenerationRequest(rid, tuple(prompt), SamplingParams(ignore_eos=stop != "eos", **params)))

    def outputs_of(engine):
        if stop == "eos":  # the plain run's token at `at` plays EOS
            engine.outputs.eos_token_ids = set(stops.values())
        return run_staggered(engine, requests, gap=0)

    want = outputs_of(make_engine())
    got = outputs_of(make_engine(speculative_model=str(checkpoints["target"]), speculate=4))
    for rid in want:
        assert tokens(got[rid]) == tokens(want[rid]), rid
        assert len(tokens(got[rid])) < MAX_NEW
        for field in ("finish_reason", "num_generated_tokens", "stop_text_offset"):
            assert getattr(got[rid][-1], field) == getattr(want[rid][-1], field), (rid, field)
        assert "".join(o.text for o in got[rid]) == "".join(o.text for o in want[rid])


def test_mixed_batch_of_speculative_and_plain_rows(make_engine, checkpoints):
    """Penalties decode plainly (their history changes per position); seeded sampling speculates."""
    ps = prompts()
    requests = [
        GenerationRequest("greedy", tuple(ps[4]), SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)),
        GenerationRequest("penalty", tuple(ps[1]), SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True, repetition_penalty=1.3)),
        GenerationRequest("top1", tuple(ps[2]), SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True, do_sample=True, top_k=1, seed=3)),
        GenerationRequest("seeded", tuple(ps[0]), SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True, do_sample=True,
                                                                 temperature=0.7, top_p=0.9, seed=11)),  # fmt: skip
        GenerationRequest("n2", tuple(ps[3]), SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True, do_sample=True, seed=5, n=2)),
    ]
    plain = run_staggered(make_engine(), requests)
    settings = dict(speculative_model=str(checkpoints["target"]), speculate=3)
    first, second = run_staggered(make_engine(**settings), requests), run_staggered(make_engine(**settings), requests, gap=1)
    for rid in ("greedy", "penalty", "top1"):  # deterministic: equal to the plain engine
        assert tokens(first[rid]) == tokens(plain[rid]), rid
    greedy_top1 = run_staggered(make_engine(), [GenerationRequest("top1", tuple(ps[2]), SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True))])
    assert tokens(first["top1"]) == tokens(greedy_top1["top1"])  # top_k=1 through the rejection sampler
    for rid in ("seeded", "n2"):  # a seed reproduces the speculative run, whatever else is in the batch
        assert tokens(first[rid]) == tokens(second[rid]), rid
        assert len(tokens(first[rid])) == MAX_NEW * (2 if rid == "n2" else 1)


def test_preemption_mid_speculation_recomputes_and_frees_everything(make_engine, checkpoints, plain_outputs):
    engine = make_engine(speculative_model=str(checkpoints["target"]), speculate=4, max_batch_total_tokens=96,
                         max_input_tokens=32, max_total_tokens=48)
    got = run_staggered(engine, greedy_requests(), gap=0)
    assert engine.scheduler.num_preemptions > 0
    for rid in got:
        assert tokens(got[rid]) == tokens(plain_outputs[rid]), rid
    bm = engine.block_manager
    assert bm.num_used_blocks == 0 and sum(bm.pool.ref_counts) == 0


def test_abort_mid_speculation_frees_everything(make_engine, checkpoints):
    engine = make_engine(speculative_model=str(checkpoints["target"]), speculate=4)
    for request in greedy_requests(max_new=40):
        engine.add_request(request)
    for _ in range(4):
        engine.step()
    assert engine.stats().extra["spec_verify_rows"] > 0
    for i in range(len(prompts())):
        engine.abort(f"r{i}")
    bm = engine.block_manager
    assert not engine.has_unfinished() and bm.num_used_blocks == 0 and sum(bm.pool.ref_counts) == 0
    proposer = engine.speculator.proposer
    aborted = set(proposer._cached)
    assert aborted
    engine.generate([GenerationRequest("next", (3, 4, 5), SamplingParams(max_new_tokens=4, ignore_eos=True))])
    assert not aborted & set(proposer._cached)  # the next step dropped the aborted sequences' draft state
    assert not aborted & set(proposer.runner._states)  # and the draft runner its per-sequence state

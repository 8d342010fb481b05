"""The threaded engine served to asyncio: concurrent streams, cancellation, errors, limits."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from lmport.engine.api import GenerationRequest, SamplingParams
from lmport.engine.async_engine import AsyncEngine
from lmport.engine.errors import EngineDeadError, EngineOverloadedError, RequestValidationError


def request(rid: str, prompt: list[int], max_new: int = 8, **params) -> GenerationRequest:
    return GenerationRequest(rid, tuple(prompt), SamplingParams(max_new_tokens=max_new, ignore_eos=True, **params))


async def collect(engine: AsyncEngine, req: GenerationRequest) -> list:
    return [out async for out in engine.generate(req)]


def tokens_of(outputs) -> list[int]:
    return [t.token_id for o in outputs for t in o.tokens]


async def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


@pytest.fixture
def async_engine(make_engine):
    engines = []

    def make(**settings):
        engine, hf_model = make_engine("llama", **settings)
        engines.append(AsyncEngine(engine))
        return engines[-1], hf_model

    yield make
    for engine in engines:
        engine.shutdown()


def test_concurrent_generate_calls_from_one_event_loop(async_engine, random_prompts, hf_greedy):
    engine, hf_model = async_engine(max_batch_prefill_tokens=12)
    prompts = random_prompts([4, 21, 9, 15], seed=10)
    loop_thread = threading.get_ident()
    engine_threads = set()
    step = engine.engine.step

    def spy():
        engine_threads.add(threading.get_ident())
        return step()

    engine.engine.step = spy

    async def main():
        return await asyncio.gather(*(collect(engine, request(str(i), p)) for i, p in enumerate(prompts)))

    results = asyncio.run(main())
    for prompt, outs in zip(prompts, results):
        assert tokens_of(outs) == hf_greedy(hf_model, prompt, 8)[0]
        assert outs[-1].finished and sum(o.finished for o in outs) == 1
    assert engine_threads and loop_thread not in engine_threads  # steps never ran on the event loop
    assert engine.is_healthy
    asyncio.run(wait_until(lambda: engine.stats().kv_blocks_used == 0))  # freed by the engine thread, maybe just after


def test_leaving_the_stream_aborts_the_request_and_frees_its_blocks(async_engine):
    engine, _ = async_engine()

    async def main():
        stream = engine.generate(request("long", [5, 6, 7, 8, 9], max_new=400))
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 3:
                break
        await stream.aclose()
        await wait_until(lambda: engine.engine.num_requests == 0)

        task = asyncio.create_task(collect(engine, request("cancelled", [3, 4, 5], max_new=400)))
        await wait_until(lambda: engine.stats().running == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until(lambda: engine.engine.num_requests == 0 and engine.stats().running == 0)

    asyncio.run(main())
    stats = engine.stats()
    assert stats.kv_blocks_used == 0 and stats.running == stats.waiting == 0


def test_a_failing_step_ends_its_stream_with_an_error_and_the_engine_lives_on(async_engine, hf_greedy):
    engine, hf_model = async_engine()
    execute = engine.engine.executor.execute

    def flaky(step):
        if any(e.request_id == "bad" for e in step.entries):
            raise RuntimeError("kernel launch failed")
        return execute(step)

    engine.engine.executor.execute = flaky

    async def main():
        failed = await collect(engine, request("bad", [10, 11, 12]))
        good = await collect(engine, request("good", [10, 11, 12]))
        return failed, good

    failed, good = asyncio.run(main())
    assert len(failed) == 1 and failed[0].finished and "kernel launch failed" in failed[0].error
    assert engine.is_healthy and engine.error is None
    assert tokens_of(good) == hf_greedy(hf_model, [10, 11, 12], 8)[0]


def test_validation_and_overload_are_raised_up_front(async_engine):
    engine, _ = async_engine(max_concurrent_requests=1, max_input_tokens=10, max_total_tokens=20)

    async def main():
        with pytest.raises(RequestValidationError):
            await collect(engine, request("long", list(range(3, 20))))
        first = engine.generate(request("first", [3, 4, 5], max_new=12))
        out = await first.__anext__()
        with pytest.raises(EngineOverloadedError):
            await collect(engine, request("second", [3, 4, 5]))
        rest = [o async for o in first]
        assert [out, *rest][-1].finished
        assert len(await collect(engine, request("third", [3, 4, 5]))) == 8  # a slot is free again

    asyncio.run(main())


def test_shutdown_ends_streams_in_flight(async_engine):
    engine, _ = async_engine()

    async def main():
        stream = engine.generate(request("forever", [3, 4, 5], max_new=400))
        await stream.__anext__()
        await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass
        assert not engine.is_healthy
        with pytest.raises(EngineDeadError):
            await collect(engine, request("late", [3, 4, 5]))

    asyncio.run(main())


def test_an_error_outside_the_model_fails_every_request_and_serving_goes_on(async_engine, hf_greedy):
    engine, hf_model = async_engine()
    schedule = engine.engine.scheduler.schedule
    broken = {"once": True}

    def buggy():
        if broken.pop("once", False):
            raise KeyError("bookkeeping bug")
        return schedule()

    engine.engine.scheduler.schedule = buggy

    async def main():
        failed = await collect(engine, request("a", [4, 5, 6]))
        good = await collect(engine, request("b", [4, 5, 6]))
        return failed, good

    failed, good = asyncio.run(main())
    assert len(failed) == 1 and "bookkeeping bug" in failed[0].error and failed[0].finished
    assert tokens_of(good) == hf_greedy(hf_model, [4, 5, 6], 8)[0]
    assert engine.is_healthy
    asyncio.run(wait_until(lambda: engine.stats().kv_blocks_used == 0))


def test_an_error_while_aborting_fails_the_requests_instead_of_killing_the_loop(async_engine, hf_greedy):
    """An abort that raises (a bookkeeping bug) ran outside the loop's try: the thread died
    and every other stream waited forever. Now it is recovered like a failed step."""
    engine, hf_model = async_engine()
    abort = engine.engine.abort
    broken = {"once": True}

    def buggy_abort(request_id):
        if broken.pop("once", False):
            raise KeyError("abort bookkeeping bug")
        return abort(request_id)

    engine.engine.abort = buggy_abort

    async def main():
        left = engine.generate(request("left", [3, 4, 5], max_new=400))
        await left.__anext__()
        other = asyncio.ensure_future(collect(engine, request("other", [6, 7, 8], max_new=40)))
        await left.aclose()  # posts the abort that raises
        other = await asyncio.wait_for(other, 30)
        good = await asyncio.wait_for(collect(engine, request("after", [4, 5, 6])), 30)
        return other, good

    other, good = asyncio.run(main())
    # "other" ends either way (failed by the recovery, or served when it arrived after it); it never hangs
    assert other[-1].finished
    assert other[-1].error is None or "abort bookkeeping bug" in other[-1].error
    assert tokens_of(good) == hf_greedy(hf_model, [4, 5, 6], 8)[0]
    assert engine.is_healthy
    asyncio.run(wait_until(lambda: engine.stats().kv_blocks_used == 0))


def test_a_request_opened_while_the_loop_dies_fails_instead_of_waiting_forever(async_engine, monkeypatch):
    """The loop dies between a request's health check and its stream's registration: the loop's
    one pass failing open streams has run already, so the request must fail on its own."""
    engine, _ = async_engine()
    engine.start()
    dead = EngineDeadError("the loop died")
    checked = []

    def healthy_then_dies(self):  # the check passes; the loop dies and fails streams right after
        checked.append(True)
        self._error = dead
        self._fail_streams(dead)
        return True

    monkeypatch.setattr(AsyncEngine, "is_healthy", property(healthy_then_dies))

    async def main():
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(collect(engine, request("late", [3, 4, 5])), timeout=5)

    asyncio.run(main())
    assert checked and "late" not in engine._streams


def test_submit_admits_all_requests_or_none(async_engine):
    """One admission control: a submission of several requests that would pass
    max_concurrent_requests is refused whole, and nothing of it reaches the engine."""
    engine, _ = async_engine(max_concurrent_requests=3)

    async def main():
        held = engine.submit([request("held", [3, 4, 5], max_new=30)])
        with pytest.raises(EngineOverloadedError):
            engine.submit([request(f"many-{i}", [3, 4, 5]) for i in range(3)])
        assert engine.num_open == 1
        pair = engine.submit([request("a", [3, 4, 5], max_new=2), request("b", [3, 4, 5], max_new=2)])
        assert engine.num_open == 3
        for stream in pair:
            outs = [out async for out in stream]
            assert outs[-1].finished and outs[-1].request_id == stream.request_id
        held[0].close()  # closing an unfinished stream aborts it and frees its slot
        assert engine.num_open == 0

    asyncio.run(main())

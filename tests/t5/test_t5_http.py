"""Native FLAN-T5 over HTTP on a live server: ``text_generation.Client`` (generate and stream,
alone and several at once) and the ``openai`` SDK's completions; tokens equal transformers'."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import torch

from lmport.config import LaunchConfig
from lmport.engine.factory import build_engine
from lmport.plugins import PluginHost
from lmport.server.app import build_app
from lmport.server.assemble import build_state
from lmport.server.serve import ServerThread
from lmport.testing.hf_oracle import hf_greedy_generate

text_generation = pytest.importorskip("text_generation")
openai = pytest.importorskip("openai")

MAX_NEW = 6
TEXTS = ["translate English to German: The house is wonderful.", "summarize: paged attention", "Hello"]


@pytest.fixture(scope="module")
def server(t5_checkpoint):
    path, oracle = t5_checkpoint("flan-t5")
    config = LaunchConfig(model_id=str(path), block_size=4, max_batch_total_tokens=2048, max_total_tokens=256)
    host = PluginHost(environ={}, load_entry_points=False).load()
    engine, tokenizer, info = build_engine(config, host)
    state = build_state(config, engine, tokenizer, info, host=host, model_id="tiny-flan-t5")
    thread = ServerThread(build_app(state)).start()
    yield thread, tokenizer, oracle
    thread.stop()
    engine.shutdown()


def expected(tokenizer, oracle, text: str, add_special_tokens: bool) -> list[int]:
    ids = tokenizer(text, add_special_tokens=add_special_tokens).input_ids
    return hf_greedy_generate(oracle, ids, MAX_NEW)[0]


def test_tgi_client_alone_and_batched(server):
    thread, tokenizer, oracle = server
    client = text_generation.Client(thread.url, timeout=60)
    want = [expected(tokenizer, oracle, t, True) for t in TEXTS]
    response = client.generate(TEXTS[0], max_new_tokens=MAX_NEW, decoder_input_details=True)
    assert [t.id for t in response.details.tokens] == want[0]
    assert response.generated_text == tokenizer.decode(want[0], skip_special_tokens=True)
    assert [e.token.id for e in client.generate_stream(TEXTS[1], max_new_tokens=MAX_NEW)] == want[1]

    async def many():
        aclient = text_generation.AsyncClient(thread.url, timeout=60)
        return await asyncio.gather(*(aclient.generate(t, max_new_tokens=MAX_NEW) for t in TEXTS * 3))

    for i, out in enumerate(asyncio.run(many())):
        assert [t.id for t in out.details.tokens] == want[i % len(TEXTS)]


def test_openai_completions_and_usage(server):
    thread, tokenizer, oracle = server
    client = openai.OpenAI(base_url=f"{thread.url}/v1", api_key="unused", timeout=60)
    for text in TEXTS[:2]:
        response = client.completions.create(model="tiny-flan-t5", prompt=text, max_tokens=MAX_NEW, temperature=0)
        want = expected(tokenizer, oracle, text, False)
        assert response.choices[0].text == tokenizer.decode(want, skip_special_tokens=True)
        # the prompt counts the encoder's input tokens, as TGI counts them
        assert response.usage.prompt_tokens == len(tokenizer(text, add_special_tokens=False).input_ids)
        assert response.usage.completion_tokens == MAX_NEW


def test_info_says_text(server):
    thread, _, _ = server
    assert httpx.get(f"{thread.url}/info").json()["modality"] == "text"
    assert httpx.get(f"{thread.url}/v1/models").json()["data"][0]["modality"] == "text"

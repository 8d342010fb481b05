"""Constrained decoding on a CUDA GPU, through the whole engine (async scheduling and decode
graphs on, as ``lmport launch`` runs there): JSON-schema and regex outputs validate; free
requests batched with them get exactly the tokens they get alone; the constrained rows' tokens
are read inside the next launch (``before_sample``), so async scheduling keeps running.

Needs a CUDA GPU (skipped otherwise); the CPU runs the same paths in
``tests/engine/test_constrained_generation.py``.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from lmport.config import LaunchConfig
from lmport.engine.api import Constraint, GenerationRequest, SamplingParams
from lmport.engine.factory import build_llm_engine
from lmport.plugins import PluginHost
from lmport.testing.tiny_models import make_checkpoint
from lmport.testing.tiny_tokenizer import train_tiny_tokenizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 6}, "age": {"type": "integer", "minimum": 0, "maximum": 99},
                   "color": {"enum": ["red", "green", "blue"]}},
    "required": ["name", "age", "color"], "additionalProperties": False,
}  # fmt: skip
REGEX = r"(cat|dog)-[0-9]{2}"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("cuda-structured")
    make_checkpoint("llama", path)
    train_tiny_tokenizer().save_pretrained(path)
    return path


def engine_for(path):
    host = PluginHost(environ={})
    assert host.select_backend("cuda").backend.name == "cuda"
    config = LaunchConfig(model_id=str(path), dtype="float32", block_size=16, max_batch_total_tokens=4096,
                          max_total_tokens=256, cuda_graphs=(1, 2, 4, 8))  # fmt: skip
    engine, _, _ = build_llm_engine(config, host)
    return engine


def run(engine, requests):
    outs = engine.generate(requests)
    assert engine.block_manager.num_used_blocks == 0
    text = {rid: "".join(o.text for o in got) for rid, got in outs.items()}
    tokens = {rid: [t.token_id for o in got for t in o.tokens] for rid, got in outs.items()}
    reasons = {rid: next(o.finish_reason for o in got if o.finished) for rid, got in outs.items()}
    return text, tokens, reasons


def test_constrained_and_free_rows_on_cuda_with_async_scheduling(checkpoint):
    import jsonschema

    prompts = [(1, 40, 41, 42), (1, 50, 51), (1, 60, 61, 62, 63), (1, 70)]
    free = [GenerationRequest(f"f{i}", p, SamplingParams(max_new_tokens=16, ignore_eos=True)) for i, p in enumerate(prompts[:2])]
    constrained = [
        GenerationRequest("json", prompts[2], SamplingParams(max_new_tokens=64, constraint=Constraint("json_schema", json.dumps(SCHEMA)))),
        GenerationRequest("regex", prompts[3], SamplingParams(max_new_tokens=64, do_sample=True, seed=3, constraint=Constraint("regex", REGEX))),
    ]
    _, alone, _ = run(engine_for(checkpoint), free)
    engine = engine_for(checkpoint)
    assert engine.async_scheduling
    launch, late = engine.executor.launch, []

    def spy(step, feed=(), previous=None, **kw):
        late.append("before_sample" in kw)
        return launch(step, feed, previous, **kw)

    engine.executor.launch = spy
    text, tokens, reasons = run(engine, constrained + free)
    assert tokens["f0"] == alone["f0"] and tokens["f1"] == alone["f1"]
    assert reasons["json"] == "eos_token" and reasons["regex"] == "eos_token", reasons
    jsonschema.validate(json.loads(text["json"]), SCHEMA)
    assert re.fullmatch(REGEX, text["regex"]), text["regex"]
    assert sum(late) > 3

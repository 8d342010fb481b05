"""What the fallback refuses or needs: remote code only when trusted, models whose attention
bypasses transformers' interface, logits it would get wrong (caught by the load-time probe)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from lmport.models import hf_fallback
from lmport.models.base import ModelInfo
from lmport.models.hf_fallback import load_fallback
from lmport.models.loader import resolve_model_info
from lmport.testing.model_driver import greedy_generate

REMOTE_CONFIG = """
from transformers import PretrainedConfig, Qwen2Config


class TinyRemoteConfig(Qwen2Config):
    model_type = "lmport_tiny_remote"


class TinyOwnAttentionConfig(PretrainedConfig):
    model_type = "lmport_tiny_own_attention"

    def __init__(self, vocab_size=64, hidden_size=32, num_attention_heads=2, num_hidden_layers=1, **kwargs):
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.num_attention_heads, self.num_hidden_layers = num_attention_heads, num_hidden_layers
        super().__init__(**kwargs)
"""

REMOTE_MODELING = """
import torch
from torch import nn
from transformers import PreTrainedModel, Qwen2ForCausalLM
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput

from .configuration_tiny import TinyOwnAttentionConfig, TinyRemoteConfig


class TinyRemoteForCausalLM(Qwen2ForCausalLM):
    # remote code built on a transformers model: its attention goes through the interface
    config_class = TinyRemoteConfig


class TinyOwnAttentionModel(PreTrainedModel):
    # remote code with attention of its own: transformers' attention interface is never called
    config_class = TinyOwnAttentionConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.attn = nn.MultiheadAttention(config.hidden_size, config.num_attention_heads, batch_first=True)
        self.post_init()

    def forward(self, input_ids=None, position_ids=None, **kwargs):
        h = self.embed(input_ids)
        mask = torch.triu(torch.ones(h.shape[1], h.shape[1], dtype=torch.bool), 1)
        return BaseModelOutput(last_hidden_state=h + self.attn(h, h, h, attn_mask=mask)[0])


class TinyOwnAttentionForCausalLM(PreTrainedModel):
    config_class = TinyOwnAttentionConfig
    base_model_prefix = "model"

    def __init__(self, config):
        super().__init__(config)
        self.model = TinyOwnAttentionModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, position_ids=None, **kwargs):
        return CausalLMOutput(logits=self.lm_head(self.model(input_ids).last_hidden_state))
"""


def write_remote_checkpoint(path: Path, kind: str) -> Path:
    """A checkpoint whose config.json points at modeling code in the folder (``auto_map``)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "configuration_tiny.py").write_text(textwrap.dedent(REMOTE_CONFIG))
    (path / "modeling_tiny.py").write_text(textwrap.dedent(REMOTE_MODELING))
    import importlib.util
    import sys

    # build the weights with the same code, imported from the folder as a package
    package = f"lmport_remote_{kind}_{abs(hash(str(path)))}"
    spec = importlib.util.spec_from_file_location(package, path / "__init__.py", submodule_search_locations=[str(path)])
    (path / "__init__.py").write_text("")
    module = importlib.util.module_from_spec(spec)
    sys.modules[package] = module
    spec.loader.exec_module(module)
    configuration = importlib.import_module(f"{package}.configuration_tiny")
    modeling = importlib.import_module(f"{package}.modeling_tiny")
    if kind == "remote":
        config = configuration.TinyRemoteConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128,
        )
        model = modeling.TinyRemoteForCausalLM(config)
        names = ("TinyRemoteConfig", "TinyRemoteForCausalLM")
    else:
        config = configuration.TinyOwnAttentionConfig()
        model = modeling.TinyOwnAttentionForCausalLM(config)
        names = ("TinyOwnAttentionConfig", "TinyOwnAttentionForCausalLM")
    model.save_pretrained(path)
    saved = json.loads((path / "config.json").read_text())
    saved["auto_map"] = {"AutoConfig": f"configuration_tiny.{names[0]}", "AutoModelForCausalLM": f"modeling_tiny.{names[1]}"}
    saved["architectures"] = [names[1]]
    (path / "config.json").write_text(json.dumps(saved))
    return path


def test_remote_code_runs_only_when_trusted(tmp_path, cpu_host):
    path = write_remote_checkpoint(tmp_path / "remote", "remote")
    info = resolve_model_info(path, trust_remote_code=True)
    assert info.architecture == "TinyRemoteForCausalLM"
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_fallback(info, cpu_host, torch.float32, torch.device("cpu"), trust_remote_code=False)
    model = load_fallback(info, cpu_host, torch.float32, torch.device("cpu"), trust_remote_code=True)
    from transformers import AutoModelForCausalLM

    oracle = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, attn_implementation="eager").eval()
    prompt = [5, 6, 7, 8, 9]
    expected = oracle.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=4, eos_token_id=None, pad_token_id=0)
    assert greedy_generate(model, [prompt], 4, host=cpu_host) == [expected[0, len(prompt) :].tolist()]


def test_model_with_its_own_attention_is_refused(tmp_path, cpu_host):
    path = write_remote_checkpoint(tmp_path / "own", "own")
    info = resolve_model_info(path, trust_remote_code=True)
    with pytest.raises(RuntimeError, match="attention interface"):
        load_fallback(info, cpu_host, torch.float32, torch.device("cpu"), trust_remote_code=True)


def test_probe_catches_logits_the_adapter_gets_wrong(fallback_checkpoint, cpu_host, monkeypatch):
    """Granite divides its logits by ``logits_scaling``; an adapter that forgot would fail at load."""
    path, _ = fallback_checkpoint("granite")
    monkeypatch.setattr(hf_fallback, "postprocess_logits", lambda logits, config: logits)
    with pytest.raises(RuntimeError, match="disagrees with transformers"):
        load_fallback(resolve_model_info(path), cpu_host, torch.float32, torch.device("cpu"), False)


def test_probe_catches_positions_that_restart_at_each_chunk(fallback_checkpoint, cpu_host, monkeypatch):
    """A model that numbered each step's tokens from 0 (cache_position, not position_ids) would
    be right for a whole prompt and wrong for every later chunk and decode: the probe's second
    chunk catches it."""
    path, _ = fallback_checkpoint("qwen2")
    forward = hf_fallback.HFCausalLMAdapter.forward

    def restarting(self, input_ids, positions, kv_caches, metadata):
        return forward(self, input_ids, torch.arange(len(positions)), kv_caches, metadata)

    monkeypatch.setattr(hf_fallback.HFCausalLMAdapter, "forward", restarting)
    with pytest.raises(RuntimeError, match="disagrees with transformers"):
        load_fallback(resolve_model_info(path), cpu_host, torch.float32, torch.device("cpu"), False)


def test_gguf_checkpoint_loads_through_gguf_file(tiny_gguf, cpu_host):
    from transformers import AutoConfig

    gguf_path, oracle, _ = tiny_gguf
    hf_config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    info = ModelInfo("tiny-gguf", gguf_path.parent, hf_config, "Qwen2ForCausalLM", gguf_file=gguf_path.name)
    model = load_fallback(info, cpu_host, torch.float32, torch.device("cpu"), False)
    prompts = [[5, 6, 7, 8, 9, 10], [40, 41]]
    got = greedy_generate(model, prompts, 5, host=cpu_host, prefill_chunk=4)
    for prompt, tokens in zip(prompts, got):
        expected = oracle.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=5, eos_token_id=None, pad_token_id=0)
        assert tokens == expected[0, len(prompt) :].tolist()


def _image_text_config(kind: str):
    from transformers import Idefics2Config

    assert kind == "idefics2"
    config = Idefics2Config(
        text_config=dict(model_type="mistral", vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2),
        vision_config=dict(hidden_size=32, image_size=32, patch_size=8, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64),
    )
    config.architectures = ["Idefics2ForConditionalGeneration"]
    return config


@pytest.mark.parametrize("kind", ["idefics2"])
def test_image_text_checkpoints_are_refused_at_startup_naming_the_architecture(kind, tmp_path, cpu_host):
    """docs/models.md: Idefics 2 (no native module) is refused rather than served without its images;
    Llava-next and Idefics (v1) are native (tests/vision)."""
    from lmport.config import LaunchConfig
    from lmport.engine.factory import build_llm_engine
    from lmport.testing.tiny_tokenizer import train_tiny_tokenizer

    config = _image_text_config(kind)
    config.save_pretrained(tmp_path)
    train_tiny_tokenizer(384).save_pretrained(tmp_path)
    architecture = config.architectures[0]
    with pytest.raises(NotImplementedError, match=f"{architecture} .*image-text model without a native lmport module") as refused:
        build_llm_engine(LaunchConfig(model_id=str(tmp_path), max_batch_total_tokens=256), cpu_host)
    assert "Unrecognized configuration class" not in str(refused.value)

"""The backend conformance suite: what every lmport backend must satisfy.

A backend distribution runs it against itself by subclassing::

    from lmport.testing.conformance import BackendConformance

    class TestCudaConformance(BackendConformance):
        backend_name = "cuda"
        distribution = "lmport-cuda"

The suite selects the backend by name (as ``--backend NAME`` would), skips with the host's
reason when the hardware isn't there, and checks: detection and selection (without creating
a device context), a valid picklable :class:`~lmport.capabilities.Capabilities`, config
adjustments, KV allocation, memory info, the weights loader for unquantized checkpoints,
and attention against the core's reference on random paged batches (prefill, decode, mixed,
chunked, GQA, MQA, sliding window and ALiBi when flagged, every flagged head size).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import subprocess
import sys
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from lmport.capabilities import BackendInfo, Capabilities
from lmport.config import ConfigAdjustment, LaunchConfig
from lmport.layers.attention import AttentionBackend, AttentionSpec, KVCacheSpec, prepare_step_metadata
from lmport.layers.reference_attention import ReferenceAttention
from lmport.memory import MemoryInfo
from lmport.plugins import PluginError, PluginHost
from lmport.testing.attention_features import check_cross_attention, check_position_bias
from lmport.testing.installed import require_distribution
from lmport.testing.model_driver import build_metadata
from lmport.weights.quantization import WeightsLoader

DEFAULT_HEAD_SIZES = (64, 80, 96, 128, 256)
# (atol, rtol) of a backend's attention against the float32-accumulating reference
TOLERANCES = {"float32": (2e-4, 2e-4), "float16": (5e-3, 5e-3), "bfloat16": (3e-2, 3e-2)}


@dataclass(frozen=True)
class AttentionCase:
    """One paged batch: per sequence, tokens already cached and tokens new this step."""

    cached: tuple[int, ...]
    new: tuple[int, ...]
    num_heads: int = 4
    num_kv_heads: int = 4
    sliding_window: int | None = None
    alibi: bool = False


ATTENTION_CASES = {
    "prefill": AttentionCase(cached=(0, 0, 0), new=(7, 13, 1)),
    "decode": AttentionCase(cached=(9, 17, 1), new=(1, 1, 1)),
    "mixed": AttentionCase(cached=(0, 6, 20, 0), new=(11, 1, 1, 3)),
    "chunked": AttentionCase(cached=(8, 16, 3), new=(8, 5, 1)),
    "gqa": AttentionCase(cached=(0, 12, 5), new=(9, 1, 4), num_heads=8, num_kv_heads=2),
    "mqa": AttentionCase(cached=(0, 12, 5), new=(9, 1, 4), num_heads=4, num_kv_heads=1),
    "sliding_window": AttentionCase(cached=(0, 14, 9), new=(12, 1, 6), sliding_window=5),
    "alibi": AttentionCase(cached=(0, 10, 4), new=(6, 1, 5), alibi=True),
}


def _clean_environ(extra: dict[str, str]) -> dict[str, str]:
    """The process environment minus lmport's own selection variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMPORT_")}
    env.update(extra)
    return env


class BackendConformance:
    """Subclass with ``backend_name`` set (and the class name starting with ``Test``)."""

    backend_name: ClassVar[str] = ""
    distribution: ClassVar[str | None] = None  # fail in CI / skip elsewhere if not installed
    environ: ClassVar[dict[str, str]] = {}  # extra variables detection needs
    dtype: ClassVar[str | None] = None  # None: float32 on CPU, else the backend's first dtype
    standard_kv_layout: ClassVar[bool] = True  # KV tensors are [blocks, block_size, kv_heads, head_dim]

    # ------------------------------------------------------------------ fixtures

    @pytest.fixture(scope="class")
    @classmethod
    def host(cls) -> PluginHost:
        if not cls.backend_name:
            pytest.fail(f"{cls.__name__} must set backend_name", pytrace=False)
        if cls.distribution:
            require_distribution(cls.distribution)
        host = PluginHost(environ=_clean_environ(dict(cls.environ)))
        try:
            host.select_backend(cls.backend_name)
        except PluginError as exc:
            pytest.skip(f"backend '{cls.backend_name}' not usable here: {exc}")
        return host

    @pytest.fixture(scope="class")
    @classmethod
    def capabilities(cls, host: PluginHost) -> Capabilities:
        return host.capabilities()

    @pytest.fixture(scope="class")
    @classmethod
    def device(cls, capabilities: Capabilities) -> torch.device:
        return torch.device(capabilities.device_type)

    @pytest.fixture(scope="class")
    @classmethod
    def attention_dtype(cls, capabilities: Capabilities) -> torch.dtype:
        name = cls.dtype
        if name is None:
            on_cpu = capabilities.device_type == "cpu"
            name = "float32" if on_cpu and capabilities.supports_dtype("float32") else capabilities.dtypes[0]
        return getattr(torch, name)

    # ------------------------------------------------------------------ detection and selection

    def test_selected_by_name(self, host: PluginHost) -> None:
        assert host.backend.name == self.backend_name
        assert isinstance(host.backend, BackendInfo)
        assert self.backend_name in [info.name for info in host.selection.detected]
        assert host.selection.reason == f"requested with --backend={self.backend_name}"

    def test_one_backend_per_process(self, host: PluginHost) -> None:
        other = "cpu" if self.backend_name != "cpu" else "no-such-backend"
        with pytest.raises(PluginError, match="already active"):
            host.select_backend(other)

    def test_detection_creates_no_device_context(self) -> None:
        # A fresh interpreter: in this one, another test may already have used the device.
        script = (
            "import sys, torch\n"
            "from lmport.plugins import PluginHost\n"
            "PluginHost().detect()\n"
            "touched = [n for n in ('cuda', 'xpu') if getattr(getattr(torch, n, None), 'is_initialized', lambda: False)()]\n"
            "sys.exit(f'device context created by detection: {touched}' if touched else 0)\n"
        )
        env = _clean_environ(dict(self.environ))
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]

    # ------------------------------------------------------------------ capabilities and config

    def test_capabilities_valid_and_picklable(self, host: PluginHost, capabilities: Capabilities) -> None:
        assert isinstance(capabilities, Capabilities)
        assert capabilities.backend == self.backend_name
        assert capabilities.device_type == host.backend.device_type
        assert pickle.loads(pickle.dumps(capabilities)) == capabilities
        assert pickle.loads(pickle.dumps(host.backend)) == host.backend
        assert capabilities.dtypes and all(isinstance(getattr(torch, d, None), torch.dtype) for d in capabilities.dtypes)
        assert capabilities.kv_block_sizes and all(isinstance(b, int) and b > 0 for b in capabilities.kv_block_sizes)
        assert all(isinstance(h, int) and h > 0 for h in capabilities.attention_head_sizes)
        assert isinstance(capabilities.quantization, frozenset)
        assert all(isinstance(q, str) for q in capabilities.quantization)
        json.dumps(capabilities.to_dict())
        with pytest.raises(dataclasses.FrozenInstanceError):
            capabilities.paged_attention = not capabilities.paged_attention  # type: ignore[misc]

    def test_config_adjustments(self, host: PluginHost, capabilities: Capabilities) -> None:
        original = LaunchConfig()
        adjusted, adjustments = host.adjust_config(original)
        assert original == LaunchConfig(), "a plugin mutated the config in place"
        assert isinstance(adjusted, LaunchConfig)
        for adjustment in adjustments:
            assert isinstance(adjustment, ConfigAdjustment)
            assert adjustment.reason.strip(), f"adjustment {adjustment.changes} gives no reason"
            assert adjustment.changes
        if adjusted.block_size is not None:
            assert adjusted.block_size in capabilities.kv_block_sizes
        with pytest.raises(dataclasses.FrozenInstanceError):
            adjusted.port = 1  # type: ignore[misc]
        again, _ = host.adjust_config(adjusted)
        assert again == adjusted, "adjusting an adjusted config changed it again"

    # ------------------------------------------------------------------ memory, KV, weights

    def test_memory_info(self, host: PluginHost, device: torch.device) -> None:
        info = host.memory_info(device)
        assert isinstance(info, MemoryInfo)
        assert 0 < info.free_bytes <= info.total_bytes

    def test_kv_cache_allocation(
        self, host: PluginHost, capabilities: Capabilities, device: torch.device, attention_dtype: torch.dtype
    ) -> None:
        block_size = capabilities.default_block_size
        spec = KVCacheSpec(num_layers=3, num_kv_heads=2, head_dim=64, block_size=block_size, dtype=attention_dtype)
        caches = host.allocate_kv_cache(spec, 5, device)
        assert isinstance(caches, list) and len(caches) == 3
        for pair in caches:
            assert len(pair) == 2
            for tensor in pair:
                assert tensor.dtype == attention_dtype
                assert tensor.device.type == device.type
                if self.standard_kv_layout:
                    assert tuple(tensor.shape) == (5, block_size, 2, 64)
        if self.standard_kv_layout:  # layers must not alias each other
            caches[0][0].fill_(1)
            assert not caches[1][0].any() and not caches[0][1].any()

    def test_weights_loader_for_unquantized(self, host: PluginHost, device: torch.device, tmp_path) -> None:
        from safetensors.torch import save_file

        tensors = {"model.embed.weight": torch.randn(6, 4), "model.step": torch.tensor([3], dtype=torch.int64)}
        save_file(tensors, str(tmp_path / "model.safetensors"))
        loader = host.weights_loader(None)
        assert isinstance(loader, WeightsLoader)
        loaded = dict(loader.iter_weights(tmp_path, torch.float16, device))
        assert set(loaded) == set(tensors)
        assert loaded["model.embed.weight"].dtype == torch.float16
        assert loaded["model.step"].dtype == torch.int64, "integer tensors must keep their dtype"
        assert loaded["model.embed.weight"].device.type == device.type
        torch.testing.assert_close(loaded["model.embed.weight"].cpu(), tensors["model.embed.weight"].half())

    # ------------------------------------------------------------------ attention

    @pytest.mark.parametrize("case_name", list(ATTENTION_CASES))
    def test_attention_matches_reference(self, case_name: str, host, capabilities, device, attention_dtype) -> None:
        case = ATTENTION_CASES[case_name]
        if case.sliding_window and not capabilities.sliding_window_attention:
            pytest.skip("sliding_window_attention is not flagged (the host falls back to the reference)")
        if case.alibi and not capabilities.alibi_attention:
            pytest.skip("alibi_attention is not flagged (the host falls back to the reference)")
        head_dim = (capabilities.attention_head_sizes or DEFAULT_HEAD_SIZES)[0]
        check_attention(host, case, head_dim, capabilities, device, attention_dtype)

    def test_cross_attention(self, host, capabilities, device, attention_dtype) -> None:
        """Encoder-decoder cross-attention (K/V written once, then attended, not causal) through
        the host's answer for a ``kind="cross"`` spec (the reference where the backend has none)."""
        _check_cross(host, capabilities, device, attention_dtype, key_ranges=False, decoder_lens=[1, 4, 1])

    def test_cross_attention_key_ranges(self, host, capabilities, device, attention_dtype) -> None:
        """Cross-attention where each query token attends its own range of the cross positions
        (Idefics: the image before it), an empty range giving zeros."""
        _check_cross(host, capabilities, device, attention_dtype, key_ranges=True, decoder_lens=[1, 4, 7])

    def test_attention_position_bias(self, host, capabilities, device, attention_dtype) -> None:
        """A per-(head, distance) score bias (T5's relative positions) over the paged cache."""
        head_dim = (capabilities.attention_head_sizes or DEFAULT_HEAD_SIZES)[0]
        spec = AttentionSpec(2, 2, head_dim, scale=head_dim**-0.5, dtype=str(attention_dtype).removeprefix("torch."),
                             position_bias_len=7)  # fmt: skip
        block_size = capabilities.default_block_size
        caches = lambda n: host.allocate_kv_cache(KVCacheSpec(1, 2, head_dim, block_size, attention_dtype), n, device)[0]  # noqa: E731
        check_position_bias(host.attention_backend(spec), caches, cached=[0, block_size + 2], new=[block_size + 3, 1],
                            block_size=block_size, device=device, dtype=attention_dtype)  # fmt: skip

    @pytest.mark.parametrize("head_dim", DEFAULT_HEAD_SIZES)
    def test_attention_head_size(self, head_dim: int, host, capabilities, device, attention_dtype) -> None:
        if capabilities.attention_head_sizes and head_dim not in capabilities.attention_head_sizes:
            pytest.skip(f"head size {head_dim} is not among the flagged {capabilities.attention_head_sizes}")
        check_attention(host, ATTENTION_CASES["mixed"], head_dim, capabilities, device, attention_dtype)


def _check_cross(host, capabilities, device, dtype, *, key_ranges: bool, decoder_lens: list[int]) -> None:
    head_dim = (capabilities.attention_head_sizes or DEFAULT_HEAD_SIZES)[0]
    spec = AttentionSpec(2, 2, head_dim, scale=head_dim**-0.5, dtype=str(dtype).removeprefix("torch."),
                         causal=False, kind="cross", key_ranges=key_ranges)  # fmt: skip
    block_size = capabilities.default_block_size
    caches = lambda n: host.allocate_kv_cache(KVCacheSpec(1, 2, head_dim, block_size, dtype), n, device)[0]  # noqa: E731
    check_cross_attention(host.attention_backend(spec), caches, encoder_lens=[5, 2, 2 * block_size + 3],
                          decoder_lens=decoder_lens, block_size=block_size, device=device, dtype=dtype)  # fmt: skip


def check_attention(
    host: PluginHost,
    case: AttentionCase,
    head_dim: int,
    capabilities: Capabilities,
    device: torch.device,
    dtype: torch.dtype,
    seed: int = 0,
) -> AttentionBackend:
    """Run ``case`` through the host's attention and the reference; assert they agree.

    The cached prefix is written by a first step through each implementation itself, so a
    backend with its own physical KV layout is checked through its own reads and writes.
    """
    dtype_name = str(dtype).removeprefix("torch.")
    slopes = None
    if case.alibi:
        slopes = tuple(2.0 ** (-8.0 * (i + 1) / case.num_heads) for i in range(case.num_heads))
    spec = AttentionSpec(
        num_heads=case.num_heads,
        num_kv_heads=case.num_kv_heads,
        head_dim=head_dim,
        scale=1.0 / math.sqrt(head_dim),
        dtype=dtype_name,
        sliding_window=case.sliding_window,
        alibi_slopes=slopes,
    )
    backend = host.attention_backend(spec)
    reference = ReferenceAttention(spec)
    block_size = capabilities.default_block_size
    gen = torch.Generator().manual_seed(seed)
    totals = [c + n for c, n in zip(case.cached, case.new)]
    per_seq = [-(-t // block_size) for t in totals]
    num_blocks = sum(per_seq) + 1
    order = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()  # scattered, block 0 unused
    tables, start = [], 0
    for count in per_seq:
        tables.append(order[start : start + count])
        start += count
    kv_spec = KVCacheSpec(1, case.num_kv_heads, head_dim, block_size, dtype)
    backend_cache = host.allocate_kv_cache(kv_spec, num_blocks, device)
    reference_cache = [tuple(torch.zeros(num_blocks, block_size, case.num_kv_heads, head_dim, dtype=dtype, device=device) for _ in range(2))]

    steps = []
    history = [i for i, c in enumerate(case.cached) if c > 0]
    if history:
        steps.append(([0] * len(history), [case.cached[i] for i in history], [tables[i] for i in history]))
    steps.append((list(case.cached), list(case.new), tables))
    atol, rtol = TOLERANCES.get(dtype_name, (1e-2, 1e-2))
    for step, (cached, new, step_tables) in enumerate(steps):
        metadata, _ = build_metadata(cached, new, step_tables, block_size, device)
        n = sum(new)
        q = torch.randn(n, case.num_heads, head_dim, generator=gen).to(device=device, dtype=dtype)
        k = torch.randn(n, case.num_kv_heads, head_dim, generator=gen).to(device=device, dtype=dtype)
        v = torch.randn(n, case.num_kv_heads, head_dim, generator=gen).to(device=device, dtype=dtype)
        prepare_step_metadata([backend], metadata)  # the backend's per-step state, as the runner builds it
        got = backend.forward(q, k, v, backend_cache[0], metadata)
        want = reference.forward(q, k, v, reference_cache[0], metadata)
        assert got.shape == want.shape == (n, case.num_heads, head_dim)
        assert got.dtype == dtype
        torch.testing.assert_close(
            got.float(), want.float(), atol=atol, rtol=rtol, msg=lambda m: f"step {step} of {case}: {m}"
        )
    return backend


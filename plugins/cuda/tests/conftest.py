"""Kernel tests run on the GPU where there is one, else in Triton's interpreter on the CPU.

The interpreter is chosen when a kernel is decorated (``@triton.jit`` reads
``TRITON_INTERPRET`` then), so the variable is set here, before any test imports a kernel.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None



def _numpy_shim_for_the_interpreter() -> None:
    """Triton 3.6's interpreter turns loop bounds into ints with ``int(array_of_one)``, which
    numpy >= 2.4 refuses; read the single element instead. Affects interpreter runs only."""
    import numpy as np

    try:
        int(np.zeros(1))
        return
    except TypeError:
        pass
    import triton.runtime.interpreter as interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "lmport_shim", False):
        return

    def patch_lang_tensor(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_lang_tensor.lmport_shim = True
    interpreter._patch_lang_tensor = patch_lang_tensor


if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if HAS_TRITON:
        _numpy_shim_for_the_interpreter()


@pytest.fixture
def device() -> torch.device:
    if not HAS_TRITON:
        pytest.skip("triton is not installed: the CUDA backend's kernels cannot run (pip install triton)")
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture
def cuda_device() -> torch.device:
    if not HAS_CUDA:
        pytest.skip("needs a CUDA GPU (CUDA graphs cannot be captured on the CPU)")
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    return torch.device("cuda")

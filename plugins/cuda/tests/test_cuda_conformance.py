"""lmport's backend conformance suite on a real NVIDIA GPU (skipped where there is none)."""

from lmport.testing.conformance import BackendConformance


class TestCudaConformance(BackendConformance):
    backend_name = "cuda"
    distribution = "lmport-cuda"

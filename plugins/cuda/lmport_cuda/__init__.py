"""lmport's NVIDIA CUDA backend (distribution ``lmport-cuda``).

Importing this package is cheap and touches no GPU: the entry point ``lmport_cuda.plugin``
holds the hooks; kernels live in modules imported only when a model is built.
"""

__version__ = "0.1.0"

"""lmport's AMD ROCm backend (distribution ``lmport-rocm``)."""

__version__ = "0.1.0"

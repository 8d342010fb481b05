"""Triton kernels of the CUDA backend; they need only torch and triton."""

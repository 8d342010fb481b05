"""Quantized checkpoint formats as :class:`~lmport.layers.linear.LinearMethod` s (see docs/quantization.md)."""

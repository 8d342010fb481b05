"""Checkpoint reading: safetensors, sharding, and the quantized formats' registry."""

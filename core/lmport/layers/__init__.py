"""Building blocks of the native models: attention contract, rotary, norms, linear, MoE."""

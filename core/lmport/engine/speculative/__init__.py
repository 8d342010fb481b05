"""Speculative decoding: proposers (n-gram prompt lookup, a draft model) and the verify step's
rejection sampler. See docs/speculative.md."""

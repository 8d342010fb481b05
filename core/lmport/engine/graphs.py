"""Moved to :mod:`lmport.graphs` (kept so that old imports work)."""

from lmport.graphs import DecodeGraphRunner, StaticDecodeMetadata  # noqa: F401

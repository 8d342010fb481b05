"""lmport's Intel Gaudi backend (distribution ``lmport-gaudi``)."""

__version__ = "0.1.0"

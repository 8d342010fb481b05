"""lmport: a text-generation inference server built as a hardware-backend plugin framework."""

from lmport.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["hookimpl", "__version__"]

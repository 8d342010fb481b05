"""Registers the core's constrained-decoding backend (llguidance) through ``lmport_logits_processors``."""

from __future__ import annotations

from lmport.hookspecs import hookimpl


@hookimpl(trylast=True)
def lmport_logits_processors(constraint, context):
    from lmport.engine.sampling.llguidance_backend import llguidance_processor

    return llguidance_processor(constraint, context)

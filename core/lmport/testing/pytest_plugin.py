"""pytest plugin (``pytest11`` entry point ``lmport``), loaded wherever lmport is installed.

It gives backend distributions what they need to test themselves without a copy of lmport's
conftest: fixtures for a plugin host and for fake machines, and a report header naming the
installed backends. The conformance suite itself is :mod:`lmport.testing.conformance`.
Kept import-light (no torch) because pytest loads it in every run of the environment.
"""

from __future__ import annotations

import importlib.metadata
import os
from typing import Any, Callable

import pytest

BACKENDS_GROUP = "lmport.backends"


def pytest_report_header(config: pytest.Config) -> str:
    names = sorted({ep.name for ep in importlib.metadata.entry_points(group=BACKENDS_GROUP)})
    return f"lmport backends installed: {', '.join(['cpu', *names])}"


@pytest.fixture
def lmport_environ() -> dict[str, str]:
    """The process environment without ``LMPORT_*`` variables, so tests don't inherit a selection."""
    return {k: v for k, v in os.environ.items() if not k.startswith("LMPORT_")}


@pytest.fixture
def plugin_host_factory(lmport_environ: dict[str, str]) -> Callable[..., Any]:
    """``factory(machine=None, **environ)`` -> a loaded ``PluginHost``.

    ``machine`` is a :class:`lmport.testing.fake_machine.FakeMachine` (the real detection hooks
    answered from tables); ``environ`` adds variables such as ``LMPORT_BACKEND``.
    """
    from lmport.plugins import PluginHost

    def factory(machine: Any = None, **environ: str) -> PluginHost:
        if machine is not None:  # a fake machine sees only the variables the test names
            machine = machine.with_environ(**environ)
        return PluginHost(environ={**lmport_environ, **environ}, detection_env=machine).load()

    return factory

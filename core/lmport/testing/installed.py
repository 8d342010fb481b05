"""Test guards for optional distributions: skip on a developer's machine, fail in CI.

CI installs every in-tree plugin and the fake vendor, so a missing one there is a broken
install, not a reason to skip.
"""

from __future__ import annotations

import importlib.metadata
import os

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_distribution(name: str, install_hint: str = "") -> str:
    """The installed version of ``name``; otherwise skip (or fail when ``CI`` is set)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        message = f"distribution '{name}' is not installed" + (f"; install it with: {install_hint}" if install_hint else "")
        if in_ci():
            pytest.fail(message + " (CI=true: every in-tree plugin must be installed)", pytrace=False)
        pytest.skip(message)

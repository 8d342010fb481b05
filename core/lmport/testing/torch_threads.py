"""``one_torch_thread``: an autouse fixture for folders of tiny-model tests.

Tiny models on a small shared CPU run several times faster on one intra-op thread than on
oversubscribed ones. A ``conftest.py`` turns it on for its folder by importing it::

    from lmport.testing.torch_threads import one_torch_thread  # noqa: F401  (autouse)
"""

from __future__ import annotations

from typing import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)

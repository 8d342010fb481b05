"""Tokenization and chat-template rendering off the event loop.

A 2 MB prompt takes seconds to tokenize; on the event loop that froze every other stream for
as long. TGI hands it to a pool of validation workers (``--validation-workers``, 2 by
default); so does lmport: a bounded pool of threads. The Rust tokenizer releases the GIL
while it encodes, so the loop keeps streaming; a template render (jinja, pure Python) shares
the GIL, which Python hands back to the loop every few milliseconds.
"""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

T = TypeVar("T")


class TokenizePool:
    def __init__(self, workers: int):
        self.workers = max(int(workers), 1)
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="lmport-tokenize")

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` on a worker; its exception (a 422 ...) is raised here."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

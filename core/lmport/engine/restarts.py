"""When to restart a dead engine process: a back-off that doubles, and a limit.

Pure bookkeeping (the clock is passed in), so the policy is tested without processes.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field


@dataclass
class RestartPolicy:
    """``max_restarts`` restarts in a row at most (0: never restart), waiting ``backoff_s``,
    then twice as long each time, up to ``max_backoff_s``. A process that served for
    ``stable_s`` seconds before it died starts the count afresh: one crash a day is not a
    crash loop.
    """

    max_restarts: int = 5
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    stable_s: float = 60.0
    consecutive: int = field(default=0, init=False)
    total: int = field(default=0, init=False)

    def next_delay(self, served_s: float) -> float | None:
        """Seconds to wait before the next start attempt, or None when the limit is reached.

        ``served_s``: how long the last process served before it died (0 for one that never
        became ready).
        """
        if served_s >= self.stable_s:
            self.consecutive = 0
        if self.consecutive >= self.max_restarts:
            return None
        delay = min(self.backoff_s * 2**self.consecutive, self.max_backoff_s)
        self.consecutive += 1
        self.total += 1
        return delay


def describe_exit(exitcode: int | None) -> str:
    """``exit code 1``, ``killed by SIGKILL`` ..., as a log line says it."""
    if exitcode is None:
        return "exit code unknown"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"

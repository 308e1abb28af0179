"""Warnings when a limit starts to bite, at most one per limit a minute.

Limits keep a flood from exhausting memory; this tells the operator that they are being
reached, before the drops (each logged) begin, without adding a log line per request
under the very load that set them off.
"""

from __future__ import annotations

import logging
import time

__all__ = ["INTERVAL", "pressure"]

INTERVAL = 60.0  # seconds between two warnings about the same limit

logger = logging.getLogger("post_response")

_MESSAGES = {
    "max_running": (
        "max_running=%s tasks are running; new tasks wait (%s waiting already). Raise "
        "max_running if your tasks wait on I/O, or hand heavy work to a queue."
    ),
    "max_queued": (
        "Tasks waiting to run reached half of max_queued=%s (%s waiting); past it, new "
        "tasks are dropped."
    ),
    "held": (
        "Tasks waiting for a delay, a key or a retry reached half of max_queued=%s (%s "
        "waiting); past it, new ones are dropped, and failed attempts not retried."
    ),
    "threads": (
        "All %s worker threads for sync tasks are busy; sync tasks wait for one (%s waiting "
        "so far). Make long sync tasks async, or bound them with max_running."
    ),
}


class _Pressure:
    def __init__(self) -> None:
        self._last: dict[str, float] = {}

    def note(self, limit: str, size: object, waiting: object) -> None:
        """`limit` is reached: warn, unless it was warned about less than INTERVAL ago."""
        now = time.monotonic()
        last = self._last.get(limit)
        if last is not None and now - last < INTERVAL:
            return
        self._last[limit] = now
        logger.warning(_MESSAGES[limit], size, waiting, extra={"limit": limit})

    def reset(self) -> None:
        """Forget when each limit was last warned about (tests)."""
        self._last.clear()


pressure = _Pressure()

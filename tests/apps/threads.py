"""Which thread a sync endpoint ran in, so a test can see that the framework used a worker."""

from __future__ import annotations

import threading


def running_in() -> str:
    """`"worker thread"`, or `"event loop thread"` (servers run their loop in the main thread)."""
    if threading.current_thread() is threading.main_thread():
        return "event loop thread"
    return "worker thread"

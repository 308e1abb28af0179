"""The worker threads that run sync tasks on asyncio: a small pool that never holds the process.

`concurrent.futures.ThreadPoolExecutor` joins its threads at interpreter exit, so one sync
task still running at a server's shutdown deadline kept the process alive until it
returned, whatever `shutdown_timeout` said. These threads are daemons: a process that
exits leaves them behind, as the shutdown report says. The pool also tells its caller
when a job actually starts, so a task that waits for a free thread is `queued`, not
`running`, and its timeout counts from its start.
"""

from __future__ import annotations

import collections
import os
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["THREADS", "Call", "Job", "pool"]

THREADS = 40  # threads for sync tasks, per process


class Job:
    """One call for a worker thread: the pool runs `run()` there. `waited` is set when no
    thread was free at `submit()`: the job then tells its caller when a thread takes it."""

    __slots__ = ("waited",)

    def __init__(self) -> None:
        self.waited = False

    def run(self) -> None:
        raise NotImplementedError


class Call(Job):
    """A job calling `call()`; `report(started, result, error)` is how it tells its caller,
    from the thread, that it started (`started` True) or ended."""

    __slots__ = ("call", "report")

    def __init__(self, call: Callable[[], Any], report: Callable[..., None]) -> None:
        self.call = call
        self.report = report
        self.waited = False

    def run(self) -> None:
        if self.waited:
            self.report(True, None, None)
        try:
            result = self.call()
        except BaseException as exc:
            self.report(False, None, exc)
        else:
            self.report(False, result, None)


class _Pool:
    """Up to `size` daemon threads, started on demand and then kept, taking jobs in order."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._ready = threading.Condition(threading.Lock())
        self._jobs: collections.deque[Job] = collections.deque()
        self._threads = 0
        self._idle = 0

    def submit(self, job: Job) -> bool:
        """Queue `job`; True if a thread takes it at once, False if it waits for one."""
        with self._ready:
            self._jobs.append(job)
            if self._idle:
                self._idle -= 1
                self._ready.notify()
                return True
            if self._threads < self._size:
                self._threads += 1
                threading.Thread(target=self._work, name="post_response", daemon=True).start()
                return True
            job.waited = True
            return False

    def waiting(self) -> int:
        """How many jobs wait for a thread now."""
        return len(self._jobs)

    def withdraw(self, job: Job) -> bool:
        """Take back a job no thread has started; False if one already has."""
        with self._ready:
            try:
                self._jobs.remove(job)
            except ValueError:
                return False
            return True

    def _work(self) -> None:
        while True:
            with self._ready:
                while not self._jobs:
                    self._idle += 1
                    self._ready.wait()  # whoever wakes us has counted us as busy again
                job = self._jobs.popleft()
            job.run()
            del job  # a parked thread keeps nothing of the task alive

    def _reset_after_fork(self) -> None:
        """A forked child has none of its parent's threads: start from nothing."""
        self._ready = threading.Condition(threading.Lock())
        self._jobs.clear()
        self._threads = self._idle = 0


pool = _Pool(THREADS)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=pool._reset_after_fork)

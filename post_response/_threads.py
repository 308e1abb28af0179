"""The worker threads that run sync tasks on asyncio: a small pool that never holds the process.

`concurrent.futures.ThreadPoolExecutor` joins its threads at interpreter exit, so one sync
task still running at a server's shutdown deadline kept the process alive until it
returned, whatever `shutdown_timeout` said. These threads are daemons: a process that
exits leaves them behind, as the shutdown report says. The pool also tells its caller
when a job actually starts, so a task that waits for a free thread is `queued`, not
`running`, and its timeout counts from its start.

When every thread is busy, jobs wait; the pool warns only once a job has waited `PATIENCE`
seconds, as a shorter wait is no sign of long tasks: under load (thousands of short sync
tasks a second), threads that ran their task wait for the GIL, held by the event loop,
before they can take the next job, and the pool looks full for a few milliseconds.
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading
import time
from typing import TYPE_CHECKING, Any

from ._pressure import pressure

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["THREADS", "Call", "Job", "pool"]

THREADS = 40  # threads for sync tasks, per process
PATIENCE = 1.0  # seconds a job may wait for a thread before the pool is warned about


class Job:
    """One call for a worker thread: the pool runs `run()` there. `waited` is when it was
    queued, no thread being free at `submit()` (0.0 if one was): the job then tells its
    caller when a thread takes it, and the caller calls `pool.note_wait(job)`."""

    __slots__ = ("waited",)

    def __init__(self) -> None:
        self.waited = 0.0

    def run(self) -> None:
        raise NotImplementedError


class Call(Job):
    """A job calling `call()`; `report(started, result, error)` is how it tells its caller,
    from the thread, that it started (`started` True) or ended."""

    __slots__ = ("call", "report")

    def __init__(self, call: Callable[[], Any], report: Callable[..., None]) -> None:
        self.call = call
        self.report = report
        self.waited = 0.0

    def run(self) -> None:
        if self.waited:
            self.report(True, None, None)
        try:
            result = self.call()
        except BaseException as exc:
            self.report(False, None, exc)
        else:
            self.report(False, result, None)


class _Parked:
    """An idle thread, waiting on its own lock (held, released to wake it) for a job."""

    __slots__ = ("gate", "job")

    def __init__(self) -> None:
        self.gate = threading.Lock()
        self.gate.acquire()
        self.job: Job | None = None


class _Pool:
    """Up to `size` daemon threads, started on demand and then kept, taking jobs in order.

    A job submitted while a thread is idle is handed to that thread directly (the last one
    to park: its cache is warm), which a release of its own lock wakes: a plain lock's C
    methods instead of `threading.Condition`'s Python code, on the event loop's thread too.
    Jobs wait in the queue only when no thread is idle.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._jobs: collections.deque[Job] = collections.deque()  # waiting for a thread
        self._parked: list[_Parked] = []  # idle threads, the last parked last
        self._threads = 0

    def submit(self, job: Job) -> bool:
        """Queue `job`; True if a thread takes it at once, False if it waits for one."""
        with self._lock:
            if self._parked:
                parked = self._parked.pop()
                parked.job = job
                parked.gate.release()
                return True
            self._jobs.append(job)
            if self._threads < self._size:
                try:
                    self._start()
                except RuntimeError:  # at interpreter exit (Python 3.12+) no thread starts
                    if not self._threads:
                        self._jobs.pop()  # none will ever take it: its task fails
                        raise
                else:
                    return True
            job.waited = time.monotonic()
            return False

    def keep_one(self) -> None:
        """Start a thread now if none runs: at interpreter exit, where the WSGI middleware
        drains its tasks, Python 3.12+ starts no new thread, and sync tasks need one."""
        with self._lock, contextlib.suppress(RuntimeError):  # else `submit` tries again
            if not self._threads:
                self._start()

    def _start(self) -> None:
        threading.Thread(target=self._work, name="post_response", daemon=True).start()
        self._threads += 1

    def note_wait(self, started: Job | None = None) -> None:
        """Warn (see `pressure`) if a job has waited `PATIENCE` seconds for a thread:
        `started`, which one took just now, or else the job waiting the longest."""
        if started is not None:
            since = started.waited
        else:
            with self._lock:  # threads take jobs meanwhile
                since = self._jobs[0].waited if self._jobs else 0.0
        if since and time.monotonic() - since >= PATIENCE:
            pressure.note("threads", self._size, len(self._jobs))

    def busy(self) -> int:
        """How many threads are not parked (running a job, or about to park)."""
        return self._threads - len(self._parked)

    def withdraw(self, job: Job) -> bool:
        """Take back a job no thread has started; False if one already has."""
        with self._lock:
            try:
                self._jobs.remove(job)
            except ValueError:
                return False
            return True

    def _work(self) -> None:
        parked = _Parked()
        lock, jobs = self._lock, self._jobs
        while True:
            with lock:
                job = jobs.popleft() if jobs else None
                if job is None:
                    self._parked.append(parked)
            if job is None:
                parked.gate.acquire()  # `submit` handed us a job, then released it
                job, parked.job = parked.job, None
            if job is not None:
                job.run()
            del job  # a parked thread keeps nothing of the task alive

    def _reset_after_fork(self) -> None:
        """A forked child has none of its parent's threads: start from nothing."""
        self._lock = threading.Lock()
        self._jobs.clear()
        self._parked.clear()
        self._threads = 0


pool = _Pool(THREADS)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=pool._reset_after_fork)

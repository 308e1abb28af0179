"""Every batch of the process not finished yet: for `wait_for_tasks()` and the exit report.

A process that exits with tasks not run or still running (a server that stopped its
event loop without a lifespan shutdown, as daphne does; a WSGI server; a worker thread a
sync task still holds) logs each of them as abandoned, so no task ends unreported.
"""

from __future__ import annotations

import atexit
import logging
import threading
from typing import TYPE_CHECKING

from ._task import TaskState

if TYPE_CHECKING:
    from ._batch import Batch

__all__ = ["add", "discard", "unfinished", "wait_idle"]

# A dict used as a set: at thousands of waiting batches its table costs a third of a set's
# per entry (~30 B instead of ~105).
unfinished: dict[Batch, None] = {}
_unfinished = unfinished
_idle = threading.Condition()  # notified when the last unfinished batch ends...
_waiters = 0  # ...if anybody waits for that

_UNFINISHED = (TaskState.PENDING, TaskState.RUNNING)


def add(batch: Batch) -> None:
    _unfinished[batch] = None


# While above 0 (`post_response.testing.tasks_before_returning()`), a request's call into
# the app returns only once its tasks have ended, so a test client sees their effects.
held_requests = 0


def discard(batch: Batch) -> None:
    _unfinished.pop(batch, None)
    if _waiters and not _unfinished:  # the lock only when someone waits
        with _idle:
            _idle.notify_all()


def wait_idle(timeout: float | None) -> list[str]:
    """Block until no batch is unfinished, at most `timeout` seconds; return the names of
    the tasks still waiting or running then (empty: all done)."""
    global _waiters  # noqa: PLW0603
    with _idle:
        _waiters += 1
        try:
            done = _idle.wait_for(lambda: not _unfinished, timeout)
        finally:
            _waiters -= 1
        if done:
            return []
        return [
            f"{task.name!r} of {batch.label}"
            for batch in list(_unfinished)
            for task in batch.tasks()
            if task.state in _UNFINISHED
        ]


@atexit.register
def _abandon_at_exit() -> None:
    for batch in list(_unfinished):
        for task in batch.tasks():
            if task.state in _UNFINISHED:
                was = task.state.value
                task._lose(
                    TaskState.ABANDONED,
                    logging.ERROR,
                    "abandoned: the process exited while it was %s",
                    was,
                )

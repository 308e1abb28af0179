"""Every batch of the process not finished yet: for `wait_for_tasks()` and the exit report.

A process that exits with tasks not run or still running (a server that stopped its
event loop without a lifespan shutdown, as daphne does; a WSGI server; a worker thread a
sync task still holds) logs each of them as abandoned, so no task ends unreported.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from typing import TYPE_CHECKING, Protocol

from ._task import TaskState

if TYPE_CHECKING:
    from ._batch import Batch

__all__ = ["Holder", "add", "discard", "unfinished", "wait_idle"]


class Holder(Protocol):
    """What the registry holds: a batch on its own, or an owner holding batches."""

    def batches(self) -> list[Batch]:
        """The unfinished batches held."""


# Every batch not finished yet that no owner holds, and every owner that took batches on
# (`Owner._hold`), until it closes: one entry per waiting batch, not one here and one in
# its owner, and no change here per batch an owner takes on and lets go of.
# A dict used as a set: at thousands of waiting batches its table costs a third of a set's
# per entry (~30 B instead of ~105).
unfinished: dict[Holder, None] = {}
_unfinished = unfinished
_idle = threading.Condition()  # notified when the last unfinished batch ends...
waiters = 0  # ...if anybody waits for that

_UNFINISHED = (TaskState.PENDING, TaskState.RUNNING)


def add(holder: Holder) -> None:
    _unfinished[holder] = None


# While above 0 (`post_response.testing.tasks_before_returning()`), a request's call into
# the app returns only once its tasks have ended, so a test client sees their effects.
held_requests = 0


def discard(holder: Holder) -> None:
    _unfinished.pop(holder, None)
    if waiters:  # the lock only when someone waits
        notify_if_idle()


def notify_if_idle() -> None:
    """Wake those who wait for every batch to end, if none is left."""
    if _is_idle():
        with _idle:
            _idle.notify_all()


def _is_idle() -> bool:
    return not any(holder.batches() for holder in list(_unfinished))


def wait_idle(timeout: float | None) -> list[str]:
    """Block until no batch is unfinished, at most `timeout` seconds; return the names of
    the tasks still waiting or running then (empty: all done)."""
    global waiters  # noqa: PLW0603
    with _idle:
        waiters += 1
        try:
            done = _idle.wait_for(_is_idle, timeout)
        finally:
            waiters -= 1
        if done:
            return []
        return [
            f"{task.name!r} of {batch.label}"
            for holder in list(_unfinished)
            for batch in holder.batches()
            for task in batch.tasks()
            if task.state in _UNFINISHED
        ]


@atexit.register
def _abandon_at_exit() -> None:
    for batch in [batch for holder in list(_unfinished) for batch in holder.batches()]:
        for task in batch.tasks():
            if task.state in _UNFINISHED:
                was = task.state.value
                task._lose(
                    TaskState.ABANDONED,
                    logging.ERROR,
                    "abandoned: the process exited while it was %s",
                    was,
                )


def _forget_after_fork() -> None:
    """A forked child runs none of its parent's batches: it must neither wait for them nor
    report them abandoned at its exit (the parent runs them)."""
    global _idle, waiters
    _unfinished.clear()
    _idle, waiters = threading.Condition(), 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)

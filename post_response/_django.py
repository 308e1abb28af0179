"""Django support: options from `settings.POST_RESPONSE`, and tasks that leave no database
connection open (or, under Django's test client, use the test's). Imported by the
middleware only once Django's settings are configured."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import inspect
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar, cast

from asgiref.sync import ThreadSensitiveContext as _ThreadSensitiveContext
from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.signals import got_request_exception, request_finished, request_started
from django.db import DatabaseError, close_old_connections, connections, transaction

from . import _batch, _context
from ._backend import asyncio_loop
from ._errors import ConfigurationError
from ._options import skip_reason
from ._owner import run_to_the_end
from ._task import Stats

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from contextlib import AbstractAsyncContextManager

    from django.db.backends.base.base import BaseDatabaseWrapper

__all__ = [
    "Environment",
    "SharedConnections",
    "close_thread_connections",
    "in_a_thread_of_its_own",
    "run_test_client_tasks",
    "settings_options",
    "thread_connections",
]

_T = TypeVar("_T")
logger = logging.getLogger("post_response")
LEFT_OPEN = "A task left a transaction open on database %r: rolled back"
# asgiref before 3.13 has no type hints here, nor the `executor` argument.
ThreadSensitiveContext = cast(
    "Callable[..., AbstractAsyncContextManager[object]]", _ThreadSensitiveContext
)
EXECUTOR_CONTEXTS = "executor" in inspect.signature(_ThreadSensitiveContext).parameters


def settings_options() -> dict[str, Any]:
    """The middleware options in `settings.POST_RESPONSE` (a dict), if any."""
    options = getattr(settings, "POST_RESPONSE", {})
    if not isinstance(options, dict):
        msg = (
            "settings.POST_RESPONSE must be a dict of PostResponseMiddleware options, "
            f'such as {{"timeout": 30}}; got {options!r}.'
        )
        raise ConfigurationError(msg)
    return options


class Environment:
    """Run each task as Django runs a request, as far as database connections go.

    Django closes a request's connections when it ends (`close_old_connections`, which
    honours `CONN_MAX_AGE`). Tasks run after that, in other threads, so they do the same:
    a sync task between two calls in its worker thread; an async task with its
    `sync_to_async` ORM calls in one thread of its own (`in_a_thread_of_its_own`), whose
    connections are all closed after it: persistent or not, none could be reused once the
    thread is gone.
    """

    def run_sync(self, call: Callable[[], _T]) -> _T:
        close_old_connections()
        try:
            return call()
        finally:
            drop_open_transactions()
            close_old_connections()

    async def run_async(self, awaitable: Awaitable[_T]) -> _T:
        return await in_a_thread_of_its_own(awaitable, _closing_thread_connections)


def drop_open_transactions() -> None:
    """Close and forget each connection of this thread that a task left inside a
    `transaction.atomic()` block: the database rolls its transaction back, and the worker
    thread, which runs later tasks, gets a fresh connection. Django would refuse every
    query on the old one ("Cannot operate on a closed database"), for every later task."""
    for connection in connections.all(initialized_only=True):
        if connection.in_atomic_block:
            logger.warning(LEFT_OPEN, connection.alias)
            connection.close()
            del connections[connection.alias]


async def in_a_thread_of_its_own(
    awaitable: Awaitable[_T], enter: Callable[[], Callable[[], object]]
) -> _T:
    """Await an async task with its thread-sensitive `sync_to_async` calls (Django's ORM) in
    one thread of its own: not the request's, whose context its snapshot carries (another
    task of the request would wait behind it), nor the test's. `enter()` is called in that
    thread first, and what it returns last, even after a cancellation, without blocking
    the event loop.

    asgiref before 3.13 cannot be told which thread to use: there its own routing stands.
    """
    loop = asyncio_loop()
    if loop is None:  # Django's async support is asyncio's: nothing to do on trio
        return await awaitable
    if not EXECUTOR_CONTEXTS:
        async with ThreadSensitiveContext():
            leave = await sync_to_async(enter)()
            try:
                return await awaitable
            finally:
                await sync_to_async(leave)()
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="post_response")
    entered = executor.submit(enter)
    try:
        await asyncio.wrap_future(entered, loop=loop)
        async with ThreadSensitiveContext(executor=executor):
            return await awaitable
    finally:
        left = executor.submit(_leave, entered)
        executor.shutdown(wait=False)  # its thread ends once `left` has run
        await asyncio.shield(asyncio.wrap_future(left, loop=loop))


def _leave(entered: Future[Callable[[], object]]) -> None:
    if entered.done() and not entered.cancelled() and entered.exception() is None:
        entered.result()()


def _closing_thread_connections() -> Callable[[], None]:
    return close_thread_connections


def thread_connections() -> dict[str, BaseDatabaseWrapper]:
    """This thread's database connections, one per alias (none is opened by this)."""
    return {alias: connections[alias] for alias in connections}


def close_thread_connections() -> None:
    """Close the database connections this thread opened, warning of a transaction a task
    left open (closing rolls it back)."""
    drop_open_transactions()
    for connection in connections.all(initialized_only=True):
        connection.close()


# A task's view of the shared connections: this thread's own connections, and the depth
# and savepoint of each shared one when the task started.
_Shared = tuple[dict[str, "BaseDatabaseWrapper"], dict[str, int], dict[str, "str | None"]]


class SharedConnections:
    """Run each task on the database connections of the thread it was added from, as
    Django's test client runs a view: inside a `TestCase`'s transaction.

    A connection of the task's own could not see that transaction's rows, would commit
    outside its rollback, and would wait on its locks while the test waits for the task
    (SQLite: "database table is locked"). The test's thread waits for the tasks meanwhile;
    tasks that run at once (`concurrency` above 1) share them as the threads of Django's
    `LiveServerTestCase` do. None is closed here: they are the test's. A `transaction.atomic()`
    block a task leaves open is rolled back, as it would be in production: the test's
    transaction would end in it, and its rollback miss the test's rows. A task whose query
    fails has its writes rolled back (to a savepoint taken before it), not the test's
    transaction spoiled. Only a task that runs alone can tell its blocks and savepoint from
    those of another task still running.
    """

    def __init__(self, shared: dict[str, BaseDatabaseWrapper]) -> None:
        self._shared = shared
        self._lock = threading.Lock()  # no task starts while one ends
        self._running = 0

    def run_sync(self, call: Callable[[], _T]) -> _T:
        own = self._share()
        try:
            return call()
        finally:
            self._unshare(own)

    async def run_async(self, awaitable: Awaitable[_T]) -> _T:
        return await in_a_thread_of_its_own(awaitable, self._share_until)

    def _share_until(self) -> Callable[[], None]:
        return functools.partial(self._unshare, self._share())

    def _share(self) -> _Shared:
        """This thread's own connections; how deep in atomic blocks each shared one is, and
        the savepoint taken on it for the task, if any."""
        own = thread_connections()
        depths, savepoints = {}, {}
        with self._lock:
            self._running += 1
            for alias, connection in self._shared.items():
                connection.inc_thread_sharing()
                connections[alias] = connection
                depths[alias] = len(connection.atomic_blocks)
                alone = self._running == 1 and connection.in_atomic_block
                if alone and not connection.needs_rollback:
                    savepoints[alias] = connection.savepoint()
        return own, depths, savepoints

    def _unshare(self, shared: _Shared) -> None:
        own, depths, savepoints = shared
        with self._lock:
            self._running -= 1
            try:
                if not self._running:  # alone: what is above the task's start is the task's
                    for alias, connection in self._shared.items():
                        roll_back_blocks_left_open(connection, depths[alias])  # via `connections`
                        end_savepoint(connection, savepoints.get(alias))
            finally:  # even if the database failed us: this thread's own again
                for alias, connection in self._shared.items():
                    connections[alias] = own[alias]
                    connection.dec_thread_sharing()


def end_savepoint(connection: BaseDatabaseWrapper, savepoint: str | None) -> None:
    """Release the savepoint a task ran after; roll back to it if a query of the task
    failed: Django then marks the transaction for rollback, or PostgreSQL aborts it."""
    if savepoint is None:
        return
    if not connection.needs_rollback:
        try:
            connection.savepoint_commit(savepoint)
        except DatabaseError:  # "current transaction is aborted"
            pass
        else:
            return
    connection.needs_rollback = False  # as it was (no savepoint is taken when it is set),
    connection.savepoint_rollback(savepoint)  # and first: Django refuses queries till then
    connection.savepoint_commit(savepoint)


def roll_back_blocks_left_open(connection: BaseDatabaseWrapper, depth: int) -> None:
    """Roll back and leave the atomic blocks of `connection` above `depth` (a task's), as
    Django's `TestCase` leaves its own."""
    left_open = connection.atomic_blocks[depth:]
    if left_open:
        logger.warning(LEFT_OPEN, connection.alias)
    for block in reversed(left_open):
        transaction.set_rollback(True, using=connection.alias)
        block.__exit__(None, None, None)


def run_test_client_tasks() -> Callable[[], None]:
    """Have the tasks that views add under Django's test client (which calls them without
    the ASGI app) run when each request finishes; returns what undoes it.

    The test client reports no status to its signals: the tasks run as after a 200
    response, or are skipped as after a 500 when the view raised. They run on the database
    connections of the thread that started the request (`SharedConnections`), as the view did.
    """
    from ._middleware import setup  # noqa: PLC0415  (it imports this module)

    config, task_settings = setup({})
    stats = Stats()  # also marks the requests this hook started
    raised: set[int] = set()
    shared: dict[int, dict[str, BaseDatabaseWrapper]] = {}  # each request's connections

    def started(sender: object, environ: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if _context.current() is not None:  # a request the middleware handles
            return
        scope = kwargs.get("scope") or {}
        method = (environ or {}).get("REQUEST_METHOD") or scope.get("method", "")
        path = (environ or {}).get("PATH_INFO") or scope.get("path", "")
        dispatchers = task_settings.dispatchers
        tasks = _context.RequestTasks(config.max_tasks, method, path, stats, dispatchers)
        _context.activate(tasks)
        shared[id(tasks)] = thread_connections()

    def failed(sender: object, **kwargs: Any) -> None:
        tasks = _context.current()
        if tasks is not None and tasks.stats is stats:
            raised.add(id(tasks))

    def finished(sender: object, **kwargs: Any) -> None:
        tasks = _context.current()
        if tasks is None or tasks.stats is not stats:
            return
        _context.activate(None)
        view_raised = id(tasks) in raised
        raised.discard(id(tasks))
        status = 500 if view_raised else 200
        reason = skip_reason(config.policy, status, True, False, raised=view_raised)
        environment = SharedConnections(shared.pop(id(tasks)))
        request_settings = dataclasses.replace(task_settings, environment=environment)
        batch = _batch.finished(tasks, request_settings, reason)
        if batch is not None:
            run_to_the_end(batch, config.max_running, config.max_queued)

    hooks = [(request_started, started), (got_request_exception, failed)]
    hooks.append((request_finished, finished))
    for signal, receiver in hooks:
        signal.connect(receiver, weak=False, dispatch_uid=f"post_response:{id(receiver)}")

    def disconnect() -> None:
        for signal, receiver in hooks:
            signal.disconnect(receiver, dispatch_uid=f"post_response:{id(receiver)}")

    return disconnect

"""The same `add_task()` for WSGI apps (Flask, Django over WSGI, any PEP 3333 app).

    from post_response.wsgi import PostResponseWSGIMiddleware

    app.wsgi_app = PostResponseWSGIMiddleware(app.wsgi_app)          # Flask
    application = PostResponseWSGIMiddleware(get_wsgi_application())  # Django

Each request runs in its own context (contextvars-extras' sandbox), so WSGI servers that
reuse threads never mix requests. Tasks start after the server has sent the response and
closed the response iterable. By default they then run detached, on an event loop in a
daemon thread the middleware starts on first use, so the server's worker thread is free at
once; `detach=False` runs them inside `close()`. Policy, isolation, logging, limits and
counters are those of `PostResponseMiddleware`. WSGI has no lifespan: at interpreter exit
(gunicorn exits through it on SIGTERM, waitress on SIGINT only) the middleware waits up to
`shutdown_timeout` for the tasks, then cancels what is left, logging each task.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import logging
import os
import threading
import weakref
from collections.abc import Sized
from typing import TYPE_CHECKING, Any

import anyio

from . import _batch, _context, _journal, _registry
from ._middleware import new_stats, setup
from ._options import check_app, skip_reason
from ._owner import Owner, run_to_the_end
from ._task import TaskState
from ._threads import pool

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator
    from contextvars import Context
    from types import TracebackType

    from typing_extensions import Unpack

    from ._options import Options

    ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]
    StartResponse = Callable[..., Callable[[bytes], object]]
    WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

__all__ = ["PostResponseWSGIMiddleware"]

logger = logging.getLogger("post_response")
_GRACE = 5.0  # seconds past shutdown_timeout that the exit may wait for the task loop


class PostResponseWSGIMiddleware:
    """Run the tasks added with `add_task()` once a WSGI response has been sent.

    Takes the same options as `PostResponseMiddleware`.
    """

    def __init__(self, app: WSGIApp, **options: Unpack[Options]) -> None:
        check_app(app, "PostResponseWSGIMiddleware", wsgi=True)
        self.app = app
        self.config, self.settings = setup(options, "PostResponseWSGIMiddleware")
        self.stats = new_stats(self.config)
        self._loop: _TaskLoop | None = None
        self._loop_lock = threading.Lock()
        self._journal = self.config.journal  # None unless `journal=` was given
        _middlewares.add(self)

    @_context.sandboxed  # a fresh context per request, though the server reuses threads
    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        config = self.config
        tasks = _context.RequestTasks(
            config.max_tasks,
            environ.get("REQUEST_METHOD", ""),
            environ.get("PATH_INFO", ""),
            self.stats,
            self.settings.dispatchers,
        )
        if self._journal is not None:
            tasks.journal = self._journal.recorder(self._journal_sink)
        _context.activate(tasks)  # no reset: the sandbox is discarded after the call
        response = _Response(self, tasks, start_response)
        try:
            body = self.app(environ, response.start_response)
        except BaseException:
            response.finish(raised=True)
            raise
        # The server iterates and closes the body outside this call: in this context again.
        wrapper = _SizedClosingIterable if isinstance(body, Sized) else _ClosingIterable
        return wrapper(response, body, _context.snapshot())

    def join(self, timeout: float | None = None) -> bool:
        """Wait until the tasks handed off so far have ended; False if `timeout` passed first."""
        loop = self._loop
        return loop is None or not loop.alive() or loop.join(timeout)

    def _journal_sink(self) -> Callable[[list[_journal.Entry]], None]:
        """Opening the journal (first request in this process): its claimed entries run on
        the task loop, replays included even with `detach=False`; it closes at exit."""
        if self._journal is not None:
            atexit.register(self._journal.close_sync)  # after the task loop's drain (LIFO)

        def sink(entries: list[_journal.Entry]) -> None:
            asyncio.run_coroutine_threadsafe(self._replay(entries), self._task_loop().loop)

        return sink

    async def _replay(self, entries: list[_journal.Entry]) -> None:
        journal, config = self._journal, self.config
        if journal is not None:
            owner = self._task_loop().owner
            await _journal.replay_batches(
                journal, entries, self.settings, self.stats, config.max_tasks, owner, owner.submit
            )

    def _run(self, batch: _batch.Batch) -> None:
        """Run a finished request's tasks: on the task loop, or here (`detach=False`).

        Never raises into the server: whatever goes wrong ends the tasks, logged.
        """
        try:
            if self.config.detach:
                loop = self._task_loop()
                if not loop.alive():  # shut down: the process is exiting
                    batch.abandon(TaskState.ABANDONED, "the server had already shut down")
                    return
                loop.submit(batch)
                if _registry.held_requests:  # a test asked to see the tasks' effects
                    loop.wait(batch)
            else:
                run_to_the_end(batch, self.config.max_running, self.config.max_queued)
        except Exception:
            logger.exception("post_response could not run the tasks of %s", batch.label)
            batch.abandon(TaskState.ABANDONED, "post_response could not run them (see above)")

    def _task_loop(self) -> _TaskLoop:
        """The running task loop; a new one if there is none, or if the last one died
        (rather than shut down at exit)."""
        with self._loop_lock:
            if self._loop is None or not (self._loop.alive() or self._loop.shut):
                if self._loop is not None:
                    logger.error("The post_response task loop had stopped; starting a new one")
                config = self.config
                self._loop = _TaskLoop(
                    config.max_running, config.max_queued, config.shutdown_timeout
                )
            return self._loop


# A forked child (gunicorn's workers, with `--preload`) has none of its parent's threads:
# each middleware there starts a task loop of its own at its first request, without taking
# the parent's for one that died, and `join()` does not wait for the parent's tasks.
_middlewares: weakref.WeakSet[PostResponseWSGIMiddleware] = weakref.WeakSet()


def _forget_task_loops() -> None:
    for middleware in _middlewares:
        middleware._loop, middleware._loop_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_task_loops)


class _Response:
    """One request's response: its status, how its body went, and the end of it."""

    def __init__(
        self,
        middleware: PostResponseWSGIMiddleware,
        tasks: _context.RequestTasks,
        start_response: StartResponse,
    ) -> None:
        self.middleware = middleware
        self.tasks = tasks
        self._start_response = start_response
        self.status = 0
        self.failed = False  # start_response() got exc_info: the app is answering an error
        self.done = False

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None
    ) -> Callable[[bytes], object]:
        self.status = int(status.split(None, 1)[0])
        self.failed = self.failed or exc_info is not None
        return self._start_response(status, headers, exc_info)

    def finish(self, *, raised: bool, complete: bool = False, client_gone: bool = False) -> None:
        """The server is done with the response: judge the outcome, hand the tasks over."""
        if self.done:
            return
        self.done = True
        tasks, config = self.tasks, self.middleware.config
        status = 500 if self.failed and self.status < 500 else self.status
        reason = skip_reason(config.policy, status, complete, client_gone, raised=raised)
        batch = _batch.finished(tasks, self.middleware.settings, reason)
        if batch is not None:
            self.middleware._run(batch)


class _ClosingIterable:
    """The app's response body, run in the request's context; its `close()` ends the request."""

    def __init__(self, response: _Response, body: Iterable[bytes], context: Context) -> None:
        self._response = response
        self._body = body
        self._context = context
        self._iterator: Iterator[bytes] | None = None
        self._exhausted = False
        self._raised = False

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        journal = self._response.tasks.journal
        try:
            if self._iterator is None:  # the body's own `__iter__` may raise too
                self._iterator = self._context.run(iter, self._body)
            chunk = self._context.run(next, self._iterator)
        except StopIteration:
            self._exhausted = True
            if journal is not None:
                journal.flush_sync()
            raise
        except BaseException:
            self._raised = True
            raise
        if journal is not None:  # the server gets the body once the tasks are on disk
            journal.flush_sync()
        return chunk

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                self._context.run(close)
        finally:
            self._response.finish(**self._outcome())

    def __del__(self) -> None:
        response = self._response
        if response.done or not response.tasks.tasks:  # closed, as PEP 3333 requires
            return
        logger.warning(
            "The server never called close() on the response of %s; its tasks are handed "
            "over now that the response was garbage-collected",
            response.tasks.label,
        )
        # In a thread of its own: the collector may run this while this thread holds a
        # lock that the hand-over takes.
        with contextlib.suppress(RuntimeError):  # no new thread at interpreter exit
            threading.Thread(
                target=response.finish, kwargs=self._outcome(), name="post_response", daemon=True
            ).start()

    def _outcome(self) -> dict[str, bool]:
        # Stopped before the end without an error of the app: the client went away.
        exhausted, raised = self._exhausted, self._raised
        return {"raised": raised, "complete": exhausted, "client_gone": not (exhausted or raised)}


class _SizedClosingIterable(_ClosingIterable):
    """A body with a length (a list): a server takes the length of a body of one chunk as
    its Content-Length (PEP 3333, waitress, wsgiref), which it could not through a wrapper
    without one."""

    def __len__(self) -> int:
        return len(self._body)  # type: ignore[arg-type]  # Sized: see `__call__`


class _TaskLoop:
    """A daemon thread with an event loop whose owner runs WSGI requests' tasks."""

    _failure: BaseException | None = None  # why the loop could not start

    def __init__(
        self, max_running: int | None, max_queued: int | None, shutdown_timeout: float | None
    ) -> None:
        self._shutdown_timeout = shutdown_timeout
        self._max_running = max_running
        self._max_queued = max_queued
        self._started = threading.Event()
        self.shut = False  # shutdown() was called: no new loop must replace this one
        self._thread = threading.Thread(target=self._main, name="post_response", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._failure is not None:
            msg = "post_response could not start its task loop"
            raise RuntimeError(msg) from self._failure
        pool.keep_one()  # for the sync tasks run at exit (delayed ones, at once)
        atexit.register(self.shutdown)

    def _main(self) -> None:
        try:
            anyio.run(self._serve)
        except BaseException as exc:
            if self._started.is_set():  # it ran, then died: `_task_loop()` starts another
                raise
            # It never started (no file descriptor left for its event loop, say): the
            # request waiting in `__init__` must fail, not wait forever holding the lock.
            self._failure = exc
            self._started.set()

    async def _serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.owner = Owner(self._max_running, self._max_queued, self._shutdown_timeout)
        async with anyio.create_task_group() as group:
            await group.start(self.owner.serve)
            self._started.set()

    def alive(self) -> bool:
        return self._thread.is_alive() and not self.loop.is_closed()

    def submit(self, batch: _batch.Batch) -> None:
        """Hand a batch to the owner, from any thread (as a task: anyio needs one)."""
        asyncio.run_coroutine_threadsafe(self._submit(batch), self.loop)

    async def _submit(self, batch: _batch.Batch) -> None:
        self.owner.submit(batch)

    def wait(self, batch: _batch.Batch) -> None:
        """Block until every task of `batch` has ended (those it left to the owner too)."""
        asyncio.run_coroutine_threadsafe(self._wait(batch), self.loop).result()

    async def _wait(self, batch: _batch.Batch) -> None:
        await self.owner.join_request(batch.request)  # the batch, and what it left to the owner

    def join(self, timeout: float | None) -> bool:
        """Wait until the owner has no batch left; False if `timeout` passed first."""
        future = asyncio.run_coroutine_threadsafe(self.owner.join(), self.loop)
        try:
            future.result(timeout)
        except concurrent.futures.TimeoutError:  # not the builtin before Python 3.11
            future.cancel()
            return False
        return True

    def shutdown(self) -> None:
        """At interpreter exit: wait for the tasks up to the shutdown timeout, then cancel."""
        self.shut = True
        if not self._thread.is_alive():
            return
        future = asyncio.run_coroutine_threadsafe(
            self.owner.shutdown(self._shutdown_timeout), self.loop
        )
        limit = None if self._shutdown_timeout is None else self._shutdown_timeout + _GRACE
        try:
            future.result(limit)  # bounded: the exit must not hang on us
        except concurrent.futures.TimeoutError:  # not the builtin before Python 3.11
            logger.exception("post_response's shutdown did not finish; exiting without it")
            return
        self._thread.join(_GRACE)

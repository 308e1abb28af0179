"""`PostResponseMiddleware`: find the end of each response, judge its outcome, run its tasks."""

from __future__ import annotations

import functools
import logging
import sys
from typing import TYPE_CHECKING

import anyio
from anyio.lowlevel import RunVar

from . import _batch, _context, _journal, _registry
from ._backend import asyncio_loop
from ._dispatch import Dispatchers
from ._errors import ConfigurationError
from ._options import Config, Options, check_app, configure, skip_reason
from ._owner import Owner
from ._task import Stats, TaskState

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import ModuleType

    from typing_extensions import Unpack

    from ._call import TaskEnvironment
    from ._types import AnyASGIApp, Message, Receive, Scope, Send

__all__ = ["PostResponseMiddleware"]

logger = logging.getLogger("post_response")

# The body-like messages that end a response unless trailers were announced.
_BODY = {"http.response.body", "http.response.zerocopysend"}
_DISCONNECTS = {"http.disconnect", "websocket.disconnect"}
_DRAINED = {"http", "websocket"}  # the scope types whose tasks this middleware runs


class PostResponseMiddleware:
    """Run the tasks added with `add_task()` once the response has been sent.

    Wrap any ASGI 3 app: `app = PostResponseMiddleware(app, **options)`.

    Args:
        app: The ASGI app to wrap.
        policy: When a request's tasks run. `"no_server_error"` (default): unless the
            app raised before completing the response or answered 5xx. `"no_error"`:
            also skip them on 4xx. `"always"`: whatever happened. Tasks marked
            `always` run in every case; skipped tasks are logged.
        concurrency: How many of one request's tasks may run at once (default 1: one
            after another, in the order they were added).
        timeout: Default seconds a task may run before it is cancelled and reported
            as timed out (default None: no limit).
        max_tasks: How many tasks one request may add, counting those added by its
            tasks (default 1000). Past it, `add_task()` raises `TaskLimitError`.
        on_error: Called as `on_error(task, exc)` for each task that failed or timed
            out; may be sync (keep it quick: it runs on the event loop) or async.
        detach: Hand a request's tasks to a worker-level owner once its response is
            complete, so the app call returns and the server frees the request
            (default True). False runs them inside the request's own app call.
        shutdown_timeout: At `lifespan.shutdown`, seconds to wait for queued and
            running tasks before cancelling them (default 20; None waits for ever).
        max_running: How many tasks may run at once across all requests (default
            10,000; None: no limit). Tasks beyond it wait their turn; responses never wait.
        max_queued: How many tasks may wait for a `max_running` slot (default 10,000;
            None: no limit). Past it, a request's tasks are dropped, each logged and
            counted. A warning says when either limit starts to bite.

        opentelemetry: Record an OpenTelemetry span per task, a child of the request's
            span when there is one, and metrics of the tasks (default False; needs
            `post_response[otel]`).
        retries: How many times a task that raised is run again, by default (default 0;
            a task's own `set(retries=...)` wins).
        backoff: Seconds before a first retry, by default; doubled at each retry, with
            jitter, at most 60 s (default 0.5; `set(backoff=...)` wins).

    Under Django (settings configured), `settings.POST_RESPONSE` may hold the same options
    as a dict; the arguments given here win over it. Sync tasks then run between calls to
    `close_old_connections()`, and async ones in their own `ThreadSensitiveContext`, as
    Django runs requests, so no task leaves a database connection open.

    Raises:
        TypeError: An unknown option (a typo, say), or `app` is not an ASGI 3 app (a WSGI
            app, say).
        ConfigurationError: An option has an invalid value (a `ValueError`).
    """

    def __init__(self, app: AnyASGIApp, **options: Unpack[Options]) -> None:
        check_app(app, "PostResponseMiddleware")
        self.app = app
        self.config, self.settings = setup(options)
        self.stats = new_stats(self.config)
        self._owners: RunVar[Owner] = RunVar("post_response.owner")  # one per event loop
        self._last: tuple[object, Owner] | None = None  # (asyncio loop, its owner): a fast path
        self._journal = self.config.journal  # None unless `journal=` was given

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan" and self.config.detach:
            await self._lifespan(scope, receive, send)
            return
        outer = _context.current()
        if kind not in _DRAINED or (outer is not None and outer.phase is _context.Phase.COLLECTING):
            # Unknown scopes pass through; so does a request that an outer
            # PostResponseMiddleware already collects for (each task runs once).
            await self.app(scope, receive, send)
            return
        config = self.config
        method = scope.get("method") or "WEBSOCKET"
        tasks = _context.RequestTasks(
            config.max_tasks, method, scope.get("path", ""), self.stats, self.settings.dispatchers
        )
        if self._journal is not None:
            tasks.journal = self._journal.recorder(self._journal_sink)
        token = _context.activate(tasks)
        try:
            if kind != "http":
                await self._websocket(scope, receive, send, tasks)
                return
            # HTTP, inline (one coroutine less per request): watch for the end of the
            # response, then judge its outcome.
            watch = _Watch(receive, send, tasks.journal)
            try:
                await self.app(scope, watch.receive, watch.send)
            except Exception:
                reason = skip_reason(
                    config.policy, watch.status, watch.complete, watch.client_gone, raised=True
                )
                await self._finish(tasks, reason)
                raise
            except BaseException:
                _abandon(tasks, "the request was cancelled")
                raise
            if not tasks.tasks and tasks.close_if_done():  # no task: the usual request, done
                return
            reason = skip_reason(
                config.policy, watch.status, watch.complete, watch.client_gone, raised=False
            )
            await self._finish(tasks, reason)
        finally:
            _context.deactivate(token)

    async def join(self) -> None:
        """Wait until the tasks handed off on this event loop have all ended.

        Handy in tests and scripts that drive the app in-process: a request's call
        returns as soon as its response is complete, before its tasks have run.
        """
        owner = self._owners.get(None)
        if owner is not None:
            await owner.join()

    async def _websocket(
        self, scope: Scope, receive: Receive, send: Send, tasks: _context.RequestTasks
    ) -> None:
        watch = _Watch(receive, send, None)  # its client leaving, its denial response
        try:
            await self.app(scope, watch.receive, watch.send)
        except Exception:
            # Starlette's `receive_text()`, say, raises once the client closed (and its
            # `send_text()` once the client dropped): the client went away, as when an
            # HTTP client does; the app did not fail.
            failed = not watch.client_gone and self.config.policy != "always"
            await self._finish(tasks, "the app raised" if failed else None)
            raise
        except BaseException:
            _abandon(tasks, "the connection was cancelled")
            raise
        reason = skip_reason(
            self.config.policy, watch.status, True, watch.client_gone, raised=False
        )
        await self._finish(tasks, reason)

    async def _finish(self, tasks: _context.RequestTasks, reason: str | None) -> None:
        """The request is over: run its tasks here, or hand them to this loop's owner."""
        batch = _batch.finished(tasks, self.settings, reason)
        if batch is None:
            return
        owner = self._owner_here()
        if not self.config.detach:
            await owner.run_here(batch)
            return
        owner.submit(batch)
        if _registry.held_requests:  # a test asked that the client see the tasks' effects
            # Its batch, and its tasks that wait for a delay, a key or a retry.
            await owner.join_request(tasks)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Own this event loop's tasks while the server runs; drain them at shutdown."""
        config = self.config
        owner = Owner(config.max_running, config.max_queued, config.shutdown_timeout)
        received = shut_down = False

        async def watch_receive() -> Message:
            nonlocal received, shut_down
            received = True
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                shut_down = True
                # Before the app's own cleanup (closing a pool...), which tasks may need.
                await owner.shutdown(self.config.shutdown_timeout)
                if self._journal is not None:
                    await self._journal.close()  # what did not finish stays for the next start
            return message

        async def watch_send(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                message = await self._journal_ready(message)
            await send(message)

        failure: Exception | None = None
        async with anyio.create_task_group() as group:
            await group.start(owner.serve)
            token = self._owners.set(owner)
            self._last = None
            if self._journal is not None:  # replay what processes that are gone left
                self._journal.open(self._journal_sink())
            try:
                try:
                    await self.app(scope, watch_receive, watch_send)
                except Exception as exc:
                    if received:  # raised after the group: the server sees it unwrapped
                        failure = exc
                    else:
                        logger.debug(
                            "The app rejected the lifespan scope; the middleware answers it"
                        )
                if not received:  # the app does not speak lifespan (it returned or raised)
                    await self._answer_lifespan(receive, send, owner)
                    shut_down = True
            finally:
                owner.stop()
                if not shut_down and self._owners.get(None) is owner:
                    # uvicorn (`lifespan="auto"`) and hypercorn serve on after a lifespan
                    # that failed: the next request's tasks get an owner of their own.
                    self._owners.reset(token)
                    self._last = None
        if failure is not None:
            raise failure

    async def _answer_lifespan(self, receive: Receive, send: Send, owner: Owner) -> None:
        """Speak lifespan for an app that does not, so the owner still drains at shutdown."""
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send(await self._journal_ready({"type": "lifespan.startup.complete"}))
            elif message["type"] == "lifespan.shutdown":
                await owner.shutdown(self.config.shutdown_timeout)
                if self._journal is not None:
                    await self._journal.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _journal_ready(self, complete: Message) -> Message:
        """`lifespan.startup.complete` once the journal is open; if it cannot be, the
        server is told that the startup failed, and why (it then exits)."""
        failure = None if self._journal is None else await self._journal.startup_failure()
        if failure is None:
            return complete
        return {"type": "lifespan.startup.failed", "message": failure}

    def _journal_sink(self) -> Callable[[list[_journal.Entry]], None]:
        """Where the journal hands the entries it claims: batches on this event loop."""
        return _journal.on_this_loop(self._replay)

    async def _replay(self, entries: list[_journal.Entry]) -> None:
        owner, journal = self._owner_here(), self._journal
        if journal is not None:
            config = self.config
            submit = owner.submit if config.detach else self._run_inline
            await _journal.replay_batches(
                journal, entries, self.settings, self.stats, config.max_tasks, owner, submit
            )

    def _run_inline(self, batch: _batch.Batch) -> None:
        owner = self._owner_here()
        owner._backend.spawn(functools.partial(owner.run_here, batch))

    def _owner_here(self) -> Owner:
        """This event loop's owner: the lifespan's, or else one made on first use (spawned
        to serve detached batches, or only holding the `max_running` limiter inline)."""
        loop = asyncio_loop()  # None under trio
        if self._last is not None and loop is self._last[0]:
            return self._last[1]  # anyio's RunVar costs a backend lookup per call
        owner = self._owners.get(None)
        if owner is None:
            config = self.config
            make = Owner.spawn if config.detach else Owner
            owner = make(config.max_running, config.max_queued, config.shutdown_timeout)
            self._owners.set(owner)
        if loop is not None:
            self._last = (loop, owner)
        return owner


class _Watch:
    """One HTTP request's view of its response, as the app sends it: what `receive` and
    `send` it is handed, and what the outcome is judged on. A WebSocket connection's too:
    its client leaving, and the status of an HTTP response that refused it.

    One object with slots rather than two closures over `__call__`'s variables: a
    request whose end waits for the journal's commit keeps it alive meanwhile, and 32
    requests waiting at once with 7 closure cells and 2 functions each would cross the
    garbage collector's first threshold at every wave of them.
    """

    __slots__ = ("_receive", "_send", "client_gone", "complete", "journal", "status", "trailers")

    def __init__(self, receive: Receive, send: Send, journal: _journal.Recorder | None) -> None:
        self._receive = receive
        self._send = send
        self.journal = journal
        self.status = 0
        self.trailers = self.complete = self.client_gone = False

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] in _DISCONNECTS:
            self.client_gone = True
        return message

    async def send(self, message: Message) -> None:
        journal = self.journal
        if journal is not None and message["type"] in _journal.ENDING:
            # The client gets the end of the response once its tasks are on disk.
            while journal.last > journal.writer.done:
                await journal.writer.until(journal.last)
        try:
            await self._send(message)  # the one place a response message is forwarded
        except OSError:  # ASGI 2.4: send() after the client went away
            self.client_gone = True
            raise
        sent = message["type"]
        if sent == "http.response.start":
            self.status = message["status"]
            self.trailers = message.get("trailers", False)
        elif sent in _BODY:
            self.complete = not self.trailers and not message.get("more_body", False)
        elif sent == "http.response.pathsend":
            self.complete = not self.trailers
        elif sent == "http.response.trailers":
            self.complete = not message.get("more_trailers", False)
        elif sent == "websocket.http.response.start":  # a connection refused (denial extension)
            self.status = message["status"]


def _abandon(tasks: _context.RequestTasks, reason: str) -> None:
    """The app was cancelled (or interrupted): nothing can run, so say so for each task."""
    for task in tasks.close():
        if task.state is TaskState.PENDING:
            task._lose(TaskState.CANCELLED, logging.WARNING, "cancelled: %s", reason)


def setup(
    options: Options, source: str = "PostResponseMiddleware"
) -> tuple[Config, _batch.Settings]:
    """The options checked (over the framework's settings), and how tasks are to run;
    `source` is the middleware, as error messages name it."""
    config = configure(_with_framework_settings(options), source)
    settings = _batch.Settings(
        concurrency=config.concurrency,
        timeout=config.timeout,
        on_error=config.on_error,
        environment=_framework_environment(),
        spans=_task_spans() if config.opentelemetry else None,
        dispatchers=Dispatchers(config.celery_app),
        retries=config.retries,
        backoff=config.backoff,
    )
    return config, settings


def new_stats(config: Config) -> Stats:
    """The middleware's counters; with `opentelemetry=True`, reported as metrics too."""
    if not config.opentelemetry:
        return Stats()
    from . import _otel  # noqa: PLC0415  (an optional dependency; setup() checked it)

    return Stats(_otel.TaskMetrics())


def _with_framework_settings(options: Options) -> dict[str, object]:
    """`options` over the framework's own settings for the middleware (Django's, for now)."""
    django = _django_support()
    if django is None:
        return dict(options)
    settings = django.settings_options()
    configure(settings, "settings.POST_RESPONSE")  # its mistakes named as its own
    return {**settings, **options}


def _framework_environment() -> TaskEnvironment | None:
    django = _django_support()
    return None if django is None else django.Environment()


def _django_support() -> ModuleType | None:
    """`post_response._django` where Django is in use (its settings configured), else None."""
    django_conf = sys.modules.get("django.conf")
    if django_conf is None or not django_conf.settings.configured:
        return None
    from . import _django  # noqa: PLC0415  (it imports Django)

    return _django


def _task_spans() -> _batch.TaskSpans:
    try:
        from . import _otel  # noqa: PLC0415  (an optional dependency)
    except ImportError as exc:
        msg = (
            "PostResponseMiddleware(opentelemetry=True) needs the OpenTelemetry API: "
            "pip install 'post_response[otel]'."
        )
        raise ConfigurationError(msg) from exc
    return _otel.TaskSpans()

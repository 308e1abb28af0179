"""`PostResponseMiddleware`: find the end of each response, judge its outcome, run its tasks."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Literal

import anyio
from anyio.lowlevel import RunVar

from . import _context, _runner
from ._errors import ConfigurationError
from ._owner import Owner
from ._task import Stats, TaskState, check_timeout

if TYPE_CHECKING:
    from ._runner import ErrorHook
    from ._types import AnyASGIApp, Message, Receive, Scope, Send

__all__ = ["POLICIES", "Policy", "PostResponseMiddleware"]

logger = logging.getLogger("post_response")

Policy = Literal["no_server_error", "no_error", "always"]
POLICIES: tuple[Policy, ...] = ("no_server_error", "no_error", "always")

# The body-like messages that end a response unless trailers were announced.
_BODY = {"http.response.body", "http.response.zerocopysend"}
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
            None: no limit). Tasks beyond it wait their turn; responses never wait.
        max_queued: How many tasks may wait to run across all requests (default None:
            no limit). Past it, a request's tasks are dropped, each logged and counted.

    Raises:
        ConfigurationError: An option has an invalid value (a `ValueError`).
    """

    def __init__(
        self,
        app: AnyASGIApp,
        *,
        policy: Policy = "no_server_error",
        concurrency: int = 1,
        timeout: float | None = None,
        max_tasks: int = 1000,
        on_error: ErrorHook | None = None,
        detach: bool = True,
        shutdown_timeout: float | None = 20.0,
        max_running: int | None = None,
        max_queued: int | None = None,
    ) -> None:
        if policy not in POLICIES:
            msg = f"policy must be one of {', '.join(map(repr, POLICIES))}; got {policy!r}."
            raise ConfigurationError(msg)
        _check_count(concurrency, "concurrency")
        _check_count(max_tasks, "max_tasks")
        _check_count(max_running, "max_running", optional=True)
        _check_count(max_queued, "max_queued", optional=True)
        _check_hook(on_error)
        _check_flag(detach, "detach")
        self.app = app
        self.policy = policy
        self.max_tasks = max_tasks
        self.detach = detach
        self.shutdown_timeout = check_timeout(
            shutdown_timeout, "PostResponseMiddleware(shutdown_timeout=...)"
        )
        self.max_running = max_running
        self.max_queued = max_queued
        self.stats = Stats()
        self.settings = _runner.Settings(
            concurrency=concurrency,
            timeout=check_timeout(timeout, "PostResponseMiddleware(timeout=...)"),
            on_error=on_error,
        )
        self._owners: RunVar[Owner] = RunVar("post_response.owner")  # one per event loop
        self._last: tuple[object, Owner] | None = None  # (asyncio loop, its owner): a fast path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan" and self.detach:
            await self._lifespan(scope, receive, send)
            return
        outer = _context.current()
        if kind not in _DRAINED or (outer is not None and outer.phase is _context.Phase.COLLECTING):
            # Unknown scopes pass through; so does a request that an outer
            # PostResponseMiddleware already collects for (each task runs once).
            await self.app(scope, receive, send)
            return
        tasks = _context.RequestTasks(self.max_tasks, scope, self.stats)
        token = _context.activate(tasks)
        try:
            if kind == "http":
                await self._http(scope, receive, send, tasks)
            else:
                await self._websocket(scope, receive, send, tasks)
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

    async def _http(
        self, scope: Scope, receive: Receive, send: Send, tasks: _context.RequestTasks
    ) -> None:
        status = 0
        trailers = complete = client_gone = False

        async def watch_receive() -> Message:
            nonlocal client_gone
            message = await receive()
            if message["type"] == "http.disconnect":
                client_gone = True
            return message

        async def watch_send(message: Message) -> None:
            nonlocal status, trailers, complete, client_gone
            try:
                await send(message)
            except OSError:  # ASGI 2.4: send() after the client went away
                client_gone = True
                raise
            sent = message["type"]
            if sent == "http.response.start":
                status = message["status"]
                trailers = message.get("trailers", False)
            elif sent in _BODY:
                complete = not trailers and not message.get("more_body", False)
            elif sent == "http.response.pathsend":
                complete = not trailers
            elif sent == "http.response.trailers":
                complete = not message.get("more_trailers", False)

        try:
            await self.app(scope, watch_receive, watch_send)
        except Exception:
            reason = self._skip_reason(status, complete, client_gone, raised=True)
            await self._finish(tasks, reason)
            raise
        except BaseException:
            self._abandon(tasks, "the request was cancelled")
            raise
        await self._finish(tasks, self._skip_reason(status, complete, client_gone, raised=False))

    async def _websocket(
        self, scope: Scope, receive: Receive, send: Send, tasks: _context.RequestTasks
    ) -> None:
        try:
            await self.app(scope, receive, send)
        except Exception:
            await self._finish(tasks, None if self.policy == "always" else "the app raised")
            raise
        except BaseException:
            self._abandon(tasks, "the connection was cancelled")
            raise
        await self._finish(tasks, None)

    def _skip_reason(
        self, status: int, complete: bool, client_gone: bool, *, raised: bool
    ) -> str | None:
        """Why the policy skips this request's tasks, or None to run them."""
        policy = self.policy
        if policy == "always":
            return None
        if status >= 500 or (status >= 400 and policy == "no_error"):
            return f"the response status was {status}"
        if complete or client_gone:
            return None
        if raised:
            return "the app raised before completing the response"
        return "the app returned without completing the response"

    async def _finish(self, tasks: _context.RequestTasks, skip_reason: str | None) -> None:
        """The request is over: run its tasks here, or hand them to this loop's owner."""
        if not tasks.tasks:
            tasks.close()
            return
        owner = self._owner_here()
        batch = _runner.Batch(tasks, self.settings, skip_reason, owner.limiter)
        batch.enqueue(self.max_queued)
        if self.detach:
            owner.submit(batch)
        else:
            await batch.run(reason="the request was cancelled")

    def _abandon(self, tasks: _context.RequestTasks, reason: str) -> None:
        """The app was cancelled (or interrupted): nothing can run, so say so for each task."""
        batch = _runner.Batch(tasks, self.settings)
        batch.abandon(TaskState.CANCELLED, reason)
        batch.close()

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Own this event loop's tasks while the server runs; drain them at shutdown."""
        owner = Owner(self.max_running)
        received = False

        async def watch_receive() -> Message:
            nonlocal received
            received = True
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                # Before the app's own cleanup (closing a pool...), which tasks may need.
                await owner.shutdown(self.shutdown_timeout)
            return message

        async with anyio.create_task_group() as group:
            await group.start(owner.serve)
            self._owners.set(owner)
            self._last = None
            try:
                await self.app(scope, watch_receive, send)
            except Exception:
                if received:
                    raise
                logger.debug("The app rejected the lifespan scope; the middleware answers it")
                await self._answer_lifespan(receive, send, owner)
            else:
                if not received:
                    await self._answer_lifespan(receive, send, owner)
            finally:
                owner.stop()

    async def _answer_lifespan(self, receive: Receive, send: Send, owner: Owner) -> None:
        """Speak lifespan for an app that does not, so the owner still drains at shutdown."""
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await owner.shutdown(self.shutdown_timeout)
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _owner_here(self) -> Owner:
        """This event loop's owner: the lifespan's, or else one made on first use (spawned
        to serve detached batches, or only holding the `max_running` limiter inline)."""
        try:
            loop: object = asyncio.get_running_loop()
        except RuntimeError:  # trio
            loop = None
        if self._last is not None and loop is self._last[0]:
            return self._last[1]  # anyio's RunVar costs a backend lookup per call
        owner = self._owners.get(None)
        if owner is None:
            owner = Owner.spawn(self.max_running) if self.detach else Owner(self.max_running)
            self._owners.set(owner)
        if loop is not None:
            self._last = (loop, owner)
        return owner


def _check_count(value: object, name: str, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        also = ", or None for no limit" if optional else ""
        msg = f"{name} must be a whole number of at least 1{also}; got {value!r}."
        raise ConfigurationError(msg)


def _check_flag(value: object, name: str) -> None:
    if not isinstance(value, bool):
        msg = f"{name} must be True or False; got {value!r}."
        raise ConfigurationError(msg)


def _check_hook(hook: object) -> None:
    if hook is not None and not callable(hook):
        msg = f"on_error must be a callable taking (task, exception); got {hook!r}."
        raise ConfigurationError(msg)

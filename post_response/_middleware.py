"""`PostResponseMiddleware`: find the end of each response, judge its outcome, drain its tasks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from . import _context, _runner
from ._errors import ConfigurationError
from ._task import check_timeout

if TYPE_CHECKING:
    from ._runner import ErrorHook
    from ._types import AnyASGIApp, Message, Receive, Scope, Send

__all__ = ["POLICIES", "Policy", "PostResponseMiddleware"]

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
    ) -> None:
        if policy not in POLICIES:
            msg = f"policy must be one of {', '.join(map(repr, POLICIES))}; got {policy!r}."
            raise ConfigurationError(msg)
        _check_count(concurrency, "concurrency")
        _check_count(max_tasks, "max_tasks")
        _check_hook(on_error)
        self.app = app
        self.policy = policy
        self.max_tasks = max_tasks
        self.settings = _runner.Settings(
            concurrency=concurrency,
            timeout=check_timeout(timeout, "PostResponseMiddleware(timeout=...)"),
            on_error=on_error,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        outer = _context.current()
        if kind not in _DRAINED or (outer is not None and outer.phase is _context.Phase.COLLECTING):
            # Lifespan and unknown scopes pass through; so does a request that an
            # outer PostResponseMiddleware already collects for (each task runs once).
            await self.app(scope, receive, send)
            return
        tasks = _context.RequestTasks(self.max_tasks, scope)
        token = _context.activate(tasks)
        try:
            if kind == "http":
                await self._http(scope, receive, send, tasks)
            else:
                await self._websocket(scope, receive, send, tasks)
        finally:
            _context.deactivate(token)

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
            await self._drain(tasks, reason)
            raise
        except BaseException:
            self._abandon(tasks, "the request was cancelled")
            raise
        await self._drain(tasks, self._skip_reason(status, complete, client_gone, raised=False))

    async def _websocket(
        self, scope: Scope, receive: Receive, send: Send, tasks: _context.RequestTasks
    ) -> None:
        try:
            await self.app(scope, receive, send)
        except Exception:
            await self._drain(tasks, None if self.policy == "always" else "the app raised")
            raise
        except BaseException:
            self._abandon(tasks, "the connection was cancelled")
            raise
        await self._drain(tasks, None)

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

    async def _drain(self, tasks: _context.RequestTasks, skip_reason: str | None) -> None:
        tasks.phase = _context.Phase.DRAINING
        try:
            if tasks.tasks:
                await _runner.drain(tasks.tasks, tasks.label, self.settings, skip_reason)
        finally:
            tasks.close()

    def _abandon(self, tasks: _context.RequestTasks, reason: str) -> None:
        """The app was cancelled (or interrupted): nothing can run, so say so for each task."""
        _runner.cancel_pending(tasks.tasks, tasks.label, reason)
        tasks.close()


def _check_count(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        msg = f"{name} must be a whole number of at least 1; got {value!r}."
        raise ConfigurationError(msg)


def _check_hook(hook: object) -> None:
    if hook is not None and not callable(hook):
        msg = f"on_error must be a callable taking (task, exception); got {hook!r}."
        raise ConfigurationError(msg)

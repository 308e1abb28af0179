"""The public API: add_task() input checks, the task handle, and the middleware's options."""

from __future__ import annotations

import functools
import gc
import logging
import re
import subprocess
import sys
import warnings
from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from post_response import (
    ConfigurationError,
    InvalidTaskError,
    OutsideRequestError,
    PostResponseError,
    PostResponseMiddleware,
    TaskHandle,
    TaskStartedError,
    TaskState,
    add_task,
)
from post_response._types import Receive, Scope, Send
from post_response.wsgi import PostResponseWSGIMiddleware

from .harness import Exchange


async def noop_app(scope: Scope, receive: Receive, send: Send) -> None:
    pass


async def send_email(to: str, *, subject: str) -> None:
    pass


def numbers() -> Iterator[int]:
    yield 1


async def async_numbers() -> AsyncIterator[int]:
    yield 1


def numbers_later() -> Iterator[int]:
    """A plain function returning a generator: `add_task()` cannot see that coming."""
    return numbers()


def async_numbers_later() -> AsyncIterator[int]:
    return async_numbers()


class Numbers:
    def __call__(self) -> Iterator[int]:
        yield 1

    def method(self) -> Iterator[int]:
        yield 1


def wsgi_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    return []


class ASGI2App:
    def __init__(self, scope: Scope) -> None:
        self.scope = scope


def three_arguments(prefix: str, task: TaskHandle, exc: BaseException) -> None:
    pass


async def async_hook(task: TaskHandle, exc: BaseException) -> None:
    pass


class TestAddTaskInput:
    def test_a_non_callable_is_a_type_error(self) -> None:
        """Passing a value that cannot be called fails at once, naming its type, not its value."""
        with pytest.raises(TypeError, match=r"needs a callable.*of type int\.$") as raised:
            add_task(42)  # type: ignore[arg-type]
        assert isinstance(raised.value, InvalidTaskError)
        assert isinstance(raised.value, PostResponseError)

    def test_a_coroutine_object_is_a_type_error_and_is_closed(self) -> None:
        """`add_task(fn())` fails, names the fix, and closes the coroutine so nothing warns."""
        coroutine = send_email("a@b.c", subject="hi")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(TypeError, match=r"add_task\(send_email, \.\.\.\)"):
                add_task(coroutine)  # type: ignore[arg-type]
            assert coroutine.cr_frame is None  # type: ignore[attr-defined]  # closed
            del coroutine
            gc.collect()
        assert caught == []

    @pytest.mark.parametrize(
        ("func", "fix"),
        [
            (numbers, r"`list\(numbers\(...\)\)`"),
            (async_numbers, r"`async for _ in async_numbers\(...\): pass`"),
            (functools.partial(numbers), r"`list\(numbers\(...\)\)`"),
            (Numbers().method, r"`list\(method\(...\)\)`"),
            (Numbers(), r"`list\(Numbers\(...\)\)`"),
        ],
        ids=["generator", "async generator", "partial", "method", "callable object"],
    )
    def test_a_generator_function_is_refused_naming_the_fix(self, func: Any, fix: str) -> None:
        """A function with `yield` would end `completed` without its body ever running:
        `add_task()` refuses it, saying how to make it run."""
        with pytest.raises(InvalidTaskError, match=rf"body would never run\..*{fix}"):
            add_task(func)

    def test_outside_a_request_the_error_names_the_fix(self) -> None:
        """No middleware around the caller: a RuntimeError saying how to wrap the app."""
        with pytest.raises(RuntimeError) as raised:
            add_task(print, "hello")
        assert isinstance(raised.value, OutsideRequestError)
        message = str(raised.value)
        assert "PostResponseMiddleware" in message
        assert "app = PostResponseMiddleware(app)" in message
        assert "add_middleware(PostResponseMiddleware)" in message


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"concurrency": 0}, r"\(concurrency=...\) must be a whole number of at least 1; got 0"),
        ({"concurrency": -2}, "concurrency"),
        ({"concurrency": 1.5}, "concurrency"),
        ({"concurrency": True}, "concurrency"),
        ({"max_tasks": 0}, "max_tasks"),
        ({"timeout": 0}, "above 0"),
        ({"timeout": -1}, "timeout"),
        ({"timeout": float("nan")}, "timeout"),
        ({"timeout": "5"}, "timeout"),
        ({"policy": "sometimes"}, "'no_server_error', 'no_error', 'always'; got 'sometimes'"),
        ({"on_error": "log it"}, r"\(on_error=...\) must be a callable"),
        ({"celery_app": SimpleNamespace(tasks={})}, r"\(celery_app=...\) must be the Celery app"),
    ],
)
def test_invalid_options_fail_when_the_middleware_is_built(
    options: dict[str, Any], match: str
) -> None:
    """Each bad option is a ValueError that names the option and the value."""
    with pytest.raises(ValueError, match=match) as raised:
        PostResponseMiddleware(noop_app, **options)
    assert isinstance(raised.value, ConfigurationError)


@pytest.mark.parametrize(
    "hook",
    [lambda: None, lambda task: None, lambda task, exc, extra: None, len],
    ids=["no parameter", "one", "three", "a builtin of one"],
)
def test_an_on_error_hook_that_cannot_take_task_and_exc_is_refused(hook: Any) -> None:
    """A hook that would raise TypeError at the first failure is refused when the
    middleware is built, with the signature it needs."""
    with pytest.raises(ConfigurationError, match=r"cannot take those two arguments.*def on_error"):
        PostResponseMiddleware(noop_app, on_error=hook)


@pytest.mark.parametrize(
    "hook",
    [lambda *args: None, async_hook, functools.partial(three_arguments, "x"), min],
    ids=["varargs", "async", "partial", "no signature to read"],
)
def test_an_on_error_hook_that_can_take_task_and_exc_is_accepted(hook: Any) -> None:
    """Any hook callable as `hook(task, exc)`, or whose signature cannot be read, is accepted."""
    assert PostResponseMiddleware(noop_app, on_error=hook).config.on_error is hook


@pytest.mark.parametrize(
    ("app", "match"),
    [
        (None, r"PostResponseMiddleware\(app\) needs the app to wrap, a callable; got NoneType"),
        (wsgi_app, r"got a WSGI app .*`post_response.wsgi.PostResponseWSGIMiddleware\(app\)`"),
        (ASGI2App, r"wraps ASGI 3 apps.*guarantee_single_callable"),
    ],
    ids=["not callable", "WSGI", "ASGI 2"],
)
def test_an_app_the_middleware_cannot_call_is_refused(app: Any, match: str) -> None:
    """An app that would fail at the first request is refused when the middleware is built."""
    with pytest.raises(TypeError, match=match):
        PostResponseMiddleware(app)


def test_an_asgi_app_given_to_the_wsgi_middleware_is_refused() -> None:
    """`PostResponseWSGIMiddleware(asgi_app)` names the ASGI middleware instead."""
    with pytest.raises(TypeError, match=r"got an ASGI app .*`post_response.PostResponseMiddleware"):
        PostResponseWSGIMiddleware(noop_app)  # type: ignore[arg-type]


def test_a_bad_django_setting_is_named_as_the_setting() -> None:
    """A bad value in `settings.POST_RESPONSE` is reported as that setting, not as an
    argument the code never passed (Django runs in a process of its own here)."""
    code = (
        "from django.conf import settings\n"
        "settings.configure(POST_RESPONSE={'timeout': '5'})\n"
        "from post_response import PostResponseMiddleware\n"
        "async def app(scope, receive, send): pass\n"
        "try:\n"
        "    PostResponseMiddleware(app)\n"
        "except ValueError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.startswith('settings.POST_RESPONSE["timeout"] must be a number of seconds')


def test_unknown_options_are_rejected() -> None:
    """A misspelt option fails loudly instead of being ignored."""
    with pytest.raises(TypeError, match="concurency"):
        PostResponseMiddleware(noop_app, concurency=2)  # type: ignore[call-arg]


def test_valid_options_are_accepted() -> None:
    """Every documented option, at a valid value, builds a middleware."""
    middleware = PostResponseMiddleware(
        noop_app,
        policy="no_error",
        concurrency=4,
        timeout=2.5,
        max_tasks=10,
        on_error=lambda task, exc: None,
    )
    assert middleware.settings.concurrency == 4
    assert middleware.settings.timeout == 2.5


@pytest.mark.anyio
class TestHandle:
    async def handles(self, *adds: Any) -> list[TaskHandle]:
        """Run a request whose endpoint calls each of `adds`; return their handles."""
        handles: list[TaskHandle] = []

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            handles.extend(add() for add in adds)
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b""})

        await Exchange().run(PostResponseMiddleware(app))
        return handles

    async def test_kwargs_go_to_the_task_and_options_to_set(self) -> None:
        """A task's own `name`/`timeout` keyword arguments never clash with the task options."""
        seen: list[tuple[str, int]] = []

        async def task(name: str, timeout: int) -> None:
            seen.append((name, timeout))

        [handle] = await self.handles(
            lambda: add_task(task, name="for the task", timeout=3).set(name="opt", timeout=9)
        )
        assert seen == [("for the task", 3)]
        assert handle.name == "opt"
        assert handle.timeout == 9.0

    async def test_a_task_without_kwargs_has_its_own_empty_dict(self) -> None:
        """`kwargs` is `{}` without keyword arguments (kept as None until asked for), one
        dict per task: changing one task's leaves the others' alone."""
        seen: list[tuple[object, ...]] = []

        async def task(*args: object) -> None:
            seen.append(args)

        first, second = await self.handles(lambda: add_task(task, 1), lambda: add_task(task))
        assert seen == [(1,), ()]
        assert first.kwargs == second.kwargs == {}
        first.kwargs["changed"] = True
        assert first.kwargs == {"changed": True}
        assert second.kwargs == {}

    async def test_the_default_name_is_the_callables_qualified_name(self) -> None:
        """Functions, partials and callable objects get a readable `module.qualname`."""

        class Notifier:
            def __call__(self) -> None:
                pass

        handles = await self.handles(
            lambda: add_task(send_email, "a", subject="b"),
            lambda: add_task(functools.partial(send_email, "a"), subject="b"),
            lambda: add_task(Notifier()),
        )
        assert [h.name for h in handles] == [
            "tests.test_api.send_email",
            "tests.test_api.send_email",
            "tests.test_api.TestHandle.test_the_default_name_is_the_callables_qualified_name"
            ".<locals>.Notifier",
        ]
        assert [h.request for h in handles] == ["GET /"] * 3
        assert repr(handles[0]) == "<TaskHandle 'tests.test_api.send_email' completed>"

    async def test_cancel_before_it_runs(self, caplog: pytest.LogCaptureFixture) -> None:
        """`cancel()` stops a pending task (logged); once it ran, `cancel()` returns False."""
        ran: list[str] = []
        cancelled: list[bool] = []

        def add_then_cancel() -> TaskHandle:
            handle = add_task(ran.append, "cancelled one")
            cancelled.append(handle.cancel())
            cancelled.append(handle.cancel())
            return handle

        handles = await self.handles(add_then_cancel, lambda: add_task(ran.append, "kept"))
        assert ran == ["kept"]
        assert cancelled == [True, False]
        assert [h.state for h in handles] == [TaskState.CANCELLED, TaskState.COMPLETED]
        assert handles[1].cancel() is False
        assert any("cancelled before it ran" in r.getMessage() for r in caplog.records)

    async def test_set_after_the_task_started_is_an_error(self) -> None:
        """Options can only change before the task starts, and the error says so."""
        [handle] = await self.handles(lambda: add_task(print, end=""))
        with pytest.raises(TaskStartedError, match="already completed"):
            handle.set(timeout=1)

    @pytest.mark.parametrize(
        ("options", "match"),
        [
            ({"timeout": 0}, "set\\(timeout=...\\) must be a number of seconds above 0"),
            ({"timeout": -1.0}, "above 0"),
            ({"name": ""}, "non-empty string"),
            ({"name": 7}, "non-empty string"),
            ({"always": "false"}, r"set\(always=...\) must be True or False; got 'false'"),
            ({"always": 1}, r"set\(always=...\) must be True or False; got 1"),
        ],
    )
    async def test_invalid_task_options(self, options: dict[str, Any], match: str) -> None:
        """A bad per-task option is a ValueError raised by `set()` inside the request."""
        errors: list[BaseException] = []

        def add() -> None:
            handle = add_task(print, end="")
            try:
                handle.set(**options)
            except ValueError as exc:
                errors.append(exc)

        await self.handles(add)
        [error] = errors
        assert isinstance(error, ConfigurationError)
        assert re.search(match, str(error))

    async def test_a_task_that_returns_a_generator_fails_saying_so(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A sync task returning a generator did nothing: it ends `failed`, and the log says
        why, instead of `completed`."""
        handles = await self.handles(
            lambda: add_task(numbers_later), lambda: add_task(async_numbers_later)
        )
        assert [h.state for h in handles] == [TaskState.FAILED] * 2
        errors = [
            r.exc_info[1] for r in caplog.records if r.exc_info and r.levelno == logging.ERROR
        ]
        assert [str(e).split(" instead")[0] for e in errors] == [
            "The task returned a generator (numbers)",
            "The task returned an async generator (async_numbers)",
        ]
        assert all(isinstance(e, InvalidTaskError) for e in errors)

"""Logs are safe to read: a client cannot forge log lines, and task arguments stay out.

The request path comes from the client, percent-decoded by the server: `%0A` is a newline
and `%1B` starts a terminal escape sequence. Every message the library writes shows them
escaped, on real servers with their default logging and with `logging.basicConfig`, while
the structured fields keep the raw value. A task's arguments (emails, tokens) never appear
in what the library logs or raises: only their types.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import anyio
import pytest

from post_response import (
    InvalidTaskError,
    PostResponseMiddleware,
    TaskHandle,
    TaskLimitError,
    add_task,
)
from post_response._types import Receive, Scope, Send

from .harness import Exchange
from .servers import Connection, run

pytestmark = pytest.mark.anyio

FORGED = "2026-01-01 CRITICAL post_response: FORGED"
# (request target sent, the request as every message must name it)
TARGETS = [
    ("/a%0A2026-01-01%20CRITICAL%20post_response:%20FORGED", rf"GET /a\n{FORGED}"),
    ("/b%1B[31mred", r"GET /b\x1b[31mred"),
]
SERVED = {
    "uvicorn": ("uvicorn-h11", "security_app:app"),
    "waitress": ("waitress", "security_app:wsgi_app"),
}

# A path no server would pass on, and a method none would, to reach every message in-process.
RAW_METHOD, RAW_PATH = "GET\x1b", f"/a\n{FORGED}\x1b[2J\u2028é"
LOGGED = rf"GET\x1b /a\n{FORGED}\x1b[2J\u2028é"
SECRETS = ("ada@example.com", "hunter2")


def new_id() -> str:
    return uuid.uuid4().hex[:8]


async def send_ok(send: Send, status: int = 200) -> None:
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.mark.parametrize("logging_setup", ["the server's own", "basicConfig"])
@pytest.mark.parametrize("server_name", list(SERVED))
def test_a_path_cannot_forge_log_lines_on_a_real_server(
    server_name: str, logging_setup: str
) -> None:
    """Paths with `%0A` and `%1B` and a failing task: the server's output has the failure
    with the path escaped, no line that starts with the forged text, and no ESC byte."""
    server, target = SERVED[server_name]
    env = {"SECURITY_LOGGING": "basic"} if logging_setup == "basicConfig" else {}
    with run(server, target, env=env) as started:
        connection = Connection(started)
        try:
            for path, _ in TARGETS:
                task_id = new_id()
                assert connection.request("GET", f"{path}?id={task_id}") == (200, b"ok")
                started.control("open", id=f"{task_id}-after")  # runs after the failing one
                assert started.control("wait", id=f"{task_id}-after")[-1].endswith(":end")
        finally:
            connection.close()
        output = started.output()
    assert [line for line in output.splitlines() if line.startswith(FORGED)] == []
    assert "\x1b" not in output
    for _, logged in TARGETS:
        assert f"of {logged} failed" in output, output


async def test_every_message_escapes_the_request_and_every_field_keeps_it_raw(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Failed, timed out, skipped and cancelled tasks, a failing on_error hook and a
    TaskLimitError all name the request escaped; the records' fields hold it raw."""
    errors: list[Exception] = []

    async def fail() -> None:
        raise ValueError("failed on purpose")

    def hook(task: TaskHandle, exc: BaseException) -> None:
        raise RuntimeError("the hook failed too")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        add_task(fail).set(always=True, name="evil\nname")
        add_task(anyio.sleep_forever).set(always=True, timeout=0.01)
        add_task(print)  # skipped: the status is 500
        add_task(print).cancel()
        try:
            add_task(print)
        except TaskLimitError as exc:
            errors.append(exc)
        await send_ok(send, status=500)

    caplog.set_level(logging.DEBUG, logger="post_response")
    middleware = PostResponseMiddleware(app, max_tasks=4, on_error=hook)
    await Exchange().run(middleware, method=RAW_METHOD, path=RAW_PATH)
    records = [r for r in caplog.records if r.name == "post_response"]
    outcomes = {getattr(r, "task_outcome", None) for r in records}
    assert {"failed", "timed_out", "skipped", "cancelled"} <= outcomes
    assert any("on_error hook raised" in r.getMessage() for r in records)
    for message in [r.getMessage() for r in records] + [str(e) for e in errors]:
        assert message.isprintable(), message
        assert LOGGED in message
    assert any("'evil\\nname'" in r.getMessage() for r in records)
    fields = {(getattr(r, "request_method", ""), getattr(r, "request_path", "")) for r in records}
    assert fields == {(RAW_METHOD, RAW_PATH)}
    [error] = errors
    assert isinstance(error, TaskLimitError)


class _Forging(str):
    """A str whose own repr, str and format write a forged log line."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"'x'\n{FORGED}"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)


async def test_a_str_subclass_cannot_forge_log_lines_as_a_name_or_a_key(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A task name, a key and a callable's `__qualname__` of a str subclass with a hostile
    `__repr__`: every message names them by their text, escaped as a plain str."""

    async def fail() -> None:
        raise ValueError("failed on purpose")

    async def qualified() -> None:
        raise ValueError("failed on purpose")

    qualified.__qualname__ = _Forging("qualified\nname")
    qualified.__module__ = None  # type: ignore[assignment]  # the name is then the qualname
    handles: list[TaskHandle] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        handles.append(add_task(fail).set(name=_Forging("named")))
        handles.append(add_task(fail).set(key=_Forging("keyed")))
        handles.append(add_task(fail).set(key=_Forging("keyed")))  # supersedes, logged by key
        handles.append(add_task(qualified))
        await send_ok(send)

    caplog.set_level(logging.DEBUG, logger="post_response")
    await Exchange().run(PostResponseMiddleware(app))
    messages = [r.getMessage() for r in caplog.records if r.name == "post_response"]
    assert not [message for message in messages if FORGED in message], messages
    assert any("'named' of GET /" in message for message in messages), messages
    assert any("key 'keyed'" in message for message in messages), messages
    assert any("'qualified\\nname' of GET /" in message for message in messages), messages
    assert [type(h.name) for h in handles] == [str] * 4
    assert [type(h.key) for h in handles[1:3]] == [str] * 2


@pytest.mark.parametrize(
    ("path", "named"),
    [
        ("/café/naïve", "GET /café/naïve"),
        ("/a\nb", r"GET /a\nb"),
        ("/\x1b[2J", r"GET /\x1b[2J"),
        ("/\r\t\x00\x7f\x85\u2028", r"GET /\r\t\x00\x7f\x85\u2028"),
    ],
)
async def test_a_handle_names_its_request_escaped(path: str, named: str) -> None:
    """`TaskHandle.request` escapes control characters as Python's repr does, and leaves
    printable non-ASCII text such as `é` alone."""
    handles: list[TaskHandle] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        handles.append(add_task(print, end=""))
        await send_ok(send)

    await Exchange().run(PostResponseMiddleware(app), path=path)
    assert [h.request for h in handles] == [named]


def test_a_non_callable_is_named_by_its_type_not_its_value() -> None:
    """`add_task(data)` by mistake: the error says what type it got, never the data."""
    with pytest.raises(InvalidTaskError, match="of type dict") as raised:
        add_task({"email": SECRETS[0], "password": SECRETS[1]})  # type: ignore[arg-type]
    assert not any(secret in str(raised.value) for secret in SECRETS)


class _Opaque:
    """An argument pickle encodes and JSON does not."""


def _opaque_task(value: object) -> None:
    del value


class TestCelery:
    """A task handed to Celery: what its errors say about its arguments."""

    @pytest.fixture
    def send_email(self) -> Any:
        """A Celery task whose broker is unreachable (nothing listens on port 1)."""
        celery = pytest.importorskip("celery")
        app = celery.Celery("security", broker="redis://127.0.0.1:1/0")

        def send_email(to: str, subject: str) -> None:
            pass

        return app.task(name="security.send_email", shared=False)(send_email)

    async def test_an_enqueue_failure_logs_argument_types_not_values(
        self, send_email: Any, caplog: pytest.LogCaptureFixture
    ) -> None:
        """The broker is down: the failure is logged with `send_email(str, subject=str)`, and
        neither the message nor the traceback shows an argument's value."""

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            add_task(send_email, SECRETS[0], subject=f"reset token {SECRETS[1]}")
            await send_ok(send)

        await Exchange().run(PostResponseMiddleware(app))
        [record] = [r for r in caplog.records if getattr(r, "task_outcome", "") == "failed"]
        logged = logging.Formatter().format(record)  # the message and the traceback
        assert "Could not enqueue Celery task security.send_email(str, subject=str)" in logged
        assert not any(secret in logged for secret in SECRETS), logged

    async def test_an_enqueue_failure_escapes_the_task_name(
        self, send_email: Any, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A signature's task name may come from outside (a job type a client chose): the
        failure's message shows its control characters escaped, and forges no line."""

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            add_task(send_email.app.signature("job\nFORGED \x1b[31m", args=("x",)))
            await send_ok(send)

        await Exchange().run(PostResponseMiddleware(app))
        [record] = [r for r in caplog.records if getattr(r, "task_outcome", "") == "failed"]
        logged = logging.Formatter().format(record)  # the message and the traceback
        assert "Could not enqueue Celery task job\\nFORGED \\x1b[31m(str) after" in logged
        assert not any(line.startswith("FORGED") for line in logged.splitlines()), logged
        assert "\x1b" not in logged

    async def test_an_enqueue_failure_that_was_not_retried_does_not_say_it_was(
        self, send_email: Any, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Kombu retries connection errors only: a chord without a result backend fails at
        once, and the log says so, not "after 3 retries"."""
        celery = pytest.importorskip("celery")

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            add_task(celery.chord([send_email.s("a", "b")], send_email.si("c", "d")))
            await send_ok(send)

        await Exchange().run(PostResponseMiddleware(app))
        [record] = [r for r in caplog.records if getattr(r, "task_outcome", "") == "failed"]
        assert record.exc_info is not None
        # The error's message, not the whole traceback: Python 3.13 prints Celery's source
        # lines in it (`max_retries=max_retries`).
        message = str(record.exc_info[1])
        assert "Could not enqueue Celery task celery.chord(" in message
        assert "): NotImplementedError: Starting chords requires a result backend" in message
        assert "retries" not in message

    async def test_a_signature_s_arguments_are_checked_with_the_serializer_it_is_sent_with(
        self, send_email: Any, caplog: pytest.LogCaptureFixture
    ) -> None:
        """`.set(serializer="json")` on a signature of a pickle task: an argument JSON cannot
        encode fails in the request (checked with pickle, it failed after the response, the
        task lost); `.set(serializer="pickle")` on a JSON task lets it through."""
        refused = pytest.importorskip("post_response.celery").UnserializableArgumentsError
        pickled = send_email.app.task(name="security.pickled", serializer="pickle", shared=False)(
            _opaque_task
        )
        errors: list[Exception] = []

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            try:
                add_task(pickled.s(_Opaque()).set(serializer="json"))
            except refused as exc:
                errors.append(exc)
            add_task(send_email.s(_Opaque(), "b").set(serializer="pickle"))  # then: broker down
            await send_ok(send)

        await Exchange().run(PostResponseMiddleware(app))
        [error] = errors
        assert "'security.pickled' cannot be encoded with its 'json' serializer" in str(error)
        [record] = [r for r in caplog.records if getattr(r, "task_outcome", "") == "failed"]
        assert "Could not enqueue Celery task security.send_email(_Opaque, str)" in str(
            record.exc_info[1] if record.exc_info else record.getMessage()
        )

    async def test_a_signature_with_more_arguments_is_named_without_its_values(
        self, send_email: Any
    ) -> None:
        """`add_task(task.s(email), more)` fails naming the task, not the signature's repr."""
        errors: list[Exception] = []

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            try:
                add_task(send_email.s(SECRETS[0]), SECRETS[1])
            except InvalidTaskError as exc:
                errors.append(exc)
            await send_ok(send)

        await Exchange().run(PostResponseMiddleware(app))
        [error] = errors
        assert "Celery signature of 'security.send_email'" in str(error)
        assert not any(secret in str(error) for secret in SECRETS)

"""Observability: structured log fields, OpenTelemetry spans and metrics, live counters."""

from __future__ import annotations

import logging
import sys
from typing import Any

import anyio
import pytest
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

import post_response
from post_response import ConfigurationError, PostResponseMiddleware, add_task
from post_response._otel import OUTCOME
from post_response._types import Receive, Scope, Send

from .harness import Exchange, http_scope

pytestmark = pytest.mark.anyio

FIELDS = ("task_name", "task_outcome", "task_duration", "request_method", "request_path")


async def send_ok(send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def ok_app(scope: Scope, receive: Receive, send: Send) -> None:
    await send_ok(send)


async def welcome(user: str) -> None:
    pass


async def broken() -> None:
    raise ValueError("broken on purpose")


async def test_task_log_records_carry_structured_fields(caplog: pytest.LogCaptureFixture) -> None:
    """Each task's records have its name, outcome, duration and the request's method and path."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        add_task(welcome, "ada")
        add_task(broken)
        await send_ok(send)

    caplog.set_level(logging.DEBUG, logger="post_response")
    await Exchange().run(PostResponseMiddleware(app), method="POST", path="/signup")
    records = [r for r in caplog.records if r.name == "post_response"]
    fields = [{name: getattr(r, name) for name in FIELDS} for r in records]
    assert [f["task_outcome"] for f in fields] == ["completed", "failed"]
    assert [f["task_name"] for f in fields] == [
        "tests.test_observability.welcome",
        "tests.test_observability.broken",
    ]
    assert {(f["request_method"], f["request_path"]) for f in fields} == {("POST", "/signup")}
    assert all(isinstance(f["task_duration"], float) and f["task_duration"] >= 0 for f in fields)
    assert records[0].levelno == logging.DEBUG
    assert (
        records[0]
        .getMessage()
        .startswith("Task 'tests.test_observability.welcome' of POST /signup completed in ")
    )


@pytest.fixture(scope="module")
def exporter() -> InMemorySpanExporter:
    """One tracer provider for the process (OpenTelemetry allows setting it once)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return exporter


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_each_task_gets_a_span_under_the_requests_span(
    exporter: InMemorySpanExporter, kind: str
) -> None:
    """The task's span is a child of the request's span, and what the task traces is its child."""
    exporter.clear()
    tracer = trace.get_tracer("tests")

    async def async_task(user: str) -> None:
        with tracer.start_as_current_span("send email"):
            pass

    def sync_task(user: str) -> None:
        with tracer.start_as_current_span("send email"):
            pass

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        with tracer.start_as_current_span("GET /signup"):  # as ASGI instrumentation would
            add_task(async_task if kind == "async" else sync_task, "ada")
            await send_ok(send)

    await Exchange().run(PostResponseMiddleware(app, opentelemetry=True), path="/signup")
    spans = {span.name.partition(" test")[0]: span for span in exporter.get_finished_spans()}
    request, task, inner = spans["GET /signup"], spans["post_response"], spans["send email"]
    assert task.name.endswith(f".{kind}_task")
    assert task.parent is not None
    assert task.parent.span_id == request.context.span_id
    assert inner.parent is not None
    assert inner.parent.span_id == task.context.span_id
    assert task.context.trace_id == request.context.trace_id
    assert task.attributes is not None
    assert task.attributes["post_response.task.outcome"] == "completed"
    assert task.attributes["url.path"] == "/signup"


async def test_a_failing_tasks_span_records_the_error(exporter: InMemorySpanExporter) -> None:
    """A failed task's span has status ERROR and the exception as an event."""
    exporter.clear()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        add_task(broken)
        await send_ok(send)

    await Exchange().run(PostResponseMiddleware(app, opentelemetry=True))
    [span] = exporter.get_finished_spans()
    assert span.parent is None  # no request span here: the task's span is a root
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes is not None
    assert span.attributes["post_response.task.outcome"] == "failed"
    assert [event.name for event in span.events] == ["exception"]


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_a_failing_tasks_log_record_and_span_carry_no_argument_values(
    exporter: InMemorySpanExporter, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    """Arguments carry emails and tokens: neither the failure's log record (message,
    fields, traceback) nor its span (attributes, events) shows them."""
    exporter.clear()
    secrets = ("ada@example.com", "hunter2")

    async def reset_async(email: str, *, token: str) -> None:
        raise ValueError("the mail server said no")

    def reset_sync(email: str, *, token: str) -> None:
        raise ValueError("the mail server said no")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        add_task(reset_async if kind == "async" else reset_sync, secrets[0], token=secrets[1])
        await send_ok(send)

    await Exchange().run(PostResponseMiddleware(app, opentelemetry=True))
    [record] = [r for r in caplog.records if r.name == "post_response"]
    [span] = exporter.get_finished_spans()
    written = [logging.Formatter().format(record), *map(str, vars(record).values())]
    written += [str(span.name), str(span.status.description), str(dict(span.attributes or {}))]
    written += [str(dict(event.attributes or {})) for event in span.events]
    assert "ValueError: the mail server said no" in written[0]  # the record is the failure
    assert [text for text in written if any(secret in text for secret in secrets)] == []


def test_opentelemetry_without_the_extra_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    """`opentelemetry=True` without the API installed says which extra to install."""
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "post_response._otel", raising=False)
    monkeypatch.delattr(post_response, "_otel", raising=False)
    with pytest.raises(ConfigurationError, match=r"pip install 'post_response\[otel\]'"):
        PostResponseMiddleware(ok_app, opentelemetry=True)


@pytest.fixture(scope="module")
def reader() -> InMemoryMetricReader:
    """One meter provider for the process (OpenTelemetry allows setting it once)."""
    reader = InMemoryMetricReader()
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    return reader


def points(reader: InMemoryMetricReader) -> dict[tuple[str, str], Any]:
    """The data points of post_response's instruments, by name and outcome."""
    found: dict[tuple[str, str], Any] = {}
    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            if scope.scope.name != "post_response":
                continue
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    outcome = str(dict(point.attributes or {}).get(OUTCOME, ""))
                    found[metric.name, outcome] = (metric.unit, point)
    return found


def value(found: dict[tuple[str, str], Any], name: str, outcome: str = "") -> float:
    point = found.get((name, outcome))
    if point is None:
        return 0
    data = point[1]
    return float(data.value if hasattr(data, "value") else data.count)


async def test_metrics_count_tasks_by_outcome_and_time_them(reader: InMemoryMetricReader) -> None:
    """`post_response.tasks` counts tasks by final state, `post_response.task.duration`
    times those that ran (in seconds), and the queued and running gauges go back to 0."""
    before = points(reader)
    gate = anyio.Event()
    seen: dict[str, float] = {}

    async def waits() -> None:
        await gate.wait()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        add_task(welcome, "ada")
        add_task(broken)
        add_task(welcome, "old").set(key="k")
        add_task(welcome, "new").set(key="k")
        add_task(waits)
        await send_ok(send)

    middleware = PostResponseMiddleware(app, opentelemetry=True)
    exchange = Exchange()
    async with anyio.create_task_group() as group:
        group.start_soon(exchange.run, middleware)
        while middleware.stats.running == 0:
            await anyio.sleep(0)
        during = points(reader)
        seen["running"] = value(during, "post_response.tasks.running") - value(
            before, "post_response.tasks.running"
        )
        gate.set()
    after = points(reader)

    def delta(name: str, outcome: str = "") -> float:
        return value(after, name, outcome) - value(before, name, outcome)

    assert seen["running"] == 1
    assert delta("post_response.tasks", "completed") == 3
    assert delta("post_response.tasks", "failed") == 1
    assert delta("post_response.tasks", "superseded") == 1
    assert delta("post_response.tasks.running") == 0
    assert delta("post_response.tasks.queued") == 0
    assert delta("post_response.task.duration", "completed") == 3  # a count of durations
    assert after["post_response.task.duration", "completed"][0] == "s"
    assert after["post_response.tasks", "completed"][0] == "{task}"


async def test_metrics_count_the_tasks_held_for_their_key(reader: InMemoryMetricReader) -> None:
    """`post_response.tasks.held` follows `stats.held`: a task waiting for its key's
    running task is counted while it waits, and no more once it ran."""
    before = points(reader)
    gate = anyio.Event()

    async def rebuild(label: str) -> None:
        if label == "first":
            await gate.wait()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        add_task(rebuild, scope["path"].strip("/")).set(key="cache")
        await send_ok(send)

    middleware = PostResponseMiddleware(app, opentelemetry=True)
    async with anyio.create_task_group() as group:
        group.start_soon(Exchange().run, middleware, http_scope(path="/first"))
        while middleware.stats.running == 0:
            await anyio.sleep(0)
        group.start_soon(Exchange().run, middleware, http_scope(path="/second"))
        while middleware.stats.held == 0:
            await anyio.sleep(0)
        during = points(reader)
        gate.set()
    after = points(reader)
    name = "post_response.tasks.held"
    assert value(during, name) - value(before, name) == 1
    assert value(after, name) - value(before, name) == 0
    assert middleware.stats.snapshot()["completed"] == 2


async def test_a_retried_attempts_span_says_retried(exporter: InMemorySpanExporter) -> None:
    """Each attempt of a retried task has its span: `retried`, then the final outcome."""
    exporter.clear()
    attempts: list[int] = []

    async def flaky() -> None:
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionError("once")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        add_task(flaky).set(retries=1, backoff=0)
        await send_ok(send)

    await Exchange().run(PostResponseMiddleware(app, opentelemetry=True))
    outcomes = [
        (span.attributes or {})["post_response.task.outcome"]
        for span in exporter.get_finished_spans()
    ]
    assert outcomes == ["retried", "completed"]

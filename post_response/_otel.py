"""OpenTelemetry: a span per task, a child of the request's span when there is one, and
metrics: tasks by final state, tasks queued, running and held, and how long tasks ran.

Imported by the middleware only with `opentelemetry=True` (the `post_response[otel]` extra).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from opentelemetry import context, metrics, trace
from opentelemetry.trace import Span, Status, StatusCode

from . import __version__
from ._task import FINAL_STATES, TaskState

if TYPE_CHECKING:
    from ._task import TaskHandle

__all__ = ["TaskMetrics", "TaskSpans"]

OUTCOME = "post_response.task.outcome"


class TaskSpans:
    """Opens a span when a task starts, in the task's own context snapshot, so that the
    request's span (current when `add_task()` was called) is its parent and whatever the
    task traces is its child."""

    def __init__(self) -> None:
        self._tracer = trace.get_tracer("post_response", __version__)

    def start(self, task: TaskHandle) -> Span:
        parent = task.context.run(context.get_current)
        request = task.request_tasks
        span = self._tracer.start_span(
            f"post_response {task.name}",
            context=parent,
            attributes={
                "post_response.task.name": task.name,
                "http.request.method": request.method,
                "url.path": request.path,
            },
        )
        # The snapshot is this task's alone: make the span current in it for the whole run.
        task.context.run(context.attach, trace.set_span_in_context(span, parent))
        return span

    def end(self, span: object, task: TaskHandle, error: BaseException | None) -> None:
        if not isinstance(span, Span):
            return
        # A failed attempt that is retried leaves the task pending: its span says so.
        outcome = "retried" if task.state is TaskState.PENDING else task.state.value
        span.set_attribute(OUTCOME, outcome)
        if error is not None:
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        span.end()


class TaskMetrics:
    """The middleware's counters as OpenTelemetry instruments, named by its conventions:
    `post_response.tasks` (tasks that ended, by `post_response.task.outcome`),
    `post_response.tasks.queued`, `post_response.tasks.running` and `post_response.tasks.held`
    (up-down counters),
    and `post_response.task.duration` (a histogram, in seconds, of tasks that ran)."""

    def __init__(self) -> None:
        meter = metrics.get_meter("post_response", __version__)
        self._ended = meter.create_counter(
            "post_response.tasks", unit="{task}", description="Tasks that ended, by outcome."
        )
        self._queued = meter.create_up_down_counter(
            "post_response.tasks.queued",
            unit="{task}",
            description="Tasks waiting for a worker, a thread or a max_running slot.",
        )
        self._running = meter.create_up_down_counter(
            "post_response.tasks.running", unit="{task}", description="Tasks running now."
        )
        self._held = meter.create_up_down_counter(
            "post_response.tasks.held",
            unit="{task}",
            description="Tasks waiting for their delay, their key or their next attempt.",
        )
        self._duration = meter.create_histogram(
            "post_response.task.duration", unit="s", description="How long tasks ran."
        )
        self._outcomes = {state: {OUTCOME: state.value} for state in FINAL_STATES}

    def queued(self, change: int) -> None:
        self._queued.add(change)

    def running(self, change: int) -> None:
        self._running.add(change)

    def held(self, change: int) -> None:
        self._held.add(change)

    def ended(self, state: TaskState, duration: float | None) -> None:
        attributes = self._outcomes[state]
        self._ended.add(1, attributes)
        if duration is not None:
            self._duration.record(duration, attributes)

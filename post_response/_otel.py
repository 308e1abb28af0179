"""OpenTelemetry: a span per task, a child of the request's span when there is one.

Imported by the middleware only with `opentelemetry=True` (the `post_response[otel]` extra).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from opentelemetry import context, trace
from opentelemetry.trace import Span, Status, StatusCode

from . import __version__

if TYPE_CHECKING:
    from ._task import TaskHandle

__all__ = ["TaskSpans"]


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
        span.set_attribute("post_response.task.outcome", task.state.value)
        if error is not None:
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        span.end()

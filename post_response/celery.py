"""Hand `add_task()` calls to Celery after the response, when one process is not enough.

    @celery_app.task
    def send_welcome_email(to: str) -> None: ...

    add_task(send_welcome_email, "ada@example.com")   # enqueued once the response is sent

When the callable given to `add_task()` is a Celery task (or a signature such as
`send_welcome_email.s(to).set(queue="mail")`), the drain does not call it: it enqueues it
with `apply_async`, in a worker thread, after the response is complete. The outcome
policy applies as for any task: a request that failed enqueues nothing. With the
middleware option `celery_app=app`, a plain function whose `module.qualname` is the name
of one of `app`'s tasks is routed to that task as well.

The arguments are checked against the task's serializer when `add_task()` is called, so
an argument that cannot travel is an error in the request, not a lost task after it.
Enqueueing retries with a bounded backoff (`RETRY_POLICY`); a task that still cannot be
enqueued fails like any task: logged by name with the types of its arguments (never their
values: they carry emails and tokens), counted, never raised into the server.

Each middleware asks its `CeleryDispatcher` about every new task once Celery has been
imported (see `post_response._dispatch`), so a Celery task is never run in the web process
by mistake. Needs the `post_response[celery]` extra.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, cast

from celery import Celery, Task
from celery.canvas import Signature
from kombu import serialization
from kombu.exceptions import EncodeError, OperationalError

from ._checks import describe
from ._errors import InvalidTaskError, PostResponseError
from ._text import escape, outline

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._task import TaskHandle

__all__ = ["RETRY_POLICY", "CeleryDispatcher", "EnqueueError", "UnserializableArgumentsError"]

# Kombu's publish retry: up to 3 retries, 0.2 s then 0.4 s then 0.5 s apart (about 1 s in
# all, plus the broker's connection timeout per attempt).
RETRY_POLICY = {"max_retries": 3, "interval_start": 0.2, "interval_step": 0.2, "interval_max": 0.5}

_dumps = cast("Callable[..., object]", serialization.dumps)  # untyped in some Kombu versions


class UnserializableArgumentsError(PostResponseError, TypeError):
    """A Celery task's arguments cannot be encoded with its serializer."""


class EnqueueError(PostResponseError, RuntimeError):
    """A Celery task could not be enqueued, retries included."""


class CeleryDispatcher:
    """Enqueues Celery tasks and signatures, and with `app`, plain functions whose
    `module.qualname` is the name of one of its tasks (the middleware's `celery_app`)."""

    def __init__(self, app: object = None) -> None:
        self.app = app if isinstance(app, Celery) else None

    def __call__(self, handle: TaskHandle) -> Callable[[], object] | None:
        target = self._target(handle)
        if target is None:
            return None
        sender, task, name, args, kwargs = target
        if task is None:  # a signature of a task known only to the workers
            serializer = cast("str", sender.app.conf.task_serializer)
        else:
            if isinstance(sender, Task) or type(sender) is Signature:  # not group(), chain()...
                _check_arguments(task, args, kwargs)  # which call no task's apply_async
            serializer = _serializer(task)
        if isinstance(sender, Signature):  # `.set(serializer=...)`: the one it is sent with
            serializer = cast("str", sender.options.get("serializer") or serializer)
        _check_serializable(name, serializer, args, kwargs)
        plan = handle._planned()
        if plan.name is None:
            plan.name = name
        return functools.partial(_enqueue, sender, name, args, kwargs)

    def _target(self, handle: TaskHandle) -> _Target | None:
        """What enqueues the task behind `handle` (a Celery task or signature), the task
        if this process knows it, its name and its arguments, or None for an ordinary
        callable."""
        func = handle.func
        if isinstance(func, Task):
            return func, func, func.name, handle.args, handle.kwargs
        if isinstance(func, Signature):
            if handle.args or handle.kwargs:
                msg = (  # the signature's name, not its repr: that shows its arguments
                    f"add_task() got a Celery signature of {func.task!r} and more arguments; "
                    "put them in the signature: `add_task(task.s(*args, **kwargs))`."
                )
                raise InvalidTaskError(msg)
            # None for a task known only to the workers (`app.signature("name")`): Celery
            # sends it by name.
            task = func._type or func.app.tasks.get(func.task)
            return func, task, func.task, tuple(func.args), dict(func.kwargs)
        if self.app is not None:
            name = describe(func)
            if name in self.app.tasks:
                task = self.app.tasks[name]
                return task, task, name, handle.args, handle.kwargs
        return None


_Target = tuple["Task | Signature", "Task | None", str, tuple[Any, ...], dict[str, Any]]


def _serializer(task: Task) -> str:
    return cast("str", task.serializer or task.app.conf.task_serializer)


def _check_arguments(task: Task, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Celery's own check of a task's arguments against its function (`typing`, on by
    default), in the request: `apply_async` makes it only in the worker thread, after the
    response, where the task would be lost."""
    header = getattr(task, "__header__", None) if task.typing else None
    if header is None:
        return
    try:
        header(*args, **kwargs)
    except TypeError as exc:  # Python's message names arguments, never their values
        msg = (
            f"Celery task {task.name!r} cannot be called with "
            f"{outline(task.name, args, kwargs)}: {escape(str(exc))}."
        )
        raise InvalidTaskError(msg) from None


def _check_serializable(
    name: str, serializer: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    try:
        _dumps((args, kwargs, {}), serializer=serializer)
    except EncodeError as exc:
        msg = (
            f"The arguments of Celery task {name!r} cannot be encoded with its "
            f"{serializer!r} serializer: {_culprit(name, args, kwargs, serializer)}. Pass "
            "values it can encode (ids, strings, numbers), or choose another serializer for "
            "the task."
        )
        raise UnserializableArgumentsError(msg) from exc


def _culprit(name: str, args: tuple[Any, ...], kwargs: dict[str, Any], serializer: str) -> str:
    """Which argument cannot be encoded, by position or name and type (never its value:
    some serializers' errors show it, so theirs is only chained)."""
    items = [(f"argument {n}", value) for n, value in enumerate(args, 1)]
    items += [(f"argument {key!r}", value) for key, value in kwargs.items()]
    for where, value in items:
        try:
            _dumps(value, serializer=serializer)
        except EncodeError:
            return f"{where} is of type {type(value).__qualname__}"
    return f"the call {outline(name, args, kwargs)}"


def _enqueue(
    sender: Task | Signature, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """Send the task to the broker (in a worker thread), with Kombu's bounded retry."""
    try:
        if isinstance(sender, Signature):
            sender.apply_async(retry=True, retry_policy=RETRY_POLICY)
        else:
            sender.apply_async(args, kwargs, retry=True, retry_policy=RETRY_POLICY)
    except Exception as exc:
        # Kombu retries connection errors only (and then raises an OperationalError).
        retried = isinstance(exc, OperationalError)
        after = f" after {RETRY_POLICY['max_retries']} retries" if retried else ""
        msg = (
            f"Could not enqueue Celery task {outline(name, args, kwargs)}{after}: "
            f"{escape(f'{type(exc).__name__}: {exc}')}"
        )
        raise EnqueueError(msg) from exc

"""The task record, which is also the handle `add_task()` returns, and `add_task()` itself."""

from __future__ import annotations

import collections
import enum
import logging
import time
from typing import TYPE_CHECKING, Any, ParamSpec, Protocol, TypeVar, cast

from . import _context
from ._checks import (
    GENERATOR,
    check_backoff,
    check_delay,
    check_flag,
    check_retries,
    check_retry_on,
    check_timeout,
    describe,
    generator_flags,
    generator_function,
    kind,
    not_callable,
)
from ._errors import ConfigurationError, OutsideRequestError, TaskStartedError
from ._text import clipped

if TYPE_CHECKING:
    from collections.abc import Callable
    from contextvars import Context

    from ._batch import HeldBatch

__all__ = [
    "FINAL_STATES",
    "NO_KWARGS",
    "UNSET",
    "Metrics",
    "Plan",
    "Stats",
    "TaskHandle",
    "TaskState",
    "Volatile",
    "add_task",
    "cancel",
    "volatile",
]

P = ParamSpec("P")
R = TypeVar("R")
logger = logging.getLogger("post_response")


class TaskState(str, enum.Enum):
    """Where a task is. Every task ends in exactly one of the states after RUNNING."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"  # raised an exception
    TIMED_OUT = "timed_out"  # ran longer than its timeout and was cancelled
    SKIPPED = "skipped"  # not run because of the request's outcome (the policy)
    CANCELLED = "cancelled"  # by `TaskHandle.cancel()`, by the server, or at shutdown's deadline
    DROPPED = "dropped"  # not run: `max_queued` tasks were already waiting
    ABANDONED = "abandoned"  # not run to its end: the server shut down, or the process exited
    SUPERSEDED = "superseded"  # not run: a newer task with the same key replaced it


FINAL_STATES = tuple(TaskState)[2:]
# Final states that keep a task in the journal: the runtime lost it, so a next start runs it.
_KEPT_IN_JOURNAL = frozenset({TaskState.DROPPED, TaskState.ABANDONED})


class Metrics(Protocol):
    """Where the counters' changes are also reported (OpenTelemetry's metrics)."""

    def queued(self, change: int) -> None: ...

    def running(self, change: int) -> None: ...

    def held(self, change: int) -> None: ...

    def ended(self, state: TaskState, duration: float | None) -> None: ...


class Stats:
    """Counters of one middleware's tasks, readable at run time: `middleware.stats`.

    `queued`, `running` and `held` are gauges (tasks waiting to run, tasks running now,
    tasks the owner holds for their delay, their key or their next attempt); each final
    state counts the tasks that ended in it since the middleware was built.
    With `metrics` (the middleware's `opentelemetry=True`), each change is reported there too.
    """

    __slots__ = ("ended", "held", "metrics", "queued", "running")

    def __init__(self, metrics: Metrics | None = None) -> None:
        self.queued = 0
        self.running = 0
        self.held = 0
        self.ended = dict.fromkeys(FINAL_STATES, 0)
        self.metrics = metrics

    def hold(self, change: int) -> None:
        """One task more (1) or fewer (-1) waits for its delay, its key or its next attempt."""
        self.held += change
        if self.metrics is not None:
            self.metrics.held(change)

    def snapshot(self) -> dict[str, int]:
        """All counters now, by name: `{"queued": 0, "running": 1, "held": 0, ...}`."""
        counts = {"queued": self.queued, "running": self.running, "held": self.held}
        counts.update((state.value, n) for state, n in self.ended.items())
        return counts

    def __repr__(self) -> str:
        return f"<Stats {self.snapshot()}>"


class _Unset(enum.Enum):
    UNSET = "unset"


UNSET = _Unset.UNSET  # "not given": for a task's timeout, "the middleware's default"
NO_KWARGS: dict[str, Any] = {}  # a task's keyword arguments when it has none: never changed
_PENDING, _COMPLETED = TaskState.PENDING, TaskState.COMPLETED
_DEBUG = logging.DEBUG


class TaskHandle:
    """A task added by `add_task()`: its options, its state, and a way to cancel it.

    Options are set with `set()` on the handle, so they never collide with the
    keyword arguments meant for the task itself::

        add_task(send_email, to, subject="Welcome").set(name="welcome", timeout=10)
    """

    __slots__ = (
        "_kwargs",
        "_plan",
        "_queued",
        "_started",
        "args",
        "context",
        "duration",
        "func",
        "request_tasks",
        "state",
    )

    def __init__(
        self,
        func: Callable[..., object],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        request_tasks: _context.RequestTasks,
    ) -> None:
        self.func = func
        self.args = args
        # None when there are none: a waiting task does not keep an empty dict (64 B).
        self._kwargs = kwargs or None
        self.request_tasks = request_tasks  # the list of the request that added it
        self.context: Context = _context.snapshot()
        self.state = _PENDING
        self._queued = False  # counted in `Stats.queued` while it waits to run
        self._started = 0.0
        self.duration: float | None = None  # seconds it ran, once it has
        # The task's options (name, timeout, always, key, delay, retries) and its queue:
        # None unless one was set (or the task was retried), so tasks without them cost
        # one attribute here (32 B less per waiting task than four) and one test where
        # they run.
        self._plan: Plan | None = None

    @property
    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments the task is called with (an empty dict made on first use
        when there are none)."""
        kwargs = self._kwargs
        if kwargs is None:
            kwargs = self._kwargs = {}
        return kwargs

    @property
    def timeout(self) -> float | _Unset | None:
        """The seconds set with `set(timeout=...)`, None for no limit, or `UNSET`: the
        middleware's default."""
        return (self._plan or _NO_PLAN).timeout

    @property
    def always(self) -> bool:
        """Whether `set(always=True)` lets the task run whatever the request's outcome."""
        return (self._plan or _NO_PLAN).always

    @property
    def dispatch(self) -> Callable[[], object] | None:
        """Called in a worker thread instead of `func(*args, **kwargs)`, when set: how a
        Celery task is enqueued rather than run here (post_response.celery)."""
        return (self._plan or _NO_PLAN).dispatch

    @property
    def key(self) -> str | None:
        """The key set with `set(key=...)`, or None."""
        return (self._plan or _NO_PLAN).key

    @property
    def delay(self) -> float | None:
        """The seconds set with `set(delay=...)`, or None."""
        return (self._plan or _NO_PLAN).delay

    @property
    def retries(self) -> int | None:
        """The retries set with `set(retries=...)`; None: the middleware's default."""
        return (self._plan or _NO_PLAN).retries

    @property
    def backoff(self) -> float | None:
        """The seconds set with `set(backoff=...)`; None: the middleware's default."""
        return (self._plan or _NO_PLAN).backoff

    @property
    def retry_on(self) -> type[Exception] | tuple[type[Exception], ...]:
        """What is worth a retry (`set(retry_on=...)`): `Exception` unless set."""
        return (self._plan or _NO_PLAN).retry_on

    @property
    def attempt(self) -> int:
        """The attempt running, or the last one run (1-based); 0 before the first.

        A task replayed from the journal goes on from the attempts of the processes that
        were handed it before (each counts as one, whether or not it got to run it).
        """
        return (self._plan or _NO_PLAN).tries + (self._started != 0.0)

    @property
    def replayed(self) -> bool:
        """Whether this task was replayed from the journal: left there by a process
        that is gone, which may have run it already (see `post_response.is_replay()`)."""
        from ._journal import replaying  # noqa: PLC0415  (only asked of a journal's tasks)

        return self.context.get(replaying, 0) > 0

    def _planned(self) -> Plan:
        """The task's plan, made on first use."""
        plan = self._plan
        if plan is None:
            plan = self._plan = Plan()
        return plan

    @property
    def name(self) -> str:
        """The name given with `set(name=...)`, else the callable's `module.qualname`."""
        return (self._plan or _NO_PLAN).name or describe(self.func)

    @property
    def request(self) -> str:
        """The request that added the task, as logs name it (`GET /path`)."""
        return self.request_tasks.label

    def set(
        self,
        *,
        name: str | None = None,
        timeout: float | _Unset | None = UNSET,
        always: bool | None = None,
        key: str | None = None,
        delay: float | None = None,
        retries: int | None = None,
        backoff: float | None = None,
        retry_on: type[Exception] | tuple[type[Exception], ...] | None = None,
        durable: bool | None = None,
    ) -> TaskHandle:
        """Set this task's options; returns the handle, so it chains onto `add_task()`.

        Args:
            name: The name used in logs and given to the error hook.
            timeout: Seconds the task may run before it is cancelled and reported as
                timed out; `None` for no limit. Defaults to the middleware's `timeout`.
                With retries, it applies to each attempt.
            always: Run the task whatever the request's outcome, even when the policy
                would skip it (the app raised, or answered 5xx).
            key: Run at most one task with this key at once, per process. In one request
                the last task added with a key replaces the earlier ones; across requests
                a new one replaces the one waiting to run. Replaced tasks end `superseded`.
            delay: Seconds to wait after the response before running the task; with a
                `key`, a debounce: it runs `delay` seconds after the last one added.
            retries: How many times to run the task again after it raised (an
                `Exception` matching `retry_on`). Defaults to the middleware's `retries`.
            backoff: Seconds before the first retry, doubled at each one (with jitter,
                at most 60 s). Defaults to the middleware's `backoff`.
            retry_on: The exception class, or a tuple of them, that is worth a retry
                (default: every `Exception`).
            durable: `False` takes the task out of the middleware's journal: it will
                not be replayed after a crash. (A task that cannot be journaled at all is
                refused by `add_task()` itself: wrap its callable in
                `post_response.volatile()` instead.)

        Raises:
            TaskStartedError: The task has already started (or ended).
            ConfigurationError: An option has an invalid value.
        """
        if self.state is not _PENDING:
            msg = (
                f"Task {self.name!r} is already {self.state.value}; set its options in the "
                "same statement as `add_task(...)`, e.g. `add_task(fn).set(timeout=5)`."
            )
            raise TaskStartedError(msg)
        if (key is not None or delay is not None) and self._plan is not None and self._plan.taken:
            msg = (
                f"Task {self.name!r} already waits for its delay, its key or its next attempt, "
                "so its key and delay can no longer change; set them in the same statement "
                "as `add_task(...)`, e.g. `add_task(fn).set(key=..., delay=5)`."
            )
            raise TaskStartedError(msg)
        if name is not None:
            if not isinstance(name, str) or not name:
                msg = f"A task name must be a non-empty string, got {name!r}."
                raise ConfigurationError(msg)
            # A plain copy: a str subclass's own __repr__ would write the log lines that name it.
            self._planned().name = str.__str__(name)
        if timeout is not UNSET:
            self._planned().timeout = check_timeout(timeout, "set(timeout=...)")
        if always is not None:
            self._planned().always = check_flag(always, "set(always=...)")
        if retries is not None or backoff is not None or retry_on is not None:
            self._set_retries(retries, backoff, retry_on)
        if delay is not None:
            self._planned().delay = check_delay(delay, "set(delay=...)")
        if key is not None:
            if not isinstance(key, str) or not key:
                msg = f"A task key must be a non-empty string, got {kind(key)}."
                raise ConfigurationError(msg)
            key = str.__str__(key)  # a plain copy, as for `name`
            self._planned().key = key
            # In one request the last call wins, at its own place in the order.
            earlier = self.request_tasks.keep_last(self, key)
            if earlier is not None and earlier.key == key and earlier.state is _PENDING:
                earlier._supersede()
        journal = self.request_tasks.journal
        if journal is not None:
            if durable is False:
                journal.ended(self, drop=True)
            else:
                journal.changed(self)  # a task added after the response may be written already
        return self

    def _set_retries(
        self,
        retries: int | None,
        backoff: float | None,
        retry_on: type[Exception] | tuple[type[Exception], ...] | None,
    ) -> None:
        if retries is not None:
            retries = check_retries(retries, "set(retries=...)")
            if retries and self.dispatch is not None:
                msg = (
                    f"Task {self.name!r} is enqueued to a task queue (Celery), which retries "
                    "tasks itself; retrying the enqueue too would run it twice. Drop "
                    "`retries=` and give the Celery task its own, e.g. "
                    "`@app.task(autoretry_for=(Exception,), max_retries=3)`."
                )
                raise ConfigurationError(msg)
            self._planned().retries = retries
        if backoff is not None:
            self._planned().backoff = check_backoff(backoff, "set(backoff=...)")
        if retry_on is not None:
            self._planned().retry_on = check_retry_on(retry_on)

    def cancel(self) -> bool:
        """Cancel the task if it has not started; returns whether it was cancelled.

        A task waiting for its delay, its key or its next attempt has not started either.
        """
        if self.state is not _PENDING:
            return False
        self._end(TaskState.CANCELLED)
        self._log(logging.INFO, "cancelled before it ran")
        self._let_go()
        return True

    def _supersede(self) -> None:
        """A newer task with this one's key replaced it before it ran."""
        self._end(TaskState.SUPERSEDED)
        self._log(logging.INFO, "superseded by a newer task with key %s", clipped(self.key or ""))
        self._let_go()

    def _let_go(self) -> None:
        """The task ended before it ran: if an owner holds it (for its delay, its key or
        its next attempt), it lets go of it now rather than once that wait is over."""
        held = None if self._plan is None else self._plan.held
        if held is not None and held.owner is not None:
            held.owner.let_go(held)

    # State changes, kept here so that the counters always match the states.

    def _enqueue(self) -> None:
        self._queued = True
        stats = self.request_tasks.stats
        stats.queued += 1
        if stats.metrics is not None:
            stats.metrics.queued(1)

    def _start(self) -> None:
        if self.state is not _PENDING:  # cancelled while it waited for a worker thread
            return
        stats = self.request_tasks.stats
        if self._queued:
            self._queued = False
            stats.queued -= 1
            if stats.metrics is not None:
                stats.metrics.queued(-1)
        self.state = TaskState.RUNNING
        stats.running += 1
        if stats.metrics is not None:
            stats.metrics.running(1)
        self._started = time.perf_counter()

    def _unqueue(self) -> None:
        """Stop counting the task as queued: it waits for its delay or its key, which
        holds no worker and no `max_running` slot (it is queued again when due)."""
        if self._queued:
            self._queued = False
            stats = self.request_tasks.stats
            stats.queued -= 1
            if stats.metrics is not None:
                stats.metrics.queued(-1)

    def _pause(self) -> None:
        """The attempt failed and another follows: the task is pending again."""
        stats = self.request_tasks.stats
        stats.running -= 1
        if stats.metrics is not None:
            stats.metrics.running(-1)
        self.duration = time.perf_counter() - self._started
        self.state = _PENDING
        self._started = 0.0
        self._planned().tries += 1

    def _end(self, state: TaskState, *, lost: bool = False) -> None:
        request = self.request_tasks
        if request.journal is not None and not lost and state not in _KEPT_IN_JOURNAL:
            request.journal.ended(self)  # it ran, or was deliberately not run
        stats = request.stats
        metrics, ran = stats.metrics, False
        if self._queued:
            self._queued = False
            stats.queued -= 1
            if metrics is not None:
                metrics.queued(-1)
        elif self.state is TaskState.RUNNING:
            stats.running -= 1
            self.duration = time.perf_counter() - self._started
            ran = True
        self.state = state
        stats.ended[state] += 1
        if metrics is not None:
            if ran:
                metrics.running(-1)
            metrics.ended(state, self.duration)
        # Here, where every runner ends a task, rather than in a method of its own: on the
        # hot path of a plain async task (`Owner._step`), one Python call more is measurable.
        if state is _COMPLETED and logger.isEnabledFor(_DEBUG):
            self._log(_DEBUG, "completed in %.1f ms", (self.duration or 0) * 1000)

    def _lose(self, state: TaskState, level: int, what: str, *args: object) -> None:
        """End in `state` a task the runtime could not run to its end: log it, and note it
        for `post_response.testing.wait_for_tasks()`."""
        self._end(state, lost=True)  # a journal keeps it: a next start runs it
        self._log(level, what, *args)
        note_lost(self)

    def _log(
        self, level: int, what: str, *args: object, exc_info: BaseException | None = None
    ) -> None:
        """Log "Task 'name' of GET /path <what>", with the task's fields for structured logs."""
        if not logger.isEnabledFor(level):
            return
        logger.log(
            level,
            "Task %r of %s " + what,
            self.name,
            self.request_tasks.label,
            *args,
            exc_info=exc_info,
            extra=self._fields(),
        )

    def _fields(self) -> dict[str, object]:
        """The task's structured log fields. The request's method and path are raw, as the
        client sent them (decoded by the server), for formatters that escape them."""
        request = self.request_tasks
        return {
            "task_name": self.name,
            "task_outcome": self.state.value,
            "task_duration": self.duration,
            "request_method": request.method,
            "request_path": request.path,
        }

    def __repr__(self) -> str:
        return f"<TaskHandle {self.name!r} {self.state.value}>"


class Plan:
    """A task's options and queue, and the state its key, delay and retries need while
    it runs."""

    __slots__ = (
        "always",
        "backoff",
        "cleared",
        "delay",
        "dispatch",
        "held",
        "key",
        "name",
        "pause",
        "retries",
        "retry_on",
        "taken",
        "timeout",
        "tries",
    )

    def __init__(self) -> None:
        self.name: str | None = None
        self.timeout: float | _Unset | None = UNSET
        self.always = False
        self.dispatch: Callable[[], object] | None = None
        self.key: str | None = None
        self.delay: float | None = None
        self.retries: int | None = None  # None: the middleware's `retries`
        self.backoff: float | None = None  # None: the middleware's `backoff`
        self.retry_on: type[Exception] | tuple[type[Exception], ...] = Exception
        self.tries = 0  # attempts that failed and were retried
        self.cleared = False  # the owner let it run: its delay is over, its key its own
        self.held: HeldBatch | None = None  # the owner's batch for it while it waits there
        self.taken = False  # the owner has it, by its key: key and delay can no longer change
        self.pause = 0.0  # seconds before the next attempt, slept by its batch (no owner)


_NO_PLAN = Plan()  # what a task without a plan reads; never changed


# The tasks the runtime lost (cancelled, abandoned, dropped), newest last, for the testing
# helpers to report: names, not handles, so that nothing of a request is kept alive.
lost: collections.deque[str] = collections.deque(maxlen=100)


def note_lost(task: TaskHandle) -> None:
    lost.append(f"{task.name!r} of {task.request_tasks.label} ({task.state.value})")


def add_task(func: Callable[P, object], /, *args: P.args, **kwargs: P.kwargs) -> TaskHandle:
    """Run `func(*args, **kwargs)` once the current response has been sent.

    Works anywhere inside a request handled by `PostResponseMiddleware`: an endpoint,
    a dependency, a sync view running in a worker thread, a library deep in the stack,
    or another task (which runs the new task in the same drain). Async callables are
    awaited on the event loop; sync ones run in a worker thread. The task sees the
    context variables as they are now.

    Returns:
        A `TaskHandle`: `.set(name=..., timeout=..., always=..., key=..., delay=...,
        retries=...)`, `.cancel()`, `.state`.

    Raises:
        InvalidTaskError: `func` is not callable, or is a generator function, whose body
            would never run (a `TypeError`).
        OutsideRequestError: No request handled by the middleware is running (a `RuntimeError`).
        RequestFinishedError: The request's tasks have all run already (a `RuntimeError`).
        TaskLimitError: The request reached the middleware's `max_tasks` (a `RuntimeError`).
    """
    if not callable(func):
        raise not_callable(func)
    code = getattr(func, "__code__", None)  # a plain function: one flag test, the usual case
    opted_out = False
    if code is None or code.co_flags & GENERATOR:
        if type(func) is Volatile:
            func, opted_out = func.func, True
            code = getattr(func, "__code__", None)
        flags = generator_flags(func, code)
        if flags:
            raise generator_function(func, flags)
    tasks = _context.current()
    if tasks is None:
        if not _context.captures:
            raise OutsideRequestError(_OUTSIDE_REQUEST)
        tasks = _context.captures[-1].request
    task = TaskHandle(func, args, kwargs, tasks)
    if tasks.dispatchers is not None:
        tasks.dispatchers.route(task)  # raises for a queued task whose arguments cannot travel
    if tasks.journal is not None:
        tasks.journal.add(task, volatile=opted_out)  # raises for one that cannot be journaled
        return task
    tasks.add(task)
    return task


class Volatile:
    """A callable marked to run without the journal: see `volatile()`."""

    __slots__ = ("func",)

    def __init__(self, func: Callable[..., object]) -> None:
        self.func = func

    def __call__(self, *args: object, **kwargs: object) -> object:
        return self.func(*args, **kwargs)

    def __repr__(self) -> str:
        return f"volatile({describe(self.func)})"


def volatile(func: Callable[P, R]) -> Callable[P, R]:
    """`func`, to be added as a task that the middleware's journal leaves out.

    With `journal=` on, `add_task()` refuses a task it cannot journal (a lambda, a bound
    method, arguments JSON cannot encode). `add_task(volatile(fn), obj)` runs it anyway,
    without the journal: it is lost if the process dies. `add_task()` unwraps it, so the
    task's `func` and name are `fn`'s. Without a journal it changes nothing.
    """
    if not callable(func):
        raise not_callable(func)
    return cast("Callable[P, R]", Volatile(func))


def cancel(key: str) -> int:
    """Cancel the current request's tasks with `key` that have not started.

    Like Laravel's `forget(name)`: a request that decided against work it scheduled
    takes it back. Returns how many tasks were cancelled.

    Raises:
        OutsideRequestError: No request handled by the middleware is running (a `RuntimeError`).
        ConfigurationError: `key` is not a non-empty string: no task can have it (a `ValueError`).
    """
    if not isinstance(key, str) or not key:  # `cancel(user.id)` for `key=f"user:{user.id}"`
        shown = "an empty string" if key == "" else kind(key)
        msg = (
            "cancel() takes a task's key, the non-empty string given to `set(key=...)`; "
            f"got {shown}, which no task can have."
        )
        raise ConfigurationError(msg)
    tasks = _context.current()
    if tasks is None:
        if not _context.captures:
            raise OutsideRequestError(_OUTSIDE_REQUEST.replace("add_task()", "cancel()", 1))
        tasks = _context.captures[-1].request
    return sum(task.cancel() for task in tasks.with_key(key))


_OUTSIDE_REQUEST = (
    "add_task() was called outside a request handled by PostResponseMiddleware. "
    "Wrap the ASGI app that serves the request: `app = PostResponseMiddleware(app)` "
    "(Starlette/FastAPI: `app.add_middleware(PostResponseMiddleware)`, but handlers of "
    "`Exception` and 500 run in Starlette's ServerErrorMiddleware, outside it: to add tasks "
    "there, wrap the app, `app = PostResponseMiddleware(app)`; Django: "
    "`PostResponseMiddleware(get_asgi_application())`; Quart: "
    "`app.asgi_app = PostResponseMiddleware(app.asgi_app)`; WSGI: "
    "`post_response.wsgi.PostResponseWSGIMiddleware`). If the app is wrapped, this code "
    "runs where the request's context was lost: in a thread started with "
    "`loop.run_in_executor` or `threading.Thread`; use `asyncio.to_thread` or "
    "`anyio.to_thread.run_sync`, which carry it. In tests, see `post_response.testing`."
)

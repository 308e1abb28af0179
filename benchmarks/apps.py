"""The ASGI apps under test, built the same way in-process and under uvicorn.

Each *system* (a bare raw app, ours, Starlette, asgi-background, fastapi-events) is built
by `build(system, work)`, where `work` says which tasks every request schedules: none,
no-op async or sync functions, a sleep, or a wait on a gate. uvicorn serves them through
the `from_env` factory, which reads the same two values from the environment:

    BENCH_SYSTEM=ours BENCH_WORK=sleep:1:0.5 uvicorn --factory benchmarks.apps:from_env

Every task function ticks `COUNTER`, so a driver can tell when a system's tasks are done,
whatever the system (Starlette's and fastapi-events' run inside the app call;
asgi-background's in a lifespan task group; ours in the owner's).
"""

from __future__ import annotations

import asyncio
import atexit
import gc
import importlib.util
import json
import os
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeAlias, cast

from post_response import PostResponseMiddleware, add_task

Scope: TypeAlias = MutableMapping[str, Any]
Message: TypeAlias = MutableMapping[str, Any]
Receive: TypeAlias = Callable[[], Awaitable[Message]]
Send: TypeAlias = Callable[[Message], Awaitable[None]]
ASGIApp: TypeAlias = Callable[[Scope, Receive, Send], Awaitable[None]]
TaskFunc: TypeAlias = Callable[..., Any]

__all__ = [
    "COUNTER",
    "GATE",
    "SYSTEMS",
    "Work",
    "available",
    "build",
    "from_env",
    "ours_middleware",
]

Kind = Literal["none", "async", "sync", "sleep", "gate", "cpu", "celery"]


@dataclass(frozen=True)
class Work:
    """What each request schedules: `count` tasks of one `kind` (sleeps last `seconds`)."""

    kind: Kind = "none"
    count: int = 1
    seconds: float = 0.0

    @property
    def tasks(self) -> int:
        """How many tasks one request schedules."""
        return 0 if self.kind == "none" else self.count

    @property
    def is_async(self) -> bool:
        return self.kind not in ("sync", "cpu")

    def encode(self) -> str:
        return f"{self.kind}:{self.count}:{self.seconds:g}"

    @classmethod
    def decode(cls, text: str) -> Work:
        kind, count, seconds = [*text.split(":"), "1", "0"][:3]
        if kind not in ("none", "async", "sync", "sleep", "gate", "cpu", "celery"):
            msg = f"unknown work kind {kind!r}"
            raise ValueError(msg)
        return cls(kind, int(count), float(seconds))  # type: ignore[arg-type]


NONE = Work()


class Counter:
    """Counts finished tasks: plain on the event loop, under a lock from worker threads."""

    def __init__(self) -> None:
        self.value = 0
        self._lock = threading.Lock()

    def tick(self) -> None:
        self.value += 1

    def tick_threadsafe(self) -> None:
        # `+=` is a read and a write: two threads may interleave between them.
        with self._lock:
            self.value += 1


COUNTER = Counter()


class Gate:
    """An event that memory tasks wait on; made afresh for each event loop that uses it."""

    def __init__(self) -> None:
        self.event: asyncio.Event | None = None

    def close(self) -> None:
        self.event = asyncio.Event()

    def open(self) -> None:
        if self.event is not None:
            self.event.set()

    async def wait(self) -> None:
        if self.event is not None:
            await self.event.wait()


GATE = Gate()


async def noop_async() -> None:
    COUNTER.tick()


def noop_sync() -> None:
    COUNTER.tick_threadsafe()


async def sleep_task(seconds: float) -> None:
    await asyncio.sleep(seconds)
    COUNTER.tick()


async def gate_task() -> None:
    await GATE.wait()
    COUNTER.tick()


def _iterations_for(seconds: float) -> int:
    """How many turns of `burn_cpu`'s loop take about `seconds` on this machine: timed
    five times, the fastest kept (a timing the process was preempted in is too slow, and
    would make every task burn less)."""
    turns, took = 200_000, []
    for _ in range(5):
        started = time.perf_counter()
        _burn(turns)
        took.append(time.perf_counter() - started)
    return max(1, int(turns * seconds / min(took)))


def _burn(turns: int) -> int:
    total = 0
    for i in range(turns):
        total += i * i
    return total


_CPU_TURNS: list[int] = []  # calibrated on first use


def burn_cpu() -> None:
    """About 50 ms of pure-Python work (holding the GIL), as a heavy task would."""
    if not _CPU_TURNS:
        _CPU_TURNS.append(_iterations_for(0.05))
    _burn(_CPU_TURNS[0])


def task_call(work: Work) -> tuple[TaskFunc, tuple[Any, ...]]:
    """The function each of a request's tasks calls, with its arguments."""
    if work.kind == "async":
        return noop_async, ()
    if work.kind == "sync":
        return noop_sync, ()
    if work.kind == "sleep":
        return sleep_task, (work.seconds,)
    if work.kind == "gate":
        return gate_task, ()
    if work.kind == "cpu":
        return burn_cpu, ()
    if work.kind == "celery":  # the same work, handed to a Celery worker (section g)
        return importlib.import_module("benchmarks.celery_app").burn, ()
    msg = "this work schedules no task"
    raise ValueError(msg)


# One response for every app: 200, "ok", with a Content-Length (keep-alive friendly).
BODY = b"ok"
HEADERS = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"2")]
START: Message = {"type": "http.response.start", "status": 200, "headers": HEADERS}
END: Message = {"type": "http.response.body", "body": BODY}


async def respond(send: Send) -> None:
    await send(START)
    await send(END)


async def answer_lifespan(receive: Receive, send: Send) -> None:
    """What a raw app that supports lifespan does: say yes to startup and shutdown."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def raw_app(before: Callable[[Scope], Awaitable[None]] | None = None) -> ASGIApp:
    """A raw ASGI app answering "ok"; `before(scope)` runs before it responds."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if before is not None:
                await before(scope)
            await respond(send)
        elif scope["type"] == "lifespan":
            await answer_lifespan(receive, send)

    return app


def bare(work: Work) -> ASGIApp:
    """The baseline: no middleware, no task."""
    del work
    return raw_app()


def raw_spawn(work: Work) -> ASGIApp:
    """The raw app starting each task itself as an asyncio task after its response: the
    practical limit for "run this later" (a strong reference keeps the task alive)."""
    func, args = task_call(work)
    running: set[asyncio.Task[Any]] = set()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await respond(send)
            for _ in range(work.count):
                task = asyncio.create_task(func(*args))
                running.add(task)
                task.add_done_callback(running.discard)
        elif scope["type"] == "lifespan":
            await answer_lifespan(receive, send)

    return app


def raw_await(work: Work) -> ASGIApp:
    """The raw app that sends its response, then runs each task itself before it returns:
    what `BackgroundTasks` do, without a framework (sync tasks in a thread)."""
    func, args = task_call(work)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await respond(send)
            for _ in range(work.count):
                await (func(*args) if work.is_async else asyncio.to_thread(func, *args))
        elif scope["type"] == "lifespan":
            await answer_lifespan(receive, send)

    return app


def _adding(work: Work) -> Callable[[Scope], Awaitable[None]] | None:
    """A `before` hook that calls our `add_task()` for each of the request's tasks."""
    if work.tasks == 0:
        return None
    func, args = task_call(work)
    count = work.count

    async def before(scope: Scope) -> None:
        for _ in range(count):
            add_task(func, *args)

    return before


def ours(work: Work) -> ASGIApp:
    """The raw app wrapped by PostResponseMiddleware (defaults: tasks detached)."""
    return PostResponseMiddleware(raw_app(_adding(work)))


def ours_unlimited(work: Work) -> ASGIApp:
    """The same with `max_running` and `max_queued` off: for the rows that need 10,000-25,000
    tasks at once (long sleep tasks), which measure capacity, not the default limits (with
    them, the tasks past 10,000 would wait, and past 20,000 be dropped)."""
    return PostResponseMiddleware(raw_app(_adding(work)), max_running=None, max_queued=None)


def ours_journal(work: Work) -> ASGIApp:
    """`ours` with the journal on: a SQLite file of its own in a fresh temporary folder."""
    folder = tempfile.mkdtemp(prefix="post_response-bench-")
    return PostResponseMiddleware(raw_app(_adding(work)), journal=os.path.join(folder, "j.db"))


def ours_inline(work: Work) -> ASGIApp:
    """The same with `detach=False`: tasks run inside the request's app call."""
    return PostResponseMiddleware(raw_app(_adding(work)), detach=False)


def _starlette(endpoint: Callable[..., Awaitable[Any]], middleware: list[Any]) -> ASGIApp:
    from starlette.applications import Starlette  # noqa: PLC0415  (an optional peer)
    from starlette.routing import Route  # noqa: PLC0415

    return Starlette(routes=[Route("/", endpoint)], middleware=middleware)


def starlette_plain(work: Work) -> ASGIApp:
    """A Starlette app returning a PlainTextResponse, no task."""
    from starlette.responses import PlainTextResponse  # noqa: PLC0415

    del work

    async def endpoint(request: object) -> PlainTextResponse:
        return PlainTextResponse("ok")

    return _starlette(endpoint, [])


def starlette_background(work: Work) -> ASGIApp:
    """The same Starlette app, its response carrying `BackgroundTasks`."""
    from starlette.background import BackgroundTasks  # noqa: PLC0415
    from starlette.responses import PlainTextResponse  # noqa: PLC0415

    func, args = task_call(work)

    async def endpoint(request: object) -> PlainTextResponse:
        tasks = BackgroundTasks()
        for _ in range(work.count):
            tasks.add_task(func, *args)
        return PlainTextResponse("ok", background=tasks)

    return _starlette(endpoint, [])


def starlette_ours(work: Work) -> ASGIApp:
    """The same Starlette app with ours, installed as the README says (first in the list)."""
    from starlette.middleware import Middleware  # noqa: PLC0415
    from starlette.responses import PlainTextResponse  # noqa: PLC0415

    before = _adding(work)

    async def endpoint(request: Any) -> PlainTextResponse:
        if before is not None:
            await before(request.scope)
        return PlainTextResponse("ok")

    return _starlette(endpoint, [Middleware(PostResponseMiddleware)])


def peer(module: str) -> Any:
    """An optional peer's module, untyped on purpose: the benchmarks type-check (and run,
    skipping that peer) where it is not installed."""
    return importlib.import_module(module)


def asgi_background(work: Work) -> ASGIApp:
    """The raw app with asgi-background: `await BackgroundTasks(scope).add_task(fn)`.

    It only takes async callables; its middleware needs lifespan (its task group lives
    there) and answers lifespan itself, so the app under it never sees that scope.
    """
    module = peer("asgi_background")
    func, args = task_call(work)

    async def before(scope: Scope) -> None:
        tasks = module.BackgroundTasks(scope)
        for _ in range(work.count):
            await tasks.add_task(func, *args)

    return cast("ASGIApp", module.BackgroundTaskMiddleware(raw_app(before)))


def fastapi_events(work: Work) -> ASGIApp:
    """The raw app with fastapi-events: `dispatch(name)` per task, and a `LocalHandler`
    whose handler for that name runs the task (its docs' set-up, with a private handler
    instance instead of the global `local_handler`)."""
    dispatch = peer("fastapi_events.dispatcher").dispatch
    middleware = peer("fastapi_events.middleware").EventHandlerASGIMiddleware
    func, args = task_call(work)
    handler = peer("fastapi_events.handlers.local").LocalHandler()
    if work.is_async:

        async def on_event(event: Any) -> None:
            await func(*args)

    else:

        def on_event(event: Any) -> None:  # type: ignore[misc]  # run in an executor
            func(*args)

    # fastapi-events inspects the handler's signature at every event, and compiles a
    # ForwardRef for each string annotation (this module's, under `from __future__ import
    # annotations`): give it real ones, as a module without that import would.
    on_event.__annotations__ = {"event": Any, "return": None}
    handler.register(on_event, event_name="bench")

    async def before(scope: Scope) -> None:
        for _ in range(work.count):
            dispatch("bench")

    return cast("ASGIApp", middleware(raw_app(before), handlers=[handler]))


@dataclass(frozen=True)
class System:
    build: Callable[[Work], ASGIApp]
    needs: str  # the module it imports: missing means the system is skipped
    label: str


SYSTEMS: dict[str, System] = {
    "bare": System(bare, "post_response", "bare raw app"),
    "raw-spawn": System(raw_spawn, "post_response", "raw app, asyncio.create_task"),
    "raw-await": System(raw_await, "post_response", "raw app, send then await the task"),
    "ours": System(ours, "post_response", "ours"),
    "ours-unlimited": System(ours_unlimited, "post_response", "ours, no max_running/max_queued"),
    "ours-inline": System(ours_inline, "post_response", "ours, detach=False"),
    "ours-journal": System(ours_journal, "post_response", "ours, journal on"),
    "starlette": System(starlette_plain, "starlette", "Starlette"),
    "starlette-bg": System(starlette_background, "starlette", "Starlette BackgroundTasks"),
    "starlette-ours": System(starlette_ours, "starlette", "Starlette + ours"),
    "asgi-background": System(asgi_background, "asgi_background", "asgi-background"),
    "fastapi-events": System(fastapi_events, "fastapi_events", "fastapi-events"),
}


def available(system: str) -> bool:
    """Whether the package a system needs is installed (peers are optional)."""
    return importlib.util.find_spec(SYSTEMS[system].needs) is not None


def build(system: str, work: Work = NONE) -> ASGIApp:
    return SYSTEMS[system].build(work)


def from_env() -> ASGIApp:
    """uvicorn's `--factory` entry: the app named by BENCH_SYSTEM, doing BENCH_WORK.

    With BENCH_GC_LOG set, the process also times its garbage collections and writes the
    totals to that file (JSON) when it exits: for `python -m benchmarks.profile`.
    """
    work = Work.decode(os.environ.get("BENCH_WORK", "none"))
    gc_log = os.environ.get("BENCH_GC_LOG")
    if gc_log:
        record_gc(gc_log)
    return build(os.environ["BENCH_SYSTEM"], work)


def record_gc(path: str) -> None:
    """Time every garbage collection, per generation; write the totals at exit."""
    totals = {generation: {"count": 0, "seconds": 0.0, "longest": 0.0} for generation in "012"}
    began = [0.0]

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            began[0] = time.perf_counter()
            return
        took, total = time.perf_counter() - began[0], totals[str(info["generation"])]
        total["count"] += 1
        total["seconds"] += took
        total["longest"] = max(total["longest"], took)

    def write() -> None:
        Path(path).write_text(json.dumps(totals))

    gc.callbacks.append(callback)
    atexit.register(write)


def ours_middleware(app: object) -> PostResponseMiddleware | None:
    """Our middleware instance inside `app`, following `.app` links (Starlette builds its
    middleware stack on the first call), or None."""
    for _ in range(10):
        if isinstance(app, PostResponseMiddleware):
            return app
        app = getattr(app, "middleware_stack", None) or getattr(app, "app", None)
        if app is None:
            return None
    return None

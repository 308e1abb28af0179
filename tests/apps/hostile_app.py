"""Tasks that misbehave, served by a raw ASGI app under PostResponseMiddleware.

They raise SystemExit, KeyboardInterrupt or other BaseExceptions, cancel themselves,
hide their names, hold worker threads, or keep adding tasks from a thread of their own
while their request's tasks end. Tests on real servers drive them (tests/test_hostile.py).

Run: python -m uvicorn tests.apps.hostile_app:app

Paths (each answers 200 "ok" with a Content-Length):

- `/hostile/<kind>/<id>` adds the hostile task `<kind>` (see `HOSTILE`), then `quick(<id>-after)`;
- `/quick/<id>`, `/gated/<id>`, `/blocked/<id>` add that one task;
- `/quick-sync/<id>?timeout=T` adds `quick_sync(<id>)`, with a timeout if given;
- `/sentinel/<id>?timeout=T` adds `gated(<id>)` with timeout T, to be left closed: the event
  `<id>:cancelled` then says that T seconds have passed since it started;
- `/adder/<id>` adds `spawn_adder(<id>)`; `/count/<n>` adds `count(<n>)`.

Controls beyond control.py's: `/_control/open?id=X` also opens the thread gate of a sync
task; `/_control/states?id=X` answers with the states of the tasks `/hostile/.../X` added;
`/_control/adder?id=X` answers once adder X's thread has stopped and its tasks have ended.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import json
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread

from post_response import (
    PostResponseMiddleware,
    RequestFinishedError,
    TaskHandle,
    TaskLimitError,
    add_task,
)
from post_response._types import ASGIApp, Receive, Scope, Send

from . import control
from .control import gated, note, options, query, record, with_controls

control.WAIT_LIMIT = 5  # fail fast: every task here is quick unless a test holds it

THREAD_WAIT = 20.0  # seconds a sync task blocks its thread when its gate stays closed
ADDS = 2000  # the most tasks one adder thread adds

HANDLES: dict[str, list[TaskHandle]] = {}  # per `/hostile/...` id: the hostile task, the next
_token: anyio.lowlevel.EventLoopToken | None = None
_sync_gates: dict[str, threading.Event] = {}
_sync_gates_lock = threading.Lock()


class Odd(BaseException):
    """Neither an Exception nor one of Python's own BaseExceptions."""


def say(event: str) -> None:
    """`note()` from a worker thread: on the event loop, where control.py's waiters live."""
    assert _token is not None
    anyio.from_thread.run_sync(note, event, token=_token)


def _sync_gate(task_id: str) -> threading.Event:
    with _sync_gates_lock:
        return _sync_gates.setdefault(task_id, threading.Event())


async def quick(task_id: str) -> None:
    note(f"{task_id}:start")
    note(f"{task_id}:end")


def quick_sync(task_id: str) -> None:
    say(f"{task_id}:start")
    say(f"{task_id}:end")


def blocked(task_id: str) -> None:
    """A sync task that holds its thread until its gate opens, or for `THREAD_WAIT` seconds."""
    say(f"{task_id}:start")
    if _sync_gate(task_id).wait(THREAD_WAIT):
        say(f"{task_id}:end")


async def count(number: int) -> None:
    await record(number)


# The hostile tasks. Each records its start, then misbehaves.


async def raise_system_exit(task_id: str) -> NoReturn:
    note(f"{task_id}:start")
    raise SystemExit(3)


def call_sys_exit(task_id: str) -> NoReturn:
    say(f"{task_id}:start")
    sys.exit(3)


async def raise_keyboard_interrupt(task_id: str) -> NoReturn:
    note(f"{task_id}:start")
    raise KeyboardInterrupt


def raise_keyboard_interrupt_sync(task_id: str) -> NoReturn:
    say(f"{task_id}:start")
    raise KeyboardInterrupt


async def raise_odd(task_id: str) -> NoReturn:
    note(f"{task_id}:start")
    raise Odd(f"odd {task_id}")


async def raise_cancelled_error(task_id: str) -> NoReturn:
    note(f"{task_id}:start")
    raise asyncio.CancelledError


async def cancel_itself(task_id: str) -> None:
    """Cancel the asyncio task this runs in (the middleware's), then let it take effect."""
    note(f"{task_id}:start")
    task = asyncio.current_task()
    assert task is not None
    task.cancel()
    await asyncio.sleep(0)


async def raise_generator_exit(task_id: str) -> NoReturn:
    note(f"{task_id}:start")
    raise GeneratorExit


class Nameless:
    """A callable whose `__qualname__` and `repr()` raise, and which fails."""

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id

    def __getattribute__(self, name: str) -> Any:
        if name == "__qualname__":
            raise RuntimeError(f"no {name} here")
        return object.__getattribute__(self, name)

    def __repr__(self) -> str:
        raise RuntimeError("no repr either")

    def __call__(self) -> NoReturn:
        say(f"{self.task_id}:start")
        raise ValueError(f"nameless {self.task_id}")


HOSTILE: dict[str, Callable[[str], object]] = {
    "system-exit": raise_system_exit,
    "sys-exit-sync": call_sys_exit,
    "keyboard-interrupt": raise_keyboard_interrupt,
    "keyboard-interrupt-sync": raise_keyboard_interrupt_sync,
    "odd": raise_odd,
    "cancelled-error": raise_cancelled_error,
    "self-cancel": cancel_itself,
    "generator-exit": raise_generator_exit,
}


# A task that starts a thread which adds tasks to the same request until it is told the
# request has finished; every task it managed to add must still end.

Adder = tuple[threading.Thread, list[TaskHandle], list[str]]
ADDERS: dict[str, Adder] = {}


async def noop() -> None:
    pass


def add_until_finished(handles: list[TaskHandle], outcome: list[str]) -> None:
    for _ in range(ADDS):
        try:
            handles.append(add_task(noop))
        except RequestFinishedError:
            outcome.append("finished")
            return
        except TaskLimitError:
            outcome.append("max_tasks reached")
            return
    outcome.append(f"stopped after {ADDS} tasks")


async def spawn_adder(run_id: str) -> None:
    handles: list[TaskHandle] = []
    outcome: list[str] = []
    context = contextvars.copy_context()  # the thread adds to this task's request
    thread = threading.Thread(
        target=context.run, args=(add_until_finished, handles, outcome), daemon=True
    )
    ADDERS[run_id] = (thread, handles, outcome)
    thread.start()
    note(f"{run_id}:start")


async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
    global _token  # noqa: PLW0603  (the loop's token, for the worker threads' notes)
    if scope["type"] != "http":  # lifespan: the middleware answers it
        return
    _token = anyio.lowlevel.current_token()
    route, *_, task_id = scope["path"].strip("/").split("/")
    params = query(scope)
    timeout = float(params["timeout"]) if "timeout" in params else None
    if route == "hostile":
        kind = scope["path"].split("/")[2]
        first = (
            add_task(Nameless(task_id)) if kind == "nameless" else add_task(HOSTILE[kind], task_id)
        )
        HANDLES[task_id] = [first, add_task(quick, f"{task_id}-after")]
    elif route == "quick":
        add_task(quick, task_id)
    elif route == "gated":
        add_task(gated, task_id)
    elif route == "blocked":
        add_task(blocked, task_id)
    elif route == "quick-sync":
        handle = add_task(quick_sync, task_id)
        if timeout is not None:
            handle.set(timeout=timeout)
    elif route == "sentinel":
        add_task(gated, task_id).set(timeout=timeout)
    elif route == "adder":
        add_task(spawn_adder, task_id)
    elif route == "count":
        add_task(count, int(task_id))
    await respond(send, b"ok", b"text/plain")


async def respond(send: Send, body: bytes, content_type: bytes) -> None:
    headers = [(b"content-type", content_type), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _states(params: dict[str, str]) -> Any:
    return [handle.state.value for handle in HANDLES.get(params["id"], [])]


async def _adder(params: dict[str, str]) -> Any:
    """Wait for the adder's thread to stop and the tasks to end; summarise its handles."""
    run_id = params["id"]
    with anyio.move_on_after(10):
        await control.wait_until(lambda: run_id in ADDERS)
    if run_id not in ADDERS:
        return {"error": f"adder {run_id} never started"}
    thread, handles, outcome = ADDERS.pop(run_id)
    await anyio.to_thread.run_sync(thread.join, 10.0)
    with anyio.move_on_after(5):
        await middleware.join()
    states = collections.Counter(handle.state.value for handle in handles)
    return {
        "added": len(handles),
        "outcome": outcome[-1] if outcome else "still adding",
        "states": dict(states),
    }


OWN_CONTROLS: dict[str, Callable[[dict[str, str]], Awaitable[Any]]] = {
    "/_control/states": _states,
    "/_control/adder": _adder,
}


def with_own_controls(app: ASGIApp) -> ASGIApp:
    """Answer this app's own controls; pass everything else to control.py's."""

    async def controlled(scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path in OWN_CONTROLS:
            body = await OWN_CONTROLS[path](query(scope))
            await respond(send, json.dumps(body).encode(), b"application/json")
            return
        if path == "/_control/open":
            _sync_gate(query(scope)["id"]).set()  # and control.py opens the async gate
        await app(scope, receive, send)

    return controlled


middleware = PostResponseMiddleware(endpoint, **options())
app = with_own_controls(with_controls(middleware, middleware))

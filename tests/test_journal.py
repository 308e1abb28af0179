"""The journal: what it refuses, what it writes and when, and what it replays."""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

import post_response
from post_response import (
    ConfigurationError,
    Journal,
    PostResponseMiddleware,
    TaskHandle,
    TaskNotDurableError,
    _journal,
    add_task,
)
from post_response._types import Message, Receive, Scope, Send

from .harness import Exchange, http_scope
from .journalfile import opened
from .test_wrapping import run_lifespan

pytestmark = pytest.mark.anyio

RAN: list[tuple[str, bool, int]] = []  # (what, is_replay(), attempt) for each run
DEADLINE = 10.0  # seconds a replay may take to show up


async def remember(what: str) -> None:
    """A journalable task: records that it ran, and whether as a replay."""
    RAN.append((what, post_response.is_replay(), 0))


HOLD: list[anyio.Event] = []  # what `held` waits for


async def held() -> None:
    """A journalable task that holds its running slot until the test sets HOLD[0]."""
    await HOLD[0].wait()


def remember_sync(what: str) -> None:
    RAN.append((what, post_response.is_replay(), 0))


class Unencodable:
    pass


def nested(depth: int) -> list[Any]:
    """A list in a list... `depth` deep: past the recursion limit, JSON cannot encode it."""
    outer: list[Any] = []
    inner = outer
    for _ in range(depth):
        inner.append([])
        inner = inner[0]
    return outer


@pytest.fixture(autouse=True)
def _forget_runs() -> None:
    RAN.clear()


def rows(path: Path) -> list[tuple[Any, ...]]:
    """The journal's entries, read by another connection, as another process would."""
    with opened(path) as db:
        db.executescript(_schema())  # the writer thread may not have made it yet
        return db.execute("SELECT func, payload, options, owner, dead FROM entries").fetchall()


def owners(path: Path) -> list[tuple[Any, ...]]:
    with opened(path) as db:
        return db.execute("SELECT id, pid, host, beat FROM owners").fetchall()


def app_adding(*calls: tuple[Any, ...], handles: list[TaskHandle] | None = None) -> Any:
    """A raw app that calls `add_task(*call)` for each call, then answers 200."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        for call in calls:
            handle = add_task(*call)
            if handles is not None:
                handles.append(handle)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return app


class DiskAtBody(Exchange):
    """An exchange that reads the journal file when the response's body (or the message
    of type `at`) arrives."""

    def __init__(self, path: Path, at: str = "http.response.body") -> None:
        super().__init__()
        self.path = path
        self.at = at
        self.at_body: list[tuple[Any, ...]] = []

    async def send(self, message: Message) -> None:
        if message["type"] == self.at:
            self.at_body = rows(self.path)
        await super().send(message)


class EndsWhenLogged(logging.Handler):
    """Calls `end()` once, in the thread that logs it, on the first record saying one of
    `what`."""

    def __init__(self, what: tuple[str, ...], end: Callable[[], object]) -> None:
        super().__init__(logging.DEBUG)
        self.what = what
        self.end: Callable[[], object] | None = end

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if self.end is not None and any(what in message for what in self.what):
            end, self.end = self.end, None
            end()


def dead_pid() -> int:
    """The pid of a process that has exited."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def plant(
    path: Path,
    func: str,
    payload: str,
    *,
    pid: int,
    beat: float | None = None,
    host: str | None = None,
    deliveries: int = 0,
) -> int:
    """Write an owner record with `pid` and one entry it owns; return the owner's id."""
    owner = uuid.uuid4().int >> 65
    with opened(path) as db:
        db.executescript(_schema())
        db.execute(
            "INSERT INTO owners VALUES (?, ?, ?, ?)",
            (
                owner,
                pid,
                _journal.this_host() if host is None else host,
                time.time() if beat is None else beat,
            ),
        )
        db.execute(
            "INSERT INTO entries (origin, seq, owner, func, payload, method, path, added, "
            "deliveries) VALUES (?, 1, ?, ?, ?, 'GET', '/planted', ?, ?)",
            (owner, owner, func, payload, time.time(), deliveries),
        )
    return owner


def _schema() -> str:
    return _journal._SCHEMA


async def heartbeats(path: Path, journal: Journal, count: int) -> None:
    """Wait until `journal`'s owner record has been refreshed `count` more times."""
    origin = journal.writer().origin
    seen: set[float] = set()
    with anyio.fail_after(DEADLINE):
        while len(seen) <= count:
            seen |= {beat for owner, _, _, beat in owners(path) if owner == origin}
            await anyio.sleep(0.01)


async def wait_for_runs(count: int) -> None:
    with anyio.fail_after(DEADLINE):
        while len(RAN) < count:
            await anyio.sleep(0.01)


# The option and what it refuses.


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"journal": 3}, "must be the path of the journal's SQLite file"),
        ({"journal": ""}, "must be the path of the journal's SQLite file"),
    ],
)
async def test_a_wrong_journal_option_is_refused_with_the_fix(
    options: dict[str, Any], message: str
) -> None:
    """`journal=` takes a path or a `Journal`; anything else names both."""
    with pytest.raises(ConfigurationError, match=message):
        PostResponseMiddleware(app_adding(), **options)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"durability": "fsync"}, "durability"),
        ({"lease": 0}, "lease"),
        ({"lease": True}, "lease"),
        ({"lease": 0.01}, r"Journal\(lease=...\) must be a number of seconds, 0.1 or more"),
        ({"lease": math.inf}, r"got inf"),
        ({"lease": math.nan}, r"got nan"),
        ({"lease": 10**400}, r"got an int of 1329 bits"),  # no float holds it
        ({"max_replays": -1}, "max_replays"),
        ({"max_replays": 2.5}, "max_replays"),
        ({"max_replays": True}, "max_replays"),
        ({"serializer": object()}, r"must have `dumps\(obj\) -> str \| bytes`"),
        ({"serializer": "json"}, "serializer"),
    ],
)
async def test_a_wrong_journal_setting_is_refused(options: dict[str, Any], message: str) -> None:
    """`Journal(...)` checks its durability, lease, serializer and replay limit when built."""
    with pytest.raises(ConfigurationError, match=message):
        Journal("x.db", **options)


@pytest.mark.parametrize("path", [":memory:", "", 3, None])
async def test_a_journal_path_that_keeps_nothing_is_refused(path: Any) -> None:
    """`:memory:` and an empty name are databases SQLite drops with the process: a journal
    there would replay nothing, silently."""
    with pytest.raises(ConfigurationError, match="must be the path of a SQLite file that outlives"):
        Journal(path)
    if path == ":memory:":
        with pytest.raises(ConfigurationError, match="SQLite drops that database"):
            PostResponseMiddleware(app_adding(), journal=path)


def _local() -> Any:
    def inner() -> None: ...

    return inner


class _Holder:
    def method(self) -> None: ...


@pytest.mark.parametrize(
    ("call", "why"),
    [
        ((lambda: None,), "not a module-level function"),
        ((_local(),), "not a module-level function"),
        ((_Holder().method,), "does not give it back"),
        ((remember, Unencodable()), "arguments cannot be encoded"),
        ((remember, nested(100_000)), "arguments cannot be encoded"),
    ],
    ids=["lambda", "local function", "bound method", "object argument", "nested too deep"],
)
async def test_a_task_that_cannot_be_journaled_is_refused_at_add_task(
    tmp_path: Path, call: tuple[Any, ...], why: str
) -> None:
    """With the journal on, add_task() raises a TypeError that names the fix: a
    module-level function, ids for arguments, or `volatile()`."""
    errors: list[BaseException] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            add_task(*call)
        except TypeError as exc:
            errors.append(exc)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    middleware = PostResponseMiddleware(app, journal=tmp_path / "j.db")
    await Exchange().run(middleware)
    [error] = errors
    assert isinstance(error, TaskNotDurableError)
    assert why in str(error)
    assert "module-level function" in str(error)
    assert "post_response.volatile(" in str(error)


async def test_volatile_runs_a_task_the_journal_cannot_take_and_leaves_it_out(
    tmp_path: Path,
) -> None:
    """`add_task(volatile(fn), obj)` runs `fn` (the handle names it), with nothing on disk."""
    journal = tmp_path / "j.db"
    handles: list[TaskHandle] = []
    app = app_adding((post_response.volatile(remember_sync), Unencodable()), handles=handles)
    exchange = DiskAtBody(journal)
    await exchange.run(PostResponseMiddleware(app, journal=journal))
    assert exchange.at_body == []
    [handle] = handles
    assert handle.func is remember_sync
    assert handle.name == "tests.test_journal.remember_sync"
    assert len(RAN) == 1


async def test_set_durable_false_takes_a_task_out_of_the_journal(tmp_path: Path) -> None:
    """`.set(durable=False)` removes a journaled task's entry before the response ends."""
    journal = tmp_path / "j.db"

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        add_task(remember, "kept")
        add_task(remember, "out").set(durable=False)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    exchange = DiskAtBody(journal)
    await exchange.run(PostResponseMiddleware(app, journal=journal))
    assert [row[1] for row in exchange.at_body] == ['[["kept"],{}]']


async def test_volatile_without_a_journal_changes_nothing() -> None:
    """Without `journal=`, a `volatile()` task is an ordinary task."""
    handles: list[TaskHandle] = []
    app = app_adding((post_response.volatile(remember), "x"), handles=handles)
    await Exchange().run(PostResponseMiddleware(app))
    assert handles[0].func is remember
    assert RAN == [("x", False, 0)]


# What is written, and when.


async def test_the_entry_is_on_disk_before_the_body_and_gone_once_the_task_ran(
    tmp_path: Path,
) -> None:
    """The body is forwarded only once the task's entry is committed; the entry is
    deleted once the task has completed, and the owner record at shutdown."""
    journal = tmp_path / "j.db"
    middleware = PostResponseMiddleware(app_adding((remember, "a")), journal=journal)
    exchange = DiskAtBody(journal)
    await exchange.run(middleware)
    [(func, payload, options, _, dead)] = exchange.at_body
    assert (func, payload, options, dead) == (
        "tests.test_journal:remember",
        '[["a"],{}]',
        None,
        None,
    )
    assert RAN == [("a", False, 0)]
    await middleware.config.journal.close()  # type: ignore[union-attr]
    assert rows(journal) == []
    assert owners(journal) == []


@pytest.mark.parametrize("ending", ["http.response.pathsend", "http.response.zerocopysend"])
async def test_a_response_that_ends_with_a_file_waits_for_the_commit_too(
    tmp_path: Path, ending: str
) -> None:
    """`pathsend` and `zerocopysend` end a response as the body does: they are forwarded
    only once the request's entries are committed."""
    journal = tmp_path / "j.db"

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        add_task(remember, "file")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": ending, "path": "/dev/null", "file": 0})

    middleware = PostResponseMiddleware(app, journal=journal)
    exchange = DiskAtBody(journal, at=ending)
    await exchange.run(middleware)
    assert [func for func, *_ in exchange.at_body] == ["tests.test_journal:remember"]
    await middleware.join()
    assert RAN == [("file", False, 0)]
    await middleware.config.journal.close()  # type: ignore[union-attr]
    assert rows(journal) == []


async def test_a_new_journal_another_process_is_switching_to_wal_is_opened_once_it_is_done(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two processes opening a new journal at once both switch it to WAL: SQLite refuses
    the one that finds the other holding the write lock at once, whatever busy_timeout
    says. The writer tries again, and journals its tasks once the other is done."""
    caplog.set_level(logging.DEBUG, "post_response")
    journal = tmp_path / "j.db"
    middleware = PostResponseMiddleware(app_adding((remember, "a")), journal=journal)
    exchange = DiskAtBody(journal)
    other = sqlite3.connect(journal, isolation_level=None, check_same_thread=False)
    # The other process's state while it switches: the write lock (RESERVED) taken, waiting
    # for the read locks to go. It lets go once the writer was refused (in the writer's
    # thread, as it logs: then, with or without a retry, nothing else waits for the lock).
    done = EndsWhenLogged(("opening it again", "could not be opened"), other.rollback)
    logger = logging.getLogger("post_response")
    try:
        other.execute("BEGIN IMMEDIATE")
        logger.addHandler(done)
        await exchange.run(middleware)
    finally:
        logger.removeHandler(done)
        other.close()
    assert "could not be opened" not in caplog.text
    assert [func for func, *_ in exchange.at_body] == ["tests.test_journal:remember"]
    assert RAN == [("a", False, 0)]
    assert "opening it again" in caplog.text  # it was refused first, and said so
    await middleware.config.journal.close()  # type: ignore[union-attr]
    assert rows(journal) == []


async def test_a_tasks_options_are_journaled_with_it(tmp_path: Path) -> None:
    """The options set on the handle after add_task() are in its entry, read at write time."""
    journal = tmp_path / "j.db"

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        add_task(remember, "o").set(
            name="named", timeout=5, always=True, key="k", retries=2, retry_on=ValueError
        )
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    exchange = DiskAtBody(journal)
    await exchange.run(PostResponseMiddleware(app, journal=journal))
    [(_, _, options, _, _)] = exchange.at_body
    assert json.loads(options) == {
        "name": "named",
        "timeout": 5,
        "always": True,
        "key": "k",
        "retries": 2,
        "retry_on": ["builtins:ValueError"],
    }


async def test_entries_are_deleted_by_primary_key_one_origin_at_a_time() -> None:
    """A deletion searches the primary key for each entry, one statement per origin: the
    row-value form `(origin, seq) IN (VALUES ...)` scans every waiting task's entry."""
    with contextlib.closing(sqlite3.connect(":memory:")) as db:  # 3.13 warns if left open
        db.executescript(_journal._SCHEMA)
        plan = db.execute("EXPLAIN QUERY PLAN " + _journal._deleting(4), [1] * 5).fetchall()
    assert [row[3] for row in plan] == ["SEARCH entries USING PRIMARY KEY (origin=? AND seq=?)"]
    assert _journal._by_origin([7, 1, 7, 2, 9, 5, 7, 3]) == [[7, 1, 2, 3], [9, 5]]
    assert _journal._by_origin([7, 1, 7, 2]) == [[7, 1, 2]]
    assert _journal._by_origin([]) == []


# Replay.


async def test_entries_of_a_dead_process_are_replayed_once_and_leave_the_journal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An entry whose owner's pid is gone runs again in the next process to open the
    journal, as a replay (`is_replay()`, `attempt` going on), then leaves the file."""
    journal = tmp_path / "j.db"
    pid = dead_pid()
    plant(journal, "tests.test_journal:remember", '[["left"],{}]', pid=pid)
    middleware = PostResponseMiddleware(app_adding(), journal=journal)
    with caplog.at_level(logging.INFO, "post_response"):
        await Exchange().run(middleware)  # the first request opens the journal
        await wait_for_runs(1)
        await middleware.join()
    assert RAN == [("left", True, 0)]
    assert f"replaying 1 tasks left by processes that are gone (pids {pid})" in caplog.text
    assert "Task 'tests.test_journal.remember' of GET /planted replayed" in caplog.text
    await middleware.config.journal.close()  # type: ignore[union-attr]
    assert rows(journal) == []


async def test_the_entries_of_a_live_owner_are_never_taken(tmp_path: Path) -> None:
    """An owner on this host whose pid is alive keeps its entries, even with its
    heartbeat late, however many heartbeats the other process makes; once its process
    is gone, they are taken and run."""
    journal = tmp_path / "j.db"
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        owner = plant(
            journal,
            "tests.test_journal:remember",
            '[["alive"],{}]',
            pid=alive.pid,
            beat=time.time() - 0.6,  # two leases late
        )
        the_journal = Journal(journal, lease=0.3)  # a heartbeat every 0.1 s
        middleware = PostResponseMiddleware(app_adding(), journal=the_journal)
        await Exchange().run(middleware)
        await heartbeats(journal, the_journal, 4)  # each one looks for owners that are gone
        assert RAN == []
        assert [row[3] for row in rows(journal)] == [owner]
    finally:
        alive.kill()
        alive.wait()
    await wait_for_runs(1)
    assert RAN == [("alive", True, 0)]
    await middleware.join()
    await the_journal.close()


async def test_an_owner_on_another_host_is_gone_once_past_its_lease(tmp_path: Path) -> None:
    """On another host no pid can be probed: a heartbeat older than the lease decides."""
    journal = tmp_path / "j.db"
    beating = time.time() + 3600  # as if it beat all through the test
    plant(
        journal,
        "tests.test_journal:remember",
        '[["far"],{}]',
        pid=1,
        host="elsewhere",
        beat=beating,
    )
    stale = plant(
        journal, "tests.test_journal:remember", '[["late"],{}]', pid=1, host="elsewhere", beat=1.0
    )
    the_journal = Journal(journal, lease=0.3)
    middleware = PostResponseMiddleware(app_adding(), journal=the_journal)
    await Exchange().run(middleware)
    await wait_for_runs(1)
    await middleware.join()
    assert RAN == [("late", True, 0)]
    assert stale not in {owner for owner, *_ in owners(journal)}
    await the_journal.close()


async def test_an_entry_whose_callable_is_gone_is_kept_as_dead_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An entry whose callable is gone is never dropped silently: logged, marked dead,
    kept in the file for whoever reads it, and not tried again."""
    journal = tmp_path / "j.db"
    plant(journal, "tests.nowhere:gone\n", "[[],{}]", pid=dead_pid())
    the_journal = Journal(journal, lease=0.3)
    middleware = PostResponseMiddleware(app_adding(), journal=the_journal)
    with caplog.at_level(logging.ERROR, "post_response"):
        await Exchange().run(middleware)
        with anyio.fail_after(DEADLINE):
            while not rows(journal)[0][4]:
                await anyio.sleep(0.01)
    [(_, _, _, _, dead)] = rows(journal)
    assert dead.startswith("ModuleNotFoundError")
    assert "tests.nowhere:gone\\n cannot be loaded" in caplog.text  # escaped: one line
    await the_journal.close()
    assert len(rows(journal)) == 1


@pytest.mark.parametrize(("replays", "runs"), [(1, True), (2, False)])
async def test_an_entry_replayed_max_replays_times_is_given_up_on_as_dead(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, replays: int, runs: bool
) -> None:
    """With `max_replays=2`, an entry replayed once already runs again; one replayed twice
    (its process died each time: a task that crashes it?) is logged and kept as dead."""
    journal = tmp_path / "j.db"
    plant(journal, "tests.test_journal:remember", '[["x"],{}]', pid=dead_pid(), deliveries=replays)
    the_journal = Journal(journal, max_replays=2)
    middleware = PostResponseMiddleware(app_adding(), journal=the_journal)
    with caplog.at_level(logging.ERROR, "post_response"):
        await Exchange().run(middleware)
        with anyio.fail_after(DEADLINE):
            while not (RAN or (rows(journal) and rows(journal)[0][4])):
                await anyio.sleep(0.01)
        await middleware.join()
    await the_journal.close()
    if runs:
        assert RAN == [("x", True, 0)]
        assert rows(journal) == []
    else:
        assert RAN == []
        [(_, _, _, _, dead)] = rows(journal)
        assert dead == "given up after 2 replays (max_replays)"
        assert "was replayed 2 times, and each time its process was gone" in caplog.text


async def test_a_replayed_task_knows_it_through_its_handle(tmp_path: Path) -> None:
    """`handle.replayed` and `handle.attempt` tell a replay from a first run."""
    journal = tmp_path / "j.db"
    seen: list[tuple[bool, int]] = []
    plant(journal, "tests.test_journal:remember", '[["h"],{}]', pid=dead_pid())

    def on_error(task: TaskHandle, exc: BaseException) -> None:
        seen.append((task.replayed, task.attempt))

    middleware = PostResponseMiddleware(app_adding(), journal=journal, on_error=on_error)
    global remember  # noqa: PLW0603  (the planted entry names this function)
    original = remember

    async def failing(what: str) -> None:
        RAN.append((what, post_response.is_replay(), 0))
        raise ValueError(what)

    remember = failing
    failing.__qualname__ = "remember"
    try:
        await Exchange().run(middleware)
        await wait_for_runs(1)
        await middleware.join()
    finally:
        remember = original
    assert seen == [(True, 2)]  # the dead process was handed attempt 1
    await middleware.config.journal.close()  # type: ignore[union-attr]


async def test_a_task_the_request_refuses_leaves_no_entry(tmp_path: Path) -> None:
    """Past `max_tasks`, add_task() raises, and the refused task is not journaled either."""
    journal = tmp_path / "j.db"
    errors: list[BaseException] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        add_task(remember, "first")
        try:
            add_task(remember, "second")
        except post_response.TaskLimitError as exc:
            errors.append(exc)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    exchange = DiskAtBody(journal)
    middleware = PostResponseMiddleware(app, journal=journal, max_tasks=1)
    await exchange.run(middleware)
    assert len(errors) == 1
    assert [row[1] for row in exchange.at_body] == ['[["first"],{}]']
    await middleware.config.journal.close()  # type: ignore[union-attr]
    assert rows(journal) == []


async def test_a_request_cancelled_while_it_waits_for_the_commit_leaves_the_others_waiting(
    tmp_path: Path,
) -> None:
    """On asyncio the requests of one event loop await one future for their commit: a
    request cancelled while it waits ends at once, and cancels no other; those still get
    the end of their response only once their entries are committed."""
    journal = tmp_path / "j.db"
    ready = {name: anyio.Event() for name in "abc"}
    ended = {name: anyio.Event() for name in "abc"}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        name = scope["path"].strip("/")
        add_task(remember, name)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        ready[name].set()  # what follows does not yield before it waits for the commit
        await send({"type": "http.response.body", "body": name.encode()})

    middleware = PostResponseMiddleware(app, journal=journal)
    await Exchange().run(middleware, path="/a")  # the writer is up, its file made
    exchanges = {name: DiskAtBody(journal) for name in "bc"}
    scopes = {name: anyio.CancelScope() for name in "bc"}

    async def request(name: str) -> None:
        with scopes[name]:
            await exchanges[name].run(middleware, path=f"/{name}")
        ended[name].set()

    blocker = sqlite3.connect(journal, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # no commit until it lets go
        async with anyio.create_task_group() as group:
            for name in "bc":
                group.start_soon(request, name)
            with anyio.fail_after(DEADLINE):
                await ready["b"].wait()
                await ready["c"].wait()
                scopes["b"].cancel()
                await ended["b"].wait()  # at once: nothing was committed meanwhile
            assert scopes["b"].cancelled_caught
            assert [m["type"] for m in exchanges["b"].sent] == ["http.response.start"]
            assert [m["type"] for m in exchanges["c"].sent] == ["http.response.start"]
            blocker.execute("ROLLBACK")
            with anyio.fail_after(DEADLINE):
                await ended["c"].wait()
    finally:
        blocker.close()
    assert not scopes["c"].cancelled_caught
    assert [m["type"] for m in exchanges["c"].sent][-1] == "http.response.body"
    assert "tests.test_journal:remember" in [func for func, *_ in exchanges["c"].at_body]
    await middleware.config.journal.close()  # type: ignore[union-attr]


# What a damaged or tampered file holds: each bad row is a dead entry, never the journal's end.

# Entries a process that is gone left, each wrong in one way (func, payload, method).
BAD_ENTRIES = [
    ("tests.test_journal:remember", "[1, {}]", "GET", "arguments are not a list"),
    ("tests.test_journal:remember", '["ab", {}]', "GET", "arguments are not a list"),
    ("tests.test_journal:remember", "[[], []]", "GET", "keyword arguments are not an object"),
    ("tests.test_journal:DEADLINE", "[[], {}]", "GET", "is not callable"),
    (b"\xff\xfe", "[[], {}]", "GET", "ValueError"),  # not UTF-8: stored as a BLOB
    ("tests.test_journal:remember", '[["blob method"], {}]', b"\xff", None),  # runs
]


def plant_rows(path: Path, owner_row: tuple[Any, ...], entries: list[tuple[Any, ...]]) -> None:
    """Write an owner record as given (any types, as a damaged file may hold them) and the
    entries it owns, in order (seq 1, 2, ...)."""
    with opened(path) as db:
        db.executescript(_schema())
        db.execute("INSERT INTO owners VALUES (?, ?, ?, ?)", owner_row)
        db.executemany(
            "INSERT INTO entries (origin, seq, owner, func, payload, method, path, added) "
            "VALUES (?, ?, ?, ?, ?, ?, '/planted', ?)",
            [
                (owner_row[0], seq, owner_row[0], func, payload, method, time.time() + seq)
                for seq, (func, payload, method) in enumerate(entries, 1)
            ],
        )


async def test_damaged_entries_are_kept_as_dead_and_the_rest_still_replay(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each entry that cannot be run as written (arguments of the wrong shape, a callable
    that is not one, text that is not UTF-8) is logged on one line and kept as dead; the
    good entries of the same claim still run, and the journal goes on journaling."""
    journal = tmp_path / "j.db"
    owner = uuid.uuid4().int >> 65
    entries = [row[:3] for row in BAD_ENTRIES] + [
        ("tests.test_journal:remember", '[["good"], {}]', "GET")
    ]
    plant_rows(journal, (owner, dead_pid(), _journal.this_host(), time.time()), entries)
    the_journal = Journal(journal, lease=0.3)
    middleware = PostResponseMiddleware(app_adding((remember, "new")), journal=the_journal)
    with caplog.at_level(logging.ERROR, "post_response"):
        await Exchange().run(middleware)
        await wait_for_runs(3)  # "new", and the two good entries
        await middleware.join()
        await heartbeats(journal, the_journal, 2)  # the writer went on after the claim
    assert sorted(what for what, _, _ in RAN) == ["blob method", "good", "new"]
    assert the_journal.writer().is_alive()
    assert "stopped" not in caplog.text
    with opened(journal) as db:  # the last bad one ran: its method is only for logs
        dead = [reason for (reason,) in db.execute("SELECT dead FROM entries ORDER BY seq")]
    for (_, _, _, reason), found in zip(BAD_ENTRIES[:-1], dead, strict=True):
        assert reason is not None
        assert reason in found
    cannot = [r for r in caplog.records if "cannot be replayed" in r.getMessage()]
    assert len(cannot) == len(BAD_ENTRIES) - 1
    assert all("\n" not in r.getMessage() for r in cannot)
    await the_journal.close()


async def test_an_owner_record_of_the_wrong_types_is_judged_by_its_heartbeat(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An owner record whose pid and heartbeat are not numbers (a damaged file) neither
    stops the journal nor keeps its entries forever: with no pid to probe and no
    heartbeat to trust, it is gone, and its entries replay."""
    journal = tmp_path / "j.db"
    owner = uuid.uuid4().int >> 65
    plant_rows(
        journal,
        (owner, "not a pid", _journal.this_host(), "not a time"),
        [("tests.test_journal:remember", '[["odd owner"], {}]', "GET")],
    )
    the_journal = Journal(journal, lease=0.3)
    middleware = PostResponseMiddleware(app_adding(), journal=the_journal)
    with caplog.at_level(logging.ERROR, "post_response"):
        await Exchange().run(middleware)
        await wait_for_runs(1)
        await middleware.join()
        await heartbeats(journal, the_journal, 2)
    assert RAN == [("odd owner", True, 0)]
    assert the_journal.writer().is_alive()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    await the_journal.close()


async def test_a_request_path_sqlite_cannot_store_is_journaled_as_printable_text(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A path with a lone surrogate (a middleware that decoded the raw path with
    surrogateescape) cannot be stored as text: the entry is written with the path as
    printable text, before the body as always, instead of its commit failing."""
    journal = tmp_path / "j.db"
    exchange = DiskAtBody(journal)
    middleware = PostResponseMiddleware(app_adding((remember, "odd path")), journal=journal)
    scope = http_scope(raw_path=b"/caf\xe9")
    scope["path"] = b"/caf\xe9".decode("utf-8", "surrogateescape")
    with caplog.at_level(logging.WARNING, "post_response"):
        await exchange.run(middleware, scope)
    assert [row[1] for row in exchange.at_body] == ['[["odd path"],{}]']
    with opened(journal) as db:
        assert db.execute("SELECT path FROM entries").fetchall() == [("/caf\\udce9",)]
    assert "cannot be stored as it is" in caplog.text
    assert RAN == [("odd path", False, 0)]
    assert middleware.config.journal.writer().is_alive()  # type: ignore[union-attr]
    await middleware.config.journal.close()  # type: ignore[union-attr]
    assert rows(journal) == []


class _Surrogates:
    """A serializer that keeps non-ASCII text as it is (`ensure_ascii=False`)."""

    @staticmethod
    def dumps(obj: Any) -> str:
        return json.dumps(obj, ensure_ascii=False)

    @staticmethod
    def loads(data: str | bytes) -> Any:
        return json.loads(data)


class _NotText(_Surrogates):
    """A serializer that forgets to encode what it does not know (here: "x")."""

    @staticmethod
    def dumps(obj: Any) -> Any:
        return obj if obj == [["x"], {}] else json.dumps(obj)


@pytest.mark.parametrize(
    ("serializer", "argument", "message"),
    [
        (_Surrogates(), "caf\udce9", "returned text SQLite cannot store"),
        (_NotText(), "x", "returned list, not str or bytes"),
    ],
)
async def test_a_serializer_whose_output_sqlite_cannot_store_is_refused_at_add_task(
    tmp_path: Path, serializer: Any, argument: str, message: str
) -> None:
    """What a serializer gives must be str (valid UTF-8) or bytes: anything else is refused
    when the task is added, naming the task, not when the commit fails."""
    journal = Journal(tmp_path / "j.db", serializer=serializer)
    errors: list[Exception] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            add_task(remember, argument)
        except TaskNotDurableError as exc:
            errors.append(exc)
        add_task(remember, "fine")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    await Exchange().run(PostResponseMiddleware(app, journal=journal))
    [error] = errors
    assert message in str(error)
    assert "remember" in str(error)
    assert RAN == [("fine", False, 0)]
    await journal.close()


async def test_a_journal_that_cannot_be_opened_is_logged_and_holds_nothing_after(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A file that cannot be opened (its folder is missing) is logged as an error, once;
    tasks still run, and from then on requests journal nothing: before, each task's row
    stayed queued for a writer thread that was gone, for the life of the process."""
    journal = Journal(tmp_path / "missing" / "j.db")
    middleware = PostResponseMiddleware(app_adding((remember, "x")), journal=journal)
    with caplog.at_level(logging.ERROR, "post_response"):
        await Exchange().run(middleware)  # opens the journal: its thread fails
        writer = journal.writer()
        await anyio.to_thread.run_sync(writer.join, DEADLINE)
        for _ in range(20):
            await Exchange().run(middleware)
    assert len(RAN) == 21
    assert (writer._plain, writer._rich, writer._ended, writer._deletes) == ([], [], [], [])
    [error] = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert "could not be opened; tasks are not journaled" in error
    await journal.close()


async def lifespan_app(scope: Scope, receive: Receive, send: Send) -> None:
    """An app that speaks lifespan: it completes whatever it is asked."""
    while True:
        message = await receive()
        await send({"type": message["type"] + ".complete"})
        if message["type"] == "lifespan.shutdown":
            return


async def http_only(scope: Scope, receive: Receive, send: Send) -> None:
    """An app that does not speak lifespan: the middleware answers it."""
    if scope["type"] != "http":
        msg = f"unsupported scope {scope['type']}"
        raise ValueError(msg)


@pytest.mark.parametrize("speaks_lifespan", [True, False])
async def test_a_journal_that_cannot_be_opened_fails_the_lifespan_startup(
    tmp_path: Path, speaks_lifespan: bool
) -> None:
    """With a lifespan, the server learns at startup that the journal cannot be opened
    (`lifespan.startup.failed`, naming the file and the fix), instead of serving requests
    whose tasks would not be journaled; whether the app speaks lifespan or not."""
    app = lifespan_app if speaks_lifespan else http_only
    sent = await run_lifespan(PostResponseMiddleware(app, journal=tmp_path / "missing" / "j.db"))
    failed = sent[0]
    assert failed["type"] == "lifespan.startup.failed"
    assert (
        f"The journal {str(tmp_path / 'missing' / 'j.db')!r} cannot be opened" in failed["message"]
    )
    assert "unable to open database file" in failed["message"]
    assert "Make its folder exist" in failed["message"]


async def test_a_file_with_another_apps_entries_table_fails_the_startup_and_is_left_as_is(
    tmp_path: Path,
) -> None:
    """A journal pointed at another app's database, which has a table `entries` of its own,
    is refused at startup, naming the table and the fix: before, the app started, and each
    write and each heartbeat failed (its tasks not journaled), logged for ever."""
    path = tmp_path / "app.db"
    with opened(path) as db:
        db.execute("CREATE TABLE entries (id INTEGER PRIMARY KEY, text TEXT)")
        db.execute("INSERT INTO entries (text) VALUES ('theirs')")
    sent = await run_lifespan(PostResponseMiddleware(lifespan_app, journal=path))
    assert sent[0]["type"] == "lifespan.startup.failed"
    assert "its table 'entries' is not a journal's" in sent[0]["message"]
    assert "give the journal a file of its own" in sent[0]["message"]
    with opened(path) as db:
        assert db.execute("SELECT id, text FROM entries").fetchall() == [(1, "theirs")]


async def test_a_journal_that_opens_completes_the_lifespan_startup(tmp_path: Path) -> None:
    sent = await run_lifespan(PostResponseMiddleware(lifespan_app, journal=tmp_path / "j.db"))
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


async def test_a_backlog_larger_than_the_limits_is_replayed_in_full_not_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Entries claimed at once beyond `max_running` + `max_queued` wait for room: dropping
    them would leave them in the file, owned by a live process, until its next start, and
    count a replay against `max_replays` each time."""
    journal = tmp_path / "j.db"
    the_journal = Journal(journal, lease=0.3)  # a heartbeat, and a claim, every 0.1 s
    middleware = PostResponseMiddleware(
        app_adding((held,)), journal=the_journal, max_running=1, max_queued=1
    )
    HOLD[:] = [anyio.Event()]
    with caplog.at_level(logging.WARNING, "post_response"):
        await middleware(http_scope(), Exchange().receive, Exchange().send)
        # Its task now holds the one running slot; then a process that died leaves 12.
        owner = uuid.uuid4().int >> 65
        backlog = [("tests.test_journal:remember", f'[["{n}"], {{}}]', "GET") for n in range(12)]
        plant_rows(journal, (owner, dead_pid(), _journal.this_host(), time.time()), backlog)
        with anyio.fail_after(DEADLINE):
            while not any("replaying 12 tasks" in r.getMessage() for r in caplog.records):
                await anyio.sleep(0.01)
            while not middleware.stats.queued:  # the replay's first batch waits to run
                await anyio.sleep(0.01)
        HOLD[0].set()
        await wait_for_runs(12)
        await middleware.join()
    assert sorted(int(what) for what, _, _ in RAN) == list(range(12))
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    await the_journal.close()
    assert rows(journal) == []


async def test_two_journals_on_one_file_in_one_process_never_take_each_others_entries(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two middlewares of one process with the same file (two apps mounted side by side, an
    app built per test): each is an owner with this process's pid, and neither takes the
    other for a process that had the pid before (a restarted container), so neither replays
    a task the other still runs."""
    journal = tmp_path / "j.db"
    first, second = Journal(journal, lease=0.3), Journal(journal, lease=0.3)
    holding = PostResponseMiddleware(app_adding((held,)), journal=first)
    other = PostResponseMiddleware(app_adding((remember, "other")), journal=second)
    HOLD[:] = [anyio.Event()]
    with caplog.at_level(logging.WARNING, "post_response"), anyio.fail_after(DEADLINE):
        await holding(http_scope(), Exchange().receive, Exchange().send)  # its task waits
        await Exchange().run(other)  # (it would wait for `held` too, were it taken over)
        await heartbeats(journal, second, 3)  # each one looks for owners that are gone
        await heartbeats(journal, first, 1)
        assert [(func, owner) for func, _, _, owner, _ in rows(journal)] == [
            ("tests.test_journal:held", first.writer().origin)
        ]
        HOLD[0].set()
        await holding.join()
    assert RAN == [("other", False, 0)]
    assert [r.getMessage() for r in caplog.records if r.name == "post_response"] == []
    await first.close()
    await second.close()
    assert rows(journal) == []


async def test_a_very_long_lease_leaves_the_writer_waiting_not_stopped(tmp_path: Path) -> None:
    """`lease=1e300` (heartbeats that never come again): the idle writer waits in bounded
    steps. It used to ask its queue for a wait past what the platform can time, and stop."""
    journal = Journal(tmp_path / "j.db", lease=1e300)
    writer = journal.writer()
    await anyio.to_thread.run_sync(writer.join, 0.5)  # at once, had it stopped
    assert writer.is_alive()
    middleware = PostResponseMiddleware(app_adding((remember, "still")), journal=journal)
    exchange = DiskAtBody(tmp_path / "j.db")
    await exchange.run(middleware)
    assert [row[1] for row in exchange.at_body] == ['[["still"],{}]']
    await journal.close()


async def test_a_file_locked_past_the_busy_timeout_holds_a_response_once_not_five_times(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another connection holds a write transaction on the file (a `sqlite3` shell left in
    `BEGIN`): the response waits one busy timeout for its commit, then goes, its task run
    and not journaled, logged once saying why. Before, the writer tried five times, each
    waiting the busy timeout (30 s): responses were held two and a half minutes."""
    monkeypatch.setattr(_journal, "BUSY_TIMEOUT", 0.2)
    path = tmp_path / "j.db"
    journal = Journal(path)
    middleware = PostResponseMiddleware(app_adding((remember, "x")), journal=journal)
    await Exchange().run(middleware)  # open, and commit once
    lock = sqlite3.connect(path, isolation_level=None)
    try:
        lock.execute("BEGIN EXCLUSIVE")
        with caplog.at_level(logging.ERROR, "post_response"):
            exchange = Exchange()
            await exchange.run(middleware)
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert exchange.status == 200
    assert [what for what, _, _ in RAN] == ["x", "x"]
    messages = [r.getMessage() for r in caplog.records if "commit" in r.getMessage()]
    # Its entry, and maybe the first request's deletion if it had not been committed yet.
    [message] = messages
    assert re.fullmatch(
        rf"Journal {re.escape(str(path))}: could not commit [12] writes \(attempt 1\)", message
    )
    [given_up] = [r.getMessage() for r in caplog.records if "not journaled" in r.getMessage()]
    assert "another connection held a write lock on the file for over 0.2s" in given_up
    await journal.close()


async def test_a_file_deleted_while_in_use_is_noticed_logged_and_made_anew(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`rm j.db*` while the app serves: the writer notices at its next heartbeat, logs an
    error, and opens a new file at the path, where the next request's entry is. Before,
    it wrote on to the deleted file, which no process would ever open again: silently,
    every task after it was lost on a crash."""
    path = tmp_path / "j.db"
    journal = Journal(path, lease=0.3)  # a heartbeat every 0.1 s
    middleware = PostResponseMiddleware(app_adding((remember, "a")), journal=journal)
    await Exchange().run(middleware)
    with caplog.at_level(logging.ERROR, "post_response"):
        for file in tmp_path.glob("j.db*"):
            file.unlink()
        with anyio.fail_after(DEADLINE):
            while not any("deleted or replaced" in r.getMessage() for r in caplog.records):
                await anyio.sleep(0.01)
    exchange = DiskAtBody(path)
    await exchange.run(middleware)
    assert [func for func, *_ in exchange.at_body] == ["tests.test_journal:remember"]
    assert [what for what, _, _ in RAN] == ["a", "a"]
    await journal.close()


async def test_a_backlog_is_claimed_a_chunk_at_a_time_as_the_runner_takes_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process that died left 25 entries; `CLAIM_CHUNK` is 10 here (10,000 by default).
    While the runner is full, this process holds the first 10 and leaves the other 15 in
    the file, unclaimed (another worker may take them); as the runner takes them, the
    next chunks follow, until all 25 ran. Before, one claim took and decoded the whole
    backlog: a million entries held in memory at once (an out-of-memory crash at each start,
    until `max_replays` gave every entry up), and the process's commits waited meanwhile."""
    monkeypatch.setattr(_journal, "CLAIM_CHUNK", 10, raising=False)
    path = tmp_path / "j.db"
    journal = Journal(path, lease=0.3)  # a heartbeat every 0.1 s
    middleware = PostResponseMiddleware(
        app_adding((held,)), journal=journal, max_running=1, max_queued=1
    )
    HOLD[:] = [anyio.Event()]
    with caplog.at_level(logging.WARNING, "post_response"), anyio.fail_after(DEADLINE):
        await middleware(http_scope(), Exchange().receive, Exchange().send)  # holds the runner
        dead = uuid.uuid4().int >> 65
        backlog = [("tests.test_journal:remember", f'[["{n}"], {{}}]', "GET") for n in range(25)]
        pid = dead_pid()
        plant_rows(path, (dead, pid, _journal.this_host(), time.time()), backlog)
        while not any("replaying" in r.getMessage() for r in caplog.records):
            await anyio.sleep(0.01)
        await heartbeats(path, journal, 3)  # each one could claim
        owned = collections.Counter(owner for _, _, _, owner, _ in rows(path))
        assert owned == {journal.writer().origin: 11, dead: 15}  # `held`'s entry, 10 replays
        HOLD[0].set()
        await wait_for_runs(25)
        await middleware.join()
    assert sorted(int(what) for what, _, _ in RAN) == list(range(25))
    replaying = [r.getMessage() for r in caplog.records if "replaying" in r.getMessage()]
    assert [re.findall(r"replaying (\d+) tasks .* \(pids (\d+)\)", m) for m in replaying] == [
        [("10", str(pid))],
        [("10", str(pid))],
        [("5", str(pid))],
    ]
    await journal.close()
    assert rows(path) == []


LIVE_OWNER = """
import sqlite3, sys, time
from post_response import Journal
journal = Journal(sys.argv[1], lease=0.3)  # as the test's
writer = journal.writer()
writer.opened.wait()
with sqlite3.connect(sys.argv[1]) as db:
    db.execute(
        "INSERT INTO entries (origin, seq, owner, func, payload, method, path, added) "
        "VALUES (?, 1, ?, 'tests.test_journal:remember', '[[\\"theirs\\"],{}]', 'GET', '/', ?)",
        (writer.origin, writer.origin, time.time()),
    )
print(writer.pid, writer.origin, flush=True)
time.sleep(60)
"""


@pytest.mark.skipif(
    sys.platform != "linux" or os.geteuid() != 0 or not shutil.which("unshare"),
    reason="needs root and unshare(1) to start a process in a pid namespace of its own",
)
async def test_a_live_owner_in_another_pid_namespace_with_this_host_name_keeps_its_entries(
    tmp_path: Path,
) -> None:
    """Two containers with one host name (host networking) and one file: a process of the
    other one, alive, with a pid that does not exist here. Before, host names alike meant
    pids alike: it was taken for dead at the first heartbeat and its entries replayed here
    while it ran them too. Now the pid namespace is part of the host: its heartbeat decides."""
    path, script = tmp_path / "j.db", tmp_path / "live_owner.py"
    script.write_text(LIVE_OWNER)
    free = next(pid for pid in range(300, 30000) if not _journal._alive(pid))
    inner = f'echo {free - 1} > /proc/sys/kernel/ns_last_pid && "$0" "$@"'
    argv = ["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c", inner]
    environ = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    with subprocess.Popen(
        [*argv, sys.executable, str(script), str(path)],
        stdout=subprocess.PIPE,
        text=True,
        env=environ,
        start_new_session=True,
    ) as other:
        try:
            assert other.stdout is not None
            pid, origin = map(int, other.stdout.readline().split())
            assert (pid, _journal._alive(pid)) == (free, False)  # its pid means nothing here
            journal = Journal(path, lease=0.3)  # a heartbeat every 0.1 s
            middleware = PostResponseMiddleware(app_adding(), journal=journal)
            await Exchange().run(middleware)
            await heartbeats(path, journal, 4)  # each one looks for owners that are gone
            assert [(func, owner) for func, _, _, owner, _ in rows(path)] == [
                ("tests.test_journal:remember", origin)
            ]
            assert RAN == []
            await journal.close()
        finally:
            os.killpg(other.pid, signal.SIGKILL)


async def test_a_file_locked_at_startup_fails_it_after_one_busy_timeout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another connection holds a write transaction on the file as the app starts: the
    startup fails once the busy timeout (30 s) has passed, saying the file is locked.
    Before, the open was tried again 20 times, each waiting the busy timeout: the server
    hung in its startup for ten minutes."""
    monkeypatch.setattr(_journal, "BUSY_TIMEOUT", 0.2)
    path = tmp_path / "j.db"
    await run_lifespan(PostResponseMiddleware(lifespan_app, journal=path))  # made, closed
    lock = sqlite3.connect(path, isolation_level=None)
    try:
        lock.execute("BEGIN EXCLUSIVE")
        with caplog.at_level(logging.DEBUG, "post_response"):
            sent = await run_lifespan(PostResponseMiddleware(lifespan_app, journal=path))
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert sent[0]["type"] == "lifespan.startup.failed"
    assert "(OperationalError: database is locked)" in sent[0]["message"]
    assert [r for r in caplog.records if "opening it again" in r.getMessage()] == []

"""The durable journal: tasks recorded in a SQLite file, replayed after a crash.

With `PostResponseMiddleware(app, journal="tasks.db")`, each task is written to the
file when it is added, and the middleware waits for that write to be committed before it
forwards the body of the response: a client that got a response knows its tasks are on
disk. A task leaves the file when it reaches a final state that means it ran, or was
deliberately not run. What the runtime lost (the process died, the shutdown deadline
passed, `max_queued` dropped it) stays, and the next process to open the file runs it.

The event loop never touches the disk: one writer thread per open journal takes every
pending write at once and commits them in one transaction, then wakes whoever waits for
them, once per event loop. Entry keys are made here (a random origin per open, and a
counter), so a task's delete can be queued before its insert is committed.

Several processes may share one file. Each registers as an owner, with its pid, host and
a heartbeat the writer refreshes every `lease / 3` seconds. An owner is gone when its
heartbeat is older than the lease, or, on the same host (`this_host()`: its name and pid
namespace), when its pid no longer exists;
its entries are claimed in one `BEGIN IMMEDIATE` transaction, so two processes never
claim the same entry, and the entries of a live owner are never taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import importlib
import itertools
import json
import logging
import os
import queue
import socket
import sqlite3
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

import anyio.to_thread

from ._checks import check_delay, describe
from ._context import Phase
from ._errors import ConfigurationError, TaskNotDurableError
from ._task import UNSET as _UNSET
from ._text import escape

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine, Iterator

    import trio

    from ._context import RequestTasks
    from ._task import TaskHandle

    _WakeAll = Callable[[list[Any]], None]  # wakes the waiters of one event loop (or thread)

__all__ = ["Journal", "Recorder", "Serializer", "is_replay", "replaying"]

logger = logging.getLogger("post_response")

Durability = Literal["normal", "full"]
Key = tuple[int, int]  # (origin, number): an entry's identity, made in this process

# Set, in the context of replayed tasks only, to how many processes were handed the
# entry before this one: normal tasks never pay for it.
replaying: contextvars.ContextVar[int] = contextvars.ContextVar(
    "post_response.replaying", default=0
)


def is_replay() -> bool:
    """Whether the running task is a replay: its entry was left in the journal by a
    process that is gone, which may have run it, or part of it, already."""
    return replaying.get() > 0


class Serializer(Protocol):
    """How a task's arguments are written to the journal: `json` is the default."""

    def dumps(self, obj: Any) -> str | bytes: ...

    def loads(self, data: str | bytes) -> Any: ...


class _Json:
    @staticmethod
    def dumps(obj: Any) -> str:
        return json.dumps(obj, separators=(",", ":"))

    @staticmethod
    def loads(data: str | bytes) -> Any:
        return json.loads(data)


_JSON = _Json()
_NO_ARGUMENTS = _JSON.dumps([[], {}])

_SCHEMA = """
CREATE TABLE IF NOT EXISTS owners (
    id INTEGER PRIMARY KEY, pid INTEGER NOT NULL, host TEXT NOT NULL, beat REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS entries (
    origin INTEGER NOT NULL, seq INTEGER NOT NULL, owner INTEGER NOT NULL,
    func TEXT NOT NULL, payload BLOB NOT NULL, options TEXT,
    method TEXT NOT NULL, path TEXT NOT NULL,
    deliveries INTEGER NOT NULL DEFAULT 0, added REAL NOT NULL,
    dead TEXT, PRIMARY KEY (origin, seq)
) WITHOUT ROWID;
"""

# Every column the code reads or writes, per table: a file that has a table of that name
# without them (another app's database) is refused when it is opened, not at each write.
_COLUMNS = {
    "owners": "id, pid, host, beat",
    "entries": "origin, seq, owner, func, payload, options, method, path, deliveries, added, dead",
}

# Many rows per statement: the sqlite3 module lets go of the GIL around each step, and a
# writer thread that must take it back from a busy event loop waits for it each time (up
# to the interpreter's switch interval), so one step per chunk, not one per row.
_INSERT_INTO = (
    "INSERT OR REPLACE INTO entries (origin, seq, owner, func, payload, options, method, "
    "path, deliveries, added) VALUES "
)
# SQLite allows 32,766 parameters per statement since 3.32 (2020), 999 before.
_PARAMETERS = 32766 if sqlite3.sqlite_version_info >= (3, 32) else 999
# Parameters of an entry's row: its seq, func, payload, method and path; options too in
# the "rich" statement (see `_inserting`).
_PLAIN_WIDTH, _RICH_WIDTH = 5, 6
# The time of the commit, in Unix seconds (ms precision): SQLite's clock, read once per
# statement, not a value bound per row.
_NOW = "(julianday('now') - 2440587.5) * 86400.0"
# One origin per statement: `(origin, seq) IN (VALUES ...)` would scan the whole table
# (every waiting task's entry) per statement; `origin = ? AND seq IN (...)` searches the
# primary key for each row.
_DELETE_FROM = "DELETE FROM entries WHERE origin = ? AND seq IN ("


@functools.lru_cache(maxsize=128)
def _inserting(rich: bool, origin: int, count: int) -> str:
    # This process writes only its own entries: their origin and owner are its id, a
    # constant of the statement (an int: nothing to escape), not two values per row. Most
    # tasks have no options: NULL in the statement, not a value to bind per row.
    options = "?" if rich else "NULL"
    row = f"({origin:d}, ?, {origin:d}, ?, ?, {options}, ?, ?, 0, {_NOW})"
    return _INSERT_INTO + ", ".join([row] * count)


@functools.lru_cache(maxsize=64)
def _deleting(count: int) -> str:
    return _DELETE_FROM + ", ".join(["?"] * count) + ")"


def _write_many(
    db: sqlite3.Connection,
    statement: Callable[[int], str],
    values: list[Any],
    width: int,
    *,
    head: int = 0,
    pad: bool = False,
) -> None:
    """Write rows of `width` values each, given one after another in `values` after
    `head` values that every statement takes first.

    With `pad`, for a statement where a row may come twice (a deletion), the count of rows
    is rounded up to a power of two by repeating the last one: a few statements, which
    the connection's statement cache keeps, instead of one to parse per count.
    """
    most = (_PARAMETERS - head) // width
    first = values[:head]
    for start in range(head, len(values), most * width):
        part = values[start : start + most * width]
        rows = len(part) // width
        if pad and rows & (rows - 1):
            more = min(1 << rows.bit_length(), most) - rows
            part += part[-width:] * more
            rows += more
        db.execute(statement(rows), first + part)


# Records and entries are read with the types the code expects, whatever a damaged or
# tampered file holds (SQLite keeps any value in any column): a pid or a time that is not
# a number reads as 0 (no pid; a heartbeat long ago), and text that is not UTF-8 reads
# with its bad bytes as lone surrogates (`_text`), so that one bad row is one dead entry,
# not a claim, or a writer thread, that fails.
_OWNERS = (
    "SELECT id, COALESCE(CAST(pid AS INTEGER), 0), COALESCE(CAST(host AS TEXT), ''), "
    "COALESCE(CAST(beat AS REAL), 0.0) FROM owners WHERE id != ?"
)
# Entries whose owner is gone (its record removed: dead, or shut down), not dead letters.
_ORPHANS = (
    "SELECT origin, seq, COALESCE(CAST(func AS TEXT), ''), payload, CAST(options AS TEXT), "
    "COALESCE(CAST(method AS TEXT), ''), COALESCE(CAST(path AS TEXT), ''), "
    "COALESCE(CAST(deliveries AS INTEGER), 0) FROM entries "
    "WHERE owner NOT IN (SELECT id FROM owners) AND dead IS NULL ORDER BY added LIMIT ?"
)
_ADOPT = "UPDATE entries SET owner = ?, deliveries = deliveries + 1 WHERE origin = ? AND seq = ?"


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class Entry:
    """A claimed entry, decoded: what to run again, and where it came from."""

    key: Key
    func: Callable[..., object]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    options: dict[str, Any]
    method: str
    path: str
    replays: int  # how many times it was claimed from a process that was gone, this one included


class Journal:
    """A SQLite file where tasks wait until they have run (see the README, "the journal").

    Args:
        path: The SQLite file; several processes of one app may share it.
        durability: `"normal"` (default) survives the process being killed, not a power
            loss; `"full"` survives a power loss too, at a higher cost per commit.
        lease: Seconds without a heartbeat after which an owner on another host is
            taken for dead and its entries are replayed (default 10, at least 0.1). On the
            same host a dead pid is noticed at the next heartbeat, every `lease / 3` seconds.
        serializer: How arguments are encoded: an object with `dumps` and `loads`
            (default: `json`).
        max_replays: How many times an entry is replayed before it is given up on, kept
            in the file marked dead (default 5; `None`: no limit). A task that takes its
            process down (`os._exit()`, a crash in C code, the OOM killer) would otherwise
            bring down every process that replays it, at every start.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        durability: Durability = "normal",
        lease: float = 10.0,
        serializer: Serializer | None = None,
        max_replays: int | None = 5,
    ) -> None:
        if durability not in ("normal", "full"):
            msg = f'Journal(durability=...) must be "normal" or "full"; got {durability!r}.'
            raise ConfigurationError(msg)
        seconds = check_delay(
            lease, "Journal(lease=...)", MIN_LEASE, " (a heartbeat comes every lease / 3 seconds)"
        )
        if max_replays is not None and (
            isinstance(max_replays, bool) or not isinstance(max_replays, int) or max_replays < 0
        ):
            msg = (
                "Journal(max_replays=...) must be a whole number >= 0, or None for no limit; "
                f"got {max_replays!r}."
            )
            raise ConfigurationError(msg)
        file = os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
        if not isinstance(file, str) or file in ("", ":memory:"):
            why = ": SQLite drops that database with the process" if isinstance(file, str) else ""
            msg = (
                "Journal(path) must be the path of a SQLite file that outlives the process "
                f'(`Journal("tasks.db")`; in tests, a file in a temporary folder); got {path!r}'
                f"{why}."
            )
            raise ConfigurationError(msg)
        if serializer is not None and not (
            callable(getattr(serializer, "dumps", None))
            and callable(getattr(serializer, "loads", None))
        ):
            msg = (
                "Journal(serializer=...) must have `dumps(obj) -> str | bytes` and "
                f"`loads(data) -> obj`, as the `json` module has; got {serializer!r}."
            )
            raise ConfigurationError(msg)
        self.path = file
        self.durability = durability
        self.lease = seconds
        self.max_replays = max_replays
        self.serializer: Serializer = _JSON if serializer is None else serializer
        self._paths: dict[object, str] = {}  # callables known to import back as themselves
        self._writer: _Writer | None = None
        self._lock = threading.Lock()
        self._sink: Callable[[list[Entry]], None] | None = None

    def __repr__(self) -> str:
        return (
            f"<Journal {self.path!r} durability={self.durability!r} lease={self.lease:g} "
            f"max_replays={self.max_replays!r}>"
        )

    # Opening, in the process that serves (after a fork), and replaying.

    def open(self, sink: Callable[[list[Entry]], None] | None = None) -> None:
        """Register this process as an owner (once per process) and take over the entries
        of owners that are gone; `sink` receives entries to run, in the writer thread."""
        with self._lock:
            if sink is not None:
                self._sink = sink
            writer = self._writer
            if writer is None or writer.pid != os.getpid():  # forked since: start afresh
                self._writer = _Writer(self)
                self._writer.start()

    def writer(self) -> _Writer:
        writer = self._writer
        if writer is None or writer.pid != os.getpid():
            self.open()
            writer = self._writer
        if writer is None:  # pragma: no cover  (open() sets it)
            msg = "the journal's writer did not start"
            raise RuntimeError(msg)
        return writer

    def recorder(
        self, opener: Callable[[], Callable[[list[Entry]], None]] | None = None
    ) -> Recorder | None:
        """What one request uses to journal its tasks; the first in this process opens
        the journal, with the sink `opener()` makes. None once the journal is unusable
        (logged when it became so): its tasks run as without a journal."""
        writer = self._writer
        if writer is None or writer.pid != _pid:
            self.open(None if opener is None else opener())
            writer = self.writer()
        if writer.broken:
            return None
        return Recorder(self, writer)

    def deliver(self, entries: list[Entry]) -> None:
        """Hand claimed entries to whoever runs them (called in the writer thread)."""
        sink = self._sink
        if sink is None:
            logger.error(
                "Journal %s: %d claimed tasks have no event loop to run on; they stay "
                "in the file for the next start",
                escape(self.path),
                len(entries),
            )
            return
        sink(entries)

    async def close(self) -> None:
        """Commit what is pending, remove this process's owner record, stop the writer;
        wait `CLOSE_LIMIT` seconds at most (the file may be locked by another connection).

        Entries of tasks that did not finish stay, claimable at once by the next start.
        """
        writer = self._writer
        if writer is None or writer.pid != os.getpid():
            return
        seq = writer.stop()
        with anyio.move_on_after(CLOSE_LIMIT) as scope:
            await writer.committed(seq)
        if scope.cancelled_caught:
            self._not_closed(CLOSE_LIMIT)
        self._writer = None

    async def startup_failure(self) -> str | None:
        """Once the journal is open: None; or, if it cannot be, why, as a server's
        lifespan startup should report it."""
        writer = self.writer()
        if not writer.opened.is_set():
            await anyio.to_thread.run_sync(writer.opened.wait)
        if writer.failure is None:
            return None
        return (
            f"The journal {self.path!r} cannot be opened ({writer.failure}). The app does not "
            "start: it would answer requests whose tasks are lost on a crash. Make its folder "
            "exist and be writable by this process, or remove `journal=`."
        )

    def close_sync(self, timeout: float | None = 10.0) -> None:
        """`close()`, from sync code (the WSGI middleware, at exit)."""
        writer = self._writer
        if writer is None or writer.pid != os.getpid():
            return
        if not writer.wait_sync(writer.stop(), timeout):
            self._not_closed(timeout)
        self._writer = None

    def _not_closed(self, timeout: float | None) -> None:
        logger.error(
            "Journal %s: its last writes were not committed within %ss of the shutdown (the "
            "file is locked by another connection?); the process goes on without them. What "
            "is in the file is replayed by the next start: tasks that ran may run again",
            escape(self.path),
            timeout,
        )

    # What can be journaled.

    def path_of(self, func: Callable[..., object]) -> str:
        """`module:qualname`, from which importing gives back `func` itself.

        Raises:
            TaskNotDurableError: `func` cannot be found again by another process.
        """
        try:
            return self._paths[func]
        except KeyError:
            pass
        except TypeError:  # unhashable callable
            raise _not_durable(func, "it cannot be found again by name") from None
        module = getattr(func, "__module__", None)
        qualname = getattr(func, "__qualname__", None)
        if not isinstance(module, str) or not isinstance(qualname, str) or "<" in qualname:
            raise _not_durable(func, "it is not a module-level function or class")
        try:
            found = resolve(module, qualname)
        except Exception:
            found = None
        if found is not func:
            raise _not_durable(func, f"importing `{module}.{qualname}` does not give it back")
        path = self._paths[func] = f"{module}:{qualname}"
        return path

    def encode(
        self, func: Callable[..., object], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> bytes | str:
        if not args and not kwargs and self.serializer is _JSON:
            return _NO_ARGUMENTS
        try:
            payload: object = self.serializer.dumps([list(args), kwargs])
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:  # too deep
            raise _not_durable(func, f"its arguments cannot be encoded ({exc})") from exc
        if isinstance(payload, bytes) or (isinstance(payload, str) and self.serializer is _JSON):
            return payload  # JSON's text is ASCII
        if not isinstance(payload, str):
            why = f"the serializer's dumps() returned {type(payload).__name__}, not str or bytes"
            raise _not_durable(func, why)
        try:
            payload.encode()
        except UnicodeEncodeError as exc:
            why = f"the serializer's dumps() returned text SQLite cannot store ({exc})"
            raise _not_durable(func, why) from exc
        return payload


class Recorder:
    """One request's side of the journal: its tasks' keys, and its last pending write."""

    __slots__ = ("entries", "journal", "last", "writer")

    def __init__(self, journal: Journal, writer: _Writer) -> None:
        self.journal = journal
        self.writer = writer
        self.entries: dict[TaskHandle, Key] = {}
        self.last = 0  # the number of this request's last write

    def add(self, task: TaskHandle, *, volatile: bool) -> None:
        """Journal a task `add_task()` just made, then add it to its request; if the request
        refuses it (closed, at its limit), its entry goes too.

        Raises:
            TaskNotDurableError: The task's callable or arguments cannot be journaled.
        """
        request, plan = task.request_tasks, task._plan
        # Not opted out, nor enqueued to a queue (a Celery task's `dispatch`, in its plan).
        if not volatile and (plan is None or plan.dispatch is None):
            journal, func, writer = self.journal, task.func, self.writer
            try:
                path = journal._paths[func]  # path_of()'s cache: one call less per task
            except (KeyError, TypeError):  # new, or not journalable: path_of() tells
                path = journal.path_of(func)
            if task.args or task._kwargs or journal.serializer is not _JSON:
                payload = journal.encode(func, task.args, task._kwargs or {})
            else:  # the usual task, no arguments: no call (this runs once per task)
                payload = _NO_ARGUMENTS
            seq = next(writer._numbers)
            self.entries[task] = (writer.origin, seq)  # its key
            options = None if plan is None else _options(task)
            self.last = writer.insert(seq, path, payload, options, request)
        try:
            request.add(task)
        except BaseException:
            self.ended(task, drop=True)
            raise

    def adopt(self, task: TaskHandle, key: Key) -> None:
        """A replayed task, whose entry is already in the file."""
        self.entries[task] = key

    def changed(self, task: TaskHandle) -> None:
        """The task's options changed (`set()`): write them again, if it is journaled."""
        key = self.entries.get(task)
        if key is not None and key[0] == self.writer.origin:
            path = self.journal.path_of(task.func)
            payload = self.journal.encode(task.func, task.args, task._kwargs or {})
            options = _options(task)
            self.last = self.writer.insert(key[1], path, payload, options, task.request_tasks)

    def ended(self, task: TaskHandle, *, drop: bool = False) -> None:
        """The task reached a final state that takes it out of the journal; with `drop`,
        it is out of it before it ran (`set(durable=False)`, refused by its request): its
        entry is not written at all if it is not yet."""
        key = self.entries.pop(task, None)
        if key is not None:
            self.writer.delete(key, drop)

    def flush_sync(self) -> None:
        if self.last > self.writer.done:
            self.writer.wait_sync(self.last, None)


# Messages that may end a response: the middleware holds each until the request's writes
# so far are committed (the client then knows its tasks are on disk).
ENDING = frozenset(
    {
        "http.response.body",
        "http.response.pathsend",
        "http.response.zerocopysend",
        "http.response.trailers",
    }
)


def resolve(module: str, qualname: str) -> Any:
    """The object `module.qualname` names, importing the module if needed."""
    found: Any = sys.modules.get(module) or importlib.import_module(module)
    for part in qualname.split("."):
        found = getattr(found, part)
    return found


def _not_durable(func: object, why: str) -> TaskNotDurableError:
    name = describe(func)
    msg = (
        f"Task {name!r} cannot be journaled: {why}. With `journal=` on, a task must be a "
        "module-level function (or class) that another process can import, called with "
        "arguments the journal's serializer encodes (JSON by default: pass ids, not "
        "objects). To run this one without the journal (it is then lost on a crash), "
        f"opt out: `add_task(post_response.volatile({name.rsplit('.', 1)[-1]}), ...)`."
    )
    return TaskNotDurableError(msg)


# The writer thread.

_pid = os.getpid()  # this process's, for the check per request (os.getpid() is a system call)
# The owner ids of this process's writers that are running: another journal object on the
# same file in this process (two apps side by side) is an owner with this pid, yet alive.
_running: set[int] = set()


def _forked() -> None:
    global _pid  # noqa: PLW0603
    _pid = os.getpid()
    _running.clear()  # the parent's writers are not this process's


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)

_COLLECTING = Phase.COLLECTING
STALE_LEASES = 10  # on the same host, a live pid silent this many leases is not the owner
MIN_LEASE = 0.1  # seconds: below it, the writer would do little but beat
LONGEST_WAIT = 3600.0  # seconds the idle writer sleeps at most (a long lease's next beat)
LINGER = 0.05  # seconds a write no one waits for may wait for others to join its commit
# Seconds a statement waits for another connection's write lock (SQLite's busy timeout),
# and that a commit is tried for at most: a file locked longer holds responses no longer.
BUSY_TIMEOUT = 30.0
CLOSE_LIMIT = 10.0  # seconds a shutdown waits for the last commit (a locked file)
# Entries claimed at once; the next ones once these have all gone to the runner: a backlog
# is held in memory a chunk at a time, and the other processes on the file may share it.
CLAIM_CHUNK = 10_000


class _Writer(threading.Thread):
    """The thread that owns the SQLite connection of one open journal in one process."""

    def __init__(self, journal: Journal) -> None:
        super().__init__(name="post_response-journal", daemon=True)
        self.journal = journal
        self.pid = os.getpid()
        self.host = this_host()
        # This process's owner id, and its entries' origin: 63 random bits (an index on
        # `owner` would cost every write; claims scan the table, a few times a minute).
        self.origin = uuid.uuid4().int >> 65
        self._numbers = itertools.count(1)
        # What is queued, flat, as the statements take it: the rows of new entries with no
        # options and with options (see `_inserting`), and the keys of entries to delete.
        self._plain: list[Any] = []
        self._rich: list[Any] = []
        self._ended: list[int] = []
        self._plain_sql = functools.partial(_inserting, False, self.origin)
        self._rich_sql = functools.partial(_inserting, True, self.origin)
        self._dropped: set[int] = set()  # seqs of entries to delete before they are written
        self._stopping = False
        self._failing = False  # the last commit failed every attempt (see `_write`)
        self._claim_due = False  # entries of owners that are gone may wait (see `_take_over`)
        self._replays: list[Entry] = []  # the last claimed, emptied as they go to the runner
        self._gone_pids: list[int] = []  # the pids of the owners found gone by the last claim
        self._db: sqlite3.Connection  # the connection, once open (in the thread)
        self._file: tuple[int, int] | None = None  # which file it has open
        self._takes = 0  # how many times the writer took what was queued
        self._lock = threading.Lock()
        # A token per wake-up (a C queue: a threading.Event costs several Python calls on
        # each side); `_signalled` keeps it to one until the writer takes the writes.
        self._wake: queue.SimpleQueue[None] = queue.SimpleQueue()
        self._queued = 0  # number of the last write queued
        self.done = 0  # number of the last write committed (or given up on)
        # [number, via, wake, waiter]: a list, so that a shared future's number can grow.
        self._waiters: list[list[Any]] = []
        self._shared: _Commit | None = None  # the future the last asyncio waiters share
        self._signalled = False  # the writer was woken and has not taken the writes yet
        self._deletes: list[int] = []  # keys of deletions not yet written, flat
        self.broken = False  # the journal is unusable: nothing is queued any more
        self.opened = threading.Event()  # set once the file is open, or failed to open
        self.failure: str | None = None  # why it could not be opened
        self._deleted_at = 0.0  # when deletions were last written (monotonic)

    def insert(
        self,
        seq: int,
        path: str,
        payload: bytes | str,
        options: str | None,
        request: RequestTasks,
    ) -> int:
        """Queue the entry of a task of `request` (new, or its options changed); return
        its number.

        Added while the request runs: committed when its response is about to end (the
        middleware waits for it), with the others of that moment. Added later: at once.
        Its row is made here, so the writer thread, which must take the GIL back from the
        event loop for every piece of Python it runs, only hands lists to SQLite.
        """
        with self._lock:
            self._queued += 1
            if options is None:
                self._plain += (seq, path, payload, request.method, request.path)
            else:
                self._rich += (seq, path, payload, options, request.method, request.path)
            number = self._queued
            wake = request.phase is not _COLLECTING and not self._signalled
            if wake:
                self._signalled = True
        if wake:
            self._wake.put(None)
        return number

    def delete(self, key: Key, drop: bool = False) -> None:
        with self._lock:  # no one waits for it (a replay too many at worst): no wake-up
            if self.broken:  # a task journaled before the journal became unusable
                return
            self._ended += key
            if drop and key[0] == self.origin:
                self._dropped.add(key[1])

    def stop(self) -> int:
        with self._lock:
            self._queued += 1
            self._stopping = True
            wake = not self._signalled
            self._signalled = True
            number = self._queued
        if wake:
            self._wake.put(None)
        return number

    # Waiting for a commit: from an event loop, or from a thread.

    async def committed(self, number: int) -> None:
        while number > self.done:
            await self.until(number)

    def until(self, number: int) -> Awaitable[None]:
        """What to await until write `number` may be committed: look again at `done`
        once it is over, and wait anew if need be (an asyncio waiter may be woken early).

        On asyncio, a future that the waiters of this event loop share, so that one
        commit costs one wake-up call per loop, not one future per request, and the
        requests waiting at once keep fewer objects alive. Waiters join it until the
        writer takes the queued writes for its next commit, which then has theirs too.
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # trio
            return self._until_trio(number)
        future = self._shared
        if future is not None and not future.done() and future.get_loop() is loop:
            if number <= future.number:
                return future
            # No take (`_serve`) since the future was registered: write `number` is
            # queued already, so a take after this test has it too: no lock needed (and
            # `_wake_waiters` may see either number: it only grows).
            entry = future.entry
            if entry is not None and future.takes == self._takes:
                future.number = entry[0] = number
                return future
        future = self._shared = _Commit(loop=loop)
        future.number = number
        entry = [number, loop.call_soon_threadsafe, _resolve_all, future]
        with self._lock:
            future.takes = self._takes
            if number <= self.done:  # committed meanwhile
                future.entry = None
                future.set_result(None)
                return future
            future.entry = entry
            self._waiters.append(entry)
            kick = not self._signalled
            self._signalled = True
        if kick:
            self._wake.put(None)
        return future

    async def _until_trio(self, number: int) -> None:
        import trio  # noqa: PLC0415  (the only other backend anyio runs)

        event = trio.Event()
        token = trio.lowlevel.current_trio_token()
        self._wait(number, token.run_sync_soon, _set_all, event)
        await event.wait()

    def wait_sync(self, number: int, timeout: float | None) -> bool:
        if number <= self.done:
            return True
        event = threading.Event()
        self._wait(number, None, _set_all, event)
        return event.wait(timeout)

    def _wait(
        self, number: int, via: Callable[..., Any] | None, wake: _WakeAll, waiter: Any
    ) -> None:
        """Have `via(wake, [waiter, ...])` called once `number` is committed (`via` None:
        `wake([waiter])` from the writer thread): one call per event loop and commit."""
        with self._lock:
            if number > self.done:
                self._waiters.append([number, via, wake, waiter])
                kick = not self._signalled
                self._signalled = True
            else:
                kick = None
        if kick is None:
            wake([waiter])
        elif kick:
            self._wake.put(None)

    def _wake_waiters(self) -> None:
        with self._lock:
            done = self.done
            ready = [w for w in self._waiters if w[0] <= done]
            self._waiters = [w for w in self._waiters if w[0] > done]
        groups: dict[tuple[Any, _WakeAll], list[Any]] = {}
        for _, via, wake, waiter in ready:
            groups.setdefault((via, wake), []).append(waiter)
        for (via, wake), waiters in groups.items():
            if via is None:
                wake(waiters)
                continue
            with contextlib.suppress(RuntimeError):  # that loop closed: no one waits there
                via(wake, waiters)

    # The thread.

    def run(self) -> None:
        # A running owner of this process from before its record exists (see `_gone`)
        # until it is removed at a clean stop: if the thread dies instead, tasks of the
        # entries it leaves may still run here, and must not be replayed beside them.
        _running.add(self.origin)
        try:
            db = self._db = self._connect()
        except Exception as exc:
            logger.exception(
                "Journal %s could not be opened; tasks are not journaled", escape(self.journal.path)
            )
            self.failure = f"{type(exc).__name__}: {exc}"
            self._give_up_forever()
            return
        finally:
            self.opened.set()
        try:
            self._serve(db)
        except BaseException:
            logger.exception("The journal %s stopped", escape(self.journal.path))
            self._give_up_forever()
        else:
            _running.discard(self.origin)  # its owner record is gone with it
        finally:
            self._db.close()  # the one open now (see `_reopened`)

    def _connect(self) -> sqlite3.Connection:
        journal = self.journal
        db = sqlite3.connect(
            journal.path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
        )
        db.text_factory = _text  # for reads only: claims (see `_OWNERS`)
        start = time.monotonic()
        try:
            for attempt in itertools.count(1):
                try:
                    self._prepare(db)
                    break
                except sqlite3.OperationalError as exc:
                    # Processes opening a new file at once (`--workers 2`) both switch it to
                    # WAL, which rewrites its header: one that holds the read lock and finds
                    # the other holding the write lock is refused at once, busy_timeout or
                    # not (waiting for it could deadlock). Seen in ~5% of opens. A lock
                    # waited for the busy timeout is another connection's write: not again.
                    waited = time.monotonic() - start >= BUSY_TIMEOUT
                    if attempt >= 20 or "locked" not in str(exc) or waited:
                        raise
                    pause = 0.05 * attempt
                    logger.debug(
                        "Journal %s is locked by a connection switching it to WAL; "
                        "opening it again in %.2fs",
                        escape(journal.path),
                        pause,
                    )
                    time.sleep(pause)
        except BaseException:
            db.close()
            raise
        self._file = _identity(journal.path)  # the file `db` has open (see `_reopened`)
        return db

    def _prepare(self, db: sqlite3.Connection) -> None:
        journal = self.journal
        db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000):d}")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute(f"PRAGMA synchronous = {'FULL' if journal.durability == 'full' else 'NORMAL'}")
        with _transaction(db):
            for statement in _SCHEMA.strip().split(";"):
                if statement.strip():
                    db.execute(statement)
            for table, columns in _COLUMNS.items():
                try:
                    db.execute(f"SELECT {columns} FROM {table} LIMIT 0")  # noqa: S608  (constants)
                except sqlite3.OperationalError as exc:
                    msg = (
                        f"its table {table!r} is not a journal's ({exc}): the file belongs to "
                        "something else; give the journal a file of its own"
                    )
                    raise sqlite3.DatabaseError(msg) from exc
            db.execute(  # OR REPLACE: a file opened again may have it (see `_reopened`)
                "INSERT OR REPLACE INTO owners (id, pid, host, beat) VALUES (?, ?, ?, ?)",
                (self.origin, self.pid, self.host, time.time()),
            )

    def _serve(self, db: sqlite3.Connection) -> None:
        beat_every = self.journal.lease / 3
        next_beat = 0.0  # at once: take over what dead owners left
        while True:
            now = time.monotonic()
            if now >= next_beat:
                db = self._reopened(db)
                self._claim_due = self._beat(db) or self._claim_due
                next_beat = time.monotonic() + beat_every
            if self._claim_due and not self._replays:
                self._take_over(db)
            until = next_beat - time.monotonic()
            if self._plain or self._rich or self._ended or self._deletes or self._claim_due:
                until = min(until, LINGER)  # writes no one waits for: commit them soon anyway
            with contextlib.suppress(queue.Empty):
                self._wake.get(timeout=min(max(until, 0.0), LONGEST_WAIT))
            with self._lock:
                self._signalled = False
                plain, rich, ended = self._plain, self._rich, self._ended
                self._plain, self._rich, self._ended = [], [], []
                dropped = self._dropped
                if dropped:
                    self._dropped = set()
                self._takes += 1
                stop = self._stopping
                last = self._queued
            self._deletes += ended
            if dropped:  # not even written (their deletions are harmless)
                plain = _without(plain, _PLAIN_WIDTH, dropped)
                rich = _without(rich, _RICH_WIDTH, dropped)
            if not plain and not rich and not self._deletes and not stop:
                continue
            self._write(db, plain, rich, stop)
            with self._lock:
                self.done = last
            self._wake_waiters()
            if stop:
                return

    def _reopened(self, db: sqlite3.Connection) -> sqlite3.Connection:
        """`db`, or a connection to the file now at the journal's path if it is not the
        one `db` has open: deleted (`rm tasks.db*`) or replaced while in use, the file
        `db` writes to is one no other process will ever open."""
        path = self.journal.path
        if _identity(path) == self._file:
            return db
        logger.error(
            "Journal %s was deleted or replaced while in use: opening the file now at that "
            "path. This process's tasks journaled before it that have not run yet are only "
            "in the old file: a crash now loses them",
            escape(path),
        )
        try:
            self._db = self._connect()
        except Exception:
            logger.exception("Journal %s could not be opened again", escape(path))
            return db
        db.close()
        return self._db

    def _write(self, db: sqlite3.Connection, plain: list[Any], rich: list[Any], stop: bool) -> None:
        """Commit the rows taken, and the deletions if due (all of them on `stop`).

        Deletions wait up to `LINGER` seconds, unless nothing else is written: each
        statement costs the thread the GIL once more (see `_write_many`), and no one
        waits for a deletion.
        """
        deletes = self._deletes  # keys, flat: origin, seq, origin, seq...
        if stop or not (plain or rich) or time.monotonic() - self._deleted_at >= LINGER:
            self._deletes, self._deleted_at = [], time.monotonic()
        else:
            deletes = []
        by_origin = _by_origin(deletes)
        fixed, start = False, time.monotonic()
        for attempt in itertools.count(1):
            try:
                # Each statement is a transaction of its own: the writes are independent,
                # and BEGIN and COMMIT would be two more steps (see _write_many). Rows
                # without options first: a task's entry written again with options (`set()`
                # after `add_task()`) replaces its first one, in the same commit or later.
                if plain:
                    _write_many(db, self._plain_sql, plain, _PLAIN_WIDTH)
                    plain = []  # committed: not written again if what follows fails
                if rich:
                    _write_many(db, self._rich_sql, rich, _RICH_WIDTH)
                    rich = []
                while by_origin:
                    _write_many(db, _deleting, by_origin[-1], 1, head=1, pad=True)
                    by_origin.pop()  # committed: not written again
                if stop:
                    db.execute("DELETE FROM owners WHERE id = ?", (self.origin,))
                self._failing = False
                break
            except (sqlite3.Error, ValueError, OverflowError) as exc:
                if not fixed and not isinstance(exc, sqlite3.OperationalError):
                    # A value SQLite cannot store (a request path with a lone surrogate,
                    # from a middleware that decoded bytes with surrogateescape): written as
                    # printable text, rather than lost with every row of its commit.
                    plain, rich, fixed = _bindable(plain), _bindable(rich), True
                    logger.warning(
                        "Journal %s: a value of an entry cannot be stored as it is (%s); "
                        "it is written as printable text",
                        escape(self.journal.path),
                        escape(str(exc)),
                    )
                    continue
                left = len(plain) // _PLAIN_WIDTH + len(rich) // _RICH_WIDTH + _count(by_origin)
                if not self._failing:
                    logger.exception(
                        "Journal %s: could not commit %d writes (attempt %d)",
                        escape(self.journal.path),
                        left,
                        attempt,
                    )
                # A lock held past the busy timeout was waited for already: once more would
                # hold the responses waiting for this commit that long again, and again. A
                # file that failed every attempt of a commit (a full disk) is tried once per
                # commit until one succeeds: each retry would hold every response meanwhile.
                if attempt >= 5 or self._failing or time.monotonic() - start >= BUSY_TIMEOUT:
                    self._failing = True
                    logger.error(
                        "Journal %s: %d writes were not journaled (%s: %s)%s",
                        escape(self.journal.path),
                        left,
                        type(exc).__name__,
                        escape(str(exc)),
                        _locked_for() if "locked" in str(exc) else "",
                    )
                    break
                time.sleep(0.1 * attempt)

    def _beat(self, db: sqlite3.Connection) -> bool:
        """Refresh this owner's heartbeat; whether it was."""
        try:
            with _transaction(db, immediate=True):
                updated = db.execute(
                    "UPDATE owners SET beat = ? WHERE id = ?", (time.time(), self.origin)
                )
                if updated.rowcount == 0:
                    logger.error(
                        "Journal %s: this process (pid %d) was taken for dead by another, "
                        "whose heartbeat check it missed; registering again",
                        escape(self.journal.path),
                        self.pid,
                    )
                    db.execute(
                        "INSERT INTO owners (id, pid, host, beat) VALUES (?, ?, ?, ?)",
                        (self.origin, self.pid, self.host, time.time()),
                    )
        except sqlite3.Error:
            logger.exception("Journal %s: the heartbeat failed", escape(self.journal.path))
            return False
        return True

    def _take_over(self, db: sqlite3.Connection) -> None:
        """Claim and deliver what owners that are gone left: `CLAIM_CHUNK` entries at most,
        the next ones once these have all gone to the runner (`_replays` is empty)."""
        # A transaction of its own: whatever a claim meets, the heartbeat is committed.
        self._claim_due = False
        try:
            with _transaction(db, immediate=True):
                claimed, gone = self._claim(db)
            more = self._claim_due = len(claimed) >= CLAIM_CHUNK
            gone = gone or self._gone_pids  # a chunk after the first: the same processes
            self._gone_pids = gone if more else []
            if claimed:
                self._deliver(db, claimed, gone)
        except Exception:  # the writer goes on: it has this process's writes to commit
            logger.exception(
                "Journal %s: taking over the entries of processes that are gone failed; "
                "what was taken stays in the file, for the next start",
                escape(self.journal.path),
            )

    def _claim(self, db: sqlite3.Connection) -> tuple[list[tuple[Any, ...]], list[int]]:
        """In the caller's transaction: remove owners that are gone, take their entries."""
        now = time.time()
        gone: list[int] = []
        for owner, pid, host, beat in db.execute(_OWNERS, (self.origin,)).fetchall():
            if owner not in _running and self._gone(pid, host, now - beat):
                db.execute("DELETE FROM owners WHERE id = ?", (owner,))
                gone.append(pid)
        claimed = db.execute(_ORPHANS, (CLAIM_CHUNK,)).fetchall()
        db.executemany(_ADOPT, [(self.origin, origin, seq) for origin, seq, *_ in claimed])
        return claimed, gone

    def _gone(self, pid: int, host: str, silent: float) -> bool:
        """Whether the owner with `pid` on `host`, silent for `silent` seconds, is gone.

        On this host the pid decides: a live process keeps its entries even if its
        heartbeat is late (stopped, starved), so that no entry ever runs twice at once;
        only a silence of `STALE_LEASES` leases outweighs it (the pid was reused). Our
        own pid under another owner id is a process that had it before us (a container
        restarted: same host name, same pid 1), unless it is a writer of this process that
        runs (`_running`). Elsewhere, the heartbeat decides.
        """
        lease = self.journal.lease
        if host != self.host or pid <= 0:  # elsewhere, or no pid (a damaged record)
            return silent > lease
        return pid == self.pid or not _alive(pid) or silent > lease * STALE_LEASES

    def _deliver(
        self, db: sqlite3.Connection, claimed: list[tuple[Any, ...]], gone: list[int]
    ) -> None:
        journal, entries, dead = self.journal, [], []
        limit = journal.max_replays
        for origin, seq, path, payload, options, method, request_path, deliveries in claimed:
            if limit is not None and deliveries >= limit:
                logger.error(
                    "Journal %s: task %s of %s %s was replayed %d times, and each time its "
                    "process was gone before it ended; it is not replayed again (max_replays), "
                    "it is kept in the file, marked dead",
                    escape(journal.path),
                    escape(path),
                    escape(method),
                    escape(request_path),
                    deliveries,
                )
                dead.append((f"given up after {deliveries} replays (max_replays)", origin, seq))
                continue
            try:
                func, args, kwargs, opts = _decoded(journal.serializer, path, payload, options)
            except Exception as exc:
                logger.error(
                    "Journal %s: a task of %s %s left by a process that is gone cannot be "
                    "replayed: %s cannot be loaded (%s: %s); it is kept in the file, marked dead",
                    escape(journal.path),
                    escape(method),
                    escape(request_path),
                    escape(path),
                    type(exc).__name__,
                    escape(str(exc)),
                )
                dead.append((escape(f"{type(exc).__name__}: {exc}"), origin, seq))
                continue
            entries.append(
                Entry(
                    (origin, seq),
                    func,
                    args,
                    kwargs,
                    opts,
                    method,
                    request_path,
                    deliveries + 1,
                )
            )
        if dead:
            try:
                with _transaction(db):
                    db.executemany("UPDATE entries SET dead = ? WHERE origin = ? AND seq = ?", dead)
            except sqlite3.Error:
                logger.exception("Journal %s: could not mark entries dead", escape(journal.path))
        if entries:
            logger.warning(
                "Journal %s: replaying %d tasks left by processes that are gone (pids %s)",
                escape(journal.path),
                len(entries),
                ", ".join(map(str, sorted(set(gone)))) or "unknown: their owners had shut down",
            )
            self._replays = entries  # `replay()` empties it
            journal.deliver(entries)

    def _give_up_forever(self) -> None:
        """The journal is unusable: release every waiter now and later (logged above),
        and let go of what was queued (requests get no recorder any more)."""
        with self._lock:
            self.done = sys.maxsize
            self.broken = True
            self._plain, self._rich, self._ended, self._deletes = [], [], [], []
            self._dropped = set()
        self._wake_waiters()


def _locked_for() -> str:
    return (
        f": another connection held a write lock on the file for over {BUSY_TIMEOUT:g}s "
        "(a `sqlite3` shell left in a transaction?)"
    )


def _decoded(
    serializer: Serializer, path: str, payload: str | bytes, options: str | None
) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any], dict[str, Any]]:
    """An entry's callable, arguments and options, as written; raises if it cannot be run
    as written (its callable gone, its arguments or options of the wrong shape)."""
    module, qualname = path.split(":", 1)
    func = resolve(module, qualname)
    if not callable(func):
        msg = f"{path} is not callable"
        raise TypeError(msg)
    args, kwargs = serializer.loads(payload)
    if not isinstance(args, (list, tuple)):
        msg = f"arguments are not a list: {type(args).__name__}"
        raise TypeError(msg)
    if not isinstance(kwargs, dict) or not all(isinstance(name, str) for name in kwargs):
        msg = f"keyword arguments are not an object: {type(kwargs).__name__}"
        raise TypeError(msg)
    opts = json.loads(options) if options else {}
    if not isinstance(opts, dict):
        msg = f"options are not an object: {type(opts).__name__}"
        raise TypeError(msg)
    return func, tuple(args), kwargs, opts


class _transaction:
    def __init__(self, db: sqlite3.Connection, *, immediate: bool = True) -> None:
        self.db = db
        self.immediate = immediate

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE" if self.immediate else "BEGIN")

    def __exit__(self, kind: object, error: object, tb: object) -> None:
        if kind is None:
            self.db.execute("COMMIT")
        else:
            self.db.execute("ROLLBACK")


class _Commit(asyncio.Future[None]):
    """A commit that the waiters of one asyncio event loop await together.

    A waiting request's task may be cancelled; `Task.cancel()` then cancels the future
    the task awaits, which would cancel every waiter. This one refuses: it wakes every
    waiter now, and asyncio, refused, marks the task to be cancelled as it wakes (its
    CancelledError comes at once). The others look again whether their writes are
    committed, and wait anew.
    """

    # Set by `_Writer.until()` (no __init__ in Python: one such future per commit round):
    # the last write its waiters wait for; its entry in the writer's waiters, whose number
    # grows with it (a cycle until _resolve_all() breaks it); how many times the writer
    # had taken the queued writes when it was registered.
    __slots__ = ("entry", "number", "takes")
    number: int
    entry: list[Any] | None
    takes: int

    def cancel(self, msg: Any | None = None) -> bool:
        if not self.done():
            self.set_result(None)
        return False


def _by_origin(keys: list[int]) -> list[list[int]]:
    """Flat keys (origin, seq, origin, seq...) as one list per origin: [origin, seq, ...]."""
    if not keys:
        return []
    origins = keys[0::2]
    if origins.count(origins[0]) == len(origins):  # all of one origin, as usual: in C
        return [[origins[0], *keys[1::2]]]
    groups: dict[int, list[int]] = {}
    for origin, seq in zip(origins, keys[1::2], strict=True):
        groups.setdefault(origin, [origin]).append(seq)
    return list(groups.values())


def _without(rows: list[Any], width: int, seqs: set[int]) -> list[Any]:
    """Flat `rows` of `width` values each, without those whose first value is in `seqs`."""
    kept: list[Any] = []
    for start in range(0, len(rows), width):
        if rows[start] not in seqs:
            kept += rows[start : start + width]
    return kept


def _bindable(rows: list[Any]) -> list[Any]:
    """`rows` with each value SQLite cannot take written as printable text: a text that
    is not valid UTF-8, an int past 64 bits, a type it does not store."""
    return [_storable(value) for value in rows]


def _storable(value: object) -> object:
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:  # lone surrogates
            return escape(value)
        return value
    if value is None or isinstance(value, (bytes, float)):
        return value
    if isinstance(value, int) and -(2**63) <= value < 2**63:
        return value
    return escape(repr(value))


def _count(by_origin: list[list[int]]) -> int:
    return sum(len(seqs) - 1 for seqs in by_origin)  # each list starts with its origin


def _resolve_all(futures: list[_Commit]) -> None:
    for future in futures:
        future.entry = None  # no cycle left for the garbage collector
        if not future.done():  # woken early (a waiter was cancelled)
            future.set_result(None)


def _set_all(events: list[trio.Event] | list[threading.Event]) -> None:
    for event in events:
        event.set()


def _identity(path: str) -> tuple[int, int] | None:
    """Which file is at `path` (None: none)."""
    try:
        found = os.stat(path)
    except OSError:
        return None
    return found.st_dev, found.st_ino


def this_host() -> str:
    """Where pids mean the same, as owner records name it: the host name, and on Linux the
    pid namespace. Containers with one host name (host networking, a name set alike for
    replicas) each have pids of their own: a pid there says nothing of a process here."""
    host = socket.gethostname()
    try:
        return f"{host} {os.readlink('/proc/self/ns/pid')}"  # "web pid:[4026531836]"
    except OSError:  # not Linux
        return host


def _alive(pid: int) -> bool:
    """Whether a process with `pid` exists on this host. On Windows, `os.kill(pid, 0)`
    would send CTRL_C_EVENT: there the heartbeat alone decides."""
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, under another user
        return True
    return True


def _options(task: TaskHandle) -> str | None:
    """The task's `set()` options for its entry, as JSON (None: none set)."""
    plan = task._plan
    if plan is None:
        return None  # most tasks: no dict to build
    options: dict[str, Any] = {}
    for name in ("name", "key", "delay", "retries", "backoff"):
        value = getattr(plan, name)
        if value is not None:
            options[name] = value
    if plan.timeout is not _UNSET:
        options["timeout"] = plan.timeout
    if plan.always:
        options["always"] = True
    if plan.retry_on is not Exception:
        kinds = plan.retry_on if isinstance(plan.retry_on, tuple) else (plan.retry_on,)
        options["retry_on"] = [f"{k.__module__}:{k.__qualname__}" for k in kinds]
    return json.dumps(options) if options else None


def replay(
    entries: list[Entry], make_request: Callable[[str, str], RequestTasks]
) -> Iterator[RequestTasks]:
    """Claimed entries made runnable again: one request of one task per entry, to run
    through the same runner. Called on the event loop that runs them."""
    from ._task import TaskHandle  # noqa: PLC0415

    # Emptied as it goes, from its end (one pop each, not a shift of the whole list): the
    # writer claims more once it is empty (`_take_over`).
    entries.reverse()
    while entries:
        entry = entries.pop()
        request = make_request(entry.method, entry.path)
        context = contextvars.Context()
        context.run(_enter, request, entry.replays)
        task = context.run(TaskHandle, entry.func, entry.args, entry.kwargs, request)
        try:
            task.set(**_replayed_options(entry.options))
        except Exception:
            logger.warning(
                "Journal: options of replayed task %r ignored", escape(task.name), exc_info=True
            )
        task._planned().tries = entry.replays  # attempt numbers go on from the lost ones
        recorder = request.journal
        if recorder is not None:
            recorder.adopt(task, entry.key)
        request.tasks = [task]
        logger.info(
            "Task %r of %s replayed from the journal (replay %d)",
            task.name,
            request.label,
            entry.replays,
            extra=task._fields(),
        )
        yield request


def _enter(request: RequestTasks, replays: int) -> None:
    from . import _context  # noqa: PLC0415

    _context.activate(request)
    replaying.set(replays)


def _replayed_options(options: dict[str, Any]) -> dict[str, Any]:
    options = dict(options)
    kinds = options.pop("retry_on", None)
    if kinds:
        found = []
        for name in kinds:
            try:
                found.append(resolve(*name.split(":", 1)))
            except (ImportError, AttributeError, ValueError):
                logger.warning(
                    "Journal: retry_on class %s not found; retrying on Exception", escape(name)
                )
                found = [Exception]
                break
        options["retry_on"] = tuple(found)
    return options


def on_this_loop(
    run: Callable[[list[Entry]], Coroutine[Any, Any, None]],
) -> Callable[[list[Entry]], None]:
    """A sink for `Journal.open()`: runs `await run(entries)` as a task of its own on the
    event loop that calls this (asyncio or trio), started from the writer thread."""
    from . import _backend  # noqa: PLC0415

    backend = _backend.current()
    loop = _backend.asyncio_loop()
    if loop is not None:
        schedule: Callable[..., object] = loop.call_soon_threadsafe
    else:
        import trio  # noqa: PLC0415  (the only other backend anyio runs)

        schedule = trio.lowlevel.current_trio_token().run_sync_soon

    def sink(entries: list[Entry]) -> None:
        try:
            schedule(backend.spawn, functools.partial(run, entries))
        except RuntimeError:  # the loop closed
            logger.error(
                "Journal: %d claimed tasks were not run, their event loop had closed; they "
                "stay in the file for the next start",
                len(entries),
            )

    return sink


async def replay_batches(  # noqa: PLR0917  (one call site per middleware)
    journal: Journal,
    entries: list[Entry],
    settings: Any,
    stats: Any,
    max_tasks: int,
    owner: Any,
    submit: Callable[[Any], None],
) -> None:
    """Run claimed entries as batches of the middleware whose `settings`, `stats` and
    `max_tasks` are given; `submit(batch)` hands each to `owner`. On the event loop.

    Each waits until `owner` has room for it (`Owner.room`): one claim may take more
    entries than `max_running` and `max_queued` let in at once, and a replay dropped for
    lack of room would stay in the file, owned by this live process, until its next start.
    """
    from . import _batch, _context  # noqa: PLC0415

    def make_request(method: str, path: str) -> RequestTasks:
        request = _context.RequestTasks(max_tasks, method, path, stats, settings.dispatchers)
        request.journal = journal.recorder()  # its tasks' ends, and what they add
        return request

    for request in replay(entries, make_request):
        await owner.room(stats)
        submit(_batch.Batch(request, settings, None))

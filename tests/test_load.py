"""Fault and load test on a real uvicorn: every task is accounted for, and memory comes back.

Some tasks are hostile (they raise SystemExit, KeyboardInterrupt, CancelledError or
GeneratorExit): they fail like the others, and the server keeps serving. Bounded and
self-stopping, loopback only. The default suite runs a short version;
`LOAD_REQUESTS=20000 pytest tests/test_load.py` (run by .ci/run) the full one.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

from .journalfile import opened
from .load import hammer, rss_bytes
from .servers import Server, exit_code_after, run

REQUESTS = int(os.environ.get("LOAD_REQUESTS", "2000"))
CONNECTIONS = 100
# CPython keeps the memory arenas its first peak needed, so RSS is measured after a
# warm-up run of the same size; what a leak would show is growth from there.
WARM_UP = REQUESTS
BURST = 2000  # requests with 0.5 s tasks: some dropped, many still queued at SIGTERM
OPTIONS = {"max_running": 100, "max_queued": 100_000, "shutdown_timeout": 2}
DRAIN_LIMIT = 60.0  # seconds the tasks of a load may take to drain
HOSTILE = ["system exit", "keyboard interrupt", "cancelled error", "generator exit"]

# The log line that reports each final state but `completed`.
LOGGED = {
    "failed": r" failed(?:: .+)?$",  # a hostile task's line may say more
    "timed_out": r" timed out after 0\.01s and was cancelled$",
    "cancelled": r" cancelled while running: the server shut down$",
    "abandoned": r" abandoned: the server shut down before it started$",
}


def load(server: Server, first: int, count: int, *, slow: bool = False) -> None:
    paths = (f"/load?n={n}{'&slow=1' if slow else ''}" for n in range(first, first + count))
    try:
        statuses = asyncio.run(hammer(server.port, paths, CONNECTIONS))
    except (OSError, asyncio.IncompleteReadError) as exc:  # did a task stop the server?
        try:
            code = server.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the load failed, the server still running: {exc!r}") from exc
        output = server.output()[-5000:]
        raise AssertionError(f"the server exited with code {code} under load:\n{output}") from exc
    assert statuses == {200: count}
    still_running(server)


def still_running(server: Server) -> None:
    """The server process still runs: no task stopped it."""
    code = server.process.poll()
    assert code is None, f"the server exited with code {code}:\n{server.output()[-5000:]}"


def drained(server: Server) -> dict[str, int]:
    """Wait until no task is queued or running (at most `DRAIN_LIMIT`); return the counters."""
    deadline = time.monotonic() + DRAIN_LIMIT
    while True:
        stats: dict[str, int] = server.control("stats")
        if stats["queued"] == stats["running"] == 0:
            return stats
        assert time.monotonic() < deadline, f"tasks still queued or running: {stats}"


def test_every_task_under_load_and_shutdown_ends_in_one_logged_state(tmp_path: Path) -> None:
    """Thousands of requests with failing, hostile, slow and timing-out tasks, then SIGTERM
    with tasks queued: the server survives, the counts add up, nothing ran twice, every loss is
    logged, RSS comes back."""
    report = tmp_path / "report.json"
    environ = {"LOAD_REPORT": str(report)}
    with run(
        "uvicorn-httptools", "load_app:app", "--no-access-log", middleware=OPTIONS, env=environ
    ) as server:
        load(server, 0, WARM_UP)
        drained(server)
        rss_before = rss_bytes(server.process.pid)

        load(server, WARM_UP, REQUESTS)
        drained(server)
        rss_after = rss_bytes(server.process.pid)
        alive = server.control("alive")  # no request, task list or task kept alive

        load(server, WARM_UP + REQUESTS, BURST, slow=True)
        exit_code_after(server, signal.SIGTERM, limit=30)
        output = server.output()

    result = json.loads(report.read_text())
    stats, total = result["stats"], 3 * (WARM_UP + REQUESTS + BURST)
    assert result["added"] == total
    assert stats["queued"] == stats["running"] == 0
    ended = {state: n for state, n in stats.items() if state not in ("queued", "running")}
    assert sum(ended.values()) == total  # each task ended exactly once
    assert result["ran_twice"] == 0
    ran = ended["completed"] + ended["failed"] + ended["timed_out"] + ended["cancelled"]
    assert result["ran"] == ran  # the tasks whose body started are exactly those
    assert ended["skipped"] == 0
    kinds = result["kinds"]
    for kind in HOSTILE:
        assert kinds.get(kind, 0) > 0, f"the run had no {kind} task: {kinds}"
    # Everything but the burst drained before SIGTERM: each raising or hostile task failed.
    assert ended["failed"] == kinds["raise"] + sum(kinds[kind] for kind in HOSTILE)
    for state in LOGGED:
        assert ended[state] > 0, f"the run never reached {state}: {ended}"
    for state, pattern in LOGGED.items():
        logged = re.findall(rf"^Task '\S+' of GET /load{pattern}", output, re.MULTILINE)
        assert len(logged) == ended[state], state
    assert ended["dropped"] == 0  # max_queued is far above this load (drops: test_owner.py)
    assert rss_after <= rss_before * 1.10, (rss_before, rss_after)
    assert alive == {"TaskHandle": 0, "RequestTasks": 0, "Batch": 0}


JOURNAL_REQUESTS = 1000  # the journal-on run: bounded, its cost is in docs/benchmarks.md
JOURNAL_BURST = 500


def test_under_load_with_the_journal_what_the_runtime_lost_stays_journaled(
    tmp_path: Path,
) -> None:
    """The same load with `journal=` on: every response, every task accounted for, none
    run twice; after SIGTERM with tasks queued, the journal holds exactly the tasks the
    shutdown cancelled or abandoned (for the next start), and none that ended otherwise."""
    report, journal = tmp_path / "report.json", tmp_path / "journal.db"
    options = {**OPTIONS, "journal": str(journal)}
    with run(
        "uvicorn-httptools",
        "load_app:app",
        "--no-access-log",
        middleware=options,
        env={"LOAD_REPORT": str(report)},
    ) as server:
        load(server, 0, JOURNAL_REQUESTS)
        drained(server)
        deadline = time.monotonic() + 5  # deletions are committed within 50 ms
        while journaled(journal) != 0:
            assert time.monotonic() < deadline, f"{journaled(journal)} entries left"
            time.sleep(0.01)
        load(server, JOURNAL_REQUESTS, JOURNAL_BURST, slow=True)
        exit_code_after(server, signal.SIGTERM, limit=30)

    result = json.loads(report.read_text())
    stats, total = result["stats"], 3 * (JOURNAL_REQUESTS + JOURNAL_BURST)
    ended = {state: n for state, n in stats.items() if state not in ("queued", "running")}
    assert result["added"] == sum(ended.values()) == total
    assert result["ran_twice"] == 0
    lost = ended["cancelled"] + ended["abandoned"] + ended["dropped"]
    assert lost > 0
    with opened(journal) as db:
        assert db.execute("SELECT count(*), count(dead) FROM entries").fetchone() == (lost, 0)
        assert db.execute("SELECT count(*) FROM owners").fetchone() == (0,)  # shut down


def journaled(path: Path) -> int:
    """How many entries the journal file holds."""
    with opened(path) as db:
        return int(db.execute("SELECT count(*) FROM entries").fetchone()[0])

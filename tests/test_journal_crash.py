"""Proof by crash: uvicorn with the journal is killed with `kill -9` while its tasks are
queued and running, and every task of every request that got a response runs after.

Tasks wait on a gate file the test creates; each run appends `n pid replay` to a runs
file. Bounded: 2,000 requests over 50 keep-alive connections, a deadline on every wait.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx

from .journalfile import opened
from .load import hammer
from .servers import STOP_LIMIT, Server, exit_code_after, free_port, run

REQUESTS = 2000
CONNECTIONS = 50
DEADLINE = 30.0  # seconds the replayed tasks may take to run
# 50 tasks running (held at the gate), the rest queued; a shutdown does not wait for them.
OPTIONS = {"max_running": 50, "shutdown_timeout": 1}


def environment(tmp_path: Path, lease: float = 10.0) -> dict[str, str]:
    return {
        "JOURNAL_FILE": str(tmp_path / "journal.db"),
        "JOURNAL_GATE": str(tmp_path / "gate"),
        "JOURNAL_RUNS": str(tmp_path / "runs.txt"),
        "JOURNAL_LEASE": str(lease),
    }


def send_requests(server: Server, count: int) -> collections.Counter[int]:
    """GET /add?n=0..count-1; the statuses of the responses received."""
    paths = (f"/add?n={n}" for n in range(count))
    return asyncio.run(hammer(server.port, paths, CONNECTIONS))


def entries(tmp_path: Path) -> int:
    with opened(tmp_path / "journal.db") as db:
        return int(db.execute("SELECT count(*) FROM entries").fetchone()[0])


def owners(tmp_path: Path) -> set[int]:
    """The pids of the processes registered as owners of the journal."""
    path = tmp_path / "journal.db"
    if not path.exists():
        return set()
    with opened(path) as db:
        try:
            return {pid for (pid,) in db.execute("SELECT pid FROM owners")}
        except sqlite3.OperationalError:  # no table yet
            return set()


def runs(tmp_path: Path) -> list[tuple[int, int, int]]:
    """Every run so far: (task number, pid, was it a replay)."""
    path = tmp_path / "runs.txt"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [(int(n), int(pid), int(replay)) for n, pid, replay in map(str.split, lines)]


def wait_for_runs(tmp_path: Path, expected: set[int]) -> list[tuple[int, int, int]]:
    """Wait (bounded) until every task in `expected` has run; return the runs."""
    deadline = time.monotonic() + DEADLINE
    while True:
        done = runs(tmp_path)
        missing = expected - {n for n, _, _ in done}
        if not missing:
            return done
        assert time.monotonic() < deadline, (
            f"{len(missing)} tasks never ran: {sorted(missing)[:20]}"
        )
        time.sleep(0.05)


def kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def test_every_task_of_a_response_runs_after_kill_9_and_a_restart(tmp_path: Path) -> None:
    """2,000 responses with their tasks queued or running at the gate, `kill -9`, a
    restart with the gate open: each task runs, as a replay, and none twice."""
    env = environment(tmp_path)
    with run(
        "uvicorn-httptools", "journal_app:app", "--no-access-log", middleware=OPTIONS, env=env
    ) as server:
        statuses = send_requests(server, REQUESTS)
        assert statuses == {200: REQUESTS}
        assert entries(tmp_path) == REQUESTS  # on disk, though none ran
        server.process.send_signal(signal.SIGKILL)
        server.process.wait()
    assert runs(tmp_path) == []
    (tmp_path / "gate").touch()
    with run(
        "uvicorn-httptools", "journal_app:app", "--no-access-log", middleware=OPTIONS, env=env
    ) as server:
        done = wait_for_runs(tmp_path, set(range(REQUESTS)))
        pids = {pid for _, pid, _ in done}
        assert pids == {server.process.pid}
    counts = collections.Counter(n for n, _, _ in done)
    duplicates = sum(count - 1 for count in counts.values())
    print(f"{len(done)} runs of {REQUESTS} tasks after kill -9; {duplicates} duplicates")
    assert duplicates == 0
    assert all(replay == 1 for _, _, replay in done)
    assert entries(tmp_path) == 0  # each left the journal once run; the owner shut down


def worker_pids(supervisor: int) -> set[int]:
    """The pids of the processes whose parent is `supervisor`."""
    children = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == supervisor:
                children.add(int(entry))
    return children


def test_a_killed_worker_s_tasks_are_taken_over_by_another_worker(tmp_path: Path) -> None:
    """`uvicorn --workers 2`: one worker is killed with `kill -9` with its tasks at the
    gate; the other worker (or the one started in its place) runs them, once each, while
    the survivor's own tasks are never taken from it."""
    env = environment(tmp_path, lease=1.5)  # a heartbeat every 0.5 s
    with run(
        "uvicorn-httptools",
        "journal_app:app",
        "--no-access-log",
        "--workers",
        "2",
        middleware=OPTIONS,
        env=env,
    ) as server:
        deadline = time.monotonic() + DEADLINE
        while len(owners(tmp_path)) < 2:
            assert time.monotonic() < deadline, "uvicorn did not start two workers"
            time.sleep(0.05)
        workers = owners(tmp_path)
        assert workers <= worker_pids(server.process.pid)
        served: dict[int, set[int]] = collections.defaultdict(set)
        statuses = asyncio.run(_requests_by_pid(server.port, served))
        assert statuses == {200: REQUESTS}
        by_worker = {pid: served[pid] for pid in workers}
        # The one that served more is killed (the kernel may hand one all connections).
        victim, survivor = sorted(workers, key=lambda pid: len(by_worker[pid]), reverse=True)
        kill(victim)
        (tmp_path / "gate").touch()
        done = wait_for_runs(tmp_path, set(range(REQUESTS)))
    counts = collections.Counter(n for n, _, _ in done)
    duplicates = sum(count - 1 for count in counts.values())
    print(f"{len(done)} runs of {REQUESTS} tasks, worker {victim} killed; {duplicates} duplicates")
    assert duplicates == 0
    ran_by = {n: (pid, replay) for n, pid, replay in done}
    assert all(ran_by[n] == (survivor, 0) for n in by_worker[survivor])  # never taken over
    assert all(ran_by[n][0] != victim and ran_by[n][1] == 1 for n in by_worker[victim])


async def _requests_by_pid(port: int, served: dict[int, set[int]]) -> collections.Counter[int]:
    """Send the requests; note which worker (its pid is the body) answered each."""
    todo = iter(range(REQUESTS))
    statuses: collections.Counter[int] = collections.Counter()

    async def client() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for n in todo:
                writer.write(f"GET /add?n={n} HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n".encode())
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                length = next(
                    int(h.split(":")[1]) for h in head if h.lower().startswith("content-length")
                )
                served[int(await reader.readexactly(length))].add(n)
                statuses[int(head[0].split(" ")[1])] += 1
        finally:
            writer.close()

    await asyncio.gather(*(client() for _ in range(CONNECTIONS)))
    return statuses


def test_a_process_that_starts_never_takes_a_live_ones_tasks_only_a_dead_ones(
    tmp_path: Path,
) -> None:
    """Two servers on one journal: the second starts, beats for several leases, and takes
    none of the first's entries; once the first is killed, it takes them all."""
    env = environment(tmp_path, lease=1.0)  # a heartbeat every 0.33 s
    count = 100
    with run(
        "uvicorn-h11", "journal_app:app", "--no-access-log", middleware=OPTIONS, env=env
    ) as first:
        assert send_requests(first, count) == {200: count}
        with run(
            "uvicorn-h11", "journal_app:app", "--no-access-log", middleware=OPTIONS, env=env
        ) as second:
            first_owner = owner_of_entries(tmp_path)
            deadline = time.monotonic() + DEADLINE
            while not (registered := beat_of(tmp_path, second.process.pid)):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            while beat_of(tmp_path, second.process.pid) < registered + 2.0:  # two leases
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert owner_of_entries(tmp_path) == first_owner  # not taken from a live owner
            first.process.send_signal(signal.SIGKILL)
            first.process.wait()
            (tmp_path / "gate").touch()
            done = wait_for_runs(tmp_path, set(range(count)))
            assert {(pid, replay) for _, pid, replay in done} == {(second.process.pid, 1)}
    assert len(done) == count


def owner_of_entries(tmp_path: Path) -> set[int]:
    with opened(tmp_path / "journal.db") as db:
        return {owner for (owner,) in db.execute("SELECT owner FROM entries")}


def beat_of(tmp_path: Path, pid: int) -> float:
    """The last heartbeat of the owner with `pid` (0 before it registered)."""
    with opened(tmp_path / "journal.db") as db:
        found = db.execute("SELECT beat FROM owners WHERE pid = ?", (pid,)).fetchone()
    return 0.0 if found is None else float(found[0])


def test_the_wsgi_middleware_journals_and_replays_at_its_first_use(tmp_path: Path) -> None:
    """waitress: responses mean entries on disk; after `kill -9` and a restart, the first
    request replays them."""
    env = environment(tmp_path)
    count = 40
    with run("waitress", "journal_wsgi:app", env=env) as server:
        for n in range(count):
            assert httpx.get(f"{server.url}/add?n={n}").status_code == 200
        assert entries(tmp_path) == count
        server.process.send_signal(signal.SIGKILL)
        server.process.wait()
    (tmp_path / "gate").touch()
    with run("waitress", "journal_wsgi:app", env=env) as server:
        assert httpx.get(f"{server.url}/").status_code == 200  # its first use
        done = wait_for_runs(tmp_path, set(range(count)))
    assert sorted(n for n, _, _ in done) == list(range(count))
    assert {(pid, replay) for _, pid, replay in done} == {(server.process.pid, 1)}


def test_on_trio_too_responses_mean_entries_and_a_restart_replays_them(tmp_path: Path) -> None:
    """hypercorn's trio worker: the body waits for the commit through trio's token, and
    the entries of the killed server run after a restart."""
    env = environment(tmp_path)
    count = 200
    with run("hypercorn-trio", "journal_app:app", middleware=OPTIONS, env=env) as server:
        assert send_requests(server, count) == {200: count}
        assert entries(tmp_path) == count
        for pid in worker_pids(server.process.pid):  # hypercorn serves from a child process
            kill(pid)
        server.process.send_signal(signal.SIGKILL)
        server.process.wait()
    (tmp_path / "gate").touch()
    with run("hypercorn-trio", "journal_app:app", middleware=OPTIONS, env=env) as server:
        done = wait_for_runs(tmp_path, set(range(count)))
    assert sorted(n for n, _, _ in done) == list(range(count))
    assert {replay for _, _, replay in done} == {1}


def test_a_task_that_kills_its_process_is_given_up_on_after_max_replays(tmp_path: Path) -> None:
    """A task that takes uvicorn down (`os._exit()`) takes each restart down as it is
    replayed, `max_replays` times; the next start keeps it as dead and serves."""
    env = {**environment(tmp_path), "JOURNAL_MAX_REPLAYS": "2"}
    gate = tmp_path / "gate"
    for start in range(3):  # its first run, then its two replays
        with run("uvicorn-httptools", "journal_app:app", "--no-access-log", env=env) as server:
            if start == 0:
                assert httpx.get(f"{server.url}/crash").status_code == 200
            gate.touch()  # the task (or its replay, waiting since the startup) goes on
            assert server.process.wait(timeout=DEADLINE) == 3
        gate.unlink()
    assert [(n, replay) for n, _, replay in runs(tmp_path)] == [(-1, 0), (-1, 1), (-1, 1)]
    gate.touch()
    with run("uvicorn-httptools", "journal_app:app", "--no-access-log", env=env) as server:
        deadline = time.monotonic() + DEADLINE
        while not dead_entries(tmp_path):
            assert time.monotonic() < deadline, "the entry was never given up on"
            time.sleep(0.05)
        assert httpx.get(f"{server.url}/add?n=7").status_code == 200
        wait_for_runs(tmp_path, {7})
        assert "was replayed 2 times, and each time its process was gone" in server.output()
    assert len(runs(tmp_path)) == 4  # not run a fourth time
    assert dead_entries(tmp_path) == ["given up after 2 replays (max_replays)"]


def dead_entries(tmp_path: Path) -> list[str]:
    with opened(tmp_path / "journal.db") as db:
        return [dead for (dead,) in db.execute("SELECT dead FROM entries WHERE dead IS NOT NULL")]


def test_uvicorn_does_not_start_with_a_journal_it_cannot_open(tmp_path: Path) -> None:
    """A journal file whose folder is missing: uvicorn reports our startup failure, which
    names the file and the fix, and exits, rather than serve responses whose tasks are not
    journaled."""
    env = {**os.environ, **environment(tmp_path), "POST_RESPONSE_OPTIONS": "{}"}
    env["JOURNAL_FILE"] = str(tmp_path / "missing" / "journal.db")
    argv = [sys.executable, "-m", "uvicorn", "tests.apps.journal_app:app"]
    argv += ["--host", "127.0.0.1", "--port", str(free_port()), "--lifespan", "on"]
    done = subprocess.run(
        argv, check=False, env=env, capture_output=True, text=True, timeout=DEADLINE
    )
    assert done.returncode != 0
    assert f"The journal {env['JOURNAL_FILE']!r} cannot be opened" in done.stderr
    assert "Application startup failed. Exiting." in done.stderr
    assert "Uvicorn running on" not in done.stderr


def test_a_server_stops_while_another_connection_holds_the_file_locked(tmp_path: Path) -> None:
    """A `sqlite3` shell (here, a connection of the test) holds a write transaction on the
    journal: SIGTERM still stops uvicorn within its limit, its last commit given up on
    after `CLOSE_LIMIT` and logged. Before, the shutdown waited for that commit as long as
    the lock was held (five busy timeouts of 30 s: minutes)."""
    env = environment(tmp_path)
    (tmp_path / "gate").touch()
    with run("uvicorn-h11", "journal_app:app", middleware=OPTIONS, env=env) as server:
        assert httpx.get(f"{server.url}/add?n=1").status_code == 200
        wait_for_runs(tmp_path, {1})
        lock = sqlite3.connect(tmp_path / "journal.db", isolation_level=None)
        try:
            lock.execute("BEGIN EXCLUSIVE")
            exit_code_after(server, signal.SIGTERM, limit=STOP_LIMIT)
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        assert "its last writes were not committed within 10.0s of the shutdown" in (
            server.output()
        )


def test_on_a_full_disk_each_commit_is_tried_once_until_one_succeeds(tmp_path: Path) -> None:
    """No file may grow past 64 KB (`RLIMIT_FSIZE`, as a full disk does it): the entry of
    each `/big` request cannot be written. The first commit that fails is tried five times;
    the next ones once each, each logged, the response and its task going on without the
    entry; a write that fits succeeds and is journaled. Before, every commit was tried five
    times, holding every response for a second: the server answered a few requests a
    second, and logged five tracebacks for each commit."""
    env = {**environment(tmp_path), "JOURNAL_FILE_SIZE": "65536"}
    (tmp_path / "gate").touch()
    with run("uvicorn-h11", "journal_app:app", "--no-access-log", middleware=OPTIONS, env=env) as (
        server
    ):
        with httpx.Client(base_url=server.url, timeout=DEADLINE) as client:
            for n in range(10):
                assert client.get(f"/big?n={n}").status_code == 200
            assert client.get("/add?n=10").status_code == 200
        wait_for_runs(tmp_path, set(range(11)))
        output = server.output()
    assert output.count("writes were not journaled (OperationalError: ") == 10
    assert output.count("(attempt 1)") == 1  # the first failing commit's tries, logged
    assert output.count("(attempt 5)") == 1

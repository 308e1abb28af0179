"""The measurements of issue 5, (a) to (f), each a `Section` of interleaved rounds.

Within a section every system is measured once per round, in the same order
(A B C A B C ...), so slow stretches of a shared machine hit all of them; servers of
a section are all started before the first round and stay up until the last.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from . import apps, inprocess, server
from .apps import Work
from .openloop import open_loop
from .results import Metric, Row, Section, Target

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

__all__ = ["FULL", "QUICK", "SECTIONS", "Plan", "Variant"]


@dataclass(frozen=True)
class Plan:
    """How much of everything to do: the full run, or the quick smoke run."""

    rounds: int = 5  # rounds of each server comparison
    inprocess_rounds: int = 7
    inprocess_requests: int = 5000
    inprocess_warmup: int = 300
    load_seconds: float = 3.0  # one wrk run (whole seconds)
    load_warmup: float = 1.0  # an unmeasured wrk run per server first (0: none)
    long_sleep: float = 0.5  # (c): each request's task sleeps this long
    rate: float = 800.0  # (d), (f): requests per second of the open-loop client
    rate_seconds: float = 4.0
    rate_warmup: float = 1.5  # > latency_sleep: the measured part sees tasks end too
    latency_sleep: float = 1.0  # (d): each request's task sleeps this long
    memory_rounds: int = 3
    memory_requests: int = 5000
    rss_requests: int = 200_000
    rss_warmup: float = 2.0
    rss_chunk: float = 2.0  # seconds of each load run until rss_requests are done
    rss_limit: float = 90.0  # seconds the RSS run may take, whatever it reached
    sync_requests: int = 1000  # (f): requests of `sync_tasks` tasks each, in-process
    sync_tasks: int = 10
    client: str | None = None  # "wrk" or "python"; None: wrk when installed
    cpu_rate: float = 30.0  # (g): requests per second, each with ~50 ms of CPU work
    cpu_seconds: float = 8.0


FULL = Plan()
QUICK = Plan(
    rounds=1,
    inprocess_rounds=2,
    inprocess_requests=500,
    inprocess_warmup=50,
    load_seconds=1.0,
    load_warmup=0.0,
    rate_seconds=1.0,
    rate_warmup=0.2,
    memory_rounds=1,
    memory_requests=500,
    rss_requests=10_000,
    rss_warmup=1.0,
    rss_chunk=1.0,
    rss_limit=15.0,
    sync_requests=100,
    cpu_seconds=2.0,
)


@dataclass(frozen=True)
class Variant:
    """One row: a system doing some work per request."""

    key: str
    label: str
    system: str
    work: Work = field(default_factory=Work)
    compare: tuple[str, ...] = ()


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _rows(section: Section, variants: list[Variant]) -> list[Variant]:
    """Add a row per variant to `section`; return the variants whose system is installed."""
    present = []
    for variant in variants:
        row = Row(variant.key, variant.label, compare=variant.compare)
        if apps.available(variant.system):
            present.append(variant)
        else:
            row.missing = f"{apps.SYSTEMS[variant.system].needs} is not installed"
        section.rows.append(row)
    return present


def interleave(
    section: Section,
    variants: list[Variant],
    rounds: int,
    measure: Callable[[Variant], dict[str, float]],
) -> None:
    """Measure every variant once per round, in order, `rounds` times."""
    present = _rows(section, variants)
    for number in range(1, rounds + 1):
        for variant in present:
            values = measure(variant)
            for metric, value in values.items():
                section.row(variant.key).add(metric, value)
            shown = ", ".join(f"{metric} {value:,.2f}" for metric, value in values.items())
            log(f"[{section.key}] round {number}/{rounds} {variant.label}: {shown}")


A1, S1 = Work("async"), Work("sync")


# (a) --------------------------------------------------------------------------------------


def inprocess_cost(plan: Plan) -> Section:
    section = Section(
        "a",
        "In-process cost per request",
        "Each app called directly on an asyncio event loop, no server: "
        f"{plan.inprocess_requests:,} GET requests one after another (each followed by one "
        "event-loop turn), then a wait until every task they scheduled has finished "
        "(`await middleware.join()` for ours). Lifespan runs around it. "
        f"Median of {plan.inprocess_rounds} interleaved rounds; tasks are no-ops.",
        [
            Metric("us", "µs/request", 2, higher_is_better=False),
            Metric("extra", "µs over bare", 2, higher_is_better=False),
        ],
        columns=[("bare", "÷ bare raw"), ("starlette", "÷ Starlette plain")],
        chart_metric="us",
    )
    bare = ("bare",)
    variants = [
        Variant("bare", "bare raw app", "bare"),
        Variant("ours-none", "ours, no task", "ours", Work(), bare),
        Variant("ours-async", "ours, one async no-op task", "ours", A1, bare),
        Variant("ours-sync", "ours, one sync no-op task", "ours", S1, bare),
        Variant("ours-inline", "ours detach=False, one async task", "ours-inline", A1, bare),
        Variant("raw-spawn", "raw app + asyncio.create_task", "raw-spawn", A1, bare),
        Variant("starlette", "Starlette plain", "starlette", Work(), bare),
        Variant(
            "starlette-bg", "Starlette BackgroundTasks", "starlette-bg", A1, ("bare", "starlette")
        ),
        Variant(
            "starlette-ours",
            "Starlette + ours (add_task)",
            "starlette-ours",
            A1,
            ("bare", "starlette"),
        ),
        Variant("asgi-background", "asgi-background", "asgi-background", A1, bare),
        Variant("fastapi-events", "fastapi-events", "fastapi-events", A1, bare),
    ]

    def measure(variant: Variant) -> dict[str, float]:
        cost = inprocess.cost_per_request(
            variant.system, variant.work, plan.inprocess_requests, plan.inprocess_warmup
        )
        return {"us": cost}

    interleave(section, variants, plan.inprocess_rounds, measure)
    # What each system adds to the bare app, round by round (ratios to a 4 µs app
    # look large; the difference is what a request pays).
    bare_values = section.row("bare").values.get("us", [])
    for row in section.rows:
        mine = row.values.get("us", [])
        row.values["extra"] = [a - b for a, b in zip(mine, bare_values, strict=False)]
    return section


# Servers ------------------------------------------------------------------------------


def _server_section(
    section: Section,
    plan: Plan,
    variants: list[Variant],
    measure: Callable[[server.Server], dict[str, float]],
    after_each: float = 0.0,
) -> None:
    """Serve every variant at once, warm each up, then interleave `measure` over them."""
    present = [v for v in variants if apps.available(v.system)]
    with server.serving({v.key: (v.system, v.work) for v in present}) as servers:
        if plan.load_warmup:
            for variant in present:
                server.load(servers[variant.key], plan.load_warmup, client=plan.client)
                time.sleep(after_each)

        def run(variant: Variant) -> dict[str, float]:
            values = measure(servers[variant.key])
            time.sleep(after_each)  # let the variant's tasks end before the next one runs
            return values

        interleave(section, variants, plan.rounds, run)


def _throughput(plan: Plan, errors: list[str]) -> Callable[[server.Server], dict[str, float]]:
    def measure(target: server.Server) -> dict[str, float]:
        result = server.load(target, plan.load_seconds, client=plan.client)
        if result.errors:
            errors.append(f"{target.name}: {result.errors} errors in {result.requests} requests")
        return {"rps": result.rate}

    return measure


def _load_method(plan: Plan) -> str:
    client = plan.client or ("wrk" if server.WRK else "python")
    how = (
        "wrk -t1 -c32" if client == "wrk" else "a Python asyncio client, 32 keep-alive connections"
    )
    return (
        "uvicorn (`--http httptools --loop uvloop --no-access-log`, one worker) on 127.0.0.1, "
        f"loaded by {how} for {plan.load_seconds:g} s per run; one server per system, all "
        "started first"
        + (f", each warmed up for {plan.load_warmup:g} s" if plan.load_warmup else "")
        + f"; median of {plan.rounds} interleaved rounds."
    )


def server_throughput(plan: Plan) -> Section:
    section = Section(
        "b",
        "Throughput under uvicorn, one no-op task per request",
        _load_method(plan),
        [Metric("rps", "req/s", 0)],
        columns=[("bare", "÷ bare raw"), ("starlette-bg", "÷ Starlette BackgroundTasks")],
    )
    variants = [
        Variant("bare", "bare raw app", "bare"),
        Variant("ours-async", "raw + ours, async no-op task", "ours", A1, ("bare",)),
        Variant("ours-sync", "raw + ours, sync no-op task", "ours", S1, ("bare",)),
        Variant("starlette", "Starlette plain", "starlette", Work(), ("bare", "starlette-bg")),
        Variant("starlette-bg", "Starlette BackgroundTasks", "starlette-bg", A1, ("bare",)),
        Variant(
            "starlette-ours",
            "Starlette + ours (add_task)",
            "starlette-ours",
            A1,
            ("bare", "starlette-bg"),
        ),
    ]
    section.targets = [
        Target("raw + ours >= 0.95 x bare raw", "rps", "ours-async", "bare", ">=", 0.95),
        Target(
            "Starlette + ours >= Starlette BackgroundTasks",
            "rps",
            "starlette-ours",
            "starlette-bg",
            ">=",
            1.0,
        ),
    ]
    errors: list[str] = []
    _server_section(section, plan, variants, _throughput(plan, errors))
    section.notes += errors
    return section


def long_tasks(plan: Plan) -> Section:
    seconds = plan.long_sleep
    section = Section(
        "c",
        f"Throughput with one {seconds:g} s sleep task per request",
        _load_method(plan) + f" After each run, a {seconds + 0.5:g} s pause lets its tasks end.",
        [Metric("rps", "req/s", 0)],
        columns=[("raw-spawn", "÷ raw spawn"), ("starlette-bg", "÷ Starlette BackgroundTasks")],
    )
    sleep = Work("sleep", 1, seconds)
    both = ("raw-spawn", "starlette-bg")
    variants = [
        Variant("raw-spawn", "raw app + asyncio.create_task", "raw-spawn", sleep),
        Variant("ours", "raw + ours", "ours", sleep, both),
        Variant("ours-inline", "raw + ours, detach=False", "ours-inline", sleep, both),
        Variant("starlette-bg", "Starlette BackgroundTasks", "starlette-bg", sleep, ("raw-spawn",)),
        Variant("asgi-background", "asgi-background", "asgi-background", sleep, both),
    ]
    section.targets = [
        Target("ours >= 0.9 x raw spawn", "rps", "ours", "raw-spawn", ">=", 0.9),
        Target("ours >= 3 x Starlette BackgroundTasks", "rps", "ours", "starlette-bg", ">=", 3.0),
    ]
    errors: list[str] = []
    _server_section(section, plan, variants, _throughput(plan, errors), after_each=seconds + 0.5)
    section.notes += errors
    return section


def _latency(plan: Plan, notes: list[str]) -> Callable[[server.Server], dict[str, float]]:
    return _latency_at(plan.rate, plan.rate_seconds, plan.rate_warmup, notes)


def _latency_method(plan: Plan) -> str:
    return (
        "uvicorn as in (b); an open-loop asyncio client sends "
        f"{plan.rate:g} requests/s on a clock for {plan.rate_warmup:g} s (not counted) + "
        f"{plan.rate_seconds:g} s, over keep-alive connections (a new one when all are busy); "
        "latency runs from the time a request was due to the end of its response. "
        "`client lag p99` is how late the client itself sent: the noise floor. "
        f"Median of {plan.rounds} interleaved rounds."
    )


LATENCY_METRICS = [
    Metric("p50", "p50 ms", 2, higher_is_better=False),
    Metric("p99", "p99 ms", 2, higher_is_better=False),
    Metric("late", "client lag p99 ms", 2, higher_is_better=False),
]


def latency(plan: Plan) -> Section:
    seconds = plan.latency_sleep
    section = Section(
        "d",
        f"Latency at a fixed rate, with and without a {seconds:g} s sleep task per request",
        _latency_method(plan),
        list(LATENCY_METRICS),
        columns=[("ours-none", "÷ ours without tasks")],
        chart_metric="p99",
    )
    variants = [
        Variant("bare", "bare raw app", "bare", Work(), ("ours-none",)),
        Variant("ours-none", "raw + ours, no task", "ours", Work()),
        Variant(
            "ours-sleep",
            f"raw + ours, {seconds:g} s sleep task",
            "ours",
            Work("sleep", 1, seconds),
            ("ours-none",),
        ),
    ]
    section.targets = [
        Target("p99 with tasks <= 1.1 x p99 without", "p99", "ours-sleep", "ours-none", "<=", 1.1)
    ]
    notes: list[str] = []
    # A pause after each run, so its tasks have ended before the next server's run.
    _server_section(section, plan, variants, _latency(plan, notes), after_each=seconds + 0.2)
    section.notes += notes
    return section


# (e) --------------------------------------------------------------------------------------


def memory_per_task(plan: Plan) -> Section:
    section = Section(
        "e1",
        "Memory per waiting task (in-process)",
        f"tracemalloc, in-process: {plan.memory_requests:,} requests, each in its own asyncio "
        "task as a server runs them, each scheduling one task that waits on an event; the "
        "memory still allocated once they all wait (after a GC), minus that before, divided "
        "by the number of requests. Systems that run tasks inside the app call keep the "
        "request's coroutine alive, which counts; on a real server they also keep the "
        f"server's request objects, which does not. Median of {plan.memory_rounds} rounds.",
        [Metric("bytes", "bytes/task", 0, higher_is_better=False)],
        columns=[("raw-spawn", "÷ raw spawn")],
    )
    gate = Work("gate")
    spawn = ("raw-spawn",)
    variants = [
        Variant("raw-spawn", "raw app + asyncio.create_task", "raw-spawn", gate),
        Variant("ours", "ours", "ours", gate, spawn),
        Variant("ours-inline", "ours, detach=False", "ours-inline", gate, spawn),
        Variant("starlette-bg", "Starlette BackgroundTasks", "starlette-bg", gate, spawn),
        Variant("asgi-background", "asgi-background", "asgi-background", gate, spawn),
        Variant("fastapi-events", "fastapi-events", "fastapi-events", gate, spawn),
    ]

    def measure(variant: Variant) -> dict[str, float]:
        return {"bytes": inprocess.bytes_per_task(variant.system, plan.memory_requests)}

    interleave(section, variants, plan.memory_rounds, measure)
    return section


class RssSampler:
    """Samples a process's RSS every `interval` seconds in a thread, while in a `with`."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._start = time.monotonic()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append((time.monotonic() - self._start, server.rss_bytes(self.pid)))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


MIB = 1024 * 1024


def _rss_run(plan: Plan, target: server.Server, section: Section, key: str) -> None:
    """Warm up, then load `target` until `plan.rss_requests` requests (or the time limit)."""
    pid, row = target.process.pid, section.row(key)
    row.add("start", server.rss_bytes(pid) / MIB)
    with RssSampler(pid) as sampler:
        server.load(target, plan.rss_warmup, client=plan.client)
        time.sleep(0.5)
        row.add("warm", server.rss_bytes(pid) / MIB)
        done, began = 0, time.monotonic()
        while done < plan.rss_requests and time.monotonic() - began < plan.rss_limit:
            done += server.load(target, plan.rss_chunk, client=plan.client).requests
        took = time.monotonic() - began
        time.sleep(1.0)  # the last tasks end
    end = server.rss_bytes(pid)
    row.add("peak", max([end, *(rss for _, rss in sampler.samples)]) / MIB)
    row.add("end", end / MIB)
    section.series[row.label] = [(t, rss / MIB) for t, rss in sampler.samples]
    section.notes.append(
        f"{row.label}: {done:,} requests after the warm-up in {took:.1f} s ({done / took:,.0f}/s)"
    )


def server_rss(plan: Plan) -> Section:
    section = Section(
        "e2",
        f"Server RSS over {plan.rss_requests:,} requests, one no-op async task each",
        "uvicorn as in (b); RSS from /proc/<pid>/status: at start, after a "
        f"{plan.rss_warmup:g} s wrk warm-up, sampled every 0.1 s while {plan.client or 'wrk'} "
        f"sends {plan.rss_requests:,} more requests in {plan.rss_chunk:g} s runs (the peak), and "
        "1 s after "
        "the last (the end). The bare app shows what uvicorn itself does.",
        [
            Metric("start", "start MiB", 1, higher_is_better=False),
            Metric("warm", "after warm-up MiB", 1, higher_is_better=False),
            Metric("peak", "peak MiB", 1, higher_is_better=False),
            Metric("end", "end MiB", 1, higher_is_better=False),
        ],
        chart_metric="end",
    )
    variants = [
        Variant("bare", "bare raw app", "bare"),
        Variant("ours", "raw + ours, async no-op task", "ours", A1),
    ]
    section.targets = [
        Target("RSS at the end <= 1.1 x after warm-up", "end", "ours", "ours", "<=", 1.1, "warm")
    ]
    present = _rows(section, variants)
    with server.serving({v.key: (v.system, v.work) for v in present}) as servers:
        for variant in present:
            _rss_run(plan, servers[variant.key], section, variant.key)
            log(f"[e2] {variant.label}: {section.row(variant.key).values}")
    return section


# (f) --------------------------------------------------------------------------------------


def sync_tasks(plan: Plan) -> Section:
    count = plan.sync_tasks
    section = Section(
        "f1",
        f"Many small tasks: {count} no-op tasks per request, tasks per second (in-process)",
        f"As in (a): {plan.sync_requests:,} requests of {count} no-op tasks each, timed until "
        "the last task ended. Ours runs a request's tasks one after another (sync ones in its "
        "own pool of 40 threads); Starlette runs sync ones with anyio.to_thread. "
        f"Median of {plan.inprocess_rounds} interleaved rounds.",
        [Metric("tps", "tasks/s", 0)],
        columns=[("ours-async", "÷ ours, async tasks"), ("starlette-sync", "÷ Starlette, sync")],
    )
    many_async, many_sync = Work("async", count), Work("sync", count)
    variants = [
        Variant("ours-async", "ours, async tasks", "ours", many_async),
        Variant(
            "ours-sync", "ours, sync tasks", "ours", many_sync, ("ours-async", "starlette-sync")
        ),
        Variant(
            "starlette-async",
            "Starlette BackgroundTasks, async",
            "starlette-bg",
            many_async,
            ("ours-async",),
        ),
        Variant(
            "starlette-sync",
            "Starlette BackgroundTasks, sync",
            "starlette-bg",
            many_sync,
            ("ours-async",),
        ),
    ]

    def measure(variant: Variant) -> dict[str, float]:
        cost = inprocess.cost_per_request(
            variant.system, variant.work, plan.sync_requests, plan.inprocess_warmup // 10
        )
        return {"tps": variant.work.tasks * 1e6 / cost}

    interleave(section, variants, plan.inprocess_rounds, measure)
    return section


def sync_latency(plan: Plan) -> Section:
    count = plan.sync_tasks
    section = Section(
        "f2",
        f"Request latency with {count} sync vs {count} async no-op tasks per request",
        _latency_method(plan),
        list(LATENCY_METRICS),
        columns=[("ours-none", "÷ ours without tasks")],
        chart_metric="p99",
    )
    variants = [
        Variant("ours-none", "raw + ours, no task", "ours", Work()),
        Variant(
            "ours-async",
            f"raw + ours, {count} async tasks",
            "ours",
            Work("async", count),
            ("ours-none",),
        ),
        Variant(
            "ours-sync",
            f"raw + ours, {count} sync tasks",
            "ours",
            Work("sync", count),
            ("ours-none",),
        ),
    ]
    notes: list[str] = []
    _server_section(section, plan, variants, _latency(plan, notes))
    section.notes += notes
    return section


# (g) --------------------------------------------------------------------------------------


CELERY_BROKER = "redis://127.0.0.1:6379/11"


def celery_offload(plan: Plan) -> Section:
    """Client latency while each request's task burns ~50 ms of CPU: in the server's process
    (a worker thread, holding the GIL) or handed to a Celery worker process."""
    rate, seconds = plan.cpu_rate, plan.cpu_seconds
    section = Section(
        "g",
        "A CPU-heavy task (about 50 ms of pure Python) per request: in-process vs Celery",
        f"uvicorn as in (b), one Celery worker (`--pool=solo`, Redis on 127.0.0.1); the "
        f"open-loop client of (d) at {rate:g} requests/s for {seconds:g} s. Median of "
        f"{plan.rounds} interleaved rounds.",
        list(LATENCY_METRICS),
        columns=[("ours-none", "÷ no task")],
        chart_metric="p99",
    )
    variants = [
        Variant("ours-none", "raw + ours, no task", "ours", Work()),
        Variant("ours-cpu", "raw + ours, CPU task in-process", "ours", Work("cpu"), ("ours-none",)),
        Variant("ours-celery", "raw + ours, CPU task to Celery", "ours", Work("celery"),
                ("ours-none",)),
    ]  # fmt: skip
    missing = _celery_missing()
    if missing:
        row = Row("ours-celery", variants[2].label, compare=variants[2].compare)
        row.missing = missing
        section.rows.append(row)
        variants = variants[:2]
    notes: list[str] = []
    measure = _latency_at(rate, seconds, plan.rate_warmup, notes)
    with _celery_worker(enabled=not missing):

        def settled(target: server.Server) -> dict[str, float]:
            values = measure(target)
            _wait_for_celery_queue(enabled=not missing)  # its backlog must not load the next
            return values

        _server_section(section, replace(plan, load_warmup=0.0), variants, settled, 0.5)
    section.notes += notes
    return section


def _latency_at(
    rate: float, seconds: float, warmup: float, notes: list[str]
) -> Callable[[server.Server], dict[str, float]]:
    def measure(target: server.Server) -> dict[str, float]:
        found = open_loop(target.port, rate, seconds, warmup)
        if found.errors:
            notes.append(f"{target.name}: {found.errors} non-200 responses")
        return {"p50": found.p50_ms, "p99": found.p99_ms, "late": found.late_p99_ms}

    return measure


def _celery_missing() -> str:
    """Why section (g) cannot hand tasks to Celery here, or "" when it can."""
    for module in ("celery", "redis"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (the celery extra)"
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", 6379), timeout=1):
        return ""
    return "no Redis on 127.0.0.1:6379"


@contextlib.contextmanager
def _celery_worker(*, enabled: bool) -> Iterator[None]:
    """A Celery worker process for (g), on an emptied Redis database, stopped afterwards."""
    if not enabled:
        yield
        return
    import redis  # noqa: PLC0415  (the celery extra; checked by _celery_missing)

    redis.Redis.from_url(CELERY_BROKER).flushdb()
    argv = [sys.executable, "-m", "celery", "-A", "benchmarks.celery_app:app", "worker",
            "--pool=solo", "--without-mingle", "--without-gossip", "--loglevel=INFO"]  # fmt: skip
    env = {**os.environ, "BENCH_CELERY_BROKER": CELERY_BROKER, "PYTHONPATH": str(server.ROOT)}
    with tempfile.NamedTemporaryFile() as out:
        worker = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)  # noqa: S603
        try:
            deadline = time.monotonic() + 30
            while b"ready." not in Path(out.name).read_bytes():
                if worker.poll() is not None or time.monotonic() > deadline:
                    msg = f"the Celery worker did not start:\n{Path(out.name).read_text()}"
                    raise RuntimeError(msg)
                time.sleep(0.1)
            yield
        finally:
            worker.terminate()
            try:
                worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()


def _wait_for_celery_queue(*, enabled: bool, limit: float = 60.0) -> None:
    """Until the worker has taken every task off the queue (bounded)."""
    if not enabled:
        return
    import redis  # noqa: PLC0415

    store, deadline = redis.Redis.from_url(CELERY_BROKER), time.monotonic() + limit
    while store.llen("post_response_bench") and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.2)  # the last one, taken, finishes


SECTIONS: dict[str, Callable[[Plan], Section]] = {
    "a": inprocess_cost,
    "b": server_throughput,
    "c": long_tasks,
    "d": latency,
    "e1": memory_per_task,
    "e2": server_rss,
    "f1": sync_tasks,
    "f2": sync_latency,
    "g": celery_offload,
}

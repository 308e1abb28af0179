"""The measurements, (a) to (g), each a `Section` of interleaved rounds (`goals` says
which of their ratios issue 12 sets a goal for).

Within a section every system is measured once per round, in the same order
(A B C A B C ...), so slow stretches of a shared machine hit all of them; servers of
a section are all started before the first round and stay up until the last.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import statistics
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
from .client import MAX_CONNECTIONS, open_loop
from .results import Metric, Row, Section

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
    rate_share: float = 0.7  # (d): the open-loop rate, as a share of the bare app's max rate
    rate_probes: int = 3  # (d): closed-loop runs that find the bare app's max rate (median)
    rate: float = 800.0  # (f2): requests per second of the open-loop client
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
    rate_probes=1,
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
    bare, both = ("bare",), ("bare", "starlette")
    variants = [
        Variant("bare", "bare raw app", "bare"),
        Variant("ours-none", "ours, no task", "ours", Work(), bare),
        Variant("ours-async", "ours, one async no-op task", "ours", A1, bare),
        Variant("ours-sync", "ours, one sync no-op task", "ours", S1, bare),
        Variant("ours-inline", "ours detach=False, one async task", "ours-inline", A1, bare),
        Variant("raw-spawn", "raw app + asyncio.create_task", "raw-spawn", A1, bare),
        Variant("raw-await", "raw app, send then await the task", "raw-await", A1, bare),
        Variant("starlette", "Starlette plain", "starlette", Work(), bare),
        Variant("starlette-bg", "Starlette BackgroundTask", "starlette-bg", A1, both),
        Variant("starlette-ours-none", "Starlette + ours, no task", "starlette-ours", Work(), both),
        Variant("starlette-ours", "Starlette + ours (add_task)", "starlette-ours", A1, both),
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
    *,
    after_each: float = 0.0,
    calibrate: Callable[[dict[str, server.Server]], None] | None = None,
) -> None:
    """Serve every variant at once, warm each up, `calibrate` (the rate of (d)), then
    interleave `measure` over them. After each run, `after_each` seconds let its tasks
    end, and then the server must be idle before the next run starts."""
    present = [v for v in variants if apps.available(v.system)]
    with server.serving({v.key: (v.system, v.work) for v in present}) as servers:

        def settle(target: server.Server) -> None:
            time.sleep(after_each)
            server.wait_idle(target)

        if plan.load_warmup:
            for variant in present:
                server.load(servers[variant.key], plan.load_warmup, client=plan.client)
                settle(servers[variant.key])
        if calibrate is not None:
            calibrate(servers)

        def run(variant: Variant) -> dict[str, float]:
            values = measure(servers[variant.key])
            settle(servers[variant.key])  # its tasks end before the next variant runs
            return values

        interleave(section, variants, plan.rounds, run)
        section.notes += [note for s in servers.values() if (note := server.complaints(s))]


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
        columns=[
            ("bare", "÷ bare raw"),
            ("raw-await", "÷ raw, send then await"),
            ("starlette-bg", "÷ Starlette BackgroundTask"),
            ("starlette-bg-sync", "÷ Starlette sync BackgroundTask"),
            ("ours-async", "÷ ours, no journal"),
        ],
    )
    bare, starlette_bg, awaited = ("bare",), ("bare", "starlette-bg"), ("bare", "raw-await")
    variants = [
        Variant("bare", "bare raw app", "bare"),
        Variant("raw-await", "raw app, send then await the task", "raw-await", A1, bare),
        # What detaching costs by itself: the floor of any design that frees the request.
        Variant("raw-spawn", "raw app + asyncio.create_task", "raw-spawn", A1, awaited),
        Variant("ours-async", "raw + ours, async task", "ours", A1, awaited),
        Variant("ours-journal", "raw + ours with the journal, async task", "ours-journal", A1,
                ("bare", "ours-async")),
        Variant("ours-sync", "raw + ours, sync task", "ours", S1, bare),
        Variant("starlette", "Starlette plain", "starlette", Work(), starlette_bg),
        Variant("starlette-bg", "Starlette BackgroundTask", "starlette-bg", A1, bare),
        Variant("starlette-ours", "Starlette + ours, async task", "starlette-ours", A1,
                starlette_bg),
        Variant("starlette-bg-sync", "Starlette sync BackgroundTask", "starlette-bg", S1, bare),
        Variant("starlette-ours-sync", "Starlette + ours, sync task", "starlette-ours", S1,
                ("bare", "starlette-bg-sync")),
    ]  # fmt: skip
    errors: list[str] = []
    _server_section(section, plan, variants, _throughput(plan, errors))
    section.notes += errors
    return section


def long_tasks(plan: Plan) -> Section:
    seconds = plan.long_sleep
    section = Section(
        "c",
        f"Throughput with one {seconds:g} s sleep task per request",
        _load_method(plan)
        + f" After each run, a {seconds + 0.5:g} s pause lets its tasks end (and the server "
        "must then be idle). Ours runs with `max_running=None, max_queued=None`: at these "
        "rates 10,000-25,000 tasks sleep at once, past the default limits, and the row "
        "measures capacity, as the others have no limit (see docs/performance.md).",
        [Metric("rps", "req/s", 0)],
        columns=[("raw-spawn", "÷ raw spawn"), ("starlette-bg", "÷ Starlette BackgroundTask")],
    )
    sleep = Work("sleep", 1, seconds)
    both = ("raw-spawn", "starlette-bg")
    variants = [
        Variant("raw-spawn", "raw app + asyncio.create_task", "raw-spawn", sleep),
        Variant("ours", "raw + ours, limits off", "ours-unlimited", sleep, both),
        Variant("ours-inline", "raw + ours, detach=False", "ours-inline", sleep, both),
        Variant("starlette-bg", "Starlette BackgroundTask", "starlette-bg", sleep, ("raw-spawn",)),
        Variant("asgi-background", "asgi-background", "asgi-background", sleep, both),
    ]
    errors: list[str] = []
    _server_section(section, plan, variants, _throughput(plan, errors), after_each=seconds + 0.5)
    section.notes += errors
    return section


def _latency_method(plan: Plan, rate: str) -> str:
    return (
        f"uvicorn as in (b); an open-loop client sends {rate} on a clock for "
        f"{plan.rate_warmup:g} s (not counted) + {plan.rate_seconds:g} s, over keep-alive "
        f"connections (a new one when all are busy, up to {MAX_CONNECTIONS}); latency runs "
        "from the time a request was due to the end of its response. `client lag p99` is how "
        "late requests went out: the client's timer granularity (about 1-2 ms), or no free "
        "connection. "
        f"Median of {plan.rounds} interleaved rounds."
    )


LATENCY_METRICS = [
    Metric("p50", "p50 ms", 2, higher_is_better=False),
    Metric("p99", "p99 ms", 2, higher_is_better=False),
    Metric("late", "client lag p99 ms", 2, higher_is_better=False),
]


def latency(plan: Plan) -> Section:
    seconds, share = plan.latency_sleep, plan.rate_share
    section = Section(
        "d",
        f"Latency at {share:.0%} of the max rate of a raw app that spawns a {seconds:g} s "
        "sleep task per request, with and without that task",
        _latency_method(
            plan,
            f"{share:.0%} of the max rate (below) of the raw app calling `asyncio.create_task()` "
            f"for the same task: the capacity one task per request leaves (at {share:.0%} of the "
            "bare app's rate, even that app is past saturation and queues)",
        )
        + f" After each run, a {seconds + 0.2:g} s pause lets its tasks end, and the server "
        "must then be idle. With the sleep task, ours runs with `max_running=None, "
        "max_queued=None`, as in (c).",
        list(LATENCY_METRICS),
        columns=[
            ("raw-spawn", "÷ raw create_task"),
            ("ours-none", "÷ ours without tasks"),
            ("bare", "÷ bare raw"),
        ],
        chart_metric="p99",
    )
    sleep = Work("sleep", 1, seconds)
    variants = [
        Variant("bare", "bare raw app", "bare", Work(), ("ours-none",)),
        Variant("ours-none", "raw + ours, no task", "ours", Work(), ("bare",)),
        Variant("ours-sleep", f"raw + ours, {seconds:g} s sleep task, limits off",
                "ours-unlimited", sleep,
                ("raw-spawn", "ours-none", "bare")),
        Variant("raw-spawn", f"raw app + asyncio.create_task, {seconds:g} s sleep task",
                "raw-spawn", sleep, ("bare",)),
    ]  # fmt: skip
    rate = [plan.rate]

    def calibrate(servers: dict[str, server.Server]) -> None:
        # The max rate as the client that sends the open-loop load drives it closed loop
        # (about what wrk gets): a rate it can send, where wrk is not installed too.
        spawn = servers["raw-spawn"]
        found = []
        for _ in range(plan.rate_probes):
            found.append(server.load(spawn, plan.load_seconds, client="python").rate)
            time.sleep(seconds + 0.2)  # its tasks end before the next probe
        rate[0] = share * statistics.median(found)
        section.notes.append(
            f"the raw create_task app's max rate: {statistics.median(found):,.0f} req/s "
            "(the Python client, closed loop over 32 connections, median of "
            f"{plan.rate_probes} runs); "
            f"the open-loop rate: {rate[0]:,.0f} req/s"
        )
        log(f"[d] open-loop rate {rate[0]:,.0f} req/s")

    notes: list[str] = []

    def measure(target: server.Server) -> dict[str, float]:
        return _latency_at(rate[0], plan.rate_seconds, plan.rate_warmup, notes)(target)

    _server_section(section, plan, variants, measure, after_each=seconds + 0.2, calibrate=calibrate)
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
        _latency_method(plan, f"{plan.rate:g} requests/s"),
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
    measure = _latency_at(plan.rate, plan.rate_seconds, plan.rate_warmup, notes)
    _server_section(section, plan, variants, measure)
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

        _server_section(section, replace(plan, load_warmup=0.0), variants, settled, after_each=0.5)
    section.notes += notes
    return section


def _latency_at(
    rate: float, seconds: float, warmup: float, notes: list[str]
) -> Callable[[server.Server], dict[str, float]]:
    def measure(target: server.Server) -> dict[str, float]:
        found = open_loop(target.port, rate, seconds, warmup)
        if found.errors:
            notes.append(f"{target.name}: {found.errors} errors (non-200, lost or unanswered)")
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

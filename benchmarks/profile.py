"""Where our hot path spends its time: `python -m benchmarks.profile [inprocess|server|all]`.

- `inprocess`: cProfile around the timed part of (a) for ours (`--work async:1` by default:
  one no-op async task per request). Deterministic, with call counts, but it inflates
  small functions: read it for what is called how often, and for the order of costs.
- `server`: py-spy samples a uvicorn server (as in (b)) while wrk loads it, for ours and
  for the bare app, and splits the samples by function and by package. Sampling does not
  inflate small functions; `µs/req` is the share of samples times the time per request
  measured meanwhile.

Examples:
    python -m benchmarks.profile inprocess --requests 20000 --top 30
    python -m benchmarks.profile inprocess --system starlette-ours --compare starlette-bg
    python -m benchmarks.profile server --seconds 8 --system ours --work sync:1
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import cProfile
import json
import pstats
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import inprocess, server
from .apps import COUNTER, Work, build

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["compare_inprocess", "main", "profile_inprocess", "profile_server"]

# Packages, by the path fragment of their frames, for the per-package split.
GROUPS = [
    ("post_response", "/post_response/"),
    ("anyio", "/anyio/"),
    ("asyncio", "/asyncio/"),
    ("uvicorn", "/uvicorn/"),
    ("starlette", "/starlette/"),
    ("contextvars_extras", "/contextvars_extras/"),
    ("logging", "/logging/"),
    ("concurrent.futures", "/concurrent/futures/"),
    ("threading", "/threading.py"),
    ("sniffio", "/sniffio/"),
    ("inspect", "/inspect.py"),
    ("selectors", "/selectors.py"),
    ("benchmarks (the app)", "/benchmarks/"),
]


def group_of(location: str) -> str:
    if location == "~":  # cProfile's name for built-in functions and methods
        return "built-ins (C)"
    for name, fragment in GROUPS:
        if fragment in location:
            return name
    return "other"


# In-process ------------------------------------------------------------------------------


async def _profiled(system: str, work: Work, count: int, profiler: cProfile.Profile) -> float:
    app = build(system, work)
    async with inprocess.running(app):
        await inprocess.check(app, work)
        expected = COUNTER.value + 500 * work.tasks
        await inprocess.requests(app, 500)
        await inprocess.settle(app, expected)
        expected = COUNTER.value + count * work.tasks
        start = time.perf_counter()
        profiler.enable()
        await inprocess.requests(app, count)
        await inprocess.settle(app, expected)
        profiler.disable()
        return time.perf_counter() - start


@dataclass(frozen=True)
class Spent:
    """One function's share of a profiled run, per request."""

    calls: float
    own_us: float
    cumulative_us: float


def _profile(
    system: str, work: Work, count: int
) -> tuple[float, dict[tuple[str, int, str], Spent]]:
    """µs per request under the profiler, and each function's calls and times per request,
    keyed by (file, line, name)."""
    profiler = cProfile.Profile()
    COUNTER.value = 0
    elapsed = asyncio.run(_profiled(system, work, count, profiler))
    entries = pstats.Stats(profiler).stats  # type: ignore[attr-defined]  # {key: (cc, nc, tt, ct, callers)}
    spent = {
        (path, line, name): Spent(calls / count, own / count * 1e6, cum / count * 1e6)
        for (path, line, name), (_, calls, own, cum, _) in entries.items()
    }
    return elapsed / count * 1e6, spent


def _where(key: tuple[str, int, str]) -> str:
    return f"{key[2]} ({_short(key[0])}:{key[1]})"


def profile_inprocess(system: str, work: Work, count: int, top: int) -> str:
    """The report: the cost per request, the top functions by own time, ours alone, and
    the own time by package."""
    per_request, spent = _profile(system, work, count)
    total = sum(entry.own_us for entry in spent.values())
    header = f"{'own %':>6} {'own µs/req':>10} {'cum µs/req':>10} {'calls/req':>9}  function"

    def table(keys: list[tuple[str, int, str]]) -> list[str]:
        return [
            f"{spent[k].own_us / total * 100:6.1f} {spent[k].own_us:10.2f} "
            f"{spent[k].cumulative_us:10.2f} {spent[k].calls:9.2f}  {_where(k)}"
            for k in keys
        ]

    ranked = sorted(spent, key=lambda key: spent[key].own_us, reverse=True)
    ours = [key for key in ranked if group_of(key[0]) == "post_response"]
    by_group = _by_group(spent)
    our_calls = sum(spent[key].calls for key in ours)
    lines = [
        f"cProfile, in-process: {system} doing {work.encode()}, {count:,} requests: "
        f"{per_request:.1f} µs/request under the profiler",
        "",
        header,
        *table(ranked[:top]),
        "",
        f"post_response's functions, top {top} by own time "
        f"({by_group.get('post_response', (0.0, 0.0))[0]:.1f} µs/req, {our_calls:.1f} calls/req):",
        header,
        *table(ours[:top]),
        "",
        "own time by package:",
        *(f"{own / total * 100:6.1f}%  {name}" for name, (own, _) in by_group.items()),
    ]
    return "\n".join(lines)


def _by_group(spent: dict[tuple[str, int, str], Spent]) -> dict[str, tuple[float, float]]:
    """Own µs and calls per request by package, most time first."""
    own: dict[str, float] = collections.defaultdict(float)
    calls: dict[str, float] = collections.defaultdict(float)
    for key, entry in spent.items():
        group = group_of(key[0])
        own[group] += entry.own_us
        calls[group] += entry.calls
    return {
        name: (own[name], calls[name]) for name in sorted(own, key=own.__getitem__, reverse=True)
    }


def compare_inprocess(first: tuple[str, Work], second: tuple[str, Work], count: int) -> str:
    """Two systems profiled one after the other: every function whose calls per request
    differ (a different code path, a fast path lost), then both by package."""
    runs = [_profile(system, work, count) for system, work in (first, second)]
    names = [f"{system} {work.encode()}" for system, work in (first, second)]
    (cost_a, a), (cost_b, b) = runs
    none = Spent(0.0, 0.0, 0.0)
    differ = [
        key
        for key in a.keys() | b.keys()
        if abs(a.get(key, none).calls - b.get(key, none).calls) >= 0.05
    ]
    differ.sort(
        key=lambda key: (group_of(key[0]), -max(a.get(key, none).own_us, b.get(key, none).own_us))
    )
    groups_a, groups_b = _by_group(a), _by_group(b)
    lines = [
        f"cProfile, in-process, {count:,} requests each: A = {names[0]} ({cost_a:.1f} µs/req "
        f"under the profiler), B = {names[1]} ({cost_b:.1f})",
        "",
        "functions whose calls per request differ (own µs/req under the profiler):",
        f"{'A calls':>8} {'B calls':>8} {'A own':>7} {'B own':>7}  function",
        *(
            f"{a.get(k, none).calls:8.2f} {b.get(k, none).calls:8.2f} "
            f"{a.get(k, none).own_us:7.2f} {b.get(k, none).own_us:7.2f}  {_where(k)}"
            for k in differ
        ),
        "",
        "by package (own µs/req under the profiler, calls/req):",
        f"{'A own':>8} {'B own':>8} {'A calls':>8} {'B calls':>8}  package",
    ]
    nothing = (0.0, 0.0)
    for group in sorted(groups_a.keys() | groups_b.keys()):
        (own_a, calls_a), (own_b, calls_b) = (
            groups_a.get(group, nothing),
            groups_b.get(group, nothing),
        )
        lines.append(f"{own_a:8.2f} {own_b:8.2f} {calls_a:8.1f} {calls_b:8.1f}  {group}")
    return "\n".join(lines)


def _short(path: str) -> str:
    for marker in ("site-packages/", "/lib/python3", f"{server.ROOT}/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


# Server -----------------------------------------------------------------------------------


def _py_spy() -> str | None:
    found = shutil.which("py-spy")
    if found:
        return found
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else None


FRAME = re.compile(r"^(?P<name>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _frames(stack: str) -> list[tuple[str, str]]:
    """`func (file:line);...` from py-spy's raw output, as (function, file) pairs."""
    frames = []
    for frame in stack.split(";"):
        found = FRAME.match(frame)
        frames.append((found["name"], found["file"]) if found else (frame, ""))
    return frames


@contextlib.contextmanager
def _sampling(spy: str, pid: int, seconds: float, out: Path) -> Iterator[None]:
    argv = [spy, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "200"]
    argv += ["-f", "raw", "-o", str(out), "--nonblocking", "--full-filenames"]
    process = subprocess.Popen(  # noqa: S603  (py-spy from this environment)
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        time.sleep(0.5)  # py-spy attaches
        yield
        _, err = process.communicate(timeout=seconds + 30)
        if process.returncode:
            msg = f"py-spy failed: {err.decode(errors='replace')}"
            raise RuntimeError(msg)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# The layers a sample is charged to: walking a stack from its innermost frame outwards,
# the first frame of one of these; library code (asyncio's locks and tasks, anyio, the
# standard library) counts for the layer that called it. Time under `Runner.run` with no
# layer deeper is the event loop's own C code (uvloop: sockets, scheduling).
LAYERS = [
    ("post_response", "/post_response/"),
    ("uvicorn", "/uvicorn/"),
    ("starlette", "/starlette/"),
    ("the app (benchmarks)", "/benchmarks/"),
    ("event loop (uvloop, C)", "/asyncio/runners.py"),
]


def _layer(frames: list[tuple[str, str]]) -> tuple[str, tuple[str, str]]:
    """The layer a stack is charged to, and that layer's innermost frame."""
    for frame in reversed(frames):
        for name, fragment in LAYERS:
            if fragment in frame[1]:
                return name, frame
    return "other", frames[-1]


def _summarise(raw: Path, label: str, per_request_us: float, top: int) -> list[str]:
    own: collections.Counter[tuple[str, str]] = collections.Counter()
    charged: collections.Counter[tuple[str, str]] = collections.Counter()  # post_response's
    layers: collections.Counter[str] = collections.Counter()
    groups: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count, frames = int(count_text), _frames(stack)
        total += count
        own[frames[-1]] += count
        groups[group_of(frames[-1][1])] += count
        layer, frame = _layer(frames)
        layers[layer] += count
        if layer == "post_response":
            charged[frame] += count
    if not total:
        return [f"{label}: no samples"]

    def share(count: int, text: str) -> str:
        return f"{count / total * 100:6.1f} {count / total * per_request_us:8.2f}  {text}"

    def where(frame: tuple[str, str]) -> str:
        return f"{frame[0]} ({_short(frame[1])})"

    return [
        f"{label}: {total:,} samples, {per_request_us:.1f} µs per request meanwhile",
        "",
        f"{'%':>6} {'µs/req':>8}  charged to (a layer, with the library code it calls)",
        *(share(count, name) for name, count in layers.most_common()),
        "",
        f"{'%':>6} {'µs/req':>8}  post_response functions, with the library code they call",
        *(share(count, where(frame)) for frame, count in charged.most_common(top)),
        "",
        f"{'own %':>6} {'µs/req':>8}  function (top {top} by own samples)",
        *(share(count, where(frame)) for frame, count in own.most_common(top)),
        "",
        f"{'own %':>6} {'µs/req':>8}  own samples by package",
        *(share(count, name) for name, count in groups.most_common()),
    ]


def profile_server(
    system: str, work: Work, seconds: float, top: int, baseline: str = "bare"
) -> str:
    """py-spy over a uvicorn server under wrk, for `baseline` (doing the same work, unless
    it is the bare app) and then for `system`."""
    spy = _py_spy()
    if spy is None:
        return "py-spy is not installed: pip install py-spy"
    report: list[str] = []
    targets = {f"{baseline} (baseline)": (baseline, Work() if baseline == "bare" else work)}
    targets[system] = (system, work)
    with tempfile.TemporaryDirectory() as tmp:
        gc_logs = {name: Path(tmp) / f"{name}.gc.json" for name in targets}
        env = {name: {"BENCH_GC_LOG": str(path)} for name, path in gc_logs.items()}
        loaded: dict[str, float] = {}
        with server.serving(targets, env) as servers:
            for name, target in servers.items():
                began = time.monotonic()
                server.load(target, 1)  # warm-up
                raw = Path(tmp) / f"{name}.txt"
                with _sampling(spy, target.process.pid, seconds, raw):
                    result = server.load(target, seconds)
                loaded[name] = time.monotonic() - began
                label = f"py-spy, uvicorn serving {name} ({targets[name][1].encode()})"
                report += [*_summarise(raw, label, 1e6 / result.rate, top), ""]
        # The servers have exited: each wrote its garbage collections' totals.
        for name, path in gc_logs.items():
            report += [_gc_summary(name, path, loaded[name]), ""]
    return "\n".join(report)


def _gc_summary(name: str, path: Path, seconds: float) -> str:
    if not path.exists():
        return f"{name}: no GC record"
    totals = json.loads(path.read_text())
    spent = sum(gen["seconds"] for gen in totals.values())
    counts = "/".join(str(totals[gen]["count"]) for gen in "012")
    longest = max(gen["longest"] for gen in totals.values())
    return (
        f"GC in {name}'s server over its whole life (~{seconds:.0f} s of load, warm-up "
        f"included): {counts} collections of generations 0/1/2, {spent * 1000:.0f} ms in all "
        f"(~{spent / seconds * 100:.1f}% of the load time), longest pause {longest * 1000:.1f} ms "
        f"(generation 2: {totals['2']['seconds'] * 1000:.0f} ms)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__)
    parser.add_argument("what", nargs="?", default="all", choices=["inprocess", "server", "all"])
    parser.add_argument("--system", default="ours", help="a system of benchmarks.apps")
    parser.add_argument("--work", default="async:1", help="kind:count[:seconds], e.g. sync:1")
    parser.add_argument("--requests", type=int, default=20_000, help="in-process requests")
    parser.add_argument("--seconds", type=float, default=6.0, help="server sampling time")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument(
        "--baseline",
        default="bare",
        help="the server profiled first, for comparison "
        "(default: the bare app; e.g. raw-spawn with --work sleep:1:0.5)",
    )
    parser.add_argument(
        "--compare",
        metavar="SYSTEM[:WORK]",
        help="in-process: profile this system too (doing --work, unless given) and list the "
        "functions whose calls per request differ, e.g. --system starlette-ours --work none "
        "--compare starlette",
    )
    args = parser.parse_args(argv)
    work = Work.decode(args.work)
    if args.what in ("inprocess", "all") and args.compare:
        other, _, other_work = args.compare.partition(":")
        second = (other, Work.decode(other_work) if other_work else work)
        print(compare_inprocess((args.system, work), second, args.requests), end="\n\n")
    elif args.what in ("inprocess", "all"):
        print(profile_inprocess(args.system, work, args.requests, args.top), end="\n\n")
    if args.what in ("server", "all"):
        print(profile_server(args.system, work, args.seconds, args.top, args.baseline))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

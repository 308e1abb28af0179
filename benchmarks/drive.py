"""Requests through an app in-process, 32 at a time on uvloop, for callgrind.

    python -m benchmarks.drive SYSTEM REQUESTS [WORK]

e.g. `python -m benchmarks.drive ours-journal 3000 async:1`. The app is built as (b)
builds it (`benchmarks.apps`), its lifespan runs around the requests, and 32 coroutines
await requests one after another, as 32 keep-alive connections do (one request at a
time would make the journal commit once per request). `REQUESTS` requests warm it up,
then `REQUESTS` more are timed. Instructions per request, all threads counted:

    PYTHONHASHSEED=0 valgrind --tool=callgrind --separate-threads=yes \\
        --callgrind-out-file=cg.N python -m benchmarks.drive ours-journal N

for N = 3,000 and 12,000; the difference of the totals ÷ 18,000 (2 x 9,000) leaves out
the start-up. The thread split (file `-01` is the event loop's) shows the journal's writer.

It also prints the garbage collector's share of the timed part: with long tasks
(`sleep:1:0.5`) every request leaves objects alive for as long as its task waits, and the
collector's passes over them cost as much as the rest of our per-request work (see
docs/performance.md, "The garbage collector").
"""

from __future__ import annotations

import asyncio
import gc
import sys
import time
from typing import TYPE_CHECKING

from .apps import Work, build
from .inprocess import new_scope, receive, running

if TYPE_CHECKING:
    from .apps import Message

CONNECTIONS = 32


async def _send(message: Message) -> None:
    if message["type"] == "http.response.body" and not message.get("more_body"):
        await asyncio.sleep(0)  # a server writes the body, then its loop turns


class CollectorTime:
    """Seconds the garbage collector ran, and how many of its passes were full ones."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.passes = self.full = 0
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        self.seconds += time.perf_counter() - self._started
        self.passes += 1
        self.full += info["generation"] == 2


async def drive(system: str, requests: int, work: Work, gc_time: CollectorTime) -> float:
    """Warm up with `requests` requests, then time as many; returns requests a second.
    `gc_time` counts the collector's passes during the timed part only."""
    app = build(system, work)
    async with running(app):
        left = 0

        async def connection() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await app(new_scope(), receive, _send)

        left = requests
        await asyncio.gather(*(connection() for _ in range(CONNECTIONS)))
        left = requests
        gc.callbacks.append(gc_time)
        started = time.perf_counter()
        try:
            await asyncio.gather(*(connection() for _ in range(CONNECTIONS)))
            return requests / (time.perf_counter() - started)
        finally:
            gc.callbacks.remove(gc_time)


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    import uvloop  # noqa: PLC0415  (uvicorn's `--loop uvloop`, as in (b))

    work = Work.decode(argv[2] if len(argv) == 3 else "async:1")
    requests, gc_time = int(argv[1]), CollectorTime()
    rate = uvloop.run(drive(argv[0], requests, work, gc_time))
    print(
        f"{argv[0]}: {rate:,.0f} requests/s in-process; garbage collector "
        f"{gc_time.seconds * 1e6 / requests:.1f} µs per request "
        f"({gc_time.seconds * rate / requests:.0%} of the time, {gc_time.passes} passes, "
        f"{gc_time.full} full)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

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
"""

from __future__ import annotations

import asyncio
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


async def drive(system: str, requests: int, work: Work) -> float:
    """Warm up with `requests` requests, then time as many; returns requests a second."""
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
        started = time.perf_counter()
        await asyncio.gather(*(connection() for _ in range(CONNECTIONS)))
        return requests / (time.perf_counter() - started)


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    import uvloop  # noqa: PLC0415  (uvicorn's `--loop uvloop`, as in (b))

    work = Work.decode(argv[2] if len(argv) == 3 else "async:1")
    rate = uvloop.run(drive(argv[0], int(argv[1]), work))
    print(f"{argv[0]}: {rate:,.0f} requests/s in-process", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

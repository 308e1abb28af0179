"""An open-loop HTTP client: requests go out on a clock, whatever the server does.

A closed-loop client (wrk) waits for each response before the next request, so a slow
server is sent less and its latency looks better than it is (coordinated omission).
Here request `i` is due at `start + i / rate`; it takes an idle keep-alive connection,
or opens one when all are busy, and its latency is counted from the time it was *due*,
so the client's own lateness and any queueing show up in the percentiles.
"""

from __future__ import annotations

import asyncio
import statistics
from dataclasses import dataclass

from .server import REQUEST, read_response

__all__ = ["Latencies", "open_loop"]

PREOPENED = 16  # connections opened before the clock starts
LIMIT = 60.0  # seconds the last responses may take to arrive


@dataclass
class Latencies:
    p50_ms: float
    p99_ms: float
    max_ms: float
    late_p99_ms: float  # how late the client itself sent (its own noise floor)
    requests: int
    errors: int
    connections: int


async def _open_loop(port: int, rate: float, seconds: float, warmup: float) -> Latencies:
    loop = asyncio.get_running_loop()
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    writers: list[asyncio.StreamWriter] = []
    latencies: list[float] = []
    lateness: list[float] = []
    errors = 0

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writers.append(writer)
        return reader, writer

    async def request(due: float, record: bool) -> None:
        nonlocal errors
        connection = idle.pop() if idle else await connect()
        sent = loop.time()
        connection[1].write(REQUEST)
        status = await read_response(connection[0])
        done = loop.time()
        idle.append(connection)
        if record:
            latencies.append(done - due)
            lateness.append(sent - due)
            errors += status != 200

    idle.extend([await connect() for _ in range(PREOPENED)])
    skipped = int(rate * warmup)  # warm-up requests are sent but not counted
    total = skipped + int(rate * seconds)
    start = loop.time() + 0.05
    pending = []
    try:
        for i in range(total):
            due = start + i / rate
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            pending.append(loop.create_task(request(due, i >= skipped)))
        await asyncio.wait_for(asyncio.gather(*pending), LIMIT)
    finally:
        for task in pending:
            task.cancel()
        for writer in writers:
            writer.close()
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    late = statistics.quantiles(lateness, n=100, method="inclusive")
    return Latencies(
        p50_ms=statistics.median(latencies) * 1000,
        p99_ms=cuts[98] * 1000,
        max_ms=max(latencies) * 1000,
        late_p99_ms=late[98] * 1000,
        requests=len(latencies),
        errors=errors,
        connections=len(writers),
    )


def open_loop(port: int, rate: float, seconds: float, warmup: float = 0.5) -> Latencies:
    """Send `rate` requests a second for `warmup + seconds`; percentiles of the last
    `seconds`' requests, in milliseconds."""
    return asyncio.run(_open_loop(port, rate, seconds, warmup))

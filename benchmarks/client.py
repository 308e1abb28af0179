"""The Python HTTP client: open loop (requests on a clock) or closed loop (as wrk does).

A closed-loop client (wrk) waits for each response before the next request, so a slow
server is sent less and its latency looks better than it is (coordinated omission).
`open_loop` sends request `i` at `start + i / rate`, on an idle keep-alive connection, on
a new one when all are busy, or, past `MAX_CONNECTIONS`, as soon as one is free; its
latency counts from the time it was *due*, so the client's own lateness and any queueing
show up in the percentiles. `closed_loop` is wrk's job, for where wrk is not installed,
and the max rate that (d) takes a share of: a rate this client can also send open loop.

Tens of thousands of requests a second are needed, so it uses asyncio's protocol API on
uvloop (when installed), with no task or stream per request. Timers fire about once a
millisecond and send every request due by then: the client's lag p99 of 1-2 ms.
"""

from __future__ import annotations

import asyncio
import importlib
import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from collections.abc import Coroutine

__all__ = ["MAX_CONNECTIONS", "Latencies", "closed_loop", "open_loop"]

REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
PREOPENED = 64  # open-loop connections opened before the clock starts
MAX_CONNECTIONS = 128  # past it, due requests wait in the client for a free connection
TICK = 0.001  # seconds between two timer calls, at least
LIMIT = 60.0  # seconds the last responses may take to arrive
clock = time.perf_counter  # uvloop's loop.time() counts whole milliseconds


class _Driver(Protocol):
    """What a connection tells the client that drives it."""

    def ready(self, connection: _Connection) -> None: ...
    def answered(self, connection: _Connection, *, ok: bool) -> None: ...
    def lost(self, connection: _Connection) -> None: ...


class _Connection(asyncio.Protocol):
    """One keep-alive connection, with at most one request in flight."""

    def __init__(self, driver: _Driver) -> None:
        self.driver = driver
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.index = -1  # the request in flight, or the last one
        self.due = 0.0
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.driver.ready(self)

    def send(self, index: int = 0, due: float = 0.0) -> None:
        assert self.transport is not None  # noqa: S101  (sent only once connected)
        self.index, self.due, self.busy = index, due, True
        self.transport.write(REQUEST)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(buffer[:end]).lower()
        _, found, rest = head.partition(b"content-length:")
        size = end + 4 + (int(rest.split(b"\r\n", 1)[0]) if found else 0)
        if len(buffer) < size:
            return
        del buffer[:size]
        self.busy = False
        self.driver.answered(self, ok=head[9:12] == b"200")

    def connection_lost(self, exc: Exception | None) -> None:
        self.driver.lost(self)


@dataclass
class Latencies:
    p50_ms: float
    p99_ms: float
    max_ms: float
    late_p99_ms: float  # how late requests went out: the client's lag, or no free connection
    requests: int
    errors: int  # non-200 responses, lost connections, responses that never came
    connections: int


class _OpenLoop:
    """Sends `total` requests at `rate`, the first `skipped` of them not counted."""

    def __init__(self, port: int, rate: float, total: int, skipped: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.port, self.rate, self.total, self.skipped = port, rate, total, skipped
        self.start = 0.0  # when request 0 is due; set once the first connections are open
        self.next = 0  # the next request to send
        self.done = 0  # requests answered, lost or failed
        self.idle: list[_Connection] = []
        self.connections: set[_Connection] = set()
        self.opening = self.made = 0  # connections being opened, ever opened
        self.openers: set[asyncio.Task[None]] = set()  # kept: a task nobody holds may vanish
        self.latencies: list[float] = []
        self.lateness: list[float] = []
        self.errors = 0
        self.finished: asyncio.Future[None] = self.loop.create_future()

    async def run(self) -> None:
        self.opening += PREOPENED
        await asyncio.gather(*(self._open() for _ in range(PREOPENED)))
        self.start = clock() + 0.05
        self.loop.call_later(0.05, self._tick)
        try:
            await asyncio.wait_for(self.finished, LIMIT + self.total / self.rate)
        except asyncio.TimeoutError:
            self.errors += self.total - self.done  # never answered
        finally:
            for connection in list(self.connections):
                connection.close()

    def _due(self) -> int:
        """How many requests are due by now."""
        if not self.start:
            return 0
        return max(0, min(self.total, int((clock() - self.start) * self.rate) + 1))

    def _tick(self) -> None:
        due = self._due()
        while self.next < due and self.idle:
            self._send(self.idle.pop())
        waiting = due - self.next - self.opening
        for _ in range(min(waiting, MAX_CONNECTIONS - len(self.connections) - self.opening)):
            self.opening += 1
            opener = self.loop.create_task(self._open())
            self.openers.add(opener)
            opener.add_done_callback(self.openers.discard)
        if due < self.total:
            self.loop.call_later(max(self.start + due / self.rate - clock(), TICK), self._tick)

    def _send(self, connection: _Connection) -> None:
        index = self.next
        self.next += 1
        due = self.start + index / self.rate
        connection.send(index, due)
        if index >= self.skipped:
            self.lateness.append(clock() - due)

    async def _open(self) -> None:
        for _ in range(100):  # the server's backlog may be full: retry for about a second
            try:
                await self.loop.create_connection(lambda: _Connection(self), "127.0.0.1", self.port)
            except OSError:
                await asyncio.sleep(0.01)
            else:
                return
        self.opening -= 1

    def ready(self, connection: _Connection) -> None:
        self.opening -= 1
        self.made += 1
        self.connections.add(connection)
        self._free(connection)

    def _free(self, connection: _Connection) -> None:
        if self.next < self._due():
            self._send(connection)
        else:
            self.idle.append(connection)

    def answered(self, connection: _Connection, *, ok: bool) -> None:
        self._count(connection, ok=ok)
        self._free(connection)

    def lost(self, connection: _Connection) -> None:
        self.connections.discard(connection)
        if connection in self.idle:
            self.idle.remove(connection)
        if connection.busy:
            self._count(connection, ok=False)

    def _count(self, connection: _Connection, *, ok: bool) -> None:
        self.done += 1
        if connection.index >= self.skipped:
            self.latencies.append(clock() - connection.due)
            self.errors += not ok
        if self.done >= self.total and not self.finished.done():
            self.finished.set_result(None)


async def _open_loop(port: int, rate: float, seconds: float, warmup: float) -> Latencies:
    skipped = int(rate * warmup)  # warm-up requests are sent but not counted
    client = _OpenLoop(port, rate, skipped + int(rate * seconds), skipped)
    await client.run()
    latencies, lateness = client.latencies or [0.0], client.lateness or [0.0]
    return Latencies(
        p50_ms=statistics.median(latencies) * 1000,
        p99_ms=_p99(latencies) * 1000,
        max_ms=max(latencies) * 1000,
        late_p99_ms=_p99(lateness) * 1000,
        requests=len(client.latencies),
        errors=client.errors,
        connections=client.made,
    )


def _p99(values: list[float]) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[98]


class _ClosedLoop:
    """`connections` connections, each sending its next request once the last is answered."""

    def __init__(self, port: int, seconds: float, connections: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.port, self.seconds, self.connections = port, seconds, connections
        self.end = 0.0  # set once every connection is open
        self.done = self.errors = self.open = 0
        self.closed: asyncio.Future[None] = self.loop.create_future()

    async def run(self) -> tuple[int, float, int]:
        """Requests answered, seconds taken, errors."""
        opened = [self._connect() for _ in range(self.connections)]
        connections = [protocol for _, protocol in await asyncio.gather(*opened)]
        start = clock()
        self.end = start + self.seconds
        for connection in connections:
            connection.send()
        await asyncio.wait_for(self.closed, self.seconds + LIMIT)
        return self.done, clock() - start, self.errors

    def _connect(self) -> Coroutine[Any, Any, tuple[asyncio.Transport, _Connection]]:
        return self.loop.create_connection(lambda: _Connection(self), "127.0.0.1", self.port)

    def ready(self, connection: _Connection) -> None:
        self.open += 1

    def answered(self, connection: _Connection, *, ok: bool) -> None:
        self.done += 1
        self.errors += not ok
        if clock() < self.end:
            connection.send()
        else:
            connection.close()

    def lost(self, connection: _Connection) -> None:
        self.errors += connection.busy
        self.open -= 1
        if not self.open and not self.closed.done():
            self.closed.set_result(None)


async def _closed_loop(port: int, seconds: float, connections: int) -> tuple[int, float, int]:
    return await _ClosedLoop(port, seconds, connections).run()


def _run(main: Coroutine[Any, Any, Any]) -> Any:
    """Run `main` on uvloop when it is installed (it is, with uvicorn[standard])."""
    try:
        uvloop: Any = importlib.import_module("uvloop")
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def open_loop(port: int, rate: float, seconds: float, warmup: float = 0.5) -> Latencies:
    """Send `rate` requests a second for `warmup + seconds`; percentiles of the last
    `seconds`' requests, in milliseconds."""
    found: Latencies = _run(_open_loop(port, rate, seconds, warmup))
    return found


def closed_loop(port: int, seconds: float, connections: int = 32) -> tuple[int, float, int]:
    """Load for `seconds` over `connections` keep-alive connections, as wrk does: the
    requests answered, the seconds that took, and the errors."""
    found: tuple[int, float, int] = _run(_closed_loop(port, seconds, connections))
    return found

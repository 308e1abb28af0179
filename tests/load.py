"""A small HTTP/1.1 load generator for tests: keep-alive connections to 127.0.0.1 only."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Iterable


async def hammer(port: int, paths: Iterable[str], connections: int) -> collections.Counter[int]:
    """GET every path over `connections` keep-alive connections; count the response statuses."""
    todo = iter(paths)
    statuses: collections.Counter[int] = collections.Counter()

    async def client() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for path in todo:
                writer.write(f"GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n".encode())
                status, length = await _read_head(reader)
                await reader.readexactly(length)
                statuses[status] += 1
        finally:
            writer.close()

    await asyncio.gather(*(client() for _ in range(connections)))
    return statuses


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, int]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in head[1:] if line)
    if headers.get("transfer-encoding") == "chunked":
        raise NotImplementedError("the load app answers with Content-Length")
    return int(head[0].split(" ")[1]), int(headers.get("content-length", 0))


def rss_bytes(pid: int) -> int:
    """The resident set size of a process, from /proc."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise LookupError(f"no VmRSS for process {pid}")

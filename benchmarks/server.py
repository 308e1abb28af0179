"""uvicorn servers on 127.0.0.1, and the clients that load them.

Each server is a subprocess (`uvicorn --http httptools --loop uvloop --no-access-log`,
one worker) serving `benchmarks.apps:from_env`; it is stopped with SIGINT (then SIGKILL)
when its block ends, whatever happened inside it. Throughput comes from wrk, or from a
Python client of `benchmarks.client` where wrk is not installed (or is not wanted).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .client import closed_loop

if TYPE_CHECKING:
    from collections.abc import Iterator

    from .apps import Work

__all__ = ["LoadResult", "Server", "complaints", "load", "rss_bytes", "serving", "wait_idle"]

ROOT = Path(__file__).resolve().parent.parent  # servers import `benchmarks.apps` from here
STARTUP_LIMIT = 30.0  # seconds a server may take to accept connections
STOP_LIMIT = 30.0  # seconds it may take to exit after SIGINT (ours drains its tasks first)


@dataclass
class Server:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            msg = f"server {self.name} exited ({self.process.returncode}):\n{self.output()}"
            raise RuntimeError(msg)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def command(port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "benchmarks.apps:from_env",
        "--factory",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--http",
        "httptools",
        "--loop",
        "uvloop",
        "--no-access-log",
        "--log-level",
        "warning",
    ]


@contextlib.contextmanager
def serving(
    apps: dict[str, tuple[str, Work]], env: dict[str, dict[str, str]] | None = None
) -> Iterator[dict[str, Server]]:
    """Start one server per entry of `apps` (name -> system, work) at once, wait until
    all listen, and stop them all when the block ends. `env[name]`: more variables."""
    servers: dict[str, Server] = {}
    with tempfile.TemporaryDirectory(prefix="post_response-bench-") as tmp:
        try:
            for name, (system, work) in apps.items():
                extra = (env or {}).get(name, {})
                servers[name] = _start(name, system, work, Path(tmp), extra)
            for server in servers.values():
                _wait_until_listening(server)
            yield servers
        finally:
            for server in servers.values():
                _stop(server)


def _start(name: str, system: str, work: Work, tmp: Path, extra: dict[str, str]) -> Server:
    port = free_port()
    log = tmp / f"{name}.log"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "BENCH_SYSTEM": system,
        "BENCH_WORK": work.encode(),
        **extra,
    }
    with log.open("wb") as out:
        process = subprocess.Popen(  # noqa: S603  (our own interpreter, fixed arguments)
            command(port), stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT
        )
    return Server(name, port, process, log)


def _wait_until_listening(server: Server) -> None:
    deadline = time.monotonic() + STARTUP_LIMIT
    while time.monotonic() < deadline:
        server.check_alive()
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", server.port)):
            return
        time.sleep(0.05)
    msg = f"server {server.name} not listening after {STARTUP_LIMIT}s:\n{server.output()}"
    raise RuntimeError(msg)


def _stop(server: Server) -> None:
    if server.process.poll() is not None:
        return
    server.process.send_signal(signal.SIGINT)
    try:
        server.process.wait(timeout=STOP_LIMIT)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


def complaints(server: Server) -> str:
    """What the server logged so far (it logs warnings and errors only), in short; or ""."""
    lines = [line for line in server.output().splitlines() if line.strip()]
    if not lines:
        return ""
    return f"{server.name}'s server logged {len(lines)} lines, the first: `{lines[0][:160]}`"


def cpu_seconds(pid: int) -> float:
    """The CPU time a process has used (user and system), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_idle(server: Server, limit: float = 30.0, interval: float = 0.2) -> None:
    """Until the server uses under 5% of a core (its tasks are done), at most `limit` s."""
    if not Path(f"/proc/{server.process.pid}/stat").exists():
        return
    deadline = time.monotonic() + limit
    used = cpu_seconds(server.process.pid)
    while time.monotonic() < deadline:
        time.sleep(interval)
        now = cpu_seconds(server.process.pid)
        if now - used <= 0.05 * interval:
            return
        used = now


def rss_bytes(pid: int) -> int:
    """The resident set size of a process, from /proc/<pid>/status."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    msg = f"no VmRSS for process {pid}"
    raise LookupError(msg)


@dataclass
class LoadResult:
    requests: int
    seconds: float
    errors: int  # non-2xx responses, socket errors and timeouts
    p50_ms: float | None = None
    p99_ms: float | None = None

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


WRK = shutil.which("wrk")


def load(
    server: Server, seconds: float, connections: int = 32, client: str | None = None
) -> LoadResult:
    """Closed-loop load: `connections` keep-alive connections, for `seconds`."""
    server.check_alive()
    if (client or ("wrk" if WRK else "python")) == "wrk" and WRK:
        result = _wrk(WRK, server.url, seconds, connections)
    else:
        result = LoadResult(*closed_loop(server.port, seconds, connections))
    server.check_alive()
    return result


def _wrk(wrk: str, url: str, seconds: float, connections: int) -> LoadResult:
    # wrk takes whole seconds only.
    argv = [wrk, "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency", url]
    out = subprocess.run(  # noqa: S603  (wrk, found on PATH, fixed arguments)
        argv, capture_output=True, text=True, timeout=seconds + 30, check=True
    ).stdout
    total = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    if total is None:
        msg = f"cannot read wrk's output:\n{out}"
        raise RuntimeError(msg)
    elapsed = float(total[2]) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[total[3]]
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors += int(non_2xx[1]) if non_2xx else 0
    return LoadResult(int(total[1]), elapsed, errors, _wrk_ms(out, "50%"), _wrk_ms(out, "99%"))


def _wrk_ms(out: str, percentile: str) -> float | None:
    found = re.search(rf"^\s*{re.escape(percentile)}\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    if found is None:
        return None
    return float(found[1]) * {"us": 1e-3, "ms": 1.0, "s": 1000.0}[found[2]]

"""Start real servers on 127.0.0.1 for a test, talk to them, and stop them."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11
import httpx
import pytest

ROOT = Path(__file__).parent.parent  # servers import the apps as `tests.apps.<module>`
STARTUP_LIMIT = 30.0  # seconds a server may take to accept connections
STOP_LIMIT = 15.0  # seconds a server may take to exit after SIGINT


@dataclass
class Server:
    """A server process serving an app on 127.0.0.1."""

    url: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        """Everything the server process wrote to stdout and stderr so far."""
        return self.log.read_text(errors="replace")

    def control(self, action: str, **params: str) -> Any:
        """Call one of the app's `/_control/...` endpoints (see apps/control.py)."""
        response = httpx.get(f"{self.url}/_control/{action}", params=params, timeout=40)
        response.raise_for_status()
        return response.json()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def serve(argv: list[str], port: int, env: dict[str, str] | None = None) -> Iterator[Server]:
    """Run `argv` (a server listening on `port`) until the block ends, then stop it."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        environ = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT), **(env or {})}
        with log.open("wb") as out:
            process = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=environ, cwd=ROOT
            )
        server = Server(f"http://127.0.0.1:{port}", port, process, log)
        try:
            _wait_until_listening(server)
            yield server
        finally:
            _stop(server)


# How each server runs `tests.apps.<module>:app` on 127.0.0.1:{port}.
SERVERS: dict[str, list[str]] = {
    "uvicorn-h11": ["uvicorn", "{app}", "--port", "{port}", "--http", "h11"],
    "uvicorn-httptools": ["uvicorn", "{app}", "--port", "{port}", "--http", "httptools"],
    "hypercorn-asyncio": ["hypercorn", "{app}", "-b", "127.0.0.1:{port}", "-k", "asyncio"],
    "hypercorn-trio": ["hypercorn", "{app}", "-b", "127.0.0.1:{port}", "-k", "trio"],
    "daphne": ["daphne", "-b", "127.0.0.1", "-p", "{port}", "{app}"],
    "granian": ["granian", "--interface", "asgi", "--port", "{port}", "{app}"],
}
ASGI_SERVERS = list(SERVERS)
SERVERS |= {  # WSGI servers, threaded
    "waitress": ["waitress", "--listen=127.0.0.1:{port}", "--threads=4", "{app}"],
    # No control socket: gunicorn >= 25 puts one at ~/.gunicorn/gunicorn.ctl, shared by
    # every gunicorn that runs at once (two test runs, a test and a benchmark).
    "gunicorn": [
        "gunicorn",
        "-k",
        "gthread",
        "--threads",
        "4",
        "--no-control-socket",
        "-b",
        "127.0.0.1:{port}",
        "{app}",
    ],
}


def run(
    server: str,
    target: str,
    *options: str,
    middleware: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
) -> contextlib.AbstractContextManager[Server]:
    """Serve `target` (`module:app`; a bare module name is looked up in tests/apps/) with
    `server`, one of `SERVERS`.

    `middleware` options reach the app's PostResponseMiddleware (see apps/control.py).
    """
    port = free_port()
    module, *args = SERVERS[server]
    if not target.startswith(("tests.", "examples.")):
        target = f"tests.apps.{target}"
    args = [a.format(app=target, port=port) for a in args]
    if module == "uvicorn":
        args += ["--host", "127.0.0.1"]
    env = {"POST_RESPONSE_OPTIONS": json.dumps(middleware or {}), **(env or {})}
    return serve([sys.executable, "-m", module, *args, *options], port, env)


@dataclass
class Process:
    """A helper process (a Celery worker, a Redis server) and its output."""

    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def background(argv: list[str], ready: str, env: dict[str, str] | None = None) -> Iterator[Process]:
    """Run `argv` until the block ends (SIGTERM, then kill); start once `ready` is in its output."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "process.log"
        environ = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT), **(env or {})}
        with log.open("wb") as out:
            popen = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=environ, cwd=ROOT
            )
        started = Process(popen, log)
        try:
            deadline = time.monotonic() + STARTUP_LIMIT
            while ready not in started.output():
                if popen.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{argv[0]} did not start:\n{started.output()}")
                time.sleep(0.05)
            yield started
        finally:
            if popen.poll() is None:
                popen.terminate()
                try:
                    popen.wait(timeout=STOP_LIMIT)
                except subprocess.TimeoutExpired:
                    popen.kill()
                    popen.wait()


def require_service(port: int, message: str) -> None:
    """Return once something answers on 127.0.0.1:`port`; else skip the test with `message`
    (how to start the service), or fail under CI (`CI` set), which starts it (.ci/run)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return
    except OSError:
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def uvicorn(target: str, *options: str) -> contextlib.AbstractContextManager[Server]:
    """Serve `module:app` from tests/apps/ with uvicorn's CLI and its default logging."""
    return run("uvicorn-h11", target, *options)


def _wait_until_listening(server: Server) -> None:
    deadline = time.monotonic() + STARTUP_LIMIT
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited early:\n{server.output()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", server.port)):
            return
        time.sleep(0.05)
    raise RuntimeError(f"server not listening after {STARTUP_LIMIT}s:\n{server.output()}")


def _stop(server: Server) -> None:
    """Stop the server with SIGINT (Ctrl+C); it must exit by itself, promptly."""
    if server.process.poll() is None:
        exit_code_after(server, signal.SIGINT, limit=STOP_LIMIT)


def exit_code_after(server: Server, sig: signal.Signals, limit: float) -> int:
    """Send `sig` to the server and wait up to `limit` seconds for it to exit by itself."""
    server.process.send_signal(sig)
    try:
        return server.process.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()
        raise AssertionError(
            f"the server did not exit within {limit}s of {sig.name}:\n{server.output()}"
        ) from None


class Connection:
    """One HTTP/1.1 keep-alive connection, to send requests one after another on it."""

    def __init__(self, server: Server) -> None:
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=20)
        self.conn = h11.Connection(h11.CLIENT)

    def request(self, method: str, target: str) -> tuple[int, bytes]:
        """Send a request and read the whole response; fails if the server closed the connection."""
        if self.conn.our_state is h11.DONE:
            self.conn.start_next_cycle()
        headers = [("host", "127.0.0.1")]
        self.sock.sendall(
            self.conn.send(h11.Request(method=method, target=target, headers=headers))
        )
        self.sock.sendall(self.conn.send(h11.EndOfMessage()))
        status, body = 0, b""
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(self.sock.recv(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return status, body
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("the server closed the connection")

    def close(self) -> None:
        self.sock.close()

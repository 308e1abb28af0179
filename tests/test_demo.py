"""The demo a newcomer runs first: `python -m post_response.demo`."""

from __future__ import annotations

import re
import signal
import subprocess
import sys

import httpx

from .servers import free_port, serve


def test_the_demo_shows_responses_before_their_tasks_and_exits_by_itself() -> None:
    """It exits 0 and its timeline has every response sent before its task starts."""
    done = subprocess.run(
        [sys.executable, "-m", "post_response.demo"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = re.findall(r"^\s*([\d.]+)s  (\w+)\s+(.*)$", done.stdout, re.MULTILINE)
    events = [f"{who} {what}" for _, who, what in lines]
    for user in ("ada", "grace", "linus"):
        request = events.index(f"client GET /signup?user={user}")
        sent = events.index("app response sent; its task runs once the app returns", request)
        started = events.index(f"task send_welcome_email({user!r}) started")
        got = next(i for i, e in enumerate(events) if e.startswith("client got 200") and i > sent)
        finished = events.index(f"task send_welcome_email({user!r}) finished")
        assert request < sent < started < finished
        assert got < finished
    assert "Nobody waited for an email." in done.stdout


def test_the_demo_can_keep_serving_for_curl() -> None:
    """With `--serve` it stays up on the given port and answers like the timeline's app."""
    port = free_port()
    argv = [sys.executable, "-m", "post_response.demo", "--serve", "--port", str(port)]
    with serve(argv, port) as server:
        response = httpx.get(f"{server.url}/signup?user=curl", timeout=10)
        assert response.text == "Welcome, curl! Your email is on its way.\n"
        server.process.send_signal(signal.SIGINT)
        server.process.wait(timeout=15)
        assert "task     send_welcome_email('curl') started" in server.output()

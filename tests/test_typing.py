"""Static typing: add_task() checks a task's arguments against its signature (ParamSpec)."""

from __future__ import annotations

from pathlib import Path

from mypy import api

SNIPPET = """from starlette.applications import Starlette
from post_response import PostResponseMiddleware, TaskHandle, add_task

def f(x: int) -> None: ...
async def g(to: str, *, subject: str) -> None: ...

good: TaskHandle = add_task(f, 1)
add_task(g, "a@b.c", subject="hi").set(name="welcome", timeout=5, always=True)
add_task(f, "wrong type")  # error
add_task(g, "a@b.c", subjet="typo")  # error
add_task(f)  # error

app = Starlette()
app.add_middleware(PostResponseMiddleware, policy="no_error", concurrency=2, timeout=1.5)
app.add_middleware(PostResponseMiddleware, policy="sometimes")  # error
"""


def test_mypy_checks_task_arguments_and_middleware_options(tmp_path: Path) -> None:
    """mypy --strict accepts correct calls and rejects wrong arguments, typos and bad options."""
    source = tmp_path / "snippet.py"
    source.write_text(SNIPPET)
    out, err, status = api.run(
        ["--strict", "--no-incremental", "--cache-dir", str(tmp_path / "cache"), str(source)]
    )
    errors = [line for line in out.splitlines() if ": error:" in line]
    lines = sorted({int(line.split(":")[1]) for line in errors})
    marked = [n for n, line in enumerate(SNIPPET.splitlines(), 1) if line.endswith("# error")]
    assert lines == marked, out + err
    assert 'Argument 2 to "add_task" has incompatible type "str"; expected "int"' in out
    assert status == 1

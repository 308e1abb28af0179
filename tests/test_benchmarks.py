"""The benchmark suite (`python -m benchmarks`) still runs: tiny versions of its code paths.

Peers that are not installed (the `bench` extra) are skipped by the suite itself, so these
tests run with the test extra alone. Nothing is written into docs/.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import time
from pathlib import Path

import pytest

from benchmarks import cli, profile, report, server, suite
from benchmarks.apps import Work
from benchmarks.openloop import open_loop
from benchmarks.results import Metric, Row, Section, Target

TINY = dataclasses.replace(
    suite.QUICK,
    inprocess_rounds=1,
    inprocess_requests=20,
    inprocess_warmup=5,
    memory_requests=20,
    sync_requests=5,
    client="python",
)


def test_every_system_answers_and_runs_its_tasks_in_process() -> None:
    section = suite.inprocess_cost(TINY)
    for row in section.rows:  # measured, or a peer that is not installed
        assert row.missing or (row.median("us") or 0) > 0, row
    assert section.ratio("us", "ours-async", "bare") is not None


def test_memory_and_sync_task_sections_run() -> None:
    memory = suite.memory_per_task(TINY)
    assert (memory.row("ours").median("bytes") or 0) > 0
    tasks = suite.sync_tasks(TINY)
    assert (tasks.row("ours-sync").median("tps") or 0) > 0


def test_a_server_is_loaded_and_stopped() -> None:
    with server.serving({"ours": ("ours", Work("async"))}) as servers:
        ours = servers["ours"]
        closed = server.load(ours, 0.5, client="python")
        latencies = open_loop(ours.port, rate=200, seconds=0.3, warmup=0.1)
    assert closed.requests > 0
    assert closed.errors == 0
    assert latencies.errors == 0
    assert latencies.p99_ms >= latencies.p50_ms > 0
    assert ours.process.poll() is not None  # stopped when the block ended


def test_cli_writes_the_report_where_told(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(suite, "QUICK", TINY)
    assert cli.main(["--quick", "--only", "a", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "benchmarks.md").read_text()
    assert "(a) In-process cost per request" in text
    assert "python -m benchmarks --quick --only a --out" in text
    assert "| ours, one async no-op task |" in text
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    assert (tmp_path / "benchmarks.png").exists() == has_matplotlib
    assert "÷ bare raw" in capsys.readouterr().out


def test_targets_are_judged_on_paired_ratios() -> None:
    section = Section("x", "x", "x", [Metric("rps", "req/s")], columns=[("base", "÷ base")])
    section.rows = [
        Row("base", "base", {"rps": [100.0, 50.0, 100.0]}),
        Row("ours", "ours", {"rps": [96.0, 40.0, 90.0]}, compare=("base",)),
    ]
    section.targets = [Target("ours >= 0.95 x base", "rps", "ours", "base", ">=", 0.95)]
    section.judge()
    assert section.targets[0].ratio == pytest.approx(0.9)  # median of 0.96, 0.8, 0.9
    assert section.targets[0].met is False
    assert "0.90 (0.80-0.96)" in "\n".join(report.section_table(section))


def test_the_in_process_profile_names_our_functions() -> None:
    text = profile.profile_inprocess("ours", Work("async"), count=50, top=40)
    assert "µs/request under the profiler" in text
    assert "post_response/_middleware.py" in text


def test_py_spy_samples_are_charged_to_the_innermost_layer(tmp_path: Path) -> None:
    loop = "Runner.run (/x/asyncio/runners.py:118)"
    ours = "PostResponseMiddleware.__call__ (/x/post_response/_middleware.py:80)"
    raw = tmp_path / "raw.txt"
    raw.write_text(
        f"{loop};{ours};Event.wait (/x/asyncio/locks.py:200) 3\n"
        f"{loop};{ours};send (/x/uvicorn/protocols/http/httptools_impl.py:500) 1\n"
    )
    text = "\n".join(profile._summarise(raw, "test", per_request_us=10.0, top=5))
    assert "  75.0     7.50  post_response" in text  # Event.wait counts for its caller
    assert "  25.0     2.50  uvicorn" in text


def test_the_celery_section_has_its_work() -> None:
    """Section (g)'s CPU work takes about 50 ms, and its Celery variant enqueues a Celery task."""
    from benchmarks import apps

    assert apps.Work.decode("cpu").kind == "cpu"
    func, args = apps.task_call(apps.Work("celery"))
    assert (getattr(func, "name", None), args) == ("benchmarks.burn", ())
    started = time.perf_counter()
    apps.burn_cpu()  # calibrates, then burns
    apps.burn_cpu()
    assert time.perf_counter() - started > 0.05  # it does burn (the bound is loose on purpose)

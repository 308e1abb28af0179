"""The benchmark suite (`python -m benchmarks`) still runs: tiny versions of its code paths.

Peers that are not installed (benchmarks/requirements.txt) are skipped by the suite itself,
so these tests run with the test extra alone. Nothing is written into docs/.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import importlib.util
import time
from pathlib import Path

import pytest

from benchmarks import cli, drive, goals, profile, report, server, suite
from benchmarks.apps import Work
from benchmarks.client import open_loop
from benchmarks.results import Metric, Row, Section

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


def test_the_callgrind_driver_drives_the_journal_s_app(capsys: pytest.CaptureFixture[str]) -> None:
    assert drive.main(["ours-journal", "64", "async:1"]) == 0
    assert "ours-journal:" in capsys.readouterr().err
    assert drive.main([]) == 2  # usage


def test_the_driver_reports_the_garbage_collector_s_share() -> None:
    gc_time = drive.CollectorTime()
    gc.collect()
    with contextlib.ExitStack() as stack:
        stack.callback(gc.set_threshold, *gc.get_threshold())
        gc.set_threshold(1)  # a pass at every allocation of a tracked object
        asyncio.run(drive.drive("ours", 50, Work.decode("async:1"), gc_time))
    assert gc_time.passes > 0
    assert gc_time.seconds > 0
    assert gc.callbacks.count(gc_time) == 0  # removed after the timed part


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


def _throughput(ours: list[float], base: list[float]) -> Section:
    """A section "x" of two rows measured over the same rounds."""
    section = Section("x", "x", "x", [Metric("rps", "req/s")], columns=[("base", "÷ base")])
    section.rows = [
        Row("base", "base", {"rps": base}),
        Row("ours", "ours", {"rps": ours}, compare=("base",)),
    ]
    return section


AT_LEAST = goals.Goal("ours >= 0.95 x base", "x", "rps", "ours", "base", ">=", 0.95)


def test_goals_are_judged_on_paired_ratios() -> None:
    """A goal's value is the median of the per-round ratios, shown with their range."""
    section = _throughput(ours=[96.0, 40.0, 90.0], base=[100.0, 50.0, 100.0])
    [verdict] = goals.judge([section], [AT_LEAST])
    assert verdict.value == pytest.approx(0.9)  # median of 0.96, 0.8, 0.9
    assert verdict.met is False
    assert verdict.shown() == "0.90 (0.80-0.96)"
    assert "0.90 (0.80-0.96)" in "\n".join(report.section_table(section))
    assert "| **missed** |" in "\n".join(report.goals_table([verdict]))


@pytest.mark.parametrize(
    ("goal", "value", "margin", "missed"),
    [
        (AT_LEAST, 0.90, 0.10, False),  # 5% under the goal: forgiven as noise
        (AT_LEAST, 0.85, 0.10, True),  # under 0.95 x 0.9
        (AT_LEAST, 0.90, 0.0, True),
        (dataclasses.replace(AT_LEAST, op="<=", threshold=1.2), 1.30, 0.10, False),
        (dataclasses.replace(AT_LEAST, op="<=", threshold=1.2), 1.33, 0.10, True),  # over 1.32
    ],
)
def test_check_forgives_the_noise_margin_and_no_more(
    goal: goals.Goal, value: float, margin: float, missed: bool
) -> None:
    """`--check` fails a goal only when it is missed by more than the margin, either way."""
    assert goals.failures([goals.Verdict(goal, value)], margin) == (
        [goals.Verdict(goal, value)] if missed else []
    )


def test_an_absolute_goal_and_an_unmeasured_one() -> None:
    """A goal without a reference row judges the row's own median; a goal whose section
    or row did not run is not measured, and `--check` does not fail it."""
    memory = Section("e1", "m", "m", [Metric("bytes", "bytes/task")])
    memory.rows = [Row("ours", "ours", {"bytes": [1900.0, 2500.0, 2100.0]})]
    verdicts = goals.judge([memory])  # the real goals: only e1's is measured
    by_section = {verdict.goal.section: verdict for verdict in verdicts}
    assert by_section["e1"].value == 2100.0
    assert by_section["e1"].met is False
    assert by_section["e1"].within(0.1) is True  # 2,100 <= 2,000 x 1.1
    assert by_section["b"].value is None
    assert goals.failures(verdicts, 0.0) == [by_section["e1"]]


def test_check_exits_1_naming_the_missed_goal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`python -m benchmarks --check` on given results (no run): exit 1, the goal named."""
    slow = _throughput(ours=[50.0, 60.0], base=[100.0, 100.0])
    slow.key = "b"
    slow.rows[0].key, slow.rows[1].key = "starlette-bg", "starlette-ours"
    monkeypatch.setitem(suite.SECTIONS, "b", lambda plan: slow)
    assert cli.main(["--only", "b", "--check", "--margin", "0.2", "--out", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "MISSED  0.55 (0.50-0.60) (goal >= 1): Starlette + ours (no-op async task)" in out
    assert "not measured" in out  # the goals of the sections that did not run
    assert "| **missed** |" in (tmp_path / "benchmarks.md").read_text()


def test_the_in_process_profile_names_our_functions() -> None:
    text = profile.profile_inprocess("ours", Work("async"), count=50, top=40)
    assert "µs/request under the profiler" in text
    assert "post_response/_middleware.py" in text
    assert "post_response's functions, top 40 by own time" in text


def test_the_profile_comparison_names_the_calls_one_system_makes_more() -> None:
    """`--compare`: a function called by one system only is listed with its calls per request."""
    text = profile.compare_inprocess(("ours", Work("async")), ("ours", Work()), count=50)
    [line] = [line for line in text.splitlines() if line.endswith(")") and " add_task (" in line]
    assert line.split()[:2] == ["1.00", "0.00"]
    assert "post_response" in text.split("by package")[1]


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

"""The report: Markdown tables (file and terminal), the machine, and a chart of the ratios."""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import math
import os
import platform
import shutil
import subprocess
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import datetime

    from .goals import Verdict
    from .results import Section

__all__ = ["machine", "markdown", "tables", "write_chart"]

PACKAGES = [
    "post_response",
    "anyio",
    "asgiref",
    "uvicorn",
    "uvloop",
    "httptools",
    "starlette",
    "fastapi",
    "asgi-background",
    "asgi-lifespan-middleware",
    "fastapi-events",
    "matplotlib",
]
ROOT = Path(__file__).resolve().parent.parent


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _memory() -> str:
    with contextlib.suppress(OSError), open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    return "unknown"


def _run(argv: list[str]) -> str:
    """A command's first line of output, or "" when it is missing or fails."""
    if shutil.which(argv[0]) is None:
        return ""
    try:
        done = subprocess.run(  # noqa: S603  (fixed commands: nproc, git, wrk)
            argv, capture_output=True, text=True, timeout=10, cwd=ROOT, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0] if lines else ""


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    commit = _run(["git", "rev-parse", "--short", "HEAD"])
    changed = _run(["git", "log", "-1", "--format=%h %s", "--", "post_response"])
    dirty = _run(["git", "status", "--porcelain", "--", "post_response"])
    load = os.getloadavg()
    return {
        "nproc": _run(["nproc"]) or str(os.cpu_count()),
        "CPU": _cpu_model(),
        "kernel": platform.release(),
        "Python": f"{platform.python_implementation()} {platform.python_version()}",
        "wrk": _run(["wrk", "-v"]).split(" [")[0] or "not installed",
        "repository": f"commit {commit}",
        "post_response last changed in": changed
        + (" (+ uncommitted changes in post_response/)" if dirty else ""),
        "memory": _memory(),
        "load average at start": f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
        **{package: _version(package) for package in PACKAGES},
    }


def _number(value: float | None, digits: int) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}"


def _ratio(found: tuple[float, float, float] | None) -> str:
    if found is None:
        return ""
    median, low, high = found
    if math.isclose(low, high):
        return f"{median:.2f}"
    return f"{median:.2f} ({low:.2f}-{high:.2f})"


def section_table(section: Section) -> list[str]:
    """The section's table: one row per system, its medians and its ratio columns."""
    ratio_metric = section.chart_metric or section.metrics[0].key
    ratio_label = next(m.label for m in section.metrics if m.key == ratio_metric)
    header = ["system", *(m.label for m in section.metrics)]
    header += [f"{title} ({ratio_label})" for _, title in section.columns]
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    for row in section.rows:
        if row.missing:
            cells = [row.label, *(["n/a"] * len(section.metrics))]
            cells += [""] * len(section.columns)
            cells[1] = f"n/a: {row.missing}"
        else:
            cells = [row.label, *(_number(row.median(m.key), m.digits) for m in section.metrics)]
            cells += [
                _ratio(section.ratio(ratio_metric, row.key, ref)) if ref in row.compare else ""
                for ref, _ in section.columns
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _met(met: bool | None) -> str:
    return {True: "**met**", False: "**missed**", None: "not measured"}[met]


def goals_table(verdicts: list[Verdict]) -> list[str]:
    """One row per goal: what it was, what it must be, what this run measured."""
    lines = [
        "| | comparison | was | goal | this run (range over rounds) | |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for verdict in verdicts:
        goal = verdict.goal
        cells = [f"({goal.section})", goal.text, goal.was, goal.wanted, verdict.shown()]
        lines.append("| " + " | ".join([*cells, _met(verdict.met)]) + " |")
    return lines


def tables(sections: list[Section], verdicts: list[Verdict]) -> str:
    """What the terminal shows at the end: each section's table, then the goals."""
    out = []
    for section in sections:
        out += [f"({section.key}) {section.title}", *section_table(section), ""]
    return "\n".join([*out, "Goals", *goals_table(verdicts)])


def markdown(
    sections: list[Section],
    verdicts: list[Verdict],
    *,
    info: dict[str, str],
    command: str,
    started: datetime.datetime,
    seconds: float,
    chart: str | None,
) -> str:
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `{command}` (from the repository root) on "
        f"{started:%Y-%m-%d %H:%M} UTC; the run took {seconds / 60:.1f} minutes.",
        "",
        "The machine is shared and noisy: absolute numbers move from run to run, so every "
        "comparison interleaves its systems (A B C A B C ...) over several rounds, and a "
        "ratio is the median of the ratios within each round, with their range in brackets. "
        'Tasks are no-ops unless said otherwise. "Ours" is `PostResponseMiddleware` with '
        "its defaults (`detach=True`). Where our time goes: `python -m benchmarks.profile`.",
        "",
        "## Goals (issue 12)",
        "",
        "Each measured in this run, its systems interleaved; `python -m benchmarks --check` "
        "fails when one is missed by more than its noise margin.",
        "",
        *goals_table(verdicts),
        "",
    ]
    if chart:
        lines += [f"![ratios]({chart})", ""]
    for section in sections:
        lines += [f"## ({section.key}) {section.title}", "", section.method, ""]
        lines += section_table(section)
        lines += ["", *[f"- {note}" for note in section.notes]]
        lines += [f"- took {section.seconds:.0f} s", ""]
    lines += ["## Machine", "", "| | |", "| --- | --- |"]
    lines += [f"| {key} | {value} |" for key, value in info.items()]
    lines += ["", f"Command: `{command}`", ""]
    return "\n".join(lines)


def _bars(ax: Any, section: Section, verdicts: list[Verdict]) -> None:
    """One bar per (row, column) ratio; a goal's bar is green when met, red when not,
    with its threshold marked by a black tick."""
    metric = section.chart_metric or section.metrics[0].key
    bars: list[tuple[str, tuple[float, float, float], Verdict | None]] = []
    for row in section.rows:
        for ref, title in section.columns:
            found = section.ratio(metric, row.key, ref) if ref in row.compare else None
            if found is None:
                continue
            verdict = next(
                (v for v in verdicts if _charted(v, section, row.key, ref, metric)), None
            )
            bars.append((f"{row.label} {title}", found, verdict))
    positions = list(range(len(bars)))[::-1]
    medians = [found[0] for _, found, _ in bars]
    ax.barh(
        positions,
        medians,
        xerr=[[f[0] - f[1] for _, f, _ in bars], [f[2] - f[0] for _, f, _ in bars]],
        color=[_COLORS[None if v is None else v.met] for _, _, v in bars],
        capsize=3,
    )
    ax.set_yticks(positions, [label for label, _, _ in bars], fontsize=7)
    ax.axvline(1.0, color="grey", linewidth=0.8)
    for position, (_, _, verdict) in zip(positions, bars, strict=True):
        if verdict is not None:
            threshold = verdict.goal.threshold
            ax.plot([threshold], [position], marker="|", markersize=16, color="black")
    if medians and max(medians) / max(min(medians), 1e-9) > 8:
        ax.set_xscale("log")
    _title(ax, section)
    ax.tick_params(axis="x", labelsize=7)


def _charted(verdict: Verdict, section: Section, row: str, ref: str, metric: str) -> bool:
    goal = verdict.goal
    return (goal.section, goal.row, goal.ref, goal.metric) == (section.key, row, ref, metric)


_COLORS = {None: "#4c72b0", True: "#55a868", False: "#c44e52"}


def _title(ax: Any, section: Section) -> None:
    ax.set_title(textwrap.fill(f"({section.key}) {section.title}", 55), fontsize=8)


def _series(ax: Any, section: Section) -> None:
    for label, points in section.series.items():
        ax.plot([t for t, _ in points], [y for _, y in points], label=label)
    ax.set_xlabel("seconds", fontsize=7)
    ax.set_ylabel("RSS MiB", fontsize=7)
    ax.set_ylim(bottom=0)  # growth in proportion to the whole
    ax.legend(fontsize=7)
    _title(ax, section)
    ax.tick_params(labelsize=7)


def write_chart(sections: list[Section], verdicts: list[Verdict], path: Path) -> bool:
    """A PNG of each section's ratios (bars with the range over rounds as whiskers, 1.0 as
    a grey line) and of the RSS samples. False when matplotlib is not installed."""
    # matplotlib is optional (benchmarks/requirements.txt), so imported untyped: the Axes are `Any`.
    try:
        mpl = importlib.import_module("matplotlib")
    except ImportError:
        return False
    mpl.use("Agg")
    plt = importlib.import_module("matplotlib.pyplot")

    panels = [s for s in sections if s.series or any(r.compare for r in s.rows)]
    if not panels:
        return False
    columns = 2
    rows = math.ceil(len(panels) / columns)
    figure, grid = plt.subplots(rows, columns, figsize=(12, 3.2 * rows), squeeze=False)
    for index, section in enumerate(panels):
        axes = grid[index // columns][index % columns]
        if section.series:
            _series(axes, section)
        else:
            _bars(axes, section, verdicts)
    for index in range(len(panels), rows * columns):
        grid[index // columns][index % columns].set_visible(False)
    figure.suptitle(
        "post_response benchmarks: ratios, median over rounds (whiskers: their range); "
        "a goal's bar is green when met, red when not, its threshold a black tick",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True

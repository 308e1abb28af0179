"""`python -m benchmarks`: run the sections, print the tables, write the report and chart;
with `--check`, exit 1 when a goal of issue 12 is missed by more than the noise margin."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from . import goals, report
from .suite import FULL, QUICK, SECTIONS, log

if TYPE_CHECKING:
    from .goals import Verdict

__all__ = ["main"]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark post_response against the bare app and its peers; "
        "writes OUT/benchmarks.md and OUT/benchmarks.png.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run of well under a minute (1 round each)"
    )
    parser.add_argument("--out", default="docs", help="where to write the report (default docs)")
    parser.add_argument(
        "--only",
        default="",
        help=f"comma-separated sections to run, of {', '.join(SECTIONS)} ('e' runs e1 and e2)",
    )
    parser.add_argument(
        "--client",
        choices=["wrk", "python"],
        help="closed-loop load generator (default: wrk when installed)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="exit 1 when a goal measured in this run is missed by more than --margin",
    )
    parser.add_argument(
        "--margin",
        type=float,
        default=0.1,
        help="the noise --check forgives, as a share of each goal (default 0.1: 10%%)",
    )
    return parser.parse_args(argv)


def selected(only: str) -> list[str]:
    if not only:
        return list(SECTIONS)
    wanted = [item.strip() for item in only.split(",") if item.strip()]
    keys = [key for key in SECTIONS if any(key.startswith(item) for item in wanted)]
    if not keys:
        msg = f"no section matches --only {only!r}; sections: {', '.join(SECTIONS)}"
        raise SystemExit(msg)
    return keys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    plan = dataclasses.replace(QUICK if args.quick else FULL, client=args.client)
    command = shlex.join(["python", "-m", "benchmarks", *argv])
    started, began = datetime.datetime.now(datetime.timezone.utc), time.monotonic()
    info = report.machine()
    sections = []
    for key in selected(args.only):
        log(f"[{key}] starting")
        section_began = time.monotonic()
        section = SECTIONS[key](plan)
        section.seconds = time.monotonic() - section_began
        sections.append(section)
    verdicts = goals.judge(sections)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chart = out / "benchmarks.png"
    drawn = report.write_chart(sections, verdicts, chart)
    text = report.markdown(
        sections,
        verdicts,
        info=info,
        command=command,
        started=started,
        seconds=time.monotonic() - began,
        chart=chart.name if drawn else None,
    )
    (out / "benchmarks.md").write_text(text)
    print(report.tables(sections, verdicts))
    print(
        f"\nWrote {out / 'benchmarks.md'}"
        + (f" and {chart}" if drawn else " (no matplotlib: no chart)")
    )
    return check(verdicts, args.margin) if args.check else 0


def check(verdicts: list[Verdict], margin: float) -> int:
    """Print each goal's verdict with `margin` forgiven; 1 if any measured one is missed."""
    print(f"\nCheck (noise margin {margin:.0%}):")
    for verdict in verdicts:
        within = verdict.within(margin)
        status = {True: "ok", False: "MISSED", None: "not measured"}[within]
        goal = verdict.goal
        print(f"  {status:>12}  {verdict.shown()} (goal {goal.wanted}): {goal.text}")
    missed = goals.failures(verdicts, margin)
    if missed:
        print(f"{len(missed)} goal(s) missed by more than {margin:.0%}.")
        return 1
    return 0

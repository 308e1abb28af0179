"""Results: values per round, medians, and paired ratios (`goals` judges them).

A ratio compares two rows *within each round* (they were measured next to each other),
and the report gives the median of those per-round ratios with their range, which says
how much the machine's noise moved it.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

__all__ = ["Metric", "Row", "Section", "paired_ratios"]


@dataclass(frozen=True)
class Metric:
    key: str
    label: str  # column header, with its unit
    digits: int = 1  # decimals shown
    higher_is_better: bool = True


@dataclass
class Row:
    key: str
    label: str
    values: dict[str, list[float]] = field(default_factory=dict)  # metric -> one per round
    compare: tuple[str, ...] = ()  # the rows (of the section's columns) it is divided by
    missing: str = ""  # why there are no values (a peer not installed)

    def add(self, metric: str, value: float) -> None:
        self.values.setdefault(metric, []).append(value)

    def median(self, metric: str) -> float | None:
        values = self.values.get(metric)
        return statistics.median(values) if values else None


@dataclass
class Section:
    key: str  # "a", "b", ...
    title: str
    method: str  # how it was measured, for the report
    metrics: list[Metric]
    columns: list[tuple[str, str]] = field(default_factory=list)  # ratio columns: (row, header)
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0  # how long the section took
    chart_metric: str | None = None  # the metric whose ratios the chart shows (default: first)
    series: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # (x, y) to plot

    def row(self, key: str) -> Row:
        for row in self.rows:
            if row.key == key:
                return row
        raise KeyError(key)

    def ratio(
        self, metric: str, key: str, ref: str, ref_metric: str | None = None
    ) -> tuple[float, float, float] | None:
        """Median, min and max of the per-round ratios `key / ref` for `metric`."""
        try:
            ratios = paired_ratios(self.row(key), self.row(ref), metric, ref_metric)
        except KeyError:
            return None
        if not ratios:
            return None
        return statistics.median(ratios), min(ratios), max(ratios)


def paired_ratios(row: Row, ref: Row, metric: str, ref_metric: str | None = None) -> list[float]:
    """`row / ref` for each round both have a value in."""
    mine, theirs = row.values.get(metric, []), ref.values.get(ref_metric or metric, [])
    return [a / b for a, b in zip(mine, theirs, strict=False) if b]

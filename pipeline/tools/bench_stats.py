"""The accounting of ``bench``, kept pure so a unit test can check it without Kafka.

A system's figures from several runs are summarised as median, min and max; ratios are
taken between medians of the same invocation only; latency percentiles use the
nearest-rank rule (a p99 is a latency some event really had, never an interpolation).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

#: what each figure of a run is called in the JSON and the table, in table order
FIGURES = (
    "events_per_s",
    "p50_ms",
    "p99_ms",
    "cpu_s_per_100k",
    "broker_cpu_s_per_100k",
    "peak_rss_mb",
    "first_commit_s",
)


@dataclass
class Run:
    """One run of one system. ``None`` where a system cannot give a figure."""

    system: str
    events: int
    seconds: float
    events_per_s: float
    p50_ms: float | None = None
    p99_ms: float | None = None
    cpu_s_per_100k: float | None = None
    #: the broker's CPU over the same interval: on one machine the broker shares the
    #: cores, so what a system asks of it (requests, transactions) costs throughput too
    broker_cpu_s_per_100k: float | None = None
    peak_rss_mb: float | None = None
    #: from the process's start to its first committed input offset
    first_commit_s: float | None = None
    #: commit interval, batch sizes and other knobs of this system, as printed
    config: dict[str, object] = field(default_factory=dict)
    note: str = ""


@dataclass(frozen=True)
class Spread:
    median: float
    low: float
    high: float


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile, ``0 < q <= 100``."""
    if not values:
        raise ValueError("no values")
    if not 0 < q <= 100:
        raise ValueError(f"q out of range: {q}")
    ordered = sorted(values)
    rank = math.ceil(q / 100 * len(ordered))
    return ordered[max(rank, 1) - 1]


def spread(values: Iterable[float | None]) -> Spread | None:
    present = [v for v in values if v is not None]
    if not present:
        return None
    return Spread(statistics.median(present), min(present), max(present))


def summarize(runs: Sequence[Run]) -> dict[str, Spread | None]:
    return {name: spread(getattr(r, name) for r in runs) for name in FIGURES}


def ratios(
    medians: dict[str, float], pairs: Sequence[tuple[str, str]]
) -> list[tuple[str, str, float]]:
    """``a / b`` of median throughput for each pair where both systems ran."""
    out = []
    for a, b in pairs:
        if medians.get(a) and medians.get(b):
            out.append((a, b, medians[a] / medians[b]))
    return out


def _cell(s: Spread | None, digits: int) -> str:
    if s is None:
        return "n/a"
    if s.low == s.high:
        return f"{s.median:.{digits}f}"
    return f"{s.median:.{digits}f} ({s.low:.{digits}f}-{s.high:.{digits}f})"


def render_table(results: dict[str, list[Run]]) -> str:
    """Markdown: one row per system, each cell "median (min-max)" over its runs."""
    lines = [
        "| system | runs | events/s | e2e p50 ms | e2e p99 ms | CPU s / 100k events "
        "| broker CPU s / 100k events | peak RSS MB | start to first commit s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for system, runs in results.items():
        s = summarize(runs)
        lines.append(
            f"| {system} | {len(runs)} | {_cell(s['events_per_s'], 0)} | "
            f"{_cell(s['p50_ms'], 0)} | {_cell(s['p99_ms'], 0)} | "
            f"{_cell(s['cpu_s_per_100k'], 1)} | {_cell(s['broker_cpu_s_per_100k'], 1)} | "
            f"{_cell(s['peak_rss_mb'], 0)} | "
            f"{_cell(s['first_commit_s'], 1)} |"
        )
    return "\n".join(lines)


def render_ratios(results: dict[str, list[Run]], pairs: Sequence[tuple[str, str]]) -> str:
    medians = {}
    for system, runs in results.items():
        s = spread(r.events_per_s for r in runs)
        if s is not None:
            medians[system] = s.median
    return "\n".join(f"- {a} / {b}: {value:.2f}" for a, b, value in ratios(medians, pairs))

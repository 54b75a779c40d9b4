"""``storm.png``: joins completed, latency percentiles and ARM calls over the storm.

Three stacked panels sharing the time axis (seconds since the storm started). The naive
baseline, when measured, is drawn beside the tuned run in a lighter dashed line. Uses
matplotlib's Agg backend: no display needed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["JoinRecord", "Sample", "Series", "latency_bins", "percentile", "plot_storm"]


@dataclass(frozen=True)
class JoinRecord:
    """One VM's join: seconds since the storm started, outcome, retries it needed."""

    start: float
    end: float
    ok: bool
    code: str
    retries: int

    @property
    def latency(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class Sample:
    """The emulator's counters polled at ``t`` seconds since the storm started."""

    t: float
    completed: int
    arm_calls: int
    arm_429s: int


@dataclass(frozen=True)
class Series:
    label: str
    records: Sequence[JoinRecord]
    samples: Sequence[Sample]


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def latency_bins(
    records: Sequence[JoinRecord], width: float = 1.0
) -> tuple[list[float], dict[int, list[float]]]:
    """Per ``width``-second bin of completion time: p50/p95/p99 latency in ms."""
    bins: dict[int, list[float]] = {}
    for r in records:
        if r.ok:
            bins.setdefault(int(r.end // width), []).append(r.latency * 1000.0)
    keys = sorted(bins)
    xs = [(k + 0.5) * width for k in keys]
    out = {q: [percentile(bins[k], q) for k in keys] for q in (50, 95, 99)}
    return xs, out


def plot_storm(path: Path, runs: Sequence[Series], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_done, ax_lat, ax_arm) = plt.subplots(3, 1, figsize=(10, 11), sharex=True)
    colors = {50: "tab:green", 95: "tab:orange", 99: "tab:red"}
    for i, run in enumerate(runs):
        style = "-" if i == 0 else "--"
        alpha = 1.0 if i == 0 else 0.6
        ends = sorted(r.end for r in run.records if r.ok)
        ax_done.plot([0.0, *ends], list(range(len(ends) + 1)), style, alpha=alpha, label=run.label)
        longest = max((r.end for r in run.records), default=1.0)
        xs, pct = latency_bins(run.records, width=max(1.0, longest / 60.0))
        for q, ys in pct.items():
            ax_lat.plot(xs, ys, style, color=colors[q], alpha=alpha, label=f"{run.label} p{q}")
        ts = [s.t for s in run.samples]
        ax_arm.plot(
            ts,
            [s.arm_calls for s in run.samples],
            style,
            alpha=alpha,
            label=f"{run.label} ARM calls",
        )
        if any(s.arm_429s for s in run.samples):
            ax_arm.plot(
                ts,
                [s.arm_429s for s in run.samples],
                ":",
                alpha=alpha,
                label=f"{run.label} ARM 429s",
            )
    ax_done.set_ylabel("joins completed")
    ax_done.legend(loc="lower right")
    ax_done.set_title(title)
    ax_lat.set_ylabel("join latency (ms)")
    ax_lat.set_yscale("log")
    ax_lat.legend(loc="upper right", fontsize="small", ncol=2)
    ax_arm.set_ylabel("ARM calls (cumulative)")
    ax_arm.set_xlabel("seconds since the storm started")
    ax_arm.legend(loc="upper left")
    for ax in (ax_done, ax_lat, ax_arm):
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

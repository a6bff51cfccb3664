"""Figures for the reports: curves with their median and interquartile band over seeds."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

Series = Sequence[Sequence[float]]  # one sequence of values per seed


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on these machines
    import matplotlib.pyplot as plt

    return plt


def band_panels(path: Path, panels: Sequence[tuple[str, Sequence[tuple[str, Series]]]],
                x: Sequence[float] | None, xlabel: str, ylabel: str,
                logx: bool = False, logy: bool = False) -> None:
    """One axes per panel; in each, a line per label: median over seeds, IQR shaded.

    Seeds of one label are cut to their shortest length (a diverged run
    stops early; its seeds are drawn only as long as all of them lasted).
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, lines) in zip(axes[0], panels):
        drew_a_point = False
        for label, series in lines:
            series = [s for s in series if len(s)]
            if not series:
                ax.plot([], [], label=f"{label} (no finished run)")
                continue
            length = min(len(s) for s in series)
            values = np.array([s[:length] for s in series], dtype=float)
            q1, median, q3 = np.nanpercentile(values, [25, 50, 75], axis=0)
            xs = np.asarray(x[:length] if x is not None else np.arange(1, length + 1))
            (line,) = ax.plot(xs, median, label=f"{label} (n={len(series)})")
            ax.fill_between(xs, q1, q3, color=line.get_color(), alpha=0.25, linewidth=0)
            drew_a_point = drew_a_point or bool(np.isfinite(median).any())
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        # A log axis without a finite point (no run yet, or all diverged) makes matplotlib
        # refuse the whole figure; a partial report must still render.
        if logx and drew_a_point:
            ax.set_xscale("log")
        if logy and drew_a_point:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

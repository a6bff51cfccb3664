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

    A panel is (title, lines) or (title, lines, its own x). Seeds of one label
    are cut to their shortest length (a diverged run stops early; its seeds
    are drawn only as long as all of them lasted); NaN values are left out.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, lines, *own_x) in zip(axes[0], panels):
        panel_x = own_x[0] if own_x else x
        drew_a_point = False
        for label, series in lines:
            series = [s for s in series if len(s)]
            if not series:
                ax.plot([], [], label=f"{label} (no finished run)")
                continue
            length = min(len(s) for s in series)
            values = np.array([s[:length] for s in series], dtype=float)
            q1, median, q3 = _nan_quartiles(values)
            xs = np.asarray(panel_x[:length] if panel_x is not None
                            else np.arange(1, length + 1))
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


def _nan_quartiles(values: np.ndarray) -> np.ndarray:
    """Quartiles over seeds (axis 0), ignoring NaNs; NaN where a column has no number
    (numpy would warn there)."""
    quarts = np.full((3, values.shape[1]), np.nan)
    some = ~np.isnan(values).all(axis=0)
    if some.any():
        quarts[:, some] = np.nanpercentile(values[:, some], [25, 50, 75], axis=0)
    return quarts

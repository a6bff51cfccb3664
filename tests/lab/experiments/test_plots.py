import math

import pytest

from normlab.experiments.plots import band_panels


@pytest.mark.parametrize("series", [[], [[math.nan, math.nan]]], ids=["no run", "all NaN"])
def test_a_log_panel_without_a_finite_point_still_renders(tmp_path, series):
    """A partial report: one task has runs, the other none yet (or only diverged ones)."""
    path = tmp_path / "figure.png"
    band_panels(path, [("some runs", [("A", [[0.5, 0.1], [0.4, 0.2]])]),
                       ("no point", [("A", series)])],
                [1, 2], "batch size", "gap", logx=True, logy=True)
    assert path.stat().st_size > 0

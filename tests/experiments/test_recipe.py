import math

import pytest

from normlab.experiments import Results, Verdict
from normlab.experiments.recipe import final, median_iqr, quartiles
from normlab.experiments.store import Run


def test_quartiles_match_numpy_and_keep_infinite_losses_infinite():
    assert quartiles([4.0, 1.0, 3.0, 2.0]) == (1.75, 2.5, 3.25)
    assert quartiles([1.0, 2.0, math.inf]) == (1.5, 2.0, math.inf)
    assert quartiles([math.inf, math.inf]) == (math.inf,) * 3
    assert all(math.isnan(q) for q in quartiles([]))


def test_median_iqr_reads_median_quartiles_and_count():
    assert median_iqr([0.9, 0.8, 0.7], "{:.2f}") == "0.80 [IQR 0.75, 0.85] (n=3)"
    assert median_iqr([]) == "no runs"


def test_results_select_by_config_and_final_metric():
    runs = [Run(str(s), {"norm": n, "seed": s}, status, 1.0, [{"acc": 0.1}, {"acc": 0.5 + s}])
            for s, n, status in [(2, "a", "done"), (0, "a", "diverged"), (1, "b", "done")]]
    results = Results(runs)
    assert [r.config["seed"] for r in results.select(norm="a")] == [0, 2]
    assert set(results.by_seed(norm="a")) == {0, 2}
    assert [final(r, "acc") for r in results.select(norm="a")] == [None, 2.5]


def test_verdicts_are_one_of_three():
    with pytest.raises(ValueError, match="verdict must be one of"):
        Verdict("1", "maybe", "")

import math

import pytest

from normlab.experiments import Results, Verdict
from normlab.experiments.recipe import final, grid, median, median_iqr, quartiles
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


def test_grid_expands_every_combination_in_declared_order():
    assert grid(norm=("a", "b"), lr=(0.1, 0.2), seed=range(1)) == [
        {"norm": "a", "lr": 0.1, "seed": 0}, {"norm": "a", "lr": 0.2, "seed": 0},
        {"norm": "b", "lr": 0.1, "seed": 0}, {"norm": "b", "lr": 0.2, "seed": 0}]
    assert grid(norm=("a",), lr=()) == []
    with pytest.raises(ValueError, match="axis 'norm' must be a sequence"):
        grid(norm="batch")  # a string would expand letter by letter


def sample_probe(seed, width):
    return [{"ratio": width / 10}]


def test_select_reads_probe_parameters_and_train_configurations_alike():
    from normlab.experiments import Probe
    from normlab.experiments.runner import job_config

    probes = [Probe(sample_probe, s, {"width": w}) for s in (1, 0) for w in (10, 20)]
    runs = [Run(p.key(), job_config(p), "done", 1.0, p.fn(p.seed, **p.params)) for p in probes]
    runs.append(Run("t", {"kind": "train", "norm": "batch", "width": 20, "seed": 0}, "done",
                    1.0, []))
    results = Results(runs)
    chosen = results.select(probe=sample_probe, width=20)
    assert [(r.config["seed"], r.history[0]["ratio"]) for r in chosen] == [(0, 2.0), (1, 2.0)]
    assert [r.key for r in results.select(kind="train", width=20)] == ["t"]
    assert len(results.select(width=20)) == 3


def test_median_is_the_middle_quartile():
    assert median([3.0, 1.0, 2.0, 10.0]) == 2.5
    assert median([1.0, math.inf, math.inf]) == math.inf
    assert math.isnan(median([]))


def test_verdicts_are_one_of_three():
    with pytest.raises(ValueError, match="verdict must be one of"):
        Verdict("1", "maybe", "")

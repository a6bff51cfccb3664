import math

import falsification
import pytest
import torch

from normlab.experiments import Probe, Results, Settings
from normlab.experiments.recipes import lecture as recipe
from normlab.experiments.runner import execute, job_config
from normlab.experiments.store import Run

QUICK = Settings("lecture", quick=True, seeds=2)
THREE = Settings("lecture", quick=True, seeds=3)


def test_residual_ratio_matches_a_per_sample_loop_with_the_same_weights():
    generator = torch.Generator().manual_seed(3)
    ratio = recipe.residual_output_ratio("scaled_weight_norm", 3, 8, generator, samples=5)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(5, 8, generator=generator, dtype=torch.float64)
    weights = [torch.randn(8, 8, generator=generator, dtype=torch.float64) for _ in range(6)]
    ratios = []
    for sample in x:
        u = sample.clone()
        for b in range(3):
            w1, w2 = weights[2 * b], weights[2 * b + 1]
            hidden = [max(0.0, math.sqrt(2) * float(w1[i] @ u) / float(w1[i].norm()))
                      for i in range(8)]
            branch = [float(w2[i] @ torch.tensor(hidden, dtype=torch.float64)) /
                      float(w2[i].norm()) for i in range(8)]
            u = u + torch.tensor(branch, dtype=torch.float64) / 3
        ratios.append(float(u.norm() / sample.norm()))
    assert ratio == pytest.approx(sorted(ratios)[2], rel=1e-12)


def test_propagation_probe_covers_the_grid():
    depth = recipe.propagation_probe(0, "depth", "he")
    assert [p["blocks"] for p in depth] == list(recipe.DEPTHS)
    width = recipe.propagation_probe(0, "width", "weight_norm")
    assert [p["width"] for p in width] == list(recipe.WIDTHS)


def test_batch_norm_probe_measures_the_identity_and_the_eps_departure():
    points = recipe.batch_norm_scale_probe(0)
    assert [p["c"] for p in points] == list(recipe.SCALES)
    assert max(p["output_diff"] for p in points) < 1e-12
    small = points[0]  # c = 0.01: BN's fixed eps is no longer negligible
    assert small["output_diff_fixed_eps"] > 1e-4 > points[-1]["output_diff_fixed_eps"]


def test_weight_norm_probe_sees_an_orthogonal_update_and_growing_norm():
    points = recipe.weight_norm_update_probe(0, steps=5)
    assert all(p["max_abs_cos"] < 1e-9 and p["max_growth_error"] < 1e-9 for p in points)
    assert points[-1]["norm"] > points[0]["norm"]


def test_probe_claims_from_stored_probes():
    one_seed = Settings("lecture", quick=True, seeds=1)
    probes = [job for job in recipe.jobs(one_seed) if job_config(job)["kind"] == "probe"]
    results = Results([execute(job) for job in probes])
    assert all(r.status == "done" for r in results.runs)
    for check in (recipe.check_propagation, recipe.check_batch_norm, recipe.check_weight_norm):
        assert check(results, one_seed).verdict == "reproduced"


def _probe_run(fn, seed, points, **params):
    job = Probe(fn, seed, params)
    return Run(job.key(), job_config(job), "done", 1.0, points)


def _propagation_runs(ratio, seeds=2):
    """`seeds` seeds of every (sweep, scheme) probe, with ratio(scheme, blocks, width)."""
    grids = {"depth": [(b, 100) for b in recipe.DEPTHS], "width": [(10, w) for w in recipe.WIDTHS]}
    return Results([_probe_run(recipe.propagation_probe, seed,
                               [{"blocks": b, "width": w, "ratio": ratio(scheme, b, w)}
                                for b, w in grid], sweep=sweep, scheme=scheme)
                    for sweep, grid in grids.items() for scheme in recipe.SCHEMES
                    for seed in range(seeds)])


def _bounded(scheme, blocks, width):
    """scaled WN within [1/e, e] everywhere; He growing and WN shrinking with depth."""
    return {"scaled_weight_norm": 1.5, "he": 1.1 ** blocks, "weight_norm": 0.97 ** blocks}[scheme]


@pytest.mark.parametrize("ratio, verdict", [
    (_bounded, "reproduced"),
    # scaled WN leaves the bound at one width only
    (lambda s, b, w: 3.0 if s == "scaled_weight_norm" and w == 500 else _bounded(s, b, w),
     "not reproduced"),
    # He stays within the bound at 100 blocks
    (lambda s, b, w: 1.0 if s == "he" else _bounded(s, b, w), "not reproduced"),
])
def test_propagation_claim_from_synthetic_probes(ratio, verdict):
    assert recipe.check_propagation(_propagation_runs(ratio), QUICK).verdict == verdict
    assert recipe.check_propagation(Results([]), QUICK).verdict == "inconclusive"


def _batch_norm_runs(diff, grad_ratio):
    return Results([_probe_run(recipe.batch_norm_scale_probe, seed,
                               [{"c": c, "output_diff": diff if c == 100.0 else 0.0,
                                 "grad_ratio_times_c": grad_ratio if c == 0.01 else 1.0,
                                 "output_diff_fixed_eps": 1e-3 * (c < 1)}
                                for c in recipe.SCALES]) for seed in range(2)])


def _weight_norm_runs(cos, growth):
    return Results([_probe_run(recipe.weight_norm_update_probe, seed,
                               [{"step": step,
                                 "max_abs_cos": cos if (seed, step) == (1, 20) else 0.0,
                                 "max_growth_error": growth if (seed, step) == (1, 20) else 0.0,
                                 "norm": 1 + step / 10} for step in range(1, 21)])
                    for seed in range(2)])


def _learning_rate_runs(weight_norm_diverged: int):
    """Three seeds at the top rate: 'none' diverged, the others at 0.3, weight
    normalization diverged in the given number of seeds."""
    top = recipe.LR_GRID[True][-1]
    runs = [_loss_run("none", top, s, 9.0, "diverged") for s in range(3)]
    runs += [_loss_run(n, top, s, 0.3, "diverged" if n == "weight_norm" and
                       s < weight_norm_diverged else "done")
             for n in recipe.SWEEP_NORMS[1:] for s in range(3)]
    return Results(runs)


def falsification_cases():
    return {
        "scaled WN": lambda: (THREE, _propagation_runs(_bounded, 3), _propagation_runs(
            lambda s, b, w: 3.0 if s == "scaled_weight_norm" and w == 500
            else _bounded(s, b, w), 3)),
        "BN scale invariance": lambda: (THREE, _batch_norm_runs(1e-15, 1 + 1e-14),
                                        _batch_norm_runs(1e-6, 1.0)),
        "WN update": lambda: (THREE, _weight_norm_runs(1e-15, 1e-15),
                              _weight_norm_runs(1e-3, 1e-15)),
        # weight normalization diverges in 2 of 3 seeds: not "tolerates large rates"
        "large learning rates": lambda: (THREE, _learning_rate_runs(0), _learning_rate_runs(2)),
    }


def test_every_claim_rule_can_fail():
    falsification.check_recipe(recipe.RECIPE, falsification_cases())


def test_learning_rate_claim_shows_the_diverged_seeds():
    verdict = recipe.check_learning_rate(_learning_rate_runs(1), THREE)
    assert verdict.verdict == "reproduced" and "weight_norm 0.3 (1/3)" in verdict.ours


@pytest.mark.parametrize("diff, grad_ratio, verdict", [
    (1e-15, 1 + 1e-14, "reproduced"), (1e-6, 1.0, "not reproduced"),
    (0.0, 1.01, "not reproduced")])
def test_batch_norm_claim_from_synthetic_probes(diff, grad_ratio, verdict):
    runs = [_probe_run(recipe.batch_norm_scale_probe, seed,
                       [{"c": c, "output_diff": diff if c == 100.0 else 0.0,
                         "grad_ratio_times_c": grad_ratio if c == 0.01 else 1.0,
                         "output_diff_fixed_eps": 1e-3 * (c < 1)} for c in recipe.SCALES])
            for seed in range(2)]
    assert recipe.check_batch_norm(Results(runs), QUICK).verdict == verdict


@pytest.mark.parametrize("cos, growth, verdict", [
    (1e-15, 1e-15, "reproduced"), (1e-3, 1e-15, "not reproduced"),
    (1e-15, 1e-4, "not reproduced")])
def test_weight_norm_claim_from_synthetic_probes(cos, growth, verdict):
    runs = [_probe_run(recipe.weight_norm_update_probe, seed,
                       [{"step": step, "max_abs_cos": cos if (seed, step) == (1, 20) else 0.0,
                         "max_growth_error": growth if (seed, step) == (1, 20) else 0.0,
                         "norm": 1 + step / 10} for step in range(1, 21)])
            for seed in range(2)]
    assert recipe.check_weight_norm(Results(runs), QUICK).verdict == verdict


def _loss_run(norm, lr, seed, loss, status="done"):
    config = {"kind": "train", "norm": norm, "lr": lr, "seed": seed}
    return Run(f"{norm}{lr}{seed}", config, status, 1.0, [{"train_loss": loss}])


def test_learning_rate_claim_counts_divergence_as_infinite_loss():
    top = recipe.LR_GRID[True][-1]
    runs = [_loss_run("none", top, s, 9.0, "diverged") for s in range(2)]
    runs += [_loss_run(n, top, s, 0.3) for n in recipe.SWEEP_NORMS[1:] for s in range(2)]
    verdict = recipe.check_learning_rate(Results(runs), QUICK)
    assert verdict.verdict == "reproduced" and "none inf" in verdict.ours
    runs += [_loss_run("none", top, s, 0.1) for s in range(2, 5)]
    verdict = recipe.check_learning_rate(Results(runs), QUICK)
    assert verdict.verdict == "not reproduced"


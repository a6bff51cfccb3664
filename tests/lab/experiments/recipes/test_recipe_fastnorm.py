import falsification
import numpy as np
import pytest

from normlab.experiments import Results, Settings
from normlab.experiments.recipes import fastnorm as recipe
from normlab.experiments.store import Run

QUICK = Settings("fastnorm", quick=True, seeds=3)


def _run(norm, lr, seed, accs, status="done", dtype="float32", batch=1):
    config = {"kind": "train", "norm": norm, "lr": lr, "seed": seed, "dtype": dtype,
              "batch_size": batch}
    return Run(f"{norm}{lr}{seed}{dtype}{batch}", config, status, 1.0,
               [{"test_acc": a} for a in accs])


def _noisy(amplitude, seed, n=120):
    rng = np.random.default_rng(seed)
    return list(0.9 + amplitude * rng.standard_normal(n))


def test_sliding_std_matches_a_loop():
    values = np.random.default_rng(0).random(30)
    expected = [np.std(values[i:i + 7]) for i in range(30 - 7 + 1)]
    np.testing.assert_allclose(recipe.sliding_std(values, 7), expected)
    assert len(recipe.sliding_std(values[:5], 7)) == 1  # shorter than the window: all of it
    assert len(recipe.sliding_std(values[:1], 7)) == 0


def test_std_ratio_is_paired_by_seed_and_skips_diverged_runs():
    runs = [_run("normprop+renorm", 0.03, s, _noisy(0.05, s)) for s in range(3)]
    runs += [_run("fastnorm", 0.03, s, _noisy(0.01, 10 + s)) for s in range(2)]
    runs.append(_run("fastnorm", 0.03, 2, [0.5], status="diverged"))
    ratios = recipe.std_ratios(Results(runs), QUICK, lr=0.03)
    assert len(ratios) == 2 and all(4 < r < 6 for r in ratios)
    verdict = recipe.check_stability(Results(runs), QUICK)
    assert verdict.verdict == "reproduced" and "(n=2)" in verdict.ours


def test_equal_noise_is_not_a_reproduction():
    runs = [_run(n, 0.03, s, _noisy(0.02, 7 * s + i)) for i, n in enumerate(recipe.ARMS)
            for s in range(5)]
    assert recipe.check_stability(Results(runs), QUICK).verdict == "not reproduced"


@pytest.mark.parametrize("normprop_status, fastnorm_status, verdict", [
    ("diverged", "done", "reproduced"),
    ("done", "done", "not reproduced"),
    ("diverged", "diverged", "not reproduced"),
])
def test_divergence_claim(normprop_status, fastnorm_status, verdict):
    runs = [_run("normprop+renorm", 0.07, s, [0.9], normprop_status) for s in range(3)]
    runs += [_run("fastnorm", 0.075, s, [0.9], fastnorm_status) for s in range(3)]
    result = recipe.check_divergence(Results(runs), QUICK)
    assert result.verdict == verdict
    assert ("NormProp, explicit (seed's) 3/3" in result.ours) == (normprop_status == "diverged")


def test_accuracy_claim_compares_medians_and_same_rate_gaps():
    runs = [_run("normprop+renorm", 0.06, s, [0.86 + s / 100]) for s in range(3)]
    runs += [_run("fastnorm", 0.075, s, [0.91]) for s in range(3)]
    runs += [_run("normprop+renorm", 0.03, s, [0.88]) for s in range(3)]
    runs += [_run("fastnorm", 0.03, s, [0.885]) for s in range(3)]
    verdict = recipe.check_accuracy(Results(runs), QUICK)
    assert verdict.verdict == "reproduced" and "87.00%" in verdict.ours
    assert "not comparable" in verdict.why  # quick mode says so
    runs[-1] = _run("fastnorm", 0.03, 2, [0.5])
    runs[-2] = _run("fastnorm", 0.03, 1, [0.5])
    assert recipe.check_accuracy(Results(runs), QUICK).verdict == "inconclusive"


def test_jobs_expand_the_declared_grids_over_every_arm():
    jobs = recipe.jobs(QUICK)
    assert {j.norm for j in jobs} == set(recipe.ARMS) and len(jobs) == 3 * 3 * (4 + 1 + 1)
    assert {(j.dtype, j.batch_size) for j in jobs} == {
        ("float32", 1), ("bfloat16", 1), ("float32", 16)}
    assert len({j.key() for j in jobs}) == len(jobs)
    # a sweep cut short has compared every arm at lr 0.03 on its first seeds
    assert [(j.norm, j.seed, j.lr, j.dtype) for j in jobs[:6]] == [
        (norm, seed, 0.03, "float32") for seed in (0, 1) for norm in recipe.ARMS]


def test_the_fastnorm_arm_is_normprop_with_tracked_norms():
    """The seed's FastNorm: NormProp's forward (the first layer on standardized data, the
    second standardizing its ReLU input), its norms tracked."""
    from normlab import FastNormLinear, NormPropLinear, training

    by_norm = {j.norm: j for j in recipe.jobs(QUICK)}
    fastnorm = [m for m in training.build_model(by_norm["fastnorm"]).modules()
                if isinstance(m, FastNormLinear)]
    normprop = [m for m in training.build_model(by_norm["normprop"]).modules()
                if isinstance(m, NormPropLinear)]
    assert [m.input_activation for m in fastnorm] == [None, "relu"]
    assert [m.input_activation for m in fastnorm] == [m.input_activation for m in normprop]


def test_quick_mode_runs_two_seeds_and_its_protocol_says_what_it_cuts():
    quick_seeds, full_seeds = recipe.RECIPE.seeds["quick"], recipe.RECIPE.seeds["full"]
    settings = Settings("fastnorm", quick=True, seeds=quick_seeds)
    batch_1 = [j for j in recipe.jobs(settings) if j.batch_size == 1]
    # the quick budget's cost: 30 batch-1 runs of 4000 steps (5 configurations per arm)
    assert quick_seeds == 2 and len(batch_1) == 30
    assert all(j.train_limit == recipe.QUICK_TRAIN for j in batch_1)
    (cut,) = [line for line in recipe.protocol(settings) if line.startswith("Quick mode")]
    assert f"{quick_seeds} seeds by default (full mode: {full_seeds})" in cut


def test_mechanism_names_the_pair_whose_ratio_is_above_one():
    """Explicit NormProp noisy, both parametrized arms quiet: the renormalization is the
    mechanism, not the tracking (parametrized NormProp and FastNorm equally quiet)."""
    amplitude = {"normprop+renorm": 0.05, "normprop": 0.01, "fastnorm": 0.01}
    runs = [_run(n, 0.03, s, _noisy(a, 11 * s + i)) for i, (n, a) in
            enumerate(amplitude.items()) for s in range(5)]
    verdict = recipe.check_mechanism(Results(runs), QUICK)
    assert verdict.verdict == "not reproduced"
    assert "support the explicit renormalization" in verdict.why
    assert "tracked arithmetic as" not in verdict.why
    # now tracking alone makes FastNorm steadier too
    amplitude = {"normprop+renorm": 0.25, "normprop": 0.05, "fastnorm": 0.01}
    runs = [_run(n, 0.03, s, _noisy(a, 11 * s + i)) for i, (n, a) in
            enumerate(amplitude.items()) for s in range(5)]
    verdict = recipe.check_mechanism(Results(runs), QUICK)
    assert verdict.verdict == "reproduced" and "and the tracked arithmetic" in verdict.why


def test_mechanism_counts_an_accuracy_gap_as_an_effect():
    """Equally noisy arms, but explicit NormProp ends 10 points lower: the renormalization
    separates the arms through accuracy, the tracking does not."""
    runs = [_run(n, 0.03, s, _noisy(0.01, 13 * s + i) + [0.8 if n == "normprop+renorm" else 0.9])
            for i, n in enumerate(recipe.ARMS) for s in range(5)]
    verdict = recipe.check_mechanism(Results(runs), QUICK)
    assert "support the explicit renormalization" in verdict.why
    assert "tracked arithmetic as" not in verdict.why
    assert "NormProp, parametrized @0.03 +10.0%" in verdict.ours


def test_jobs_refuse_methods_that_are_not_registered(monkeypatch):
    from normlab import registry

    monkeypatch.delitem(registry._REGISTRY, "normprop")
    with pytest.raises(ValueError, match="unknown normalization 'normprop'"):
        recipe.jobs(QUICK)


def _variant_runs(normprop_noise, fastnorm_noise, dtype="float32", batch=1, seeds=5):
    """Runs at lr 0.03 whose accuracy curves have the given noise amplitudes."""
    return [_run(norm, 0.03, s, _noisy(noise, 100 * i + s), dtype=dtype, batch=batch)
            for i, (norm, noise) in enumerate([("normprop+renorm", normprop_noise),
                                               ("fastnorm", fastnorm_noise)])
            for s in range(seeds)]


@pytest.mark.parametrize("bfloat16_normprop_noise, verdict", [
    (0.2, "reproduced"),  # std ratio ~10x in bfloat16 against ~2x in float32
    (0.01, "not reproduced"),  # ~0.5x: the advantage shrinks
    (0.02, "inconclusive"),  # the same ~2x: the IQRs overlap
])
def test_bfloat16_claim_compares_the_std_ratios_of_both_precisions(bfloat16_normprop_noise,
                                                                  verdict):
    runs = _variant_runs(0.02, 0.01) + _variant_runs(bfloat16_normprop_noise, 0.01, "bfloat16")
    assert recipe.check_bfloat16(Results(runs), QUICK).verdict == verdict
    assert recipe.check_bfloat16(Results(_variant_runs(0.02, 0.01)), QUICK).verdict == \
        "inconclusive"  # no bfloat16 runs


@pytest.mark.parametrize("normprop_noise, fastnorm_noise, verdict", [
    (0.03, 0.01, "reproduced"), (0.01, 0.03, "not reproduced"),
    (0.012, 0.01, "not reproduced"),  # IQR about [1.09x, 1.28x]: steadier, but no effect
])
def test_minibatch_claim_reads_the_batch_16_runs(normprop_noise, fastnorm_noise, verdict):
    runs = _variant_runs(normprop_noise, fastnorm_noise, batch=16)
    runs += _variant_runs(fastnorm_noise, normprop_noise)  # batch 1, the other way round
    result = recipe.check_minibatch(Results(runs), QUICK)
    assert result.verdict == verdict and "batch 16" in result.ours


def test_the_window_spans_the_same_training_samples_at_every_batch_size():
    full = Settings("fastnorm", quick=False, seeds=5)
    assert [recipe.window(full, b) for b in (1, 16)] == [100, 6]
    assert [recipe.window(QUICK, b) for b in (1, 16)] == [30, 2]


def test_at_batch_16_a_rising_curve_with_the_same_noise_is_about_as_stable():
    """37 evaluations, as in an epoch at batch 16: a window over all of them counts one
    arm's rise as instability (std ratios 2.8-4.0 here); windows of 6 evaluations mostly
    see the noise, the same in both arms (1.1-1.25)."""
    full = Settings("fastnorm", quick=False, seeds=5)
    noise = [np.array(_noisy(0.005, s, n=37)) for s in range(5)]
    rise = np.linspace(-0.05, 0, 37)
    rising = [_run("normprop+renorm", 0.03, s, list(n + rise), batch=16)
              for s, n in enumerate(noise)]
    flat = [_run("fastnorm", 0.03, s, list(n), batch=16) for s, n in enumerate(noise)]
    ratios = recipe.std_ratios(Results(rising + flat), full, lr=0.03, batch=16)
    assert len(ratios) == 5 and all(1 < r < 1.3 for r in ratios)
    whole = [recipe.sliding_std(n + rise, 37)[0] / recipe.sliding_std(n, 37)[0] for n in noise]
    assert all(r > 2.5 for r in whole)


def test_accuracy_claim_not_reproduced_when_normprop_is_ahead_in_both_comparisons():
    runs = [_run("normprop+renorm", 0.06, s, [0.93]) for s in range(3)]
    runs += [_run("fastnorm", 0.075, s, [0.90]) for s in range(3)]
    runs += [_run("normprop+renorm", 0.03, s, [0.90]) for s in range(3)]
    runs += [_run("fastnorm", 0.03, s, [0.88]) for s in range(3)]
    verdict = recipe.check_accuracy(Results(runs), QUICK)
    assert verdict.verdict == "not reproduced" and "NormProp ahead in both" in verdict.why


FULL = Settings("fastnorm", quick=False, seeds=5)


def _mechanism_runs(amplitude):
    return Results([_run(n, 0.03, s, _noisy(a, 11 * s + i)) for i, (n, a) in
                    enumerate(amplitude.items()) for s in range(5)])


def _divergence_runs(normprop_status, normprop_acc=0.1):
    runs = [_run("normprop+renorm", 0.07, s, [normprop_acc], normprop_status) for s in range(5)]
    return Results(runs + [_run("fastnorm", 0.075, s, [0.9]) for s in range(5)])


def _accuracy_runs(normprop_06, fastnorm_075, normprop_03, fastnorm_03):
    return Results([_run(norm, lr, s, [acc]) for norm, lr, acc in (
        ("normprop+renorm", 0.06, normprop_06), ("fastnorm", 0.075, fastnorm_075),
        ("normprop+renorm", 0.03, normprop_03), ("fastnorm", 0.03, fastnorm_03))
        for s in range(5)])


def falsification_cases():
    return {
        "(a) stability": lambda: (FULL, Results(_variant_runs(0.05, 0.01)),
                                  Results(_variant_runs(0.02, 0.02))),
        # the collapse reading: NormProp ends at 90% without a NaN, so it trained
        "(b) learning-rate range": lambda: (FULL, _divergence_runs("diverged"),
                                            _divergence_runs("done", 0.9)),
        "(c) accuracy": lambda: (FULL, _accuracy_runs(0.86, 0.91, 0.88, 0.885),
                                 _accuracy_runs(0.91, 0.86, 0.885, 0.88)),
        "(d) bfloat16": lambda: (FULL,
                                 Results(_variant_runs(0.02, 0.01)
                                         + _variant_runs(0.2, 0.01, "bfloat16")),
                                 Results(_variant_runs(0.02, 0.01)
                                         + _variant_runs(0.01, 0.01, "bfloat16"))),
        "(e) minibatch 16": lambda: (FULL, Results(_variant_runs(0.03, 0.01, batch=16)),
                                     Results(_variant_runs(0.01, 0.03, batch=16))),
        "(f) mechanism": lambda: (
            FULL, _mechanism_runs({"normprop+renorm": 0.25, "normprop": 0.05, "fastnorm": 0.01}),
            _mechanism_runs({"normprop+renorm": 0.05, "normprop": 0.01, "fastnorm": 0.01})),
    }


def test_every_claim_rule_can_fail():
    falsification.check_recipe(recipe.RECIPE, falsification_cases())


def test_a_collapsed_normprop_run_failed_to_train_without_a_nan():
    verdict = recipe.check_divergence(_divergence_runs("done", 0.2), FULL)
    assert verdict.verdict == "reproduced"
    assert "NormProp, explicit (seed's) 0/5 of 5" in verdict.ours


def test_parametrized_normprop_and_fastnorm_differ_only_in_how_the_norm_is_kept():
    """Both arms start from unit rows: the same function, and SGD on it keeps them together
    (FastNorm's tracking only rounds differently)."""
    import torch

    from normlab import training

    torch.manual_seed(0)
    by_norm = {j.norm: j for j in recipe.jobs(QUICK) if j.seed == 0}
    models, optimizers = {}, {}
    for norm in ("normprop", "fastnorm"):
        torch.manual_seed(0)
        models[norm] = training.build_model(by_norm[norm])
        optimizers[norm] = training.build_optimizer(models[norm], by_norm[norm])
        first = next(m for m in models[norm].modules() if hasattr(m, "weight"))
        torch.testing.assert_close(first.weight.norm(dim=1), torch.ones(1024))
    data = torch.randn(64, 784, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(2))
    for x, y in zip(data.split(1), labels.split(1)):
        for norm, model in models.items():
            optimizers[norm].zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            for group in optimizers[norm].param_groups:
                group["lr"] = 0.03
            optimizers[norm].step()
    probe = torch.randn(8, 784, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(models["normprop"](probe), models["fastnorm"](probe),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dataset, widths", [("mnist", "784-1024-10"), ("digits", "64-256-10")])
def test_the_protocol_names_the_network_that_ran(dataset, widths):
    """A sweep that fell back to digits ran a smaller network: its report says so."""
    from normlab.experiments.recipes import lecture

    for module in (recipe, lecture):
        settings = Settings(module.RECIPE.name, quick=True, seeds=2, dataset=dataset)
        text = " ".join(module.protocol(settings))
        assert f"{widths} MLP" in text and ("784" in text) == (dataset == "mnist")

import math

from normlab.experiments import recipe
from normlab.experiments.recipes import enorm
from normlab.experiments.runner import job_config
from normlab.experiments.store import Run

QUICK = recipe.Settings("enorm", quick=True, seeds=1, dataset="cifar10")


def test_jobs_follow_seed_003():
    jobs = enorm.jobs(QUICK)
    # p in {1, 9, 19}: four methods, the two ENorm ones with both schedules, two with biases
    assert len(jobs) == 3 * (4 + 2) + 3 * 2
    job = next(j for j in jobs if j.norm == "enorm" and j.model_kw == {"p": 19})
    assert (job.lr, job.batch_size, job.weight_decay, job.momentum, job.lr_schedule) == \
        (0.01, 256, 1e-3, 0.0, "linear")  # Table 1: ENorm at p = 19
    assert job.rebalancer_kw == {"c": 1.2, "schedule": "paper"}
    assert {j.rebalancer_kw.get("schedule") for j in jobs if j.norm == "batch+enorm"} == {
        "paper", "official"}
    biased = next(j for j in jobs if j.norm == "enorm" and j.model_kw.get("bias"))
    assert biased.rebalancer_kw == {"c": 1.2, "schedule": "paper", "balance_bias": True}
    full = enorm.jobs(recipe.Settings("enorm", quick=False, seeds=1, dataset="cifar10"))
    assert {j.epochs for j in full} == {60} and {j.train_limit for j in full} == {None}
    assert {j.rebalancer_kw.get("schedule") for j in full} == {None, "paper"}
    assert enorm.learning_rate("batch+enorm", 15) == 0.05 and enorm.learning_rate("none", 9) == 0.05


def fake_results(accuracy, diverged=lambda method, p, bias: False, settings=QUICK):
    runs = []
    for job in enorm.jobs(settings):
        p, bias = job.model_kw["p"], job.model_kw.get("bias", False)
        schedule = job.rebalancer_kw.get("schedule")
        if diverged(job.norm, p, bias):
            runs.append(Run(job.key(), job_config(job), "diverged", 1.0, []))
        else:
            runs.append(Run(job.key(), job_config(job), "done", 1.0,
                            [{"test_acc": accuracy(job.norm, p) + (
                                job.seed / 1000 + OFFICIAL_SHIFT[job.norm] * p / 19
                                if schedule == "official" else 0.0)}]))
    return recipe.Results(runs)


OFFICIAL_SHIFT = {"enorm": 0.0, "batch+enorm": 0.0}


RANKED = {"batch+enorm": 0.5, "enorm": 0.45, "batch": 0.4, "none": 0.35}


def test_ranking_and_baseline_claims_follow_the_numbers():
    results = fake_results(lambda method, p: RANKED[method])
    assert enorm.check_ranking(results, QUICK).verdict == "reproduced"
    assert enorm.check_enorm_beats_baseline(results, QUICK).verdict == "reproduced"
    reversed_ = fake_results(lambda method, p: 1 - RANKED[method])
    assert enorm.check_ranking(reversed_, QUICK).verdict == "inconclusive"  # one seed
    two_seeds = recipe.Settings("enorm", quick=True, seeds=2, dataset="cifar10")
    reversed_twice = fake_results(lambda method, p: 1 - RANKED[method], settings=two_seeds)
    assert enorm.check_ranking(reversed_twice, two_seeds).verdict == "not reproduced"
    assert enorm.check_enorm_beats_baseline(reversed_, QUICK).verdict == "not reproduced"


def test_bias_instability_claim_reads_the_diverged_runs():
    deep_enorm = fake_results(lambda m, p: 0.4,
                              lambda m, p, bias: bias and m == "enorm" and p >= 11)
    assert enorm.check_bias_instability(deep_enorm, QUICK).verdict == "reproduced"
    stable = fake_results(lambda m, p: 0.4)
    assert enorm.check_bias_instability(stable, QUICK).verdict == "not reproduced"
    assert math.isnan(enorm._median(enorm.accuracies(deep_enorm, "enorm", 19, bias=True)))


def test_schedule_claim_compares_the_official_schedule_with_the_paper(monkeypatch):
    same = fake_results(lambda m, p: RANKED[m])
    assert enorm.check_schedule(same, QUICK).verdict == "reproduced"
    assert "ENorm p=19: +0.0" in enorm.check_schedule(same, QUICK).ours
    monkeypatch.setitem(OFFICIAL_SHIFT, "batch+enorm", 0.05)  # 5 points apart at p = 19
    shifted = fake_results(lambda m, p: RANKED[m])
    verdict = enorm.check_schedule(shifted, QUICK)
    assert verdict.verdict == "inconclusive" and "up to 5.0 points" in verdict.why
    three = recipe.Settings("enorm", quick=True, seeds=3, dataset="cifar10")
    verdict = enorm.check_schedule(fake_results(lambda m, p: RANKED[m], settings=three), three)
    assert verdict.verdict == "not reproduced"
    full = recipe.Settings("enorm", quick=False, seeds=1, dataset="cifar10")
    assert enorm.check_schedule(same, full).verdict == "inconclusive"


def test_baseline_claim_waits_for_every_depth():
    """One exception is allowed among all depths: one depth measured proves nothing."""
    below = fake_results(lambda m, p: 0.4 if m == "enorm" else 0.45)
    partial = recipe.Results([r for r in below.runs if r.config["model_kw"]["p"] == 1])
    verdict = enorm.check_enorm_beats_baseline(partial, QUICK)
    assert verdict.verdict == "inconclusive" and "missing at 2 of 3 depths" in verdict.why


def test_figure_is_drawn(tmp_path):
    enorm.draw_depth_sweep(fake_results(lambda m, p: RANKED[m]), QUICK, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 0

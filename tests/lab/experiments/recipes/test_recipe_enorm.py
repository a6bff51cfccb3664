import math

import falsification

from normlab.experiments import recipe
from normlab.experiments.recipes import enorm
from normlab.experiments.runner import job_config
from normlab.experiments.store import Run

QUICK = recipe.Settings("enorm", quick=True, seeds=1, dataset="cifar10")
DECISIVE = recipe.Settings("enorm", quick=False, seeds=3, dataset="cifar10",
                           protocol="decisive")


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


def test_the_decisive_protocol_is_the_issue_s_96_runs_at_the_paper_s_settings():
    jobs = enorm.jobs(DECISIVE)
    assert len(jobs) == len({j.key() for j in jobs}) == 96
    assert {(j.epochs, j.train_limit, j.batch_size) for j in jobs} == {(60, None, 256)}
    main = {(j.norm, j.model_kw["p"]) for j in jobs
            if not j.model_kw.get("bias") and j.rebalancer_kw.get("schedule") != "official"}
    assert main == {(m, p) for m in enorm.METHODS for p in (1, 5, 9, 15, 19)}
    assert {(j.norm, j.model_kw["p"]) for j in jobs if j.model_kw.get("bias")} == {
        (m, p) for m in ("none", "enorm") for p in (9, 11, 19)}
    assert {(j.norm, j.model_kw["p"]) for j in jobs
            if j.rebalancer_kw.get("schedule") == "official"} == {
        (m, p) for m in ("enorm", "batch+enorm") for p in (1, 9, 19)}
    # seed by seed: the first third of the sweep holds every configuration once
    assert {j.seed for j in jobs[:32]} == {0}


def fake_results(accuracy, diverged=lambda method, p, bias: False, settings=QUICK):
    runs = []
    for job in enorm.jobs(settings):
        p, bias = job.model_kw["p"], job.model_kw.get("bias", False)
        schedule = job.rebalancer_kw.get("schedule")
        if diverged(job.norm, p, bias):
            runs.append(Run(job.key(), job_config(job), "diverged", 1.0, []))
        else:
            runs.append(Run(job.key(), job_config(job), "done", 1.0,
                            [{"test_acc": accuracy(job.norm, p) + job.seed / 1000 + (
                                OFFICIAL_SHIFT[job.norm] * p / 19
                                if schedule == "official" else 0.0)}]))
    return recipe.Results(runs)


OFFICIAL_SHIFT = {"enorm": 0.0, "batch+enorm": 0.0}


RANKED = {"batch+enorm": 0.5, "enorm": 0.45, "batch": 0.4, "none": 0.35}


def falsification_cases():
    def ranked(settings=DECISIVE, **kw):
        return fake_results(lambda m, p: RANKED[m], settings=settings, **kw)

    def shifted():
        OFFICIAL_SHIFT["batch+enorm"] = 0.05  # 5 points apart at p = 19
        try:
            return ranked()
        finally:
            OFFICIAL_SHIFT["batch+enorm"] = 0.0

    deep = lambda m, p, bias: bias and m == "enorm" and p >= 11  # noqa: E731
    return {
        "ranking": lambda: (DECISIVE, ranked(), fake_results(lambda m, p: 1 - RANKED[m],
                                                             settings=DECISIVE)),
        # ENorm below the baseline at 2 of 5 depths: more than "almost every p" allows
        "ENorm vs baseline": lambda: (DECISIVE, ranked(), fake_results(
            lambda m, p: 0.3 if m == "enorm" and p >= 15 else RANKED[m], settings=DECISIVE)),
        "schedule": lambda: (DECISIVE, ranked(), shifted()),
        "biases": lambda: (DECISIVE, ranked(diverged=deep), ranked(
            diverged=lambda m, p, bias: bias and m == "enorm")),  # p = 9 diverges too
    }


def test_every_claim_rule_can_fail():
    falsification.check_recipe(enorm.RECIPE, falsification_cases())


def test_almost_every_depth_allows_one_exception_in_five_not_two_in_three():
    one_below = fake_results(lambda m, p: 0.3 if m == "enorm" and p == 19 else RANKED[m],
                             settings=DECISIVE)
    assert enorm.check_enorm_beats_baseline(one_below, DECISIVE).verdict == "reproduced"
    three = recipe.Settings("enorm", quick=True, seeds=3, dataset="cifar10")
    quick_below = fake_results(lambda m, p: 0.3 if m == "enorm" and p == 19 else RANKED[m],
                               settings=three)
    assert enorm.check_enorm_beats_baseline(quick_below, three).verdict == "not reproduced"


def test_one_seed_gives_an_indicative_verdict_and_a_missing_seed_an_inconclusive_one():
    claim = next(c for c in enorm.RECIPE.claims if c.name == "ranking")
    reversed_ = fake_results(lambda method, p: 1 - RANKED[method])
    verdict = recipe.decide(claim, reversed_, QUICK)
    assert verdict.verdict == "indicative" and "leans 'not reproduced' on 1 seed" in verdict.why
    partial = recipe.Results([r for r in fake_results(lambda m, p: RANKED[m],
                                                      settings=DECISIVE).runs
                              if r.config["seed"] < 2])
    verdict = recipe.decide(claim, partial, DECISIVE)
    assert verdict.verdict == "inconclusive" and verdict.why.startswith("runs missing")


def test_bias_instability_claim_reads_the_diverged_runs():
    deep_enorm = fake_results(lambda m, p: 0.4,
                              lambda m, p, bias: bias and m == "enorm" and p >= 11,
                              settings=DECISIVE)
    assert enorm.check_bias_instability(deep_enorm, DECISIVE).verdict == "reproduced"
    stable = fake_results(lambda m, p: 0.4, settings=DECISIVE)
    assert enorm.check_bias_instability(stable, DECISIVE).verdict == "not reproduced"
    assert math.isnan(enorm._median(enorm.accuracies(deep_enorm, "enorm", 19, bias=True)))


def test_schedule_claim_reports_the_difference_and_needs_official_runs():
    same = fake_results(lambda m, p: RANKED[m])
    assert "ENorm p=19: +0.0" in enorm.check_schedule(same, QUICK).ours
    full = recipe.Settings("enorm", quick=False, seeds=1, dataset="cifar10")
    assert enorm.check_schedule(same, full).verdict == "inconclusive"


def test_claims_wait_for_every_depth():
    """A depth with no run makes the claim inconclusive, whatever the others say."""
    below = fake_results(lambda m, p: 0.4 if m == "enorm" else 0.45, settings=DECISIVE)
    partial = recipe.Results([r for r in below.runs if r.config["model_kw"]["p"] == 1])
    for check in (enorm.check_enorm_beats_baseline, enorm.check_ranking):
        verdict = check(partial, DECISIVE)
        assert verdict.verdict == "inconclusive" and "runs missing" in verdict.why


def test_figure_is_drawn(tmp_path):
    enorm.draw_depth_sweep(fake_results(lambda m, p: RANKED[m]), QUICK, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 0
    partial = recipe.Results(fake_results(lambda m, p: RANKED[m], settings=DECISIVE).runs[:40])
    enorm.draw_depth_sweep(partial, DECISIVE, tmp_path / "d.png")
    assert (tmp_path / "d.png").stat().st_size > 0


from normlab.experiments import recipe
from normlab.experiments.recipes import equinorm
from normlab.experiments.runner import job_config
from normlab.experiments.store import Run

QUICK = recipe.Settings("equinorm", quick=True, seeds=2, dataset="cifar10")


def test_jobs_follow_section_6_1():
    jobs = equinorm.jobs(QUICK)
    assert len(jobs) == 4 * 2 * 2  # four variants, long and short schedules, two seeds
    # the first seed's runs come first: a sweep cut short has a run of every claim's arms
    assert {(j.seed, j.norm, j.lr_schedule) for j in jobs[:8]} == {
        (0, norm, schedule) for norm in ("batch", "group", "equinorm")
        for schedule in ("step", "linear")}
    quarter = [j for j in jobs if j.norm_kw == {"stat_fraction": 0.25}]
    assert quarter and all(j.norm == "equinorm" for j in quarter)
    long = [j for j in jobs if j.lr_schedule == "step"]
    assert {(j.momentum, j.lr, j.batch_size, j.weight_decay) for j in long} == \
        {(0.9, 0.1, 128, 1e-4)}


def fake_results(acc, loss):
    """acc(label, epoch), loss(label, epoch) -> the curves of every job."""
    label_of = {(norm, tuple(kw.items())): label for label, (norm, kw) in
                equinorm.VARIANTS.items()}
    runs = []
    for job in equinorm.jobs(QUICK):
        label = label_of[job.norm, tuple(job.norm_kw.items())]
        history = [{"test_acc": acc(label, e), "test_loss": loss(label, e)}
                   for e in range(job.epochs)]
        runs.append(Run(job.key(), job_config(job), "done", 1.0, history))
    return recipe.Results(runs)


def test_claims_follow_the_curves():
    fast = {"EquiNorm": 0.1, "EquiNorm, first-quarter stats": 0.1}
    rising = {"EquiNorm": 0.3}  # EquiNorm's test loss climbs after the drop at epoch 2
    results = fake_results(lambda label, e: 0.3 + 0.1 * e + fast.get(label, 0),
                           lambda label, e: 1.0 + (rising.get(label, 0) * e if e >= 2 else 0))
    assert equinorm.check_early_convergence(results, QUICK).verdict == "reproduced"
    assert equinorm.check_overfitting(results, QUICK).verdict == "reproduced"
    assert equinorm.check_short_schedule(results, QUICK).verdict == "reproduced"
    flat = fake_results(lambda label, e: 0.5, lambda label, e: 1.0)
    for check in (equinorm.check_early_convergence, equinorm.check_overfitting,
                  equinorm.check_short_schedule):
        assert check(flat, QUICK).verdict == "not reproduced"

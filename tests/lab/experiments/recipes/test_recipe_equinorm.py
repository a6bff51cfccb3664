
import falsification

from normlab.experiments import recipe
from normlab.experiments.recipes import equinorm
from normlab.experiments.runner import job_config
from normlab.experiments.store import Run

QUICK = recipe.Settings("equinorm", quick=True, seeds=2, dataset="cifar10")
DECISIVE = recipe.Settings("equinorm", quick=False, seeds=3, dataset="cifar10",
                           protocol="decisive")


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


def test_the_decisive_protocol_runs_only_the_compared_arms_at_full_scale():
    jobs = equinorm.jobs(DECISIVE)
    assert len(jobs) == len({j.key() for j in jobs}) == 15
    labels = {(norm, tuple(kw.items())): label
              for label, (norm, kw) in equinorm.VARIANTS.items()}
    long = {labels[j.norm, tuple(j.norm_kw.items())] for j in jobs if j.lr_schedule == "step"}
    short = {labels[j.norm, tuple(j.norm_kw.items())] for j in jobs if j.lr_schedule == "linear"}
    assert long == {"BatchNorm", "EquiNorm", equinorm.QUARTER}
    assert short == {"BatchNorm", "EquiNorm"}
    assert {(j.epochs, j.train_limit) for j in jobs if j.lr_schedule == "step"} == {(40, None)}
    assert {j.model_kw["depth"] for j in jobs} == {20}


def fake_results(acc, loss, settings=QUICK):
    """acc(label, epoch), loss(label, epoch) -> the curves of every job; the seed adds a
    little noise, so that the IQRs have a width."""
    label_of = {(norm, tuple(kw.items())): label for label, (norm, kw) in
                equinorm.VARIANTS.items()}
    runs = []
    for job in equinorm.jobs(settings):
        label = label_of[job.norm, tuple(job.norm_kw.items())]
        history = [{"test_acc": acc(label, e) + job.seed / 10_000,
                    "test_loss": loss(label, e) + job.seed / 1000} for e in range(job.epochs)]
        runs.append(Run(job.key(), job_config(job), "done", 1.0, history))
    return recipe.Results(runs)


def falsification_cases():
    epochs = equinorm.EPOCHS["decisive"]
    drop = epochs // 2

    def curves(ahead=None, rising=None):
        ahead, rising = ahead or {}, rising or {}
        return fake_results(lambda label, e: 0.5 + 0.01 * e + ahead.get(label, 0.0),
                            lambda label, e: 1.0 + rising.get(label, 0.0) * max(0, e - drop),
                            settings=DECISIVE)

    paper = curves(ahead={"EquiNorm": 0.02, equinorm.QUARTER: 0.02},
                   rising={"EquiNorm": 0.05})
    return {
        "early convergence": lambda: (DECISIVE, paper, curves()),
        # no overfitting: EquiNorm's loss flat after the drop
        "overfitting": lambda: (DECISIVE, paper, curves(
            ahead={"EquiNorm": 0.02}, rising={})),
        # first-quarter EquiNorm level with BatchNorm
        "first-quarter accuracy": lambda: (DECISIVE, paper, curves(
            ahead={"EquiNorm": 0.02}, rising={"EquiNorm": 0.05})),
        # on the short schedule too the gap is what the curves give: none in the wrong case
        "short schedule": lambda: (DECISIVE, paper, curves(
            ahead={equinorm.QUARTER: 0.02}, rising={"EquiNorm": 0.05})),
    }


def test_every_claim_rule_can_fail():
    falsification.check_recipe(equinorm.RECIPE, falsification_cases())


def test_overfitting_needs_the_first_quarter_fix_as_well():
    drop = equinorm.EPOCHS["decisive"] // 2
    both_rise = fake_results(lambda label, e: 0.5,
                             lambda label, e: 1.0 + (0.05 * max(0, e - drop) if "Equi" in label
                                                     else 0.0), settings=DECISIVE)
    verdict = equinorm.check_overfitting(both_rise, DECISIVE)
    assert verdict.verdict == "not reproduced" and "below EquiNorm's: False" in verdict.why


def test_claims_follow_the_curves():
    fast = {"EquiNorm": 0.1, "EquiNorm, first-quarter stats": 0.1}
    rising = {"EquiNorm": 0.3}  # EquiNorm's test loss climbs after the drop at epoch 2
    results = fake_results(lambda label, e: 0.3 + 0.1 * e + fast.get(label, 0),
                           lambda label, e: 1.0 + (rising.get(label, 0) * e if e >= 2 else 0))
    assert equinorm.check_early_convergence(results, QUICK).verdict == "reproduced"
    assert equinorm.check_overfitting(results, QUICK).verdict == "reproduced"
    assert equinorm.check_short_schedule(results, QUICK).verdict == "reproduced"
    assert equinorm.check_quarter_accuracy(results, QUICK).verdict == "reproduced"
    flat = fake_results(lambda label, e: 0.5, lambda label, e: 1.0)
    for check in (equinorm.check_early_convergence, equinorm.check_overfitting,
                  equinorm.check_short_schedule, equinorm.check_quarter_accuracy):
        assert check(flat, QUICK).verdict == "not reproduced"

import torch
from torch import nn

from normlab.experiments import recipe
from normlab.experiments.recipes import onlinenorm
from normlab.experiments.runner import job_config
from normlab.experiments.store import Run

QUICK = recipe.Settings("onlinenorm", quick=True, seeds=1, dataset="mnist")


def test_jobs_skip_what_torch_cannot_train():
    params = [j.params for j in onlinenorm.jobs(QUICK) if j.params]
    assert {"task": "mnist-mlp", "norm": "online", "batch": 1, "quick": True} in params
    assert not any(p["batch"] == 1 and p["task"] == "mnist-mlp" and p["norm"] == "batch"
                   for p in params)
    assert any(p["batch"] == 1 and p["task"] == "cifar10-resnet" and p["norm"] == "batch"
               for p in params)


def test_train_eval_gap_is_zero_without_batch_statistics_and_not_with_them():
    torch.manual_seed(0)
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    plain = nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    assert onlinenorm.train_eval_gap(plain, x, y, 4)["gap"] < 1e-6  # float rounding only
    batch = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    before = batch[1].running_mean.clone()
    assert onlinenorm.train_eval_gap(batch, x, y, 4)["gap"] > 0.1
    assert torch.equal(batch[1].running_mean, before)  # measured on a copy


def fake_results(acc, gap, gb=lambda batch: batch * 0.5):
    runs = [Run("memory", {"kind": "probe", "probe": "normlab.experiments.recipes.onlinenorm."
                           "memory_probe", "seed": 0, "params": {}}, "done", 1.0,
                [{"network": i, "batch": b, "gb": gb(b)}
                 for i in range(len(onlinenorm.memory.NETWORKS)) for b in (1, 32, 128)])]
    for job in onlinenorm.jobs(QUICK)[1:]:
        p = job.params
        runs.append(Run(job.key(), job_config(job), "done", 1.0,
                        [{"test_acc": acc(p["norm"], p["batch"]),
                          "gap": gap(p["norm"], p["batch"])}]))
    return recipe.Results(runs)


def test_claims_follow_the_numbers():
    steady = fake_results(lambda n, b: 0.9 if n in ("online", "group") else 0.5 + b / 1000,
                          lambda n, b: 0.01 if n in ("online", "group") else 1 / b)
    for check in (onlinenorm.check_memory, onlinenorm.check_batch_dependency,
                  onlinenorm.check_symmetry):
        assert check(steady, QUICK).verdict == "reproduced"
    worse = fake_results(lambda n, b: 0.5 + b / 1000 if n == "online" else 0.9,
                         lambda n, b: 1.0 if n == "online" else 0.0)
    assert onlinenorm.check_batch_dependency(worse, QUICK).verdict == "not reproduced"
    assert onlinenorm.check_symmetry(worse, QUICK).verdict == "not reproduced"


def test_memory_claim_needs_batch_1_far_below_batch_32():
    def results(gb):
        return fake_results(lambda n, b: 0.9, lambda n, b: 0.0, gb)
    assert onlinenorm.check_memory(results(lambda b: 0.1 * b), QUICK).verdict == "reproduced"
    # weights and workspace dominate: batch 32 only ~4x batch 1
    assert onlinenorm.check_memory(results(lambda b: 1 + 0.1 * b), QUICK).verdict == \
        "not reproduced"
    no_probe = recipe.Results(results(lambda b: b).runs[1:])
    assert onlinenorm.check_memory(no_probe, QUICK).verdict == "inconclusive"

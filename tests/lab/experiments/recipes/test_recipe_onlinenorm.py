import hashlib

import falsification
import pytest
import torch
from torch import nn

from normlab.experiments import recipe
from normlab.experiments.recipes import onlinenorm
from normlab.experiments.runner import job_config
from normlab.experiments.store import Run

QUICK = recipe.Settings("onlinenorm", quick=True, seeds=1, dataset="mnist")
DECISIVE = recipe.Settings("onlinenorm", quick=False, seeds=3, dataset="mnist",
                           protocol="decisive")
FULL = recipe.Settings("onlinenorm", quick=False, seeds=3, dataset="mnist")


def test_jobs_skip_what_torch_cannot_train():
    """And the quick and full modes run every method at every batch size otherwise."""
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


def poster_gb(network: int, batch: int) -> float:
    """The poster's own figures: what an implementation that matches it measures."""
    return onlinenorm.memory.NETWORKS[network].poster_gb[onlinenorm.memory.BATCHES.index(batch)]


def fake_results(acc, gap, gb=poster_gb, settings=QUICK):
    (probe, *trainings) = onlinenorm.jobs(settings)
    runs = [Run(probe.key(), job_config(probe), "done", 1.0,
                [{"network": i, "batch": b, "gb": gb(i, b)}
                 for i in range(len(onlinenorm.memory.NETWORKS)) for b in (1, 32, 128)])]
    for job in trainings:
        p = job.params
        runs.append(Run(job.key(), job_config(job), "done", 1.0,
                        [{"test_acc": acc(p["norm"], p["batch"]) + job.seed / 10_000,
                          "gap": gap(p["norm"], p["batch"]) * (1 + job.seed / 100)}]))
    return recipe.Results(runs)


def steady_acc(norm, batch):
    return 0.9 if norm in onlinenorm.BATCH_FREE else 0.5 + batch / 1000


def steady_gap(norm, batch):
    return 0.01 if norm in onlinenorm.BATCH_FREE else 1 / batch


def falsification_cases():
    paper = fake_results(steady_acc, steady_gap, settings=DECISIVE)
    return {
        # activations linear in the batch and nothing else: 32x and 128x, far from ResNet-50's
        # 2x and 4x
        "memory": lambda: (DECISIVE, paper, fake_results(
            steady_acc, steady_gap, lambda i, b: 0.1 * b, settings=DECISIVE)),
        # Online Norm as batch-dependent as BatchNorm
        "batch dependency": lambda: (DECISIVE, paper, fake_results(
            lambda n, b: steady_acc("batch" if n == "online" else n, b), steady_gap,
            settings=DECISIVE)),
        # Online Norm's train/eval gap as large as BatchNorm's
        "train/inference symmetry": lambda: (DECISIVE, paper, fake_results(
            steady_acc, lambda n, b: steady_gap("batch" if n == "online" else n, b),
            settings=DECISIVE)),
    }


def test_every_claim_rule_can_fail():
    falsification.check_recipe(onlinenorm.RECIPE, falsification_cases())


def test_batch_dependency_holds_online_norm_to_groupnorm_s_range():
    """Below BatchNorm's range is not enough: Online Norm 3 points less steady than
    GroupNorm, a batch-independent normalizer, has not removed the dependency."""
    results = fake_results(lambda n, b: 0.9 + (0.03 * (b == 128) if n == "online" else 0)
                           if n in onlinenorm.BATCH_FREE else 0.5 + b / 1000, steady_gap,
                           settings=DECISIVE)
    verdict = onlinenorm.check_batch_dependency(results, DECISIVE)
    assert verdict.verdict == "not reproduced" and "on 0 of 2 tasks" in verdict.why


def test_decisive_protocol_runs_batch_1_for_the_batch_free_norms_only_and_last():
    (probe, *trainings) = onlinenorm.jobs(DECISIVE)
    params = [j.params for j in trainings]
    assert probe.fn is onlinenorm.training_memory_probe
    assert {p["batch"] for p in params} == {1, 2, 8, 128}
    assert {p["norm"] for p in params if p["batch"] == 1} == set(onlinenorm.COMPARED_BATCH_FREE)
    cifar = [p for p in params if p["task"] == "cifar10-resnet"]
    assert len(cifar) == 3 * (4 * 3 + 2) and cifar[-6:] == [p for p in cifar if p["batch"] == 1]
    # its MNIST runs are the full protocol's (copied from its export by --resume-from)
    full_keys = {j.key() for j in onlinenorm.jobs(FULL)}
    assert {j.key() for j in onlinenorm.jobs(DECISIVE)} <= full_keys
    # each training run checkpoints (a CIFAR-10 one takes hours); the memory probe does not
    assert all(j.trains for j in trainings) and not probe.trains


def keys_digest(keys) -> str:
    return hashlib.sha256(" ".join(keys).encode()).hexdigest()


def test_the_decisive_job_list_is_main_s_of_2026_12_03():
    """A decisive sweep runs at a fixed commit (issue 25): its 85 jobs, in order, are the
    ones main's code (d8e4ff2) listed, whatever the registry holds since."""
    jobs = onlinenorm.jobs(DECISIVE)
    assert len(jobs) == 85
    assert {j.params["norm"] for j in jobs if j.params} == set(onlinenorm.NORMS)
    assert keys_digest(j.key() for j in jobs) == (
        "722baafcecca730a7948d4acfc1724327d2868607f47331dd572e8021999f343")


@pytest.mark.parametrize("settings, count, digest", [
    (QUICK, 39, "62aa1e445aa2da44dd9cfdcc4515637f560ccdb76d2be678fe4eb09288c60884"),
    (FULL, 115, "cd6d8745bfbe35dcac200b70de2eee57c54f82f557c8bd775f24b2d359f4cf07")])
def test_quick_and_full_add_the_registry_s_batch_free_methods_to_main_s_jobs(
        settings, count, digest):
    jobs = onlinenorm.jobs(settings)
    compared = [j.key() for j in jobs if not j.params or j.params["norm"] in onlinenorm.NORMS]
    assert len(compared) == count and keys_digest(sorted(compared)) == digest  # main's, kept
    extra = [j.params for j in jobs if j.params and j.params["norm"] not in onlinenorm.NORMS]
    arms = {p["norm"] for p in extra}
    assert {"frn", "group+weight_standardization"} <= arms
    assert arms == {a for a in onlinenorm.BATCH_FREE if a not in onlinenorm.NORMS}
    # every batch size, both tasks; Weight Standardization has no Linear: the ResNet only
    assert {(p["task"], p["batch"]) for p in extra if p["norm"] == "frn"} == {
        (t, b) for t in onlinenorm.TASKS for b in onlinenorm.BATCHES_BY_MODE[settings.mode]}
    assert {p["task"] for p in extra if "weight_standardization" in p["norm"]} == {
        "cifar10-resnet"}
    # InstanceNorm normalizes over positions alone: an MLP's features have none
    assert {p["task"] for p in extra if p["norm"] == "instance"} == {"cifar10-resnet"}
    assert onlinenorm.label("group+weight_standardization") == (
        "GroupNorm + Weight Standardization")


def test_a_newly_registered_batch_free_method_joins_by_itself(monkeypatch):
    from torch import nn as torch_nn

    from normlab import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    registry.register(registry.Method(
        "unit_rms", "activation", "-", "a batch-free test method", label="Unit RMS",
        build=lambda num_features, dim, **kw: torch_nn.Identity(), batch_free=True))
    registry.register(registry.Method("batch_twin", "activation", "-", "uses batch statistics",
                                      build=lambda num_features, dim, **kw: torch_nn.Identity()))
    arms = onlinenorm.batch_free_arms()
    assert "unit_rms" in arms and "batch_twin" not in arms
    assert onlinenorm.label("unit_rms") == "Unit RMS"


def test_the_other_batch_free_methods_are_shown_beside_the_claims_and_change_no_verdict():
    def acc(norm, batch):  # the extra arms as batch-dependent as BatchNorm: no verdict moves
        return steady_acc("batch" if norm not in onlinenorm.NORMS else norm, batch)

    def gap(norm, batch):
        return steady_gap("batch" if norm not in onlinenorm.NORMS else norm, batch)

    with_extras = fake_results(acc, gap, settings=QUICK)
    without = recipe.Results([r for r in with_extras.runs
                              if r.config.get("params", {}).get("norm", "batch")
                              in onlinenorm.NORMS])
    assert len(without.runs) < len(with_extras.runs)
    for check in (onlinenorm.check_batch_dependency, onlinenorm.check_symmetry):
        extended, plain = check(with_extras, QUICK), check(without, QUICK)
        assert (extended.verdict, extended.why, extended.seeds) == (
            plain.verdict, plain.why, plain.seeds)
        assert "beside the rule" not in plain.ours  # a report of older runs reads as before
        assert extended.ours.startswith(plain.ours.split(";")[0])
        assert "FRN" in extended.ours and "GroupNorm + Weight Standardization" in extended.ours
    dependency = onlinenorm.check_batch_dependency(with_extras, QUICK).ours
    # batch-dependent in this fake, 0.5 + b / 1000: over batches 2-128 on the MLP (BatchNorm
    # cannot train at 1 there), 1-128 on the ResNet
    mlp, resnet = dependency.split("; cifar10-resnet")
    assert "FRN 12.60" in mlp and "FRN 12.70" in resnet
    assert "Weight Standardization" not in mlp and "Weight Standardization 12.70" in resnet
    assert "InstanceNorm" not in mlp and "InstanceNorm 12.70" in resnet

import pytest
import torch
import torch.distributed as dist
from torch import nn

import normlab
from distributed_helper import CASES, STEPS, train
from normlab.distributed import GlobalBatchNorm as SyncBatchNorm
from normlab.distributed import convert_sync, run_local


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """Every case trained under DDP on 2 gloo processes: one spawn for all of them."""
    import distributed_helper

    out = tmp_path_factory.mktemp("ddp")
    run_local(distributed_helper.worker, 2, str(out))
    return [torch.load(out / f"rank{rank}.pt") for rank in range(2)]


def assert_close(actual, expected, where: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-12,
                               msg=lambda message: f"{where}: {message}")


@pytest.mark.parametrize("name", list(CASES))
def test_ddp_on_two_processes_trains_like_one_process_on_the_global_batch(name, ddp_runs):
    case, single = CASES[name], train(CASES[name])
    for rank, runs in enumerate(ddp_runs):
        run, start = runs[name], sum(case.split[:rank])
        for step in range(STEPS):
            assert_close(run["outputs"][step],
                         single["outputs"][step][start:start + case.split[rank]],
                         f"{name}, rank {rank}, step {step}, output")
            for key, value in single["states"][step].items():
                assert_close(run["states"][step][key], value,
                             f"{name}, rank {rank}, step {step}, {key}")


@pytest.mark.parametrize("name", list(CASES))
def test_ranks_stay_bit_identical(name, ddp_runs):
    """Parameters and buffers, even with DDP's buffer broadcast off: the synced statistics
    are computed alike on every rank and ENorm is deterministic."""
    for step in range(STEPS):
        first, second = (runs[name]["states"][step] for runs in ddp_runs)
        differ = [key for key in first if not torch.equal(first[key], second[key])]
        assert not differ, f"{name}, step {step}: ranks differ in {differ}"


def test_a_process_without_samples_is_an_error_on_every_process_for_online_norm(ddp_runs):
    """Online Normalization's kernels cannot take an empty share; every rank must raise
    (a rank that raised alone would leave the others waiting in a collective call)."""
    for runs in ddp_runs:
        assert "needs at least one sample on every process" in runs["empty share error"]
        assert "split as [2, 0]" in runs["empty share error"]


def test_fastnorm_fused_mode_under_ddp_is_an_error_naming_the_dense_mode(ddp_runs):
    for runs in ddp_runs:
        assert "use mode='dense'" in runs["fused fastnorm error"]


def test_convert_sync_switches_fastnorm_to_the_dense_mode():
    model = convert_sync(normlab.convert(nn.Sequential(nn.Linear(4, 6)), "fastnorm"))
    assert model[0].mode == "dense"


def test_convert_sync_turns_batch_dependent_layers_synced_in_place():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), normlab.OnlineNorm1d(6),
                          normlab.BatchRenorm1d(6), nn.LayerNorm(6),
                          normlab.EquiNormLinear(6, 3))
    batch_norm = model[1]
    group = object()  # stands for a process group: only stored until a forward pass
    assert convert_sync(model, group) is model
    synced = model[1]
    assert type(synced) is SyncBatchNorm
    assert synced.weight is batch_norm.weight and synced.running_var is batch_norm.running_var
    assert synced.process_group is group
    assert [(m.sync, m.process_group) for m in (model[2], model[3], model[5])] == \
        [(True, group)] * 3
    assert type(model[4]) is nn.LayerNorm and "sync=True" in repr(model[2])
    assert type(convert_sync(nn.BatchNorm2d(3))) is SyncBatchNorm


def test_synced_layers_without_a_process_group_compute_local_statistics():
    torch.manual_seed(0)
    assert not dist.is_initialized()
    x = torch.randn(8, 5, dtype=torch.float64)
    for make in (normlab.OnlineNorm1d, normlab.BatchRenorm1d, nn.BatchNorm1d):
        plain, synced = make(5).double(), convert_sync(make(5).double())
        torch.testing.assert_close(synced(x), plain(x), rtol=0, atol=0)


def test_process_group_without_sync_is_an_error():
    with pytest.raises(ValueError, match="sync=True"):
        normlab.OnlineNorm2d(4, process_group=object())
    with pytest.raises(ValueError, match="sync=True"):
        normlab.EquiNormConv2d(4, 4, 3, process_group=object())


class PlainSubclass(nn.BatchNorm2d):
    pass


class BatchNormAct2d(nn.BatchNorm2d):
    """A stand-in for timm's BatchNormAct2d: batch norm, then an activation."""

    def __init__(self, num_features):
        super().__init__(num_features)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(super().forward(x))


def test_convert_sync_takes_subclasses_and_carries_or_refuses_what_they_add(monkeypatch):
    model = nn.Sequential(nn.Conv3d(2, 3, 1), nn.BatchNorm3d(3), nn.Conv2d(3, 3, 1),
                          PlainSubclass(3), nn.Conv2d(3, 3, 1), nn.SyncBatchNorm(3))
    convert_sync(model)
    assert [type(m) for m in model[1::2]] == [SyncBatchNorm] * 3, model
    with pytest.raises(ValueError, match="BatchNormAct2d overrides the forward of "
                                         "BatchNorm2d.*register_norm_subclass"):
        convert_sync(nn.Sequential(BatchNormAct2d(3)))
    monkeypatch.setattr(normlab.module_kinds, "_EXTRA_STEPS", {})
    normlab.register_norm_subclass(BatchNormAct2d, lambda m: [m.act])
    original = BatchNormAct2d(3)
    synced = convert_sync(nn.Sequential(original))[0]
    assert [type(m) for m in synced] == [SyncBatchNorm, nn.ReLU]
    assert synced[0].weight is original.weight and synced[1] is original.act
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(synced(x), BatchNormAct2d(3)(x))  # batch statistics: no state
    # normlab's layers are recognized as normlab's first, whatever torch class they derive from
    renorm = normlab.BatchRenorm2d(3)
    assert convert_sync(renorm) is renorm and renorm.sync

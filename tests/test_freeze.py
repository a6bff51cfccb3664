import copy
import io

import pytest
import torch
from torch import nn

import normlab
from conftest import monai_basic_unet
from test_fold import randomized


def network():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), normlab.BatchRenorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), normlab.OnlineNorm2d(4), nn.GroupNorm(2, 4),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        normlab.EquiNormLinear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2),
    )


FROZEN = (1, 4, 7, 11, 12)  # the modules with running statistics
AFFINE = (1, 4, 7, 12)  # ... and the activation normalizers among them


def buffers(model):
    return {name: buffer.clone() for name, buffer in model.named_buffers()}


def train_step(model, x):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.zero_grad()
    out = model(x)
    out.square().mean().backward()
    optimizer.step()
    return out


def test_a_frozen_model_in_training_computes_its_eval_function_and_changes_no_statistic():
    torch.manual_seed(0)
    model = randomized(network()).train()
    keys = list(model.state_dict())
    x = torch.randn(8, 3, 5, 5)
    with torch.no_grad():
        expected = copy.deepcopy(model).eval()(x)
    assert normlab.freeze(model) is model
    model.train()
    assert [i for i, m in enumerate(model) if not m.training] == list(FROZEN)
    before = buffers(model)
    conv_weight = model[0].weight.clone()
    out = train_step(model, x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    after = buffers(model)
    assert all(torch.equal(after[name], before[name]) for name in before), "a buffer moved"
    for i in AFFINE:
        assert model[i].weight.grad is None and model[i].bias.grad is None
        assert not model[i].weight.requires_grad
    assert model[11].weight.grad is not None, "EquiNorm's weights are not affine: they train"
    assert model[8].weight.grad is not None, "GroupNorm has no running statistics"
    assert not torch.equal(model[0].weight, conv_weight), "the rest of the model trains"
    assert list(model.state_dict()) == keys


def test_unfreeze_restores_training():
    torch.manual_seed(0)
    model = randomized(network())
    model[4].bias.requires_grad_(False)  # a flag set before freeze comes back as it was
    normlab.unfreeze(normlab.freeze(model).train())
    assert all(m.training for m in model.modules())
    assert [p.requires_grad for p in (model[1].weight, model[4].weight, model[4].bias)] == \
        [True, True, False]
    before = buffers(model)
    x = torch.randn(8, 3, 5, 5)
    with torch.no_grad():
        expected = copy.deepcopy(model).eval()(x)
    out = train_step(model, x)
    assert not torch.allclose(out, expected, atol=1e-3), "batch statistics again"
    after = buffers(model)
    for i in FROZEN:
        assert not torch.equal(after[f"{i}.running_mean"], before[f"{i}.running_mean"]), i
    assert model[1].weight.grad is not None
    normlab.freeze(normlab.freeze(model))  # twice: one unfreeze undoes it
    normlab.unfreeze(model)
    assert model[1].weight.requires_grad and model[1].training


def test_a_frozen_model_stays_frozen_when_copied_or_saved():
    model = normlab.freeze(network())
    copied = copy.deepcopy(model).train()
    assert not copied[1].training and model[1].train is not copied[1].train
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False).train()
    assert not loaded[4].training
    normlab.unfreeze(loaded.train())
    assert loaded[4].training and not model[4].training


def test_freeze_a_monai_basic_unet():
    torch.manual_seed(0)
    model = monai_basic_unet(2, "batch")
    with torch.no_grad():
        model(torch.randn(4, 1, 32, 32) * 2 + 1)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        expected = model.eval()(x)
    normlab.freeze(model).train()
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    assert not any(p.requires_grad for m in model.modules() if isinstance(m, nn.BatchNorm2d)
                   for p in m.parameters())


@pytest.mark.parametrize("norm", [nn.BatchNorm2d(3, track_running_stats=False),
                                  nn.GroupNorm(1, 3)])
def test_a_normalizer_without_running_statistics_is_left_as_it_is(norm):
    normlab.freeze(nn.Sequential(norm)).train()
    assert norm.training and norm.weight.requires_grad


def test_convert_sync_leaves_a_frozen_batch_norm_as_it_is():
    model = normlab.freeze(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4),
                                         nn.BatchNorm2d(4)))
    normlab.unfreeze(model[2])
    normlab.convert_sync(model)
    assert type(model[1]) is nn.BatchNorm2d
    assert type(model[2]) is normlab.distributed.GlobalBatchNorm

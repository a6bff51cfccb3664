import math

import pytest
import torch

from normlab import training
from normlab.training import TrainConfig, split_norm, train

pytest.importorskip("sklearn")  # the digits task is the fast dataset for these tests


def test_same_seed_same_numbers():
    config = TrainConfig(task="digits-mlp", norm="batch", lr=0.1, epochs=2, batch_size=32)
    first, second = train(config), train(config)
    assert first.status == "done" and len(first.history) == 2
    assert [_drop_time(p) for p in first.history] == [_drop_time(p) for p in second.history]
    assert first.final["test_acc"] > 0.85
    other_seed = train(TrainConfig(**{**config.to_dict(), "seed": 1}))
    assert other_seed.final["train_loss"] != first.final["train_loss"]


def _drop_time(point):
    return {k: v for k, v in point.items() if k != "wall_time"}


def test_eval_every_records_each_evaluation_point():
    config = TrainConfig(task="digits-mlp", norm="none", lr=0.05, batch_size=100, eval_every=5)
    result = train(config)
    steps_per_epoch = math.ceil(1438 / 100)
    assert [p["step"] for p in result.history] == [5, 10, steps_per_epoch]
    assert set(result.history[0]) >= {"step", "epoch", "train_loss", "test_loss", "test_acc"}


def test_nan_loss_ends_run_as_diverged():
    result = train(TrainConfig(task="digits-mlp", norm="none", lr=1e6, batch_size=16))
    assert result.status == "diverged"
    assert len(result.history) < math.ceil(1438 / 16)


def test_linear_schedule_decays_to_zero():
    config = TrainConfig(task="digits-mlp", lr=0.1, batch_size=500, epochs=2,
                         lr_schedule="linear", eval_every=1)
    result = train(config)
    steps = 2 * math.ceil(1438 / 500)
    assert [p["lr"] for p in result.history] == pytest.approx(
        [0.1 * (1 - s / steps) for s in range(steps)])


def test_step_schedule_divides_by_ten_at_half_and_three_quarters():
    rates = [training.scheduled_lr(0.1, "step", s, 8) for s in range(8)]
    assert rates == pytest.approx([0.1] * 4 + [0.01] * 2 + [0.001] * 2)
    assert training.scheduled_lr(0.1, "constant", 7, 8) == 0.1


def test_config_validation_names_the_problem():
    with pytest.raises(ValueError, match="unknown task"):
        TrainConfig(task="imagenet")
    with pytest.raises(ValueError, match="valid names"):
        TrainConfig(norm="bn")
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="cosine")
    with pytest.raises(ValueError, match="at most one layer normalizer"):
        TrainConfig(norm="batch+layer")
    with pytest.raises(ValueError, match="a weight normalizer makes scale-free"):
        TrainConfig(norm="weight_norm+enorm")
    with pytest.raises(ValueError, match=r"enorm takes no keyword\(s\) \['k'\]"):
        TrainConfig(norm="enorm", rebalancer_kw={"k": 1.2})
    with pytest.raises(ValueError, match="has no rebalancer"):
        TrainConfig(norm="batch", rebalancer_kw={"c": 1.2})


def test_config_key_is_stable_and_distinguishes_configs():
    a, b = TrainConfig(lr=0.1), TrainConfig(lr=0.2)
    assert a.key() == TrainConfig(lr=0.1).key() != b.key()


def test_split_norm():
    assert split_norm("batch") == ("batch", None)


def test_random_crop_flip_keeps_shape_and_content():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    out = training.random_crop_flip(images, torch.Generator().manual_seed(0), pad=0)
    for original, augmented in zip(images, out):
        assert torch.equal(augmented, original) or torch.equal(augmented, original.flip(-1))
    padded = training.random_crop_flip(images, torch.Generator().manual_seed(1), pad=2)
    assert padded.shape == images.shape


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_every_task_builds_with_the_norm_it_is_given(norm):
    for task in training.TASKS:
        config = TrainConfig(task=task, norm=norm, model_kw={"depth": 8, "width": 4}
                             if task == "cifar10-resnet" else {})
        model = training.build_model(config)
        assert any(type(m).__name__.lower().startswith(norm) for m in model.modules())


def test_standardize_off_keeps_raw_pixels():
    config = TrainConfig(task="digits-mlp", standardize=False)
    images, _ = training.load_split(config, "train")
    assert images.min() >= 0 and images.max() <= 1
    standardized, _ = training.load_split(TrainConfig(task="digits-mlp"), "train")
    assert standardized.min() < 0

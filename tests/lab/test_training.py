import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from normlab import FastNormSGD, models, training
from normlab.training import Checkpoint, TrainConfig, split_norm, train

pytestmark = pytest.mark.usefixtures("needs_sklearn")  # digits: the fast dataset for these tests


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
    # The training loss stops the run within the first epoch, before its evaluation point.
    assert result.status == "diverged" and result.history == []


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
    assert split_norm("group+weight_standardization") == ("group+weight_standardization", None)
    assert split_norm("group+weight_norm+renorm") == ("group+weight_norm", "renorm")
    with pytest.raises(ValueError, match="at most one rebalancer"):
        split_norm("batch+enorm+enorm")
    with pytest.raises(ValueError, match="scale-free"):  # a weight normalizer in the pair
        split_norm("group+weight_standardization+enorm")


def test_a_paired_weight_normalizer_trains_with_its_own_optimizer():
    config = TrainConfig(task="cifar10-resnet", norm="group+fastnorm",
                         model_kw={"depth": 8, "width": 8})
    model = training.build_model(config)
    assert isinstance(training.build_optimizer(model, config), FastNormSGD)
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())


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


class _Probe(nn.Module):
    """The digits MLP, recording for each call its input and whether it ran in training mode
    with gradients; `eval_logits` replaces its output in eval mode (to make the test loss
    diverge)."""

    def __init__(self, eval_logits: float | None = None):
        super().__init__()
        self.net = models.mlp("none", in_features=64, hidden=32)
        self.eval_logits, self.calls = eval_logits, []

    def forward(self, x):
        self.calls.append({"input": x, "training": self.training,
                           "grad": torch.is_grad_enabled()})
        out = self.net(x)
        return out if self.training or self.eval_logits is None else out * self.eval_logits


def _probe_task(monkeypatch, augment=False, **probe_kw):
    """Register a digits task built as a _Probe; returns the list of probes built."""
    built = []

    def build(norm, **kw):
        built.append(_Probe(**probe_kw))
        return built[-1]
    monkeypatch.setitem(training.TASKS, "digits-probe", training.Task("digits", build, augment))
    return built


def test_evaluate_runs_in_eval_mode_and_restores_the_mode():
    model = _Probe()
    images, labels = torch.rand(10, 1, 8, 8), torch.randint(0, 10, (10,))
    for was_training in (True, False):
        model.train(was_training)
        model.calls.clear()
        result = training.evaluate(model, images, labels, batch_size=4)
        assert len(model.calls) == 3
        assert not any(call["training"] or call["grad"] for call in model.calls)
        assert model.training == was_training
    # the metrics are those of the eval-mode model, batch by batch
    logits = model.eval()(images)
    assert result["test_loss"] == pytest.approx(F.cross_entropy(logits, labels).item())
    assert result["test_acc"] == pytest.approx((logits.argmax(1) == labels).float().mean().item())


def test_train_steps_in_training_mode_and_evaluates_in_eval_mode(monkeypatch):
    built = _probe_task(monkeypatch)
    result = train(TrainConfig(task="digits-probe", lr=0.05, batch_size=100, eval_every=5))
    (probe,) = built
    train_calls = [call for call in probe.calls if call["grad"]]
    eval_calls = [call for call in probe.calls if not call["grad"]]
    assert len(train_calls) == math.ceil(1438 / 100) and len(result.history) == 3
    assert all(call["training"] for call in train_calls)
    assert eval_calls and not any(call["training"] for call in eval_calls)
    assert result.model is probe and probe.training


@pytest.mark.parametrize("dtype", ["float64", "bfloat16"])
def test_float64_and_bfloat16_runs_compute_in_their_dtype_and_track_float32(dtype):
    config = TrainConfig(task="digits-mlp", norm="batch", lr=0.1, batch_size=64)
    reference = train(config)
    result = train(TrainConfig(**{**config.to_dict(), "dtype": dtype}))
    assert result.status == "done"
    assert {p.dtype for p in result.model.parameters()} == {training.DTYPES[dtype]}
    images, _ = training.load_split(result.config, "test")
    assert images.dtype == training.DTYPES[dtype]
    # The same run to rounding: float64 closely, bfloat16 (8-bit mantissa) loosely.
    tolerance = {"float64": 1e-5, "bfloat16": 0.05}[dtype]
    for key in ("train_loss", "test_loss"):
        assert result.final[key] == pytest.approx(reference.final[key], rel=tolerance), key
    assert result.final["test_acc"] > 0.85


def test_augmentation_is_applied_to_each_training_batch_only(monkeypatch):
    crops = []

    def recording_crop_flip(images, generator):
        crops.append(real_crop_flip(images, generator))
        return crops[-1]
    real_crop_flip = training.random_crop_flip
    monkeypatch.setattr(training, "random_crop_flip", recording_crop_flip)
    built = _probe_task(monkeypatch, augment=True)
    train(TrainConfig(task="digits-probe", lr=0.05, batch_size=200, standardize=False))
    (probe,) = built
    train_inputs = [call["input"] for call in probe.calls if call["grad"]]
    assert len(crops) == len(train_inputs) == math.ceil(1438 / 200)
    assert all(seen is crop for seen, crop in zip(train_inputs, crops))
    test_images, _ = training.load_split(TrainConfig(task="digits-mlp", standardize=False),
                                         "test")
    (eval_input,) = [call["input"] for call in probe.calls if not call["grad"]]
    assert torch.equal(eval_input, test_images)
    assert training.TASKS["cifar10-resnet"].augment  # the task that uses it


def test_non_finite_test_loss_ends_the_run_as_diverged(monkeypatch):
    built = _probe_task(monkeypatch, eval_logits=float("inf"))
    result = train(TrainConfig(task="digits-probe", lr=0.05, batch_size=100, eval_every=3))
    (probe,) = built
    assert result.status == "diverged"
    assert [point["step"] for point in result.history] == [3]
    assert math.isfinite(result.history[0]["train_loss"])
    assert not math.isfinite(result.history[0]["test_loss"])
    assert sum(call["grad"] for call in probe.calls) == 3  # no step after the divergence


# -- checkpoints -------------------------------------------------------------------------

SRC = Path(__file__).resolve().parents[2] / "src"


def _resumable(norm: str = "online", **kw) -> TrainConfig:
    """16 steps (2 epochs of 8 batches of 16) evaluated every 5, with a decaying rate: an
    interruption at step 10 falls mid-epoch, between evaluations and rate changes."""
    return TrainConfig(**{"task": "digits-mlp", "norm": norm, "lr": 0.05, "momentum": 0.9,
                          "epochs": 2, "batch_size": 16, "train_limit": 128, "test_limit": 200,
                          "eval_every": 5, "lr_schedule": "linear", "model_kw": {"hidden": 32},
                          **kw})


class _Stop(Exception):
    """Stands for the kill: the run's process state is abandoned at this point."""


def _stop_at(step: int):
    def on_eval(point):
        if point["step"] >= step:
            raise _Stop
    return on_eval


def _resume(config: TrainConfig, checkpoint: Checkpoint):
    """The rerun after an interruption, with the steps it evaluated itself."""
    evaluated = []
    result = train(config, checkpoint=checkpoint, on_eval=lambda p: evaluated.append(p["step"]))
    return result, evaluated


def _assert_same_run(result, reference):
    assert result.status == reference.status == "done"
    assert [_drop_time(p) for p in result.history] == [_drop_time(p) for p in reference.history]
    state, expected = result.model.state_dict(), reference.model.state_dict()
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name


@pytest.mark.parametrize("norm, momentum, every, last_saved", [
    ("online", 0.9, 3, 9),  # buffers: running stats and the backward's controls
    ("batch_renorm", 0.9, 3, 9),
    ("batch+enorm", 0.9, 3, 9),  # ENorm rescales the momentum buffers
    ("fastnorm", 0.0, 3, 9),  # the fused step's tracked norms (batch 16 is tracked)
    ("enorm", 0.0, 4, 8),  # saved at the end of the first epoch: the next draws its order
])
def test_an_interrupted_run_resumes_from_its_last_checkpoint_to_the_same_numbers(
        tmp_path, norm, momentum, every, last_saved):
    config = _resumable(norm, momentum=momentum)
    reference = train(config)
    checkpoint = Checkpoint(tmp_path / "run.pt", steps=every)
    with pytest.raises(_Stop):
        train(config, checkpoint=checkpoint, on_eval=_stop_at(10))
    assert torch.load(checkpoint.path, weights_only=True)["step"] == last_saved
    result, evaluated = _resume(config, checkpoint)
    assert evaluated == [10, 15, 16]  # continued after its checkpoint, not from the start
    _assert_same_run(result, reference)


def _dropout_mlp(norm, hidden):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.Dropout(0.2), nn.ReLU(),
                         nn.Linear(hidden, 10))


def test_a_resumed_run_continues_the_draws_of_augmentation_and_dropout_mid_epoch(
        tmp_path, monkeypatch):
    # augmentation draws from the run's generator, dropout from torch's global one
    augmented = training.Task("digits", _dropout_mlp, augment=True)
    monkeypatch.setitem(training.TASKS, "digits-augmented", augmented)
    config = _resumable(task="digits-augmented", standardize=False)
    reference = train(config)
    checkpoint = Checkpoint(tmp_path / "run.pt", steps=3)
    with pytest.raises(_Stop):
        train(config, checkpoint=checkpoint, on_eval=_stop_at(10))
    result, evaluated = _resume(config, checkpoint)
    assert evaluated == [10, 15, 16]
    _assert_same_run(result, reference)


_KILLED_RUN = """
import json, sys, time, torch
from pathlib import Path
from normlab.training import Checkpoint, TrainConfig, train
path, threads, config = sys.argv[1], int(sys.argv[2]), TrainConfig(**json.loads(sys.argv[3]))
torch.set_num_threads(threads)  # the parent's: the same reductions, the same rounding

def wait_to_be_killed(point):
    if point["step"] >= 10:  # one step past the checkpoint at 9: that work dies with us
        Path(path + ".waiting").touch()
        time.sleep(300)

train(config, checkpoint=Checkpoint(path, steps=3), on_eval=wait_to_be_killed)
"""


def test_a_run_killed_with_sigkill_after_a_checkpoint_resumes_to_the_same_numbers(tmp_path):
    config = _resumable("online")
    path = tmp_path / "run.pt"
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED_RUN, str(path), str(torch.get_num_threads()),
         json.dumps(config.to_dict())],
        env={**os.environ, "PYTHONPATH": str(SRC)}, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not Path(f"{path}.waiting").exists():
            assert child.poll() is None, f"the run ended before the kill: {child.stderr.read()}"
            assert time.monotonic() < deadline, "the run never reached step 10"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        child.kill()
        child.stderr.close()
    assert torch.load(path, weights_only=True)["step"] == 9
    result, evaluated = _resume(config, Checkpoint(path, steps=3))
    assert evaluated == [10, 15, 16]
    _assert_same_run(result, train(config))


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one_usable(tmp_path,
                                                                          monkeypatch):
    config = _resumable("batch_renorm")
    checkpoint = Checkpoint(tmp_path / "run.pt", steps=3)
    real_replace, replaced = os.replace, []

    def crash_on_the_second_replace(source, target):
        if replaced:
            Path(source).write_bytes(Path(source).read_bytes()[:100])  # cut off mid-write
            raise OSError("killed while writing")
        replaced.append(target)
        real_replace(source, target)
    monkeypatch.setattr(os, "replace", crash_on_the_second_replace)
    with pytest.raises(OSError, match="killed while writing"):
        train(config, checkpoint=checkpoint)
    monkeypatch.setattr(os, "replace", real_replace)
    assert checkpoint.partial_path().stat().st_size == 100
    saved = torch.load(checkpoint.path, weights_only=True)
    assert saved["step"] == 3 and saved["config_key"] == config.key()
    assert saved["generator"].dtype == saved["torch_rng"].dtype == torch.uint8
    result, evaluated = _resume(config, checkpoint)
    assert evaluated == [5, 10, 15, 16]  # from step 3: before the first evaluation
    _assert_same_run(result, train(config))


def test_a_checkpoint_of_another_config_is_refused(tmp_path):
    checkpoint = Checkpoint(tmp_path / "run.pt", steps=3)
    with pytest.raises(_Stop):
        train(_resumable("none"), checkpoint=checkpoint, on_eval=_stop_at(5))
    other = _resumable("none", seed=1)
    with pytest.raises(ValueError, match=f"belongs to run '{_resumable('none').key()}', not "
                                         f"to this config \\(key '{other.key()}'\\)"):
        train(other, checkpoint=checkpoint)


def test_an_unreadable_checkpoint_is_named_in_the_error(tmp_path):
    path = tmp_path / "run.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=f"checkpoint {path} cannot be read .*; remove it"):
        train(_resumable(), checkpoint=Checkpoint(path, steps=3))


def test_checkpoint_interval_in_seconds_or_steps():
    by_time = Checkpoint("run.pt", seconds=60)
    assert not by_time.due(7, seconds_since_last=59.9) and by_time.due(7, seconds_since_last=60)
    by_steps = Checkpoint("run.pt", seconds=60, steps=4)
    assert by_steps.due(8, 0.0) and not by_steps.due(9, 1e6)
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        Checkpoint("run.pt", steps=0)
    with pytest.raises(ValueError, match="seconds must be > 0"):
        Checkpoint("run.pt", seconds=0)


def test_checkpointing_a_run_of_several_processes_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(training.Ranks, "current",
                        classmethod(lambda cls: training.Ranks(None, rank=0, size=2)))
    with pytest.raises(ValueError, match="checkpointing a run of 2 processes is not supported"):
        train(_resumable(), checkpoint=Checkpoint(tmp_path / "run.pt", steps=3))
    assert not (tmp_path / "run.pt").exists()

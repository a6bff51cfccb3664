"""The training loop shared by `normlab train` and the experiment runner.

A run is described by a `TrainConfig`; `train` returns a `TrainResult` with
the metrics at every evaluation point. A loss that becomes NaN or Inf ends
the run with status ``"diverged"``: for a learning-rate sweep that is a
result, not a crash.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from .. import distributed, registry
from . import data, models


@dataclass(frozen=True)
class Task:
    dataset: str
    build: Callable[..., nn.Module]
    augment: bool = False  # random crops and flips (the standard CIFAR augmentation)


TASKS: dict[str, Task] = {
    "mnist-mlp": Task("mnist", models.mlp),
    "digits-mlp": Task("digits", lambda norm, **kw: models.mlp(
        norm, **{"in_features": 64, "hidden": 256, **kw})),
    "cifar10-fc": Task("cifar10", lambda norm, **kw: models.fc_cifar(
        **{"p": 3, "in_features": 3072, **kw}, norm=norm)),
    "cifar10-resnet": Task("cifar10", lambda norm, **kw: models.cifar_resnet(norm=norm, **kw),
                           augment=True),
}

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
LR_SCHEDULES = ("constant", "linear", "step")


def mlp_widths(task: str) -> str:
    """The layer widths of `task`'s fully-connected network, "784-1024-10" style: what a
    report states, read from the network itself (the digits fallback's is smaller)."""
    with torch.device("meta"):
        model = TASKS[task].build("none")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return "-".join(map(str, [linears[0].in_features] + [m.out_features for m in linears]))


def scheduled_lr(lr: float, schedule: str, step: int, total_steps: int) -> float:
    """The learning rate before optimizer step `step` (0-based) of `total_steps`.

    ``linear`` decays to 0; ``step`` divides by 10 at 50% and again at 75% of
    training (epochs 150 and 225 of 300 in Defazio and Bottou, arXiv:1812.04549).
    """
    if schedule == "linear":
        return lr * (1 - step / total_steps)
    if schedule == "step":
        return lr * 0.1 ** ((step >= total_steps // 2) + (step >= 3 * total_steps // 4))
    return lr


@dataclass
class TrainConfig:
    """Everything that defines a run; two equal configs give the same numbers on CPU.

    `norm` names a registered method; ``"batch+enorm"`` combines a layer
    normalizer with a rebalancer, ``"group+weight_standardization"`` an activation
    normalizer with a weight normalizer. `eval_every` counts optimizer steps between
    evaluations (0: at the end of each epoch). `train_limit`/`test_limit`
    keep the first samples of each split (quick modes). `dtype` is the dtype
    of the parameters and inputs. `standardize` shifts and scales each input
    channel by the training split's statistics; EquiNorm's paper (Defazio and
    Bottou, arXiv:1812.04549, section 5.2) recommends against it, its first
    layer assuming positive inputs.
    """

    task: str = "mnist-mlp"
    norm: str = "none"
    lr: float = 0.1
    epochs: int = 1
    batch_size: int = 64
    seed: int = 0
    momentum: float = 0.0
    weight_decay: float = 0.0
    lr_schedule: str = "constant"
    eval_every: int = 0
    train_limit: int | None = None
    test_limit: int | None = None
    dtype: str = "float32"
    standardize: bool = True
    model_kw: dict = field(default_factory=dict)
    norm_kw: dict = field(default_factory=dict)
    rebalancer_kw: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; expected one of {sorted(TASKS)}")
        _, rebalancer = split_norm(self.norm)  # rejects unknown names early
        if self.rebalancer_kw:
            if rebalancer is None:
                raise ValueError(f"rebalancer_kw {self.rebalancer_kw} given, but norm "
                                 f"{self.norm!r} has no rebalancer")
            accepted = inspect.signature(registry.get(rebalancer).rebalancer).parameters
            unknown = sorted(set(self.rebalancer_kw) - set(accepted) - {"model", "optimizer"})
            if unknown:
                raise ValueError(f"{rebalancer} takes no keyword(s) {unknown}; expected some "
                                 f"of {[p for p in accepted if p not in ('model', 'optimizer')]}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, "
                             f"got {self.lr_schedule!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs} "
                             f"and {self.batch_size}")
        if not (self.lr > 0):
            raise ValueError(f"lr must be > 0, got {self.lr}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def key(self) -> str:
        """A stable hash of the configuration (the results store's key)."""
        text = json.dumps(self.to_dict(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def split_norm(spec: str) -> tuple[str, str | None]:
    """The layer normalizers and the rebalancer of a norm spec: ``"batch+enorm"`` ->
    ``("batch", "enorm")``; ``"enorm"`` -> ``("none", "enorm")``;
    ``"group+weight_standardization"`` -> ``("group+weight_standardization", None)``."""
    methods = [registry.get(name) for name in spec.split("+")]
    rebalancers = [m.name for m in methods if m.family == "rebalancer"]
    layer = "+".join(m.name for m in methods if m.family != "rebalancer") or "none"
    if len(rebalancers) > 1:
        raise ValueError(f"norm {spec!r}: expected at most one rebalancer, joined by '+' to "
                         f"the layer normalizers")
    _, weight = models.layer_methods(layer)  # at most one of each family
    if rebalancers:
        rebalancer = registry.get(rebalancers[0])
        layer_family = "activation" if weight is None else "weight"
        if layer_family != rebalancer.pairs_with and rebalancer.pairs_with == "activation":
            raise ValueError(f"norm {spec!r}: {rebalancer.name} rescales plain Linear/Conv2d "
                             f"weights, which a weight normalizer makes scale-free; use one "
                             f"or the other")
        if layer_family != rebalancer.pairs_with:
            raise ValueError(f"norm {spec!r}: {rebalancer.name} rescales the rows of "
                             f"weight-normalized layers; join it to a weight normalizer, "
                             f"as in normprop+{rebalancer.name}")
    return layer, (rebalancers[0] if rebalancers else None)


@dataclass
class TrainResult:
    config: TrainConfig
    status: str  # "done" or "diverged"
    history: list[dict]  # one entry per evaluation point
    wall_time: float
    model: nn.Module | None = None

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}

    def to_dict(self) -> dict:
        return {"config": self.config.to_dict(), "status": self.status,
                "history": self.history, "wall_time": self.wall_time}


def build_model(config: TrainConfig) -> nn.Module:
    layer_norm, _ = split_norm(config.norm)
    return TASKS[config.task].build(layer_norm, **config.model_kw, **config.norm_kw)


def build_optimizer(model: nn.Module, config: TrainConfig):
    _, weight = models.layer_methods(split_norm(config.norm)[0])
    make = (registry.get(weight).optimizer if weight else None) or torch.optim.SGD
    return make(model.parameters(), lr=config.lr, momentum=config.momentum,
                weight_decay=config.weight_decay)


def load_split(config: TrainConfig, split: str, data_dir=None):
    """The task's split, standardized with the training statistics unless the config says not."""
    images, labels = data.load(TASKS[config.task].dataset, split, root=data_dir,
                               normalize=config.standardize)
    limit = config.train_limit if split == "train" else config.test_limit
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images.to(DTYPES[config.dtype]), labels


def random_crop_flip(images: torch.Tensor, generator: torch.Generator, pad: int = 4):
    """Pad by `pad`, crop back at a random offset, flip half the images horizontally."""
    n, _, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n, 1, 1), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n, 1, 1), generator=generator)
    cols = torch.arange(w).view(1, 1, w)
    flip = torch.rand(n, 1, 1, generator=generator) < 0.5
    cols = torch.where(flip, w - 1 - cols, cols)
    rows = torch.arange(h).view(1, h, 1) + dy
    crops = padded[torch.arange(n).view(n, 1, 1), :, rows, cols + dx]  # (n, h, w, C)
    return crops.permute(0, 3, 1, 2).contiguous()


@dataclass(frozen=True)
class Ranks:
    """The processes of a data-parallel run: each takes its contiguous 1/size of a batch."""

    group: dist.ProcessGroup
    rank: int
    size: int

    @classmethod
    def current(cls) -> Ranks | None:
        """The world group when torch.distributed runs several processes, else None."""
        group = distributed.sync_group()
        return None if group is None else cls(group, dist.get_rank(group),
                                              dist.get_world_size(group))

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        return batch.tensor_split(self.size)[self.rank]

    def sum(self, *values: float | torch.Tensor) -> list[float]:
        """Each value summed over the processes (one all-reduce, in float64)."""
        total = torch.tensor([float(v) for v in values], dtype=torch.float64)
        dist.all_reduce(total, group=self.group)
        return total.tolist()


@dataclass(frozen=True)
class Checkpoint:
    """Where and how often `train` saves a run's whole state, to resume it after a kill.

    Written every `seconds` of wall time, or every `steps` optimizer steps
    when given (deterministic: the tests use it). Not part of the run's
    config: a run's numbers (and key) do not depend on it.
    """

    path: str | Path
    seconds: float = 300.0
    steps: int | None = None

    def __post_init__(self):
        if self.steps is not None and not (isinstance(self.steps, int) and self.steps >= 1):
            raise ValueError(f"Checkpoint.steps must be an int >= 1 (or None), got {self.steps!r}")
        if not self.seconds > 0:
            raise ValueError(f"Checkpoint.seconds must be > 0, got {self.seconds!r}")

    def due(self, step: int, seconds_since_last: float) -> bool:
        if self.steps is not None:
            return step % self.steps == 0
        return seconds_since_last >= self.seconds

    def partial_path(self) -> Path:
        """The temporary file a checkpoint is written to before it replaces the last one."""
        path = Path(self.path)
        return path.with_name(path.name + ".partial")

    def save(self, state: dict) -> None:
        """Atomically: a crash while writing leaves the previous checkpoint as it was."""
        path, partial = Path(self.path), self.partial_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
        folder = os.open(path.parent, os.O_RDONLY)
        try:  # the rename itself survives a power loss only once the folder is synced
            os.fsync(folder)
        finally:
            os.close(folder)

    def load(self, config: TrainConfig) -> dict | None:
        """The saved state of `config`'s run, or None when there is none yet."""
        path = Path(self.path)
        if not path.exists():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # not written by `save`: its writes are atomic
            raise ValueError(f"checkpoint {path} cannot be read ({type(err).__name__}, "
                             f"above); remove it to start the run over") from err
        saved_key = state.get("config_key") if isinstance(state, dict) else None
        if saved_key != config.key():
            raise ValueError(f"checkpoint {path} belongs to run {saved_key!r}, "
                             f"not to this config (key {config.key()!r}); remove it or give "
                             f"this run another checkpoint path")
        return state

    def remove(self) -> None:
        """Delete the checkpoint and any half-written one (once the run is stored)."""
        Path(self.path).unlink(missing_ok=True)
        self.partial_path().unlink(missing_ok=True)


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 1000, ranks: Ranks | None = None) -> dict:
    """Test loss and accuracy; with `ranks`, each process evaluates its shard of the set."""
    count = len(labels)
    if ranks is not None:
        images, labels = ranks.shard(images), ranks.shard(labels)
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(labels), batch_size):
        logits = model(images[start:start + batch_size]).float()
        target = labels[start:start + batch_size]
        loss_sum += F.cross_entropy(logits, target, reduction="sum").item()
        correct += (logits.argmax(1) == target).sum().item()
    model.train(was_training)
    if ranks is not None:
        loss_sum, correct = ranks.sum(loss_sum, correct)
    return {"test_loss": loss_sum / count, "test_acc": correct / count}


def train(config: TrainConfig, data_dir=None, progress: bool = False,
          on_eval: Callable[[dict], None] | None = None,
          checkpoint: Checkpoint | None = None) -> TrainResult:
    """Train `config` and evaluate on the test split; see `TrainConfig`.

    With `checkpoint`, the run's whole state (model with its normalizers'
    buffers, optimizer, step and the epoch's data order, the data generator's
    and torch's RNG states, history, running train-loss sums, elapsed time)
    is saved there at the checkpoint's interval, and a call that finds a
    checkpoint of the same config continues from it: the finished run equals
    an uninterrupted one bit for bit on the CPU with the same thread count
    (the learning rate is a function of the step, and the rebalancers keep no
    state between steps). The checkpoint is left in place at the end (the
    caller deletes it once the result is safe). Refused under torch.distributed
    with several processes.

    Under torch.distributed with several processes (as `normlab train
    --nproc-per-node` runs it), the run is data-parallel and equals the
    one-process run up to rounding: every process draws the same batches of
    `config.batch_size` (the global batch) and takes its contiguous 1/P
    slice, the model's batch-dependent layers are synced (`convert_sync`)
    and wrapped in DistributedDataParallel, and each process evaluates 1/P
    of the test set. Every process returns the same result.
    """
    start_time = time.perf_counter()
    ranks = Ranks.current()
    if ranks is not None and config.batch_size < ranks.size:
        raise ValueError(f"batch_size is the global batch: it must be at least the number of "
                         f"processes ({ranks.size}), got {config.batch_size}")
    if ranks is not None and checkpoint is not None:
        raise ValueError(f"checkpointing a run of {ranks.size} processes is not supported; "
                         f"run it without a checkpoint, or as one process")
    saved = checkpoint.load(config) if checkpoint is not None else None
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    train_x, train_y = load_split(config, "train", data_dir)
    test_x, test_y = load_split(config, "test", data_dir)
    model = build_model(config).to(DTYPES[config.dtype])
    optimizer = build_optimizer(model, config)
    _, rebalancer_name = split_norm(config.norm)
    # Built before convert_sync: it finds its layer pairs across torch's BatchNorm classes,
    # and convert_sync keeps the parameter objects it holds.
    rebalancer = (registry.get(rebalancer_name).rebalancer(model, optimizer, **config.rebalancer_kw)
                  if rebalancer_name else None)
    history: list[dict] = []
    status, step, loss_sum, loss_count, order = "done", 0, 0.0, 0, None
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        generator.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])
        history, step = saved["history"], saved["step"]
        loss_sum, loss_count = saved["loss_sum"], saved["loss_count"]
        order = saved["order"]
        start_time -= saved["elapsed"]
    trained = model
    if ranks is not None:
        model = distributed.convert_sync(model)
        trained = nn.parallel.DistributedDataParallel(model, process_group=ranks.group)

    steps_per_epoch = math.ceil(len(train_y) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    eval_every = config.eval_every or steps_per_epoch
    if step % steps_per_epoch == 0:  # a checkpoint at an epoch's end: the next draws its order
        order = None
    last_saved = time.perf_counter()
    bar = _progress_bar(total_steps, f"{config.task} {config.norm}",
                        progress and (ranks is None or ranks.rank == 0))
    bar.update(step)
    model.train()
    for _ in range(step // steps_per_epoch, config.epochs):
        if order is None:
            order = torch.randperm(len(train_y), generator=generator)
        first = (step % steps_per_epoch) * config.batch_size
        for start in range(first, len(order), config.batch_size):
            index = order[start:start + config.batch_size]
            inputs, target = train_x[index], train_y[index]
            if TASKS[config.task].augment:
                inputs = random_crop_flip(inputs, generator)
            for group in optimizer.param_groups:
                group["lr"] = scheduled_lr(config.lr, config.lr_schedule, step, total_steps)
            if ranks is None:
                loss = F.cross_entropy(model(inputs).float(), target)
                batch_loss = loss.item()
            else:
                inputs, target = ranks.shard(inputs), ranks.shard(target)
                shard_sum = F.cross_entropy(trained(inputs).float(), target, reduction="sum")
                # DDP averages the processes' gradients: this rank's share of the global
                # batch's mean loss, times P, averages back to exactly that mean's gradient.
                loss = shard_sum * (ranks.size / len(index))
                (global_sum,) = ranks.sum(shard_sum.detach())
                batch_loss = global_sum / len(index)
            if not math.isfinite(batch_loss):
                status = "diverged"
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if rebalancer is not None:
                rebalancer.step()
            step += 1
            loss_sum, loss_count = loss_sum + batch_loss, loss_count + 1
            bar.update(1)
            if step % eval_every == 0 or step == total_steps:
                point = {"step": step, "epoch": step / steps_per_epoch,
                         "train_loss": loss_sum / loss_count,
                         "lr": optimizer.param_groups[0]["lr"],
                         **evaluate(model, test_x, test_y, ranks=ranks),
                         "wall_time": time.perf_counter() - start_time}
                if not math.isfinite(point["test_loss"]):
                    status = "diverged"
                history.append(point)
                loss_sum, loss_count = 0.0, 0
                bar.set_postfix(acc=f"{point['test_acc']:.4f}")
                if on_eval is not None:
                    on_eval(point)
                if status == "diverged":
                    break
            if (checkpoint is not None and step < total_steps
                    and checkpoint.due(step, time.perf_counter() - last_saved)):
                checkpoint.save({
                    "config_key": config.key(), "step": step, "order": order,
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
                    "history": history, "loss_sum": loss_sum, "loss_count": loss_count,
                    "elapsed": time.perf_counter() - start_time})
                last_saved = time.perf_counter()
        order = None
        if status == "diverged":
            break
    bar.close()
    return TrainResult(config, status, history, time.perf_counter() - start_time, model)


def _progress_bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)

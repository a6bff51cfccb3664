"""Micro-benchmarks: each case times a method and its baseline in the same run.

These machines are shared and noisy, so a case never reports an absolute
time alone: it times the baseline and the method alternately, several rounds
each with `torch.utils.benchmark`, and reports the median over rounds of the
method's time over the baseline's in that round (a burst of load from
elsewhere then moves one round, and a slow drift moves both sides of a round
alike), with the medians of the times beside it. Cases register themselves with `@case("name")`.
"""

from __future__ import annotations

import copy
import functools
import itertools
import json
import math
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrizations
from torch.utils import benchmark

from .. import distributed, registry
from ..fold import fold
from ..functional.fastnorm import tracked_sq_norms
from ..layers.batch_renorm import BatchRenorm1d, BatchRenorm2d
from ..layers.equinorm import EquiNormConv2d, EquiNormLinear
from ..layers.online import OnlineNorm1d, OnlineNorm2d
from ..layers.weight_norm import WeightNormLinear
from ..optim import FastNormSGD
from ..rebalancers import ENorm
from . import models
from .text import text_table


@dataclass
class Row:
    case: str
    variant: str  # the shape or setting measured
    method: str
    baseline: str
    method_s: float  # median seconds per call
    baseline_s: float
    ratio: float  # median over rounds of method / baseline seconds in the round

    @classmethod
    def from_rounds(cls, case_name: str, variant: str, method: str, baseline: str,
                    method_times: list[float], baseline_times: list[float]) -> Row:
        """A row from the per-call seconds of each round, paired by round."""
        ratios = [m / b for m, b in zip(method_times, baseline_times, strict=True)]
        return cls(case_name, variant, method, baseline, statistics.median(method_times),
                   statistics.median(baseline_times), statistics.median(ratios))

    def to_dict(self) -> dict:
        return asdict(self)


CASES: dict[str, Callable[[float], list[Row]]] = {}


def case(name: str):
    """Register a benchmark case: a function of `min_run_time` returning rows."""
    def register(fn):
        CASES[name] = fn
        return fn
    return register


def median_seconds(fn: Callable[[], object], min_run_time: float) -> float:
    # on torch's threads as set (OMP_NUM_THREADS, set_num_threads): the Timer's default is 1
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def compare(case_name: str, variant: str, method: str, method_fn: Callable[[], object],
            baseline: str, baseline_fn: Callable[[], object], min_run_time: float,
            rounds: int = 7) -> Row:
    """Time `method_fn` against `baseline_fn`, alternating, `rounds` rounds of each."""
    method_fn(), baseline_fn()  # warm-up: allocator, lazy init
    method_times, baseline_times = [], []
    for _ in range(rounds):
        baseline_times.append(median_seconds(baseline_fn, min_run_time / rounds))
        method_times.append(median_seconds(method_fn, min_run_time / rounds))
    return Row.from_rounds(case_name, variant, method, baseline, method_times, baseline_times)


def forward_backward(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """A closure running module(x) forward and backward with a fixed output gradient."""
    x = x.detach().requires_grad_(True)
    grad = torch.randn_like(module(x))

    def run():
        x.grad = None
        module(x).backward(grad)
    return run


def sgd_step(model: nn.Module, optimizer, inputs: torch.Tensor,
             labels: torch.Tensor) -> Callable[[], None]:
    """A closure running one training step on a fixed batch: forward, cross-entropy,
    backward, update."""
    return cycling_sgd_step(model, optimizer, [(inputs, labels)])


def cycling_sgd_step(model: nn.Module, optimizer,
                     batches: list[tuple[torch.Tensor, torch.Tensor]]) -> Callable[[], None]:
    """A closure running one training step per call on the next of `batches`, in turn
    (fresh samples every step, as in training)."""
    batches = itertools.cycle(batches)

    def run():
        inputs, labels = next(batches)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(inputs), labels).backward()
        optimizer.step()
    return run


def _shape(shape) -> str:
    return "x".join(map(str, shape))


# -- cases -------------------------------------------------------------------

@case("torch_norms")
def torch_norms(min_run_time: float) -> list[Row]:
    """torch's normalizers, forward+backward, against a copy of the same tensor."""
    torch.manual_seed(0)
    x = torch.randn(32, 64, 32, 32)
    copy = forward_backward(_Copy(), x)
    norms = {"batch": nn.BatchNorm2d(64), "layer": nn.GroupNorm(1, 64),
             "group": nn.GroupNorm(32, 64), "instance": nn.InstanceNorm2d(64, affine=True)}
    return [compare("torch_norms", _shape(x.shape), name, forward_backward(norm, x), "copy",
                    copy, min_run_time) for name, norm in norms.items()]


class _Copy(nn.Module):
    def forward(self, x):
        return x.clone()


ONLINE_SHAPES = ((32, 64, 32, 32), (128, 256, 8, 8), (8, 64, 56, 56))


def _against_batch_norm(case_name: str, make, shapes, min_run_time: float,
                        baselines: dict[str, Callable[[int], nn.Module]] | None = None,
                        method: str | None = None) -> list[Row]:
    """`make(C)` against each of `baselines` (default: BatchNorm2d) on each shape,
    forward+backward, float32."""
    baselines = baselines or {"batch": nn.BatchNorm2d}
    torch.manual_seed(0)
    rows = []
    for shape in shapes:
        x = torch.randn(shape)
        run_method = forward_backward(make(shape[1]), x)
        for name, make_baseline in baselines.items():
            rows.append(compare(case_name, _shape(shape), method or case_name, run_method, name,
                                forward_backward(make_baseline(shape[1]), x), min_run_time))
    return rows


@case("online")
def online(min_run_time: float) -> list[Row]:
    """OnlineNorm2d (default ecm "ac"), forward+backward, float32; target <= 1.2x BatchNorm2d
    on each shape. Then the poster's other error compensation, layer scaling (ecm "ls"), on
    the first shape; target <= 1.5x BatchNorm2d."""
    return (_against_batch_norm("online", OnlineNorm2d, ONLINE_SHAPES, min_run_time)
            + _against_batch_norm("online", functools.partial(OnlineNorm2d, ecm="ls"),
                                  ONLINE_SHAPES[:1], min_run_time, method="online(ecm=ls)"))


ONLINE_SMALL_BATCH_SHAPES = ((1, 64, 32, 32), (1, 256, 8, 8), (2, 64, 32, 32))


@case("online_small_batch")
def online_small_batch(min_run_time: float) -> list[Row]:
    """OnlineNorm2d (ecm "ac") at batch 1 and 2, where the method is used, forward+backward,
    float32; targets: <= 2x GroupNorm(32) at batch 1, <= 1.2x BatchNorm2d at batch 2."""
    baselines = {"group(32)": lambda channels: nn.GroupNorm(32, channels),
                 "batch": nn.BatchNorm2d}
    return _against_batch_norm("online_small_batch", OnlineNorm2d, ONLINE_SMALL_BATCH_SHAPES,
                               min_run_time, baselines, method="online")


ONLINE_1D_SHAPES = ((256, 1024), (32, 512))


@case("online_1d")
def online_1d(min_run_time: float) -> list[Row]:
    """OnlineNorm1d on (N, C) inputs (the papers' MLPs), each error compensation,
    forward+backward, float32, against BatchNorm1d; target <= 2x."""
    return [row for ecm in ("ac", "ls") for row in _against_batch_norm(
        "online_1d", functools.partial(OnlineNorm1d, ecm=ecm), ONLINE_1D_SHAPES, min_run_time,
        {"batch": nn.BatchNorm1d}, method=f"online(ecm={ecm})")]


BATCH_RENORM_SMALL_BATCH = (2, 64, 32, 32)  # the method's use: small minibatches
BATCH_RENORM_1D_SHAPES = ONLINE_1D_SHAPES  # the papers' MLPs


@case("batch_renorm")
def batch_renorm(min_run_time: float) -> list[Row]:
    """BatchRenorm2d and BatchRenorm1d, forward+backward, float32, against torch's BatchNorm of
    the same dimension; targets: <= 1.1x at (32, 64, 32, 32), <= 1.2x at batch 2
    (2, 64, 32, 32), <= 1.5x on (N, C) inputs (256, 1024) and (32, 512)."""
    return (_against_batch_norm("batch_renorm", BatchRenorm2d,
                                (ONLINE_SHAPES[0], BATCH_RENORM_SMALL_BATCH), min_run_time)
            + _against_batch_norm("batch_renorm", BatchRenorm1d, BATCH_RENORM_1D_SHAPES,
                                  min_run_time, {"batch": nn.BatchNorm1d}))


CHANNELS_LAST_LAYERS = {"online": OnlineNorm2d, "batch_renorm": BatchRenorm2d,
                        "batch": nn.BatchNorm2d}  # torch's, for what the layout costs it


@case("channels_last")
def channels_last(min_run_time: float) -> list[Row]:
    """OnlineNorm2d and BatchRenorm2d (and torch's BatchNorm2d, for reference) on a
    channels_last input against the same layer on the contiguous one, forward+backward,
    float32, at (32, 64, 32, 32); target <= 1.2x."""
    torch.manual_seed(0)
    x = torch.randn(ONLINE_SHAPES[0])
    x_channels_last = x.contiguous(memory_format=torch.channels_last)
    return [compare("channels_last", _shape(x.shape), f"{name}(channels_last)",
                    forward_backward(make(x.shape[1]), x_channels_last), f"{name}(contiguous)",
                    forward_backward(make(x.shape[1]), x), min_run_time)
            for name, make in CHANNELS_LAST_LAYERS.items()]


@case("weight_norm")
def weight_norm(min_run_time: float) -> list[Row]:
    """WeightNormLinear against torch's weight_norm parametrization, forward+backward;
    target <= 1.0x at each batch size."""
    torch.manual_seed(0)
    linear = nn.Linear(784, 1024)
    ours = WeightNormLinear.from_module(linear)
    theirs = parametrizations.weight_norm(copy.deepcopy(linear))
    rows = []
    for batch in (1, 16, 128):
        x = torch.randn(batch, 784)
        rows.append(compare("weight_norm", f"784->1024 batch {batch}", "WeightNormLinear",
                            forward_backward(ours, x), "torch weight_norm",
                            forward_backward(theirs, x), min_run_time))
    return rows


@case("equinorm")
def equinorm(min_run_time: float) -> list[Row]:
    """One SGD step of cifar_resnet(depth=20), EquiNorm against BatchNorm2d, batch 64, float32;
    target <= 0.9x."""
    torch.manual_seed(0)
    images, labels = torch.rand(64, 3, 32, 32), torch.randint(0, 10, (64,))

    def step(norm: str):
        model = models.cifar_resnet(depth=20, norm=norm)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        return sgd_step(model, optimizer, images, labels)

    return [compare("equinorm", "cifar_resnet20 64x3x32x32", "equinorm", step("equinorm"),
                    "batch", step("batch"), min_run_time)]


EQUINORM_CONV_BATCHES = (1, 8)


@case("equinorm_layers")
def equinorm_layers(min_run_time: float) -> list[Row]:
    """EquiNormConv2d 64->64 3x3 on 32x32 at batch 1 and 8, against Conv2d + BatchNorm2d,
    and EquiNormLinear 784->512 at batch 128 against Linear + BatchNorm1d, forward+backward,
    float32, non-negative inputs (after a ReLU, where the method is used); targets: <= 1.3x
    (conv, batch 1), <= 1.5x (linear)."""
    torch.manual_seed(0)
    rows = []
    for batch in EQUINORM_CONV_BATCHES:
        x = torch.rand(batch, 64, 32, 32)
        rows.append(compare(
            "equinorm_layers", _shape(x.shape), "EquiNormConv2d",
            forward_backward(EquiNormConv2d(64, 64, 3, padding=1), x), "conv2d+batch",
            forward_backward(nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64)),
                             x), min_run_time))
    x = torch.rand(128, 784)
    rows.append(compare("equinorm_layers", _shape(x.shape), "EquiNormLinear",
                        forward_backward(EquiNormLinear(784, 512), x), "linear+batch",
                        forward_backward(nn.Sequential(nn.Linear(784, 512), nn.BatchNorm1d(512)),
                                         x), min_run_time))
    return rows


@case("enorm")
def enorm(min_run_time: float) -> list[Row]:
    """One ENorm cycle against one SGD step of fc_cifar(p=15) at batch 256 (the ENorm
    reproduction's network); target <= 0.03x."""
    torch.manual_seed(0)
    model = models.fc_cifar(p=15)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(256, 3072), torch.randint(0, 10, (256,))
    rebalancer = ENorm(model, optimizer, c=1.2)
    return [compare("enorm", "fc_cifar(p=15), batch 256", "enorm cycle", rebalancer.step,
                    "sgd step", sgd_step(model, optimizer, x, y), min_run_time)]


def _explicit_weight_norm_mlp() -> nn.Module:
    model = models.mlp("none")
    for module in model:
        if isinstance(module, nn.Linear):
            parametrizations.weight_norm(module)
    return model


def _norm_updates(in_features: int, out_features: int, batch_size: int):
    """FastNorm's tracked norm update and an explicit norm pass, on the same layer."""
    weight = torch.randn(out_features, in_features)
    inv_norm = weight.norm(dim=1).reciprocal()
    inputs = torch.randn(batch_size, in_features)
    outputs = inputs @ weight.T * inv_norm
    grads = torch.randn(batch_size, out_features)

    def tracked():
        a = grads * inv_norm
        a_dot_p = (a * outputs).sum(0)
        tracked_sq_norms(inv_norm.pow(-2), inputs, a, a_dot_p, inv_norm.square() * a_dot_p,
                         0.1, 0.0)

    def explicit():
        torch.linalg.vector_norm(weight, dim=1)
    return tracked, explicit


@case("fastnorm")
def fastnorm(min_run_time: float) -> list[Row]:
    """The FastNorm paper's 784-1024-10 MLP, one SGD step on a fresh batch, against plain
    nn.Linear + torch.optim.SGD (targets: <= 1.0x at batch 1, <= 1.1x at batch 16) and
    torch's explicit weight_norm against the same baseline (FastNorm <= 0.35x it at batch 1);
    then FastNorm on one repeated batch against fresh batches (target <= 1.2x)."""
    torch.manual_seed(0)
    rows = []
    for batch_size in (1, 16, 128):
        pool = [(torch.randn(batch_size, 784), torch.randint(0, 10, (batch_size,)))
                for _ in range(max(4, 1024 // batch_size))]
        plain, fast, explicit = models.mlp("none"), models.mlp("fastnorm"), \
            _explicit_weight_norm_mlp()
        variant = f"mlp 784-1024-10 step, batch {batch_size}"
        baseline = cycling_sgd_step(plain, torch.optim.SGD(plain.parameters(), lr=0.01), pool)
        fast_step = cycling_sgd_step(fast, FastNormSGD(fast.parameters(), lr=0.01), pool)
        rows.append(compare("fastnorm", variant, "fastnorm", fast_step, "linear", baseline,
                            min_run_time))
        rows.append(compare("fastnorm", variant, "weight_norm (torch)",
                            cycling_sgd_step(explicit, torch.optim.SGD(
                                explicit.parameters(), lr=0.01), pool),
                            "linear", baseline, min_run_time))
        if batch_size == 1:
            repeated = cycling_sgd_step(fast, FastNormSGD(fast.parameters(), lr=0.01), pool[:1])
            rows.append(compare("fastnorm", variant, "fastnorm, one repeated sample", repeated,
                                "fastnorm, fresh samples", fast_step, min_run_time))
    for width in (256, 1024, 4096):
        tracked, explicit_norms = _norm_updates(width, width, 1)
        rows.append(compare("fastnorm", f"norm update {width}x{width}, batch 1", "tracked",
                            tracked, "explicit norms", explicit_norms, min_run_time))
    return rows


@case("fastnorm_crossover")
def fastnorm_crossover(min_run_time: float) -> list[Row]:
    """FastNorm's 784-1024-10 MLP step on fresh batches with the norms tracked, against the
    same step with explicit norms after each update (max_tracked_batch=1), by batch: where
    DEFAULT_MAX_TRACKED_BATCH should sit. Both run the layer's step as training does (the
    compiled kernels on CPU)."""
    torch.manual_seed(0)
    rows = []
    for batch_size in (2, 8, 16, 32, 64, 128, 256):
        pool = [(torch.randn(batch_size, 784), torch.randint(0, 10, (batch_size,)))
                for _ in range(max(4, 1024 // batch_size))]
        steps = []
        for limit in (batch_size, 1):
            model = models.mlp("fastnorm", max_tracked_batch=limit)
            steps.append(cycling_sgd_step(model, FastNormSGD(model.parameters(), lr=0.01), pool))
        rows.append(compare("fastnorm_crossover", f"mlp step, batch {batch_size}", "tracked",
                            steps[0], "explicit norms", steps[1], min_run_time))
    return rows


SYNC_NORMS = ("batch", "batch_renorm", "online", "equinorm")


@case("sync")
def sync(min_run_time: float) -> list[Row]:
    """One DDP step of cifar_resnet(depth=8) on 2 gloo processes (global batch 32, 16 each),
    synced layers (convert_sync) against the same layers unsynced: the cost of exact
    global-batch statistics."""
    with tempfile.TemporaryDirectory() as out:
        distributed.run_local(_time_synced_steps, 2, min_run_time, out)
        return [Row(**row) for row in json.loads((Path(out) / "rows.json").read_text())]


def _time_synced_steps(rank: int, world_size: int, min_run_time: float, out: str,
                       rounds: int = 3) -> None:
    """Both variants of each norm, alternating; every rank runs the same number of steps
    (collectives pair them up), set by rank 0 from a first timing."""
    torch.manual_seed(0)
    images, labels = torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))
    rows = []
    for norm in SYNC_NORMS:
        steps = {}
        for synced in (False, True):
            model = models.cifar_resnet(depth=8, norm=norm)
            if synced:
                model = distributed.convert_sync(model)
            model = nn.parallel.DistributedDataParallel(model)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
            steps[synced] = sgd_step(model, optimizer, images, labels)
        count = torch.tensor([_lockstep_seconds(steps[False], 2)])
        dist.broadcast(count, 0)  # rank 0's step time decides the count for all
        count = max(1, math.ceil(min_run_time / (2 * rounds * float(count))))
        times = {False: [], True: []}
        for _ in range(rounds):
            for synced in (False, True):
                times[synced].append(_lockstep_seconds(steps[synced], count))
        rows.append(Row.from_rounds("sync", "cifar_resnet8, 2 processes x 16", f"{norm} synced",
                                    f"{norm} unsynced", times[True], times[False]))
    if rank == 0:
        (Path(out) / "rows.json").write_text(json.dumps([asdict(row) for row in rows]))


def _lockstep_seconds(step: Callable[[], None], count: int) -> float:
    """Seconds per call of `step` over `count` calls, started together on every rank."""
    dist.barrier()
    start = time.perf_counter()
    for _ in range(count):
        step()
    return (time.perf_counter() - start) / count


def _inference(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    model.eval()

    def run() -> None:
        with torch.no_grad():
            model(x)
    return run


def _conv_net(norm: str) -> nn.Module:
    """conv 3->32 -> norm -> ReLU -> conv 32->64 stride 2 -> norm -> ReLU -> pool -> linear."""
    layers = []
    for in_channels, out_channels, stride in ((3, 32, 1), (32, 64, 2)):
        layers += [nn.Conv2d(in_channels, out_channels, 3, stride, 1),
                   registry.create(norm, out_channels, 2), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


@case("fold")
def fold_case(min_run_time: float) -> list[Row]:
    """Inference (eval, no_grad) of normlab.fold(model) against the same network without
    normalization (plain nn layers), float32; target <= 1.02x."""
    torch.manual_seed(0)
    rows = []
    x = torch.randn(64, 784)
    for norm in ("batch", "online", "normprop", "equinorm"):
        rows.append(compare("fold", "mlp 784-1024-10, batch 64", f"fold({norm})",
                            _inference(fold(models.mlp(norm)), x), "plain",
                            _inference(models.mlp("none"), x), min_run_time))
    images = torch.randn(64, 3, 32, 32)
    for norm in ("batch", "batch_renorm"):
        rows.append(compare("fold", "conv net 64x3x32x32", f"fold({norm})",
                            _inference(fold(_conv_net(norm)), images), "plain",
                            _inference(_conv_net("none"), images), min_run_time))
    return rows


@case("methods")
def methods(min_run_time: float) -> list[Row]:
    """Every registered layer normalizer, in one SGD step of the conv net of the fold case
    (batch 16x3x32x32, float32, the method's optimizer): an activation normalizer after each
    conv, against BatchNorm2d; a weight normalizer in place of the plain layers it replaces,
    against them. No target: the cost of each method at a glance."""
    torch.manual_seed(0)
    images, labels = torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))

    def step(model: nn.Module, method: registry.Method | None = None):
        make = (method and method.optimizer) or torch.optim.SGD
        return sgd_step(model, make(model.parameters(), lr=0.01), images, labels)

    rows = []
    for name in registry.available():
        method = registry.get(name)
        if method.family == "activation" and name != "none":
            method_fn, baseline = step(_conv_net(name), method), "batch"
            baseline_fn = step(_conv_net("batch"))
        elif method.family == "weight":
            method_fn, baseline = step(registry.convert(_conv_net("none"), name), method), "plain"
            baseline_fn = step(_conv_net("none"))
        else:
            continue
        rows.append(compare("methods", "conv net 16x3x32x32, SGD step", name, method_fn,
                            baseline, baseline_fn, min_run_time))
    return rows


# -- running -----------------------------------------------------------------

def run(names: list[str] | None = None, min_run_time: float = 1.0) -> list[Row]:
    names = names or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise ValueError(f"unknown bench case(s) {unknown}; valid cases: {', '.join(CASES)}")
    return [row for name in names for row in CASES[name](min_run_time)]


def cpu_model() -> str:
    """The CPU's model name as the kernel reports it (`lscpu`'s "Model name"), else the
    platform's processor string: speed ratios differ between CPU kinds."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine() -> dict[str, object]:
    """What a bench run's ratios depend on: the CPU kind, the vector instructions torch
    dispatches to on it, torch's threads and version."""
    return {"cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def format_machine(described: dict[str, object]) -> str:
    return (f"{described['cpu']} (torch dispatches {described['cpu_capability']}), "
            f"{described['threads']} threads, torch {described['torch']}")


def format_table(rows: list[Row]) -> str:
    header = ("case", "variant", "method", "baseline", "method ms", "baseline ms", "ratio")
    lines = [(r.case, r.variant, r.method, r.baseline, f"{r.method_s * 1e3:.3f}",
              f"{r.baseline_s * 1e3:.3f}", f"{r.ratio:.3g}x") for r in rows]
    return text_table(header, lines)


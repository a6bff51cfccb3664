"""Micro-benchmarks: each case times a method and its baseline in the same run.

These machines are shared and noisy, so a case never reports an absolute
time alone: it times the baseline and the method alternately, several rounds
each with `torch.utils.benchmark`, and reports the ratio of the medians with
the medians beside it. Cases register themselves with `@case("name")`.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils import benchmark

from .text import text_table


@dataclass
class Row:
    case: str
    variant: str  # the shape or setting measured
    method: str
    baseline: str
    method_s: float  # median seconds per call
    baseline_s: float

    @property
    def ratio(self) -> float:
        return self.method_s / self.baseline_s

    def to_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio}


CASES: dict[str, Callable[[float], list[Row]]] = {}


def case(name: str):
    """Register a benchmark case: a function of `min_run_time` returning rows."""
    def register(fn):
        CASES[name] = fn
        return fn
    return register


def median_seconds(fn: Callable[[], object], min_run_time: float) -> float:
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn})
    return timer.blocked_autorange(min_run_time=min_run_time).median


def compare(case_name: str, variant: str, method: str, method_fn: Callable[[], object],
            baseline: str, baseline_fn: Callable[[], object], min_run_time: float,
            rounds: int = 3) -> Row:
    """Time `method_fn` against `baseline_fn`, alternating, and keep the medians."""
    method_fn(), baseline_fn()  # warm-up: allocator, lazy init
    method_times, baseline_times = [], []
    for _ in range(rounds):
        baseline_times.append(median_seconds(baseline_fn, min_run_time / rounds))
        method_times.append(median_seconds(method_fn, min_run_time / rounds))
    return Row(case_name, variant, method, baseline, statistics.median(method_times),
               statistics.median(baseline_times))


def forward_backward(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """A closure running module(x) forward and backward with a fixed output gradient."""
    x = x.detach().requires_grad_(True)
    grad = torch.randn_like(module(x))

    def run():
        x.grad = None
        module(x).backward(grad)
    return run


@case("torch_norms")
def torch_norms(min_run_time: float) -> list[Row]:
    """torch's normalizers, forward+backward, against a copy of the same tensor."""
    torch.manual_seed(0)
    shape = (32, 64, 32, 32)
    x = torch.randn(shape)
    copy = forward_backward(_Copy(), x)
    variant = "x".join(map(str, shape))
    norms = {"batch": nn.BatchNorm2d(64), "layer": nn.GroupNorm(1, 64),
             "group": nn.GroupNorm(32, 64), "instance": nn.InstanceNorm2d(64, affine=True)}
    return [compare("torch_norms", variant, name, forward_backward(norm, x), "copy", copy,
                    min_run_time) for name, norm in norms.items()]


class _Copy(nn.Module):
    def forward(self, x):
        return x.clone()


def run(names: list[str] | None = None, min_run_time: float = 1.0) -> list[Row]:
    names = names or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise ValueError(f"unknown bench case(s) {unknown}; valid cases: {', '.join(CASES)}")
    return [row for name in names for row in CASES[name](min_run_time)]


def format_table(rows: list[Row]) -> str:
    header = ("case", "variant", "method", "baseline", "method ms", "baseline ms", "ratio")
    lines = [(r.case, r.variant, r.method, r.baseline, f"{r.method_s * 1e3:.3f}",
              f"{r.baseline_s * 1e3:.3f}", f"{r.ratio:.2f}x") for r in rows]
    return text_table(header, lines)


from . import enorm as _enorm  # noqa: E402, F401  (registers the "enorm" case)
from .layers import equinorm as _equinorm  # noqa: E402, F401  (registers the "equinorm" case)

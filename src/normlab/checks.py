"""Argument checks shared by normlab's layers: one exception type per kind of mistake.

* A value of the wrong type (a float or a bool where a count is needed, a
  string where a number is, an integer tensor where a floating-point one
  is): ``TypeError``.
* A value of the right type outside its range or set: ``ValueError``.
* A tensor of the wrong shape: ``ValueError``, raised by each layer, which
  knows the shape it expects.

Every message starts with the layer (or function) it concerns and names what
was expected and what came.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection

import torch


def positive_int(owner: str, name: str, value) -> int:
    """`value` if it is an int >= 1."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")
    return value


def in_interval(owner: str, name: str, value, interval: str) -> float:
    """`value` if it is a real number in `interval`, written like ``"(0, 1]"`` or ``"[1, inf)"``."""
    low_bracket, low, high, high_bracket = (interval[0], *interval[1:-1].split(","),
                                            interval[-1])
    low, high = float(low), float(high)
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be a number in {interval}, got {value!r}")
    above = value > low if low_bracket == "(" else value >= low
    below = value < high if high_bracket == ")" else value <= high
    if not (above and below) or math.isnan(value):
        expected = (f"{'>' if low_bracket == '(' else '>='} {low:g}" if math.isinf(high)
                    else f"in {interval}")
        raise ValueError(f"{owner}: {name} must be {expected}, got {value!r}")
    return value


def one_of(owner: str, name: str, value, choices: Collection, meaning: str = ""):
    """`value` if it is one of `choices`; `meaning` explains them in the message."""
    if value not in choices:
        raise ValueError(f"{owner}: {name} must be one of {list(choices)}{meaning}, "
                         f"got {value!r}")
    return value


def floating_point_input(owner: str, x: torch.Tensor) -> None:
    """A layer's input must be a floating-point tensor."""
    if not x.is_floating_point():
        raise TypeError(f"{owner}: expected a floating-point input, got {x.dtype}")

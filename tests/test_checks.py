import math

import pytest
import torch

from normlab import checks


def test_positive_int_tells_a_wrong_type_from_a_wrong_value():
    assert checks.positive_int("Layer", "size", 3) == 3
    for wrong_type in (3.0, True, "3", None):
        with pytest.raises(TypeError, match=r"Layer: size must be a positive int, got"):
            checks.positive_int("Layer", "size", wrong_type)
    for wrong_value in (0, -2):
        with pytest.raises(ValueError, match=rf"Layer: size must be a positive int, got "
                                             rf"{wrong_value}"):
            checks.positive_int("Layer", "size", wrong_value)


@pytest.mark.parametrize("interval,inside,outside,expected", [
    ("(0, 1)", [1e-9, 0.5, 1 - 1e-9], [0, 1, -1, math.nan], r"in \(0, 1\)"),
    ("[0, 1]", [0, 0.3, 1], [-1e-9, 1.5], r"in \[0, 1\]"),
    ("(0, 1]", [1e-9, 1], [0, 2], r"in \(0, 1\]"),
    ("(0, inf)", [1e-12, 5, 1e30], [0, -1], "> 0"),
    ("[1, inf)", [1, 3.0], [0.999], ">= 1"),
])
def test_in_interval_bounds(interval, inside, outside, expected):
    for value in inside:
        assert checks.in_interval("L", "x", value, interval) == value
    for value in outside:
        with pytest.raises(ValueError, match=f"L: x must be {expected}, got"):
            checks.in_interval("L", "x", value, interval)
    with pytest.raises(TypeError, match=r"L: x must be a number in"):
        checks.in_interval("L", "x", "0.5", interval)


def test_one_of_lists_the_choices_and_their_meaning():
    assert checks.one_of("L", "mode", None, ("a", None)) is None
    with pytest.raises(ValueError, match=r"L: mode must be one of \['a', None\] \(a: all\), "
                                         r"got 'b'"):
        checks.one_of("L", "mode", "b", ("a", None), " (a: all)")


def test_floating_point_input():
    checks.floating_point_input("L", torch.ones(2, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="L: expected a floating-point input, got torch.int64"):
        checks.floating_point_input("L", torch.ones(2, dtype=torch.long))

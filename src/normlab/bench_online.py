"""Bench cases of the batch-independent activation normalizers, against torch's BatchNorm2d."""

from __future__ import annotations

import torch
from torch import nn

from .bench import Row, case, compare, forward_backward
from .layers.batch_renorm import BatchRenorm2d
from .layers.online import OnlineNorm2d

ONLINE_SHAPES = ((32, 64, 32, 32), (128, 256, 8, 8), (8, 64, 56, 56))


def _against_batch_norm(case_name: str, make, shapes, min_run_time: float) -> list[Row]:
    torch.manual_seed(0)
    rows = []
    for shape in shapes:
        x = torch.randn(shape)
        rows.append(compare(case_name, "x".join(map(str, shape)), case_name,
                            forward_backward(make(shape[1]), x), "batch",
                            forward_backward(nn.BatchNorm2d(shape[1]), x), min_run_time))
    return rows


@case("online")
def online(min_run_time: float) -> list[Row]:
    """OnlineNorm2d (default ecm "ac"), forward+backward, float32, target <= 1.5x BatchNorm2d."""
    return _against_batch_norm("online", OnlineNorm2d, ONLINE_SHAPES, min_run_time)


@case("batch_renorm")
def batch_renorm(min_run_time: float) -> list[Row]:
    """BatchRenorm2d, forward+backward, float32, against BatchNorm2d."""
    return _against_batch_norm("batch_renorm", BatchRenorm2d, ONLINE_SHAPES[:1], min_run_time)

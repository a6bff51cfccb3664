"""The papers' architectures, parameterized by the name of a normalization.

An activation normalizer sits where the papers put it: after the linear/conv
layer, before the ReLU. A weight normalizer replaces the linear/conv layers
instead (built plain, then swapped by `normlab.convert`, so one code path
serves every weight method). A rebalancer (ENorm) changes no layer: the model
is built without normalization and the rebalancer runs beside the optimizer.
"""

from __future__ import annotations

from torch import nn

from .. import registry
from ..rebalancers.row_renorm import Renormalize


def layer_methods(norm: str) -> tuple[str, str | None]:
    """The activation normalizer ("none" without one) and the weight normalizer (None
    without one) that `norm` names: one method, or one of each joined by '+', as a weight
    normalizer and the activation normalizer it runs with (``"group+weight_standardization"``
    -> ``("group", "weight_standardization")``; ``"fastnorm"`` -> ``("none", "fastnorm")``)."""
    methods = [registry.get(name) for name in norm.split("+")]
    activations = [m.name for m in methods if m.family == "activation"]
    weights = [m.name for m in methods if m.family == "weight"]
    if len(activations) > 1 or len(weights) > 1 or len(activations) + len(weights) < len(methods):
        raise ValueError(f"norm {norm!r}: expected at most one layer normalizer of each family "
                         f"(an activation normalizer, a weight normalizer, or one of each "
                         f"joined by '+', as in group+weight_standardization)")
    return (activations[0] if activations else "none"), (weights[0] if weights else None)


def _norm(norm: str, num_features: int, dim: int) -> nn.Module:
    activation, _ = layer_methods(norm)
    return registry.create(activation, num_features, dim)


def _needs_bias(norm: str) -> bool:
    """A layer followed by an activation normalizer gets its shift from it."""
    return layer_methods(norm)[0] == "none"


def _apply_weight_norm(model: nn.Module, norm: str, unit_rows: bool = False,
                       **norm_kw) -> nn.Module:
    """`model` with its Linear/Conv layers converted to the weight normalizer of `norm`, its
    activation normalizers kept.

    ``unit_rows=True`` stores every direction with unit rows (the gain keeps the
    function): plain SGD's step on the direction then starts at the nominal
    learning rate, as FastNorm's does, instead of about 3x it (torch's default
    init gives rows of norm 1/sqrt(3)).
    """
    _, weight = layer_methods(norm)
    if weight is None:
        if unit_rows:
            raise ValueError(f"unit_rows applies to weight normalizers; {norm!r} is not one")
        return model
    model = registry.convert(model, weight, keep_activation_norm=True, **norm_kw)
    if unit_rows:
        Renormalize(model).step()
    return model


def mlp(norm: str = "none", hidden: int = 1024, in_features: int = 784,
        num_classes: int = 10, **norm_kw) -> nn.Module:
    """The 2-layer fully-connected MNIST network of the FastNorm paper (anonymous ICLR 2020
    submission, "FastNorm: improving numerical stability of neural network training with
    efficient normalization").

    in_features -> hidden -> (norm) -> ReLU -> num_classes. Accepts images
    (N, 1, 28, 28) or flat vectors (N, in_features).
    """
    model = nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, hidden),
        _norm(norm, hidden, dim=1),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )
    return _apply_weight_norm(model, norm, **norm_kw)


def fc_cifar(p: int, norm: str = "none", width: int = 500, in_features: int = 3072,
             num_classes: int = 10, bias: bool = False, **norm_kw) -> nn.Module:
    """The fully-connected CIFAR-10 network of Stock et al. (2019, arXiv:1902.10416) as
    reproduced in the anonymous ICLR 2019 reproducibility report "Reproducibility of
    Equi-normalization of Neural Networks".

    3072 -> width, then `p` intermediary width -> width layers, then
    width -> 10; ReLU after every layer but the last, no biases (``bias=True``
    adds them, initialized to zero: the report's Figure 3), He initialization.
    Accepts (N, 3, 32, 32) or (N, 3072).
    """
    if p < 0:
        raise ValueError(f"p (the number of intermediary layers) must be >= 0, got {p}")
    sizes = [in_features] + [width] * (p + 1)
    layers: list[nn.Module] = [nn.Flatten()]
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(fan_in, fan_out, bias=bias), _norm(norm, fan_out, dim=1), nn.ReLU()]
    layers.append(nn.Linear(width, num_classes, bias=bias))
    model = nn.Sequential(*layers)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            if bias:
                nn.init.zeros_(module.bias)
    return _apply_weight_norm(model, norm, **norm_kw)


class BasicBlock(nn.Module):
    """conv-norm-ReLU-conv-norm plus a shortcut, then ReLU (He et al. 2016).

    `residual_scale` multiplies the residual branch: the lecture's rule for
    scaled weight normalization divides it by the number of blocks.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str,
                 residual_scale: float = 1.0):
        super().__init__()
        bias = _needs_bias(norm)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=bias)
        self.norm1 = _norm(norm, out_channels, dim=2)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=bias)
        self.norm2 = _norm(norm, out_channels, dim=2)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=bias),
                _norm(norm, out_channels, dim=2),
            )
        self.relu2 = nn.ReLU()
        self.residual_scale = residual_scale

    def forward(self, x):
        out = self.norm2(self.conv2(self.relu1(self.norm1(self.conv1(x)))))
        if self.residual_scale != 1.0:
            out = out * self.residual_scale
        return self.relu2(out + self.shortcut(x))


def cifar_resnet(depth: int = 20, width: int = 16, norm: str = "batch", num_classes: int = 10,
                 scale_residual: bool = False, **norm_kw) -> nn.Module:
    """The CIFAR ResNet of He et al. (2016): depth = 6n + 2, three stages of n blocks.

    Stages have `width`, 2 `width` and 4 `width` channels; global average
    pooling and a linear classifier end the network. With
    ``scale_residual=True`` each residual branch is divided by the number of
    blocks (the lecture's rule for scaled weight normalization).
    """
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, ...), got {depth}")
    blocks_per_stage = (depth - 2) // 6
    residual_scale = 1.0 / (3 * blocks_per_stage) if scale_residual else 1.0
    layers: list[nn.Module] = [
        nn.Conv2d(3, width, 3, 1, 1, bias=_needs_bias(norm)),
        _norm(norm, width, dim=2),
        nn.ReLU(),
    ]
    in_channels = width
    for stage in range(3):
        out_channels = width * 2**stage
        for block in range(blocks_per_stage):
            stride = 2 if stage > 0 and block == 0 else 1
            layers.append(BasicBlock(in_channels, out_channels, stride, norm, residual_scale))
            in_channels = out_channels
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, num_classes)]
    return _apply_weight_norm(nn.Sequential(*layers), norm, **norm_kw)

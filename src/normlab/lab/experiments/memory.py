"""Activation memory of training, counted on the meta device (seed 001's memory table).

Online Normalization trains at batch size 1, so the activations a network
stores for its backward pass are those of one sample instead of a batch.
Seed 001 (Chiley et al. 2019, poster) puts figures on it: ResNet-50, a 3D
U-Net and a 2D U-Net, with Online Normalization at batch 1 against
BatchNorm at batches 32 and 128. This module computes those figures instead
of estimating them by hand:

* the network is built on the meta device, so tensors have shapes and dtypes
  but no storage: a 3D U-Net at 250^3 voxels and batch 128 (terabytes) costs
  nothing;
* one training-mode forward pass runs under
  ``torch.autograd.graph.saved_tensors_hooks``, which sees every tensor that
  autograd keeps for the backward pass; their bytes are summed, each storage
  once (a ReLU output that the next layer also saves counts once), and the
  parameters and buffers are left out (they are not activations).

So the count is what PyTorch itself stores for backward, in the precision of
the pass (float32 by default; max-pooling indices are int64). `state_bytes`
adds what a training step keeps besides: the parameters, their gradients and
SGD's momentum buffers (no workspace, no allocator slack). GB means 10^9 bytes.

Example:
    >>> from normlab.experiments import memory
    >>> table = memory.table()  # the poster's table, ours beside it
    >>> with torch.device("meta"):
    ...     model = memory.resnet50()
    >>> memory.activation_bytes(model, (1, 3, 224, 224))
    86121984
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ... import registry
from ..text import text_table

GB = 1e9


# --- the architectures, compact and standard, normalization after every conv ---

def _conv_norm_relu(conv: nn.Module, norm: str, channels: int) -> list[nn.Module]:
    dim = 3 if isinstance(conv, nn.Conv3d) else 2
    return [conv, registry.create(norm, channels, dim=dim), nn.ReLU()]


class Bottleneck(nn.Module):
    """ResNet-50's block: 1x1 reduce, 3x3 (stride here), 1x1 expand x4, plus a shortcut."""

    def __init__(self, in_channels: int, width: int, stride: int, norm: str):
        super().__init__()
        out_channels = 4 * width
        self.branch = nn.Sequential(
            *_conv_norm_relu(nn.Conv2d(in_channels, width, 1, bias=False), norm, width),
            *_conv_norm_relu(nn.Conv2d(width, width, 3, stride, 1, bias=False), norm, width),
            nn.Conv2d(width, out_channels, 1, bias=False),
            registry.create(norm, out_channels, dim=2),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride,
                                                    bias=False),
                                          registry.create(norm, out_channels, dim=2))
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.branch(x) + self.shortcut(x))


def resnet50(norm: str = "batch", num_classes: int = 1000) -> nn.Module:
    """ResNet-50 (He et al. 2016): a 7x7 stem, stages of 3, 4, 6, 3 bottlenecks."""
    layers: list[nn.Module] = [*_conv_norm_relu(nn.Conv2d(3, 64, 7, 2, 3, bias=False), norm, 64),
                               nn.MaxPool2d(3, 2, 1)]
    in_channels = 64
    for stage, blocks in enumerate((3, 4, 6, 3)):
        width = 64 * 2**stage
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            layers.append(Bottleneck(in_channels, width, stride, norm))
            in_channels = 4 * width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, num_classes)]
    return nn.Sequential(*layers)


class UNet(nn.Module):
    """U-Net: an encoder of double convolutions and 2x max-pools, a mirrored decoder of
    2x transposed convolutions whose outputs are concatenated with the encoder's.

    ``spatial_dims=2`` with ``channels=(64, 128, 256, 512, 1024)`` is the 2D U-Net of
    Ronneberger et al. (2015); ``spatial_dims=3`` with ``channels=(32, 64, 128, 256)``
    and ``first_doubles=True`` (each level's first conv has half the channels of
    its second, as in the paper) is the 3D U-Net of Cicek et al. (2016). Convolutions
    are padded ("same"), and an upsampled map whose size an odd input made one
    smaller than the skip connection's is padded to it.
    """

    def __init__(self, spatial_dims: int, channels: tuple[int, ...], in_channels: int,
                 num_classes: int, norm: str = "batch", first_doubles: bool = False):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        conv, transposed, pool = ((nn.Conv2d, nn.ConvTranspose2d, nn.MaxPool2d)
                                  if spatial_dims == 2 else
                                  (nn.Conv3d, nn.ConvTranspose3d, nn.MaxPool3d))

        def double(c_in: int, c_out: int, c_mid: int) -> nn.Sequential:
            return nn.Sequential(*_conv_norm_relu(conv(c_in, c_mid, 3, padding=1, bias=False),
                                                  norm, c_mid),
                                 *_conv_norm_relu(conv(c_mid, c_out, 3, padding=1, bias=False),
                                                  norm, c_out))

        self.down = nn.ModuleList()
        c_in = in_channels
        for c in channels:
            self.down.append(double(c_in, c, c // 2 if first_doubles else c))
            c_in = c
        self.pool = pool(2)
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for c_deep, c_skip in zip(channels[:0:-1], channels[-2::-1]):
            c_up = c_deep if first_doubles else c_skip
            self.up.append(transposed(c_deep, c_up, 2, stride=2))
            self.merge.append(double(c_up + c_skip, c_skip, c_skip))
        self.head = conv(channels[0], num_classes, 1)

    def forward(self, x):
        skips = []
        for level, block in enumerate(self.down):
            x = block(x if level == 0 else self.pool(x))
            skips.append(x)
        skips.pop()
        for up, merge in zip(self.up, self.merge):
            skip = skips.pop()
            x = up(x)
            shortfall = [s - u for s, u in zip(skip.shape[:1:-1], x.shape[:1:-1])]
            x = F.pad(x, [p for d in shortfall for p in (0, d)])
            x = merge(torch.cat([skip, x], dim=1))
        return self.head(x)


def unet2d(norm: str = "batch") -> nn.Module:
    return UNet(2, (64, 128, 256, 512, 1024), in_channels=1, num_classes=2, norm=norm)


def unet3d(norm: str = "batch") -> nn.Module:
    return UNet(3, (64, 128, 256, 512), in_channels=1, num_classes=3, norm=norm,
                first_doubles=True)


# --- the count ---

def saved_bytes(model: nn.Module, inputs: torch.Tensor) -> int:
    """Bytes autograd saves for the backward pass of ``model(inputs)``, on any device.

    Each saved storage counts once; parameters and buffers do not count.
    """
    state = {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers())}
    saved: dict[int, int] = {}
    kept = []  # keeps the saved tensors alive so that no storage id is reused during the pass

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in state:
            saved[storage._cdata] = storage.nbytes()
        kept.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(inputs)
    return sum(saved.values())


def activation_bytes(model: nn.Module, input_shape: tuple[int, ...],
                     dtype: torch.dtype = torch.float32) -> int:
    """`saved_bytes` of one training step of `model` on an input of `input_shape`, counted
    on the meta device.

    `model` must live on the meta device (build it under
    ``with torch.device("meta"):``), so that nothing is allocated; it is cast
    to `dtype` in place and put in training mode.
    """
    if not input_shape or any(not isinstance(s, int) or s < 1 for s in input_shape):
        raise ValueError(f"input_shape must be positive ints, (N, C, ...); got {input_shape!r}")
    off_meta = [(name, t.device) for name, t in (*model.named_parameters(),
                                                 *model.named_buffers()) if not t.is_meta]
    if off_meta:
        raise ValueError(f"the model must be on the meta device (build it under "
                         f'`with torch.device("meta"):`); {off_meta[0][0]!r} is on '
                         f"{off_meta[0][1]}")
    model = model.to(dtype=dtype).train()
    return saved_bytes(model, torch.empty(input_shape, device="meta", dtype=dtype))


def state_bytes(model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of the parameters, their gradients and SGD's momentum buffers, in `dtype`:
    the memory of a training step that does not grow with the batch."""
    elements = sum(p.numel() for p in model.parameters())
    return 3 * elements * torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class Network:
    name: str
    build: Callable[[str], nn.Module]
    input_shape: tuple[int, ...]  # one sample, (C, ...)
    poster_gb: tuple[float, float, float]  # Online Norm at batch 1, BatchNorm at 32 and 128


NETWORKS = (
    Network("ResNet-50, ImageNet 224x224", resnet50, (3, 224, 224), (1, 2, 4)),
    Network("3D U-Net, 150^3 voxels", unet3d, (1, 150, 150, 150), (1, 29, 115)),
    Network("3D U-Net, 250^3 voxels", unet3d, (1, 250, 250, 250), (6, 195, 785)),
    Network("2D U-Net, 1024^2 pixels", unet2d, (1, 1024, 1024), (2, 31, 123)),
    Network("2D U-Net, 2048^2 pixels", unet2d, (1, 2048, 2048), (5, 137, 546)),
)
BATCHES = (1, 32, 128)  # Online Normalization at 1, BatchNorm at 32 and 128


def measure(networks=NETWORKS, dtype: torch.dtype = torch.float32) -> list[dict]:
    """One row per network: the poster's GB and ours for each column of BATCHES.

    The Online Normalization column counts the network with normlab's Online
    Normalization (OnlineNorm2d, OnlineNorm3d) at batch 1; the others, BatchNorm. ``ours_gb`` is the
    activations autograd saves, ``state_gb`` the parameters, gradients and
    momentum buffers, ``total_gb`` their sum: a training step's memory.
    """
    rows = []
    for net in networks:
        ours, state = [], []
        for batch in BATCHES:
            with torch.device("meta"):
                model = net.build("online" if batch == 1 else "batch")
            ours.append(activation_bytes(model, (batch, *net.input_shape), dtype) / GB)
            state.append(state_bytes(model, dtype) / GB)
        rows.append({"network": net.name, "poster_gb": net.poster_gb, "ours_gb": tuple(ours),
                     "state_gb": tuple(state),
                     "total_gb": tuple(a + b for a, b in zip(ours, state))})
    return rows


def assumptions(dtype: torch.dtype = torch.float32) -> str:
    return (f"Memory of one training step: the tensors PyTorch autograd saves for "
            f"backward, each storage once, parameters and buffers excluded, in {dtype} "
            f"(max-pool indices int64), plus the parameters, their gradients and SGD's momentum "
            f"buffers; no workspace or allocator slack; counted at the poster's input sizes on "
            f"the meta device (nothing allocated, so no scaling). GB = 10^9 bytes. The Online "
            f"Normalization column counts the network at batch 1 with normlab's OnlineNorm2d "
            f"and OnlineNorm3d layers.")


def table(rows: list[dict] | None = None, dtype: torch.dtype = torch.float32) -> str:
    """The poster's memory table with our counts beside each figure."""
    rows = measure(dtype=dtype) if rows is None else rows
    header = ("network", "OnlineNorm b=1 poster/ours", "BatchNorm b=32 poster/ours",
              "BatchNorm b=128 poster/ours")
    lines = [(r["network"], *(f"{p:g} / {o:.1f}" for p, o in zip(r["poster_gb"], r["total_gb"])))
             for r in rows]
    return text_table(header, lines) + "\n\n" + assumptions(dtype)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="seed 001's memory table, counted")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    print(table(dtype=getattr(torch, parser.parse_args().dtype)))

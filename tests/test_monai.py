"""normlab on third-party 3-D networks: MONAI's U-Nets (BasicUNet, UNet, DynUNet) at small
sizes, with batch or instance normalization. What `convert`, `fold` and `freeze` do to a
network normlab did not write; `convert_sync` under DDP is a case of test_distributed.py."""

import math
import warnings

import pytest
import torch
from torch import nn

import normlab
from conftest import require_module

require_module("monai")

from monai.networks import nets  # noqa: E402  (after the dependency check)

SIDE = 16  # one sample: (1, SIDE, SIDE, SIDE); BasicUNet's deepest level has one voxel


def basic_unet(norm: str) -> nn.Module:
    return nets.BasicUNet(spatial_dims=3, in_channels=1, out_channels=2,
                          features=(4, 4, 8, 8, 16, 4), norm=norm)


def unet(norm: str) -> nn.Module:
    return nets.UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 16),
                     strides=(2, 2), num_res_units=1, norm=norm)


def dyn_unet(norm: str) -> nn.Module:
    return nets.DynUNet(spatial_dims=3, in_channels=1, out_channels=2, kernel_size=[3, 3, 3],
                        strides=[1, 2, 2], upsample_kernel_size=[2, 2], filters=[4, 8, 16],
                        norm_name=norm)


NETWORKS = {"BasicUNet": basic_unet, "UNet": unet, "DynUNet": dyn_unet}
NORMS = ("batch", "instance")
CASES = [(name, norm) for name in NETWORKS for norm in NORMS]
TORCH_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


def build(name: str, norm: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return NETWORKS[name](norm).double()


def volumes(count: int, seed: int = 1, side: int = SIDE) -> torch.Tensor:
    return torch.rand((count, 1, side, side, side), generator=torch.Generator().manual_seed(seed),
                      dtype=torch.float64)


def with_running_statistics(net: nn.Module) -> nn.Module:
    """`net` in eval mode after a few training-mode forwards, so that BatchNorm's running
    statistics are not the identity's (0, 1) and the affine parameters not (1, 0)."""
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, TORCH_NORMS) and module.affine:
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
        net.train()
        for seed in range(3):
            net(volumes(2, seed))
    return net.eval()


def norm_types(net: nn.Module) -> set[type]:
    return {type(m) for m in net.modules()
            if isinstance(m, (*TORCH_NORMS, normlab.layers._base.ActivationNorm))}


@pytest.mark.parametrize("name,norm", CASES)
def test_convert_to_online_puts_online_norm_3d_in_every_normalizers_place(name, norm):
    net = build(name, norm)
    before = sum(isinstance(m, TORCH_NORMS) for m in net.modules())
    converted = normlab.convert(net, "online")
    assert before > 0 and norm_types(converted) == {normlab.OnlineNorm3d}
    assert sum(isinstance(m, normlab.OnlineNorm3d) for m in converted.modules()) == before


@pytest.mark.parametrize("name", list(NETWORKS))
def test_online_normalization_trains_a_unet_at_batch_1(name):
    """A segmentation of synthetic volumes (the voxels above a threshold), one volume per
    step: the loss falls from chance's ln 2 = 0.69 to below 0.9 ln 2, though BasicUNet's
    deepest level holds one voxel per channel, where batch, instance and group
    normalization refuse a batch of 1."""
    torch.manual_seed(0)
    net = normlab.convert(NETWORKS[name]("batch"), "online")
    inputs = volumes(8).float()
    targets = (inputs[:, 0] > 0.5).long()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)

    def epoch_loss() -> float:
        total = 0.0
        for x, y in zip(inputs.split(1), targets.split(1)):
            loss = nn.functional.cross_entropy(net(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
        return total / len(inputs)

    first = epoch_loss()
    for _ in range(7):
        last = epoch_loss()
    chance = math.log(2)  # two classes, balanced
    assert last < first and last < 0.9 * chance, (first, last)


@pytest.mark.parametrize("name", list(NETWORKS))
def test_batch_renorm_from_a_trained_batchnorm_network_computes_its_function(name):
    net = with_running_statistics(build(name, "batch"))
    converted = normlab.convert(net, "batch_renorm").eval()
    assert norm_types(converted) == {normlab.BatchRenorm3d}
    x = volumes(2, seed=7)
    torch.testing.assert_close(converted(x), net(x), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name,norm", CASES)
def test_weight_norm_keeps_the_function_and_lists_the_layers_it_cannot_replace(name, norm):
    net = build(name, norm).eval()
    with pytest.warns(UserWarning, match="ConvTranspose3d"):
        converted = normlab.convert(net, "weight_norm", keep_activation_norm=True).eval()
    kinds = {type(m) for m in converted.modules()}
    assert normlab.WeightNormConv3d in kinds and nn.Conv3d not in kinds
    # instance normalization needs 2 voxels per channel, so BasicUNet's 4 poolings need 32^3
    x = volumes(2, seed=3, side=32 if (name, norm) == ("BasicUNet", "instance") else SIDE)
    torch.testing.assert_close(converted(x), net(x), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", list(NETWORKS))
def test_fold_of_the_eval_network_holds_no_batch_norm_and_matches_it(name):
    net = with_running_statistics(build(name, "batch")).float()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the network traces: no fallback warning
        folded = normlab.fold(net)
    # fold folds into Linear/ConvNd layers; MONAI's UNet normalizes after its transposed
    # convolutions too (Convolution blocks: .conv, then .adn.N), and those stay
    after_transposed = {id(m.adn.N) for m in folded.modules()
                        if isinstance(getattr(m, "conv", None), nn.ConvTranspose3d)
                        and hasattr(getattr(m, "adn", None), "N")}
    left = [m for m in folded.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert all(id(m) in after_transposed for m in left)
    assert len(left) < sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    x = volumes(2, seed=5).float()
    torch.testing.assert_close(folded(x), net(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(NETWORKS))
def test_freeze_makes_a_training_network_use_its_running_statistics(name):
    net = with_running_statistics(build(name, "batch"))
    x = volumes(2, seed=9)
    expected = net(x)
    buffers = {k: v.clone() for k, v in net.state_dict().items()}
    normlab.freeze(net)
    net.train()
    out = net(x)
    out.sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    for key, value in net.state_dict().items():
        assert torch.equal(value, buffers[key]), key
    assert all(m.weight.grad is None for m in net.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm))


def test_convert_to_frn_replaces_basic_unet_s_relus_through_its_dropouts(monkeypatch):
    """MONAI's blocks run norm, dropout, activation: each ReLU fed by a new FRN (through the
    dropout) gives way to FRN's TLU, and the function is kept at conversion (tau = 0)."""
    from normlab.layers.filter_response_norm import FilterResponseNorm3d

    torch.manual_seed(0)
    model = nets.BasicUNet(spatial_dims=3, in_channels=1, out_channels=2,
                           features=(4, 4, 8, 8, 16, 4), act="relu").eval()
    relus = sum(isinstance(m, nn.ReLU) for m in model.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # BasicUNet traces: nothing it cannot tell
        converted = normlab.convert(model, "frn")
    assert relus == 18 == sum(isinstance(m, FilterResponseNorm3d) for m in converted.modules())
    assert not any(isinstance(m, nn.ReLU) for m in converted.modules())
    monkeypatch.setattr(FilterResponseNorm3d, "absorbs_following", ())
    kept = normlab.convert(model, "frn")
    assert sum(isinstance(m, nn.ReLU) for m in kept.modules()) == relus
    kept.load_state_dict(converted.state_dict())
    x = torch.randn(1, 1, SIDE, SIDE, SIDE)
    torch.testing.assert_close(converted(x), kept(x))

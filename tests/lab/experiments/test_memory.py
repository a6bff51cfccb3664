import pytest
import torch
from torch import nn

import normlab
from normlab.experiments import memory

FLOAT32, INT64 = 4, 8


def on_meta(build):
    with torch.device("meta"):
        return build()


def test_linear_relu_counted_by_hand():
    # Linear saves its input (2 x 4) for the weight gradient, ReLU its output (2 x 3);
    # the weight is a parameter and does not count.
    model = on_meta(lambda: nn.Sequential(nn.Linear(4, 3, bias=False), nn.ReLU()))
    assert memory.activation_bytes(model, (2, 4)) == (2 * 4 + 2 * 3) * FLOAT32


def test_conv_norm_relu_pool_counted_by_hand():
    model = on_meta(lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False),
                                          nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2)))
    expected = (2 * 3 * 16 * 16  # the image, saved by the conv
                + 2 * 8 * 16 * 16  # the conv output, saved by BatchNorm
                + 2 * 8  # BatchNorm's batch mean and inverse std
                + 2 * 8 * 16 * 16  # the ReLU output, saved by ReLU and max-pool: once
                ) * FLOAT32 + 2 * 8 * 8 * 8 * INT64  # the max-pool indices
    assert memory.activation_bytes(model, (2, 3, 16, 16)) == expected


def test_dtype_sets_the_bytes_per_element():
    model = on_meta(lambda: nn.Sequential(nn.Linear(4, 3, bias=False), nn.ReLU()))
    assert memory.activation_bytes(model, (2, 4), torch.bfloat16) == (2 * 4 + 2 * 3) * 2


def test_memory_is_per_sample_activations_plus_per_channel_statistics():
    one, two, many = (memory.activation_bytes(on_meta(memory.resnet50), (batch, 3, 64, 64))
                      for batch in (1, 2, 32))
    per_sample = two - one
    statistics = one - per_sample  # BatchNorm's mean and inverse std: 2 per channel
    norm_channels = sum(m.num_features for m in on_meta(memory.resnet50).modules()
                        if isinstance(m, nn.BatchNorm2d))
    assert statistics == 2 * norm_channels * FLOAT32
    assert many == 32 * per_sample + statistics


def test_terabytes_counted_without_allocating():
    model = on_meta(memory.unet3d)
    assert all(p.is_meta for p in model.parameters())
    # 250^3 voxels at batch 128: terabytes if anything were allocated.
    assert memory.activation_bytes(model, (128, 1, 250, 250, 250)) > 1e12


def test_resnet50_is_the_standard_one():
    model = on_meta(memory.resnet50)
    assert sum(p.numel() for p in model.parameters()) == 25_557_032  # He et al. (2016)
    assert model(torch.empty(2, 3, 224, 224, device="meta")).shape == (2, 1000)


@pytest.mark.parametrize("spatial", [(37, 41), (19, 20, 21)])
def test_unet_keeps_odd_input_sizes(spatial):
    net = memory.UNet(len(spatial), (4, 8, 16), in_channels=1, num_classes=3,
                      first_doubles=len(spatial) == 3)
    out = net(torch.randn(2, 1, *spatial))
    assert out.shape == (2, 3, *spatial)


def test_unet_levels_follow_the_papers():
    unet2d = on_meta(memory.unet2d)
    assert [block[0].out_channels for block in unet2d.down] == [64, 128, 256, 512, 1024]
    assert unet2d.up[0].out_channels == 512  # the up-convolution halves the channels
    unet3d = on_meta(memory.unet3d)
    assert [(block[0].out_channels, block[3].out_channels) for block in unet3d.down] == \
        [(32, 64), (64, 128), (128, 256), (256, 512)]
    assert unet3d.up[0].out_channels == 512  # Cicek et al.: the up-convolution keeps them


def test_table_prints_poster_figures_beside_ours():
    built = []

    def build(norm):
        built.append(norm)
        return nn.Sequential(nn.Conv2d(1, 2, 3, bias=False), normlab.create(norm, 2, dim=2),
                             nn.ReLU())

    tiny = memory.Network("tiny", build, (1, 64, 64), (1, 29, 115))
    rows = memory.measure([tiny])
    assert built == ["online", "batch", "batch"]  # Online Normalization itself at batch 1
    online, batch32, batch128 = rows[0]["ours_gb"]
    assert batch32 == pytest.approx(32 * online, rel=1e-2)
    assert batch128 == pytest.approx(4 * batch32, rel=1e-2)
    text = memory.table(rows)
    assert "tiny" in text and "29 / " in text and "float32" in text


def test_model_off_the_meta_device_is_refused():
    with pytest.raises(ValueError, match="meta device.*'0.weight' is on cpu"):
        memory.activation_bytes(nn.Sequential(nn.Linear(4, 3)), (2, 4))


@pytest.mark.parametrize("shape", [(), (0, 4), (2, -1)])
def test_bad_input_shape_is_refused(shape):
    model = on_meta(lambda: nn.Linear(4, 3))
    with pytest.raises(ValueError, match="input_shape must be positive ints"):
        memory.activation_bytes(model, shape)


def test_the_3d_unet_takes_3d_normalizers():
    model = on_meta(lambda: memory.unet3d("online"))
    norms = [m for m in model.modules() if isinstance(m, normlab.OnlineNorm3d)]
    assert norms and not any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                             for m in model.modules())


def test_online_norm_stores_per_sample_about_what_batch_norm_stores():
    # The memory claim compares Online Normalization at batch 1 with BatchNorm at 32 and 128:
    # per sample, both keep an activation-sized tensor and a few numbers per channel.
    for dim, shape in ((2, (4, 3, 16, 16)), (3, (4, 3, 8, 8, 8))):
        x = torch.randn(shape)
        conv = (nn.Conv2d, nn.Conv3d)[dim - 2]
        stored = {}
        for norm in ("batch", "online"):
            torch.manual_seed(0)
            model = nn.Sequential(conv(3, 8, 3, padding=1, bias=False),
                                  normlab.create(norm, 8, dim=dim), nn.ReLU())
            stored[norm] = memory.saved_bytes(model, x)
        per_channel_numbers = 4 * 8 * 8  # a few float64 statistics per sample and channel
        assert abs(stored["online"] - stored["batch"]) <= per_channel_numbers * 8, dim


def test_state_is_parameters_gradients_and_momentum():
    model = on_meta(lambda: nn.Sequential(nn.Linear(4, 3), nn.ReLU()))
    assert memory.state_bytes(model) == 3 * (4 * 3 + 3) * FLOAT32
    assert memory.state_bytes(model, torch.bfloat16) == 3 * (4 * 3 + 3) * 2


def test_measure_adds_the_state_to_the_saved_activations():
    (row,) = memory.measure(memory.NETWORKS[:1])
    assert row["total_gb"] == pytest.approx(tuple(a + s for a, s in
                                                  zip(row["ours_gb"], row["state_gb"])))
    assert row["state_gb"][0] == pytest.approx(3 * 25_557_032 * FLOAT32 / memory.GB)

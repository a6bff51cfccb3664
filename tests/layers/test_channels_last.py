"""channels_last (and channels_last_3d) inputs to every activation normalizer normlab defines
for images and volumes: the function of the contiguous layout, in the input's memory format,
on the compiled passes (which read that layout as it is) and on the eager torch path.
(VectorLayerNorm takes (N, C[, L]) inputs, which have no channels_last layout.)"""

import copy

import pytest
import torch

from conftest import skip_unless_ci
from normlab._ext import loader as _native
from normlab.layers.batch_renorm import BatchRenorm2d, BatchRenorm3d
from normlab.layers.filter_response_norm import FilterResponseNorm2d, FilterResponseNorm3d
from normlab.layers.online import OnlineNorm2d, OnlineNorm3d

FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}
CASES = [
    (OnlineNorm2d, (6, 72, 5, 7), {}),  # more channels than one of the kernel's blocks (64)
    (OnlineNorm2d, (1, 16, 9, 9), {"ecm": "ls"}),  # batch 1
    (OnlineNorm2d, (3, 16, 5, 5), {"ecm": "ls"}),  # each sample's block scaled in its layout
    (OnlineNorm2d, (4, 16, 5, 5), {"ecm": None, "affine": False}),
    # 2^18 values a sample: one sample per range of the kernel's positions-major passes
    (OnlineNorm2d, (3, 64, 64, 64), {}),
    (OnlineNorm3d, (2, 12, 3, 4, 5), {"clamp_val": 1.0}),
    (OnlineNorm3d, (1, 12, 3, 4, 5), {}),
    (BatchRenorm2d, (6, 72, 5, 7), {"r_max": 1.5, "d_max": 0.5}),
    (BatchRenorm3d, (2, 12, 3, 4, 5), {"track_running_stats": False}),
    (FilterResponseNorm2d, (3, 16, 5, 7), {}),
    (FilterResponseNorm3d, (2, 12, 3, 4, 5), {"learnable_eps": True}),
]


def close(actual, expected, rtol):
    """max |actual - expected| <= rtol * max |expected|, the tensor's scale."""
    scale = expected.abs().max().clamp(min=1e-30)
    assert (actual - expected).abs().max() <= rtol * scale, (actual - expected).abs().max()


def randomized(layer):
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.add_(torch.rand_like(parameter) - 0.5)
    return layer


def steps(layer, batches, grads, memory_format):
    """Outputs, input gradients (both contiguous, for comparing), parameter gradients and
    buffers after training steps on `batches` laid out in `memory_format`; the outputs and
    input gradients are checked to keep that format."""
    record = []
    for x, grad in zip(batches, grads):
        x = x.contiguous(memory_format=memory_format).requires_grad_(True)
        out = layer(x)
        assert out.is_contiguous(memory_format=memory_format)
        out.backward(grad.contiguous(memory_format=memory_format))
        record += [out.detach().contiguous(), x.grad.contiguous()]
    return record + [p.grad for p in layer.parameters()] + [b.clone() for b in layer.buffers()
                                                            if b.is_floating_point()]


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("cls,shape,kw", CASES)
def test_channels_last_computes_what_the_contiguous_layout_computes(cls, shape, kw, dtype, rtol,
                                                                    passes):
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(shape, generator=generator) * 2 + 1).to(dtype) for _ in range(2)]
    grads = [torch.randn(shape, generator=generator).to(dtype) for _ in range(2)]
    layer = randomized(cls(shape[1], **kw).to(dtype))
    twin = copy.deepcopy(layer)
    channels_last = FORMATS[len(shape)]
    got = steps(twin, batches, grads, channels_last)
    expected = steps(layer, batches, grads, torch.contiguous_format)
    assert len(got) == len(expected)
    for actual, want in zip(got, expected):
        close(actual, want, rtol)
    # evaluation mode too, from the statistics the steps left
    x = batches[0].contiguous(memory_format=channels_last)
    with torch.no_grad():
        out = twin.eval()(x)
        assert out.is_contiguous(memory_format=channels_last)
        close(out, layer.eval()(batches[0]), rtol)


@pytest.fixture
def kernel():
    module = _native.module("activations", openmp=True)
    if module is None:
        skip_unless_ci("the compiled activations kernel could not be built on this machine")
    return module


def test_the_compiled_stream_passes_keep_the_channels_last_layout(kernel):
    # a channels_last activation: read as the (N, C, S) view whose channels are adjacent, no
    # copy to (N, C, S); the output and the input gradient in its layout
    x = torch.randn(3, 70, 4, 5).contiguous(memory_format=torch.channels_last)
    gamma, beta = torch.rand(70) + 0.5, torch.rand(70) - 0.5
    out, record, kept = kernel.online_stream_forward(x, gamma, beta, torch.zeros(70),
                                                     torch.ones(70), 0.9, 1e-5, 1.0)
    assert out.shape == x.shape and out.stride() == x.stride()
    # the backward reads x itself
    assert kept.data_ptr() == x.data_ptr() and kept.stride() == (70 * 20, 1, 70)
    grad_x, _, _ = kernel.online_stream_backward(torch.randn(3, 70, 4, 5), kept, gamma, beta,
                                                 record, torch.zeros(70), torch.zeros(70), 0.9,
                                                 1.0, 0.9, 1e-5, False)
    assert grad_x.shape == x.shape and grad_x.stride() == x.stride()
    x = x.flatten(2)
    mean, var = kernel.channel_moments(x.double())
    torch.testing.assert_close(mean, x.double().mean((0, 2)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, x.double().var((0, 2), unbiased=False), rtol=1e-12,
                               atol=1e-12)


def test_channels_last_batch_statistics_stay_accurate_in_float32_at_a_large_mean(kernel):
    # one pass around each channel's first value: no E[x^2] - E[x]^2 cancellation at |mean| /
    # std = 1000, where that would lose every digit of float32 sums
    x = torch.randn(8, 70, 6, 6, dtype=torch.float64) + 1000
    view = x.float().contiguous(memory_format=torch.channels_last).flatten(2)
    mean, var = kernel.channel_moments(view)
    torch.testing.assert_close(mean, x.mean((0, 2, 3)), rtol=1e-6, atol=0)
    torch.testing.assert_close(var, x.float().double().var((0, 2, 3), unbiased=False),
                               rtol=1e-3, atol=0)


@pytest.mark.parametrize("cls", [OnlineNorm2d, BatchRenorm2d])
def test_a_dense_input_in_neither_layout_computes_what_its_contiguous_copy_computes(cls, passes):
    # permuted (N, H, C, W) storage: dense, neither contiguous nor channels_last; the
    # compiled step reads a contiguous copy of it and writes a fresh contiguous output
    x = torch.randn(2, 4, 3, 5).permute(0, 2, 1, 3).requires_grad_(True)
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    copy_x = x.detach().contiguous().requires_grad_(True)
    layer = randomized(cls(3))
    twin = copy.deepcopy(layer)
    grad = torch.randn(x.shape)
    out, want = layer(x), twin(copy_x)
    out.backward(grad)
    want.backward(grad)
    close(out, want, 1e-6)
    close(x.grad, copy_x.grad, 1e-6)

import torch

from normlab.functional import weight_normalized_linear


def test_weight_normalized_linear_matches_normalized_rows_and_its_gradient():
    torch.manual_seed(0)
    x = torch.randn(3, 5, dtype=torch.float64)
    weight = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    gain = torch.rand(4, dtype=torch.float64) + 0.5
    bias = torch.randn(4, dtype=torch.float64)
    reference = x @ (gain[:, None] * weight / weight.norm(dim=1, keepdim=True)).T + bias
    z = weight_normalized_linear(x, weight, gain, weight.norm(dim=1).reciprocal(), bias)
    assert torch.allclose(z, reference)
    assert torch.autograd.gradcheck(
        lambda w: weight_normalized_linear(x, w, gain, w.norm(dim=1).reciprocal(), bias),
        (weight,))
    # the weight-normalization gradient is orthogonal to each row
    z.sum().backward()
    assert torch.allclose((weight.grad * weight).sum(1), torch.zeros(4, dtype=torch.float64),
                          atol=1e-12)

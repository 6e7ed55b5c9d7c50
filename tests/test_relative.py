import torch

from snf_core import Flow
from snf_core.relative import RelativeGradientLinear


def test_relative_gradient_is_exact_times_wtw() -> None:
    features = 6
    layer = RelativeGradientLinear(features).double()

    with torch.no_grad():
        layer.weight.add_(0.3 * torch.randn(features, features))
        layer.bias.normal_()

    x = torch.randn(7, features, dtype=torch.float64)
    Flow([layer], (features,), reconstruction_weight=0.0).loss(x).backward()

    weight = layer.weight.detach().clone().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()
    z = x @ weight.T + bias
    nll = 0.5 * z.square().sum(dim=1) - torch.linalg.slogdet(weight)[1]
    nll.mean().backward()

    assert torch.allclose(layer.weight.grad, weight.grad @ weight.T @ weight, atol=1e-10)
    assert torch.allclose(layer.bias.grad, bias.grad, atol=1e-12)


def test_relative_gradient_input_gradient() -> None:
    layer = RelativeGradientLinear(5).double()
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    z, _, _ = layer.train_forward(x)
    z.square().sum().backward()

    x_reference = x.detach().clone().requires_grad_()
    (x_reference @ layer.weight.T + layer.bias).square().sum().backward()

    assert torch.allclose(x.grad, x_reference.grad, atol=1e-12)


def test_fc2_flows_train_and_sample() -> None:
    from snf_core.models import fc2_flow

    x = torch.randn(8, 16)

    for method in ("exact", "relative", "snf"):
        flow = fc2_flow(method, features=16)
        optimizer = torch.optim.Adam(flow.parameters(), lr=1e-3)
        loss = flow.loss(x)
        loss.backward()
        optimizer.step()

        assert torch.isfinite(loss)
        assert flow.sample(3).shape == (3, 16)
        assert flow.sample(3, exact=True).shape == (3, 16)

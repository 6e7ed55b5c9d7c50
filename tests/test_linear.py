import pytest
import torch
from helpers import jacobian_logabsdet

from snf_core import ExactLinear, Flow, SelfNormalizingLinear, SmoothLeakyReLU
from snf_core.flow import StandardNormal


def exact_mixture_loss(
    weights: list[torch.Tensor],
    inverses: list[torch.Tensor],
    biases: list[torch.Tensor],
    x: torch.Tensor,
) -> torch.Tensor:
    """-1/2 log p_f - 1/2 log p_g of a stack of linear layers with Smooth Leaky ReLUs in
    between, where p_g uses the exact inverse of each R as its forward weight."""

    activation = SmoothLeakyReLU(alpha=0.3)
    base = StandardNormal(x.shape[1:])

    def log_prob(matrices: list[torch.Tensor], logabsdets: list[torch.Tensor]) -> torch.Tensor:
        h = x
        total = torch.zeros(x.shape[0], dtype=x.dtype)

        for k, (matrix, bias) in enumerate(zip(matrices, biases, strict=True)):
            h = h @ matrix.T + bias
            total = total + logabsdets[k]

            if k < len(matrices) - 1:
                h, ladj = activation(h)
                total = total + ladj

        return base.log_prob(h) + total

    log_p_f = log_prob(weights, [torch.linalg.slogdet(w)[1] for w in weights])
    forward_of_g = [torch.linalg.inv(r) for r in inverses]
    log_p_g = log_prob(forward_of_g, [-torch.linalg.slogdet(r)[1] for r in inverses])

    return (-0.5 * log_p_f - 0.5 * log_p_g).mean()


@pytest.mark.parametrize("depth", [1, 2])
def test_self_normalizing_gradient_exact_inverse(depth: int) -> None:
    features = 6
    layers = []

    for k in range(depth):
        layer = SelfNormalizingLinear(features).double()

        with torch.no_grad():
            layer.weight.copy_(torch.eye(features) + 0.3 * torch.randn(features, features))
            layer.inverse_weight.copy_(torch.linalg.inv(layer.weight))
            layer.bias.copy_(0.1 * torch.randn(features))

        layers.append(layer)

        if k < depth - 1:
            layers.append(SmoothLeakyReLU(alpha=0.3))

    snf_layers = layers[::2]
    flow = Flow(layers, (features,), reconstruction_weight=0.0).double()
    x = torch.randn(9, features, dtype=torch.float64)

    flow.loss(x).backward()

    weights = [layer.weight.detach().clone().requires_grad_() for layer in snf_layers]
    inverses = [layer.inverse_weight.detach().clone().requires_grad_() for layer in snf_layers]
    biases = [layer.bias.detach().clone().requires_grad_() for layer in snf_layers]
    exact_mixture_loss(weights, inverses, biases, x).backward()

    for k, layer in enumerate(snf_layers):
        assert torch.allclose(layer.weight.grad, weights[k].grad, atol=1e-10)
        assert torch.allclose(layer.inverse_weight.grad, inverses[k].grad, atol=1e-10)
        assert torch.allclose(layer.bias.grad, biases[k].grad, atol=1e-10)


def test_self_normalizing_gradient_approximates_exact() -> None:
    """With R near but not at the inverse, the gradient of W is near the exact one."""

    features = 5
    layer = SelfNormalizingLinear(features).double()

    with torch.no_grad():
        layer.inverse_weight.copy_(torch.linalg.inv(layer.weight) + 1e-3)

    x = torch.randn(8, features, dtype=torch.float64)
    Flow([layer], (features,), reconstruction_weight=0.0).loss(x).backward()

    weight = layer.weight.detach().clone().requires_grad_()
    inverse = layer.inverse_weight.detach().clone().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()
    exact_mixture_loss([weight], [inverse], [bias], x).backward()

    assert not torch.allclose(layer.weight.grad, weight.grad, atol=1e-8)
    assert torch.allclose(layer.weight.grad, weight.grad, atol=2e-3)


def test_reconstruction_gradient_matches_autograd() -> None:
    features = 7
    layer = SelfNormalizingLinear(features).double()

    with torch.no_grad():
        layer.inverse_weight.add_(0.2 * torch.randn(features, features))

    x = torch.randn(5, features, dtype=torch.float64, requires_grad=True)
    _, _, error = layer.train_forward(x)
    (0.7 * error.mean()).backward()

    weight = layer.weight.detach().clone().requires_grad_()
    inverse = layer.inverse_weight.detach().clone().requires_grad_()
    h = x.detach()
    reference = 0.7 * (h @ weight.T @ inverse.T - h).square().sum(dim=1).mean()
    reference.backward()

    assert torch.allclose(layer.weight.grad, weight.grad, atol=1e-12)
    assert torch.allclose(layer.inverse_weight.grad, inverse.grad, atol=1e-12)
    assert torch.count_nonzero(x.grad) == 0
    assert torch.allclose(error, (h @ weight.T @ inverse.T - h).square().sum(dim=1))


@pytest.mark.parametrize("layer_class", [ExactLinear, SelfNormalizingLinear])
def test_logabsdet_matches_jacobian(layer_class: type) -> None:
    layer = layer_class(6).double()

    with torch.no_grad():
        layer.weight.add_(0.5 * torch.randn(6, 6))

    x = torch.randn(3, 6, dtype=torch.float64)
    _, logabsdet = layer(x)

    assert torch.allclose(logabsdet, jacobian_logabsdet(layer, x), atol=1e-10)


def test_logabsdet_cache_follows_weight() -> None:
    layer = SelfNormalizingLinear(4).double()
    x = torch.randn(2, 4, dtype=torch.float64)

    with torch.no_grad():
        before = layer(x)[1]
        layer.weight.mul_(2.0)
        after = layer(x)[1]

    assert torch.allclose(
        after - before, torch.full_like(before, 4 * torch.log(torch.tensor(2.0)).item())
    )


@pytest.mark.parametrize("layer_class", [ExactLinear, SelfNormalizingLinear])
def test_inverse_exact_round_trip(layer_class: type) -> None:
    layer = layer_class(8).double()

    with torch.no_grad():
        layer.weight.add_(0.3 * torch.randn(8, 8))
        layer.bias.normal_()

    x = torch.randn(4, 8, dtype=torch.float64)
    z, _ = layer(x)

    assert torch.allclose(layer.inverse_exact(z), x, atol=1e-10)


def test_learned_inverse_round_trip() -> None:
    layer = SelfNormalizingLinear(8).double()

    with torch.no_grad():
        layer.weight.add_(0.3 * torch.randn(8, 8))
        layer.inverse_weight.copy_(torch.linalg.inv(layer.weight))
        layer.bias.normal_()

    x = torch.randn(4, 8, dtype=torch.float64)
    flow = Flow([layer], (8,))

    assert torch.allclose(layer.inverse(layer(x)[0]), x, atol=1e-10)
    assert torch.allclose(flow.reconstruct(x), x, atol=1e-10)
    assert flow.reconstruction_error(x).item() < 1e-18


def test_initialization_identity_plus_noise() -> None:
    layer = SelfNormalizingLinear(64)
    noise = layer.weight.detach() - torch.eye(64)

    assert noise.abs().max() < 0.01
    assert noise.abs().max() > 0.0
    assert torch.equal(layer.inverse_weight.detach(), layer.weight.detach().T)
    assert layer.inverse_weight.is_contiguous()

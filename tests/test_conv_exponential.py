import pytest
import torch
from helpers import jacobian_logabsdet

from snf_core.conv import conv_matrix
from snf_core.conv_exponential import ConvExponential2d, operator_norm_bound

SHAPE = torch.Size([2, 3, 3])


def random_layer(shape: torch.Size = SHAPE, kernel_size: int = 3, **options) -> ConvExponential2d:
    layer = ConvExponential2d(shape[0], kernel_size, **options).double()

    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()

    return layer


@pytest.mark.parametrize("kernel_size", [1, 3, 5])
def test_series_matches_matrix_exp(kernel_size: int) -> None:
    shape = torch.Size([3, 4, 5])
    layer = random_layer(shape, kernel_size)
    matrix = conv_matrix(layer.kernel(), shape, layer.padding)
    x = torch.randn(2, *shape, dtype=torch.float64)
    z, _ = layer(x)
    expected = x.flatten(1) @ torch.linalg.matrix_exp(matrix).T
    expected = expected.view_as(x) + layer.bias.view(-1, 1, 1)

    assert torch.allclose(z, expected, atol=1e-12)


@pytest.mark.parametrize("kernel_size", [1, 3])
def test_logabsdet_matches_jacobian(kernel_size: int) -> None:
    layer = random_layer(kernel_size=kernel_size)
    x = torch.randn(2, *SHAPE, dtype=torch.float64)
    _, logabsdet = layer(x)

    assert torch.allclose(logabsdet, jacobian_logabsdet(layer, x), atol=1e-9)


def test_logabsdet_independent_of_data() -> None:
    layer = random_layer()
    _, first = layer(torch.randn(3, *SHAPE, dtype=torch.float64))
    _, second = layer(10.0 * torch.randn(3, *SHAPE, dtype=torch.float64))

    assert torch.equal(first, second)
    assert torch.equal(first, first[0].expand(3))


def test_logabsdet_gradient_matches_dense() -> None:
    """The trace's gradient, through the norm scaling, is that of the exact log-det."""

    layer = random_layer()
    layer.logabsdet(SHAPE).backward()

    weight = layer.weight.detach().clone().requires_grad_()
    scale = torch.clamp(layer.max_norm / operator_norm_bound(weight), max=1.0)
    matrix = torch.linalg.matrix_exp(conv_matrix(weight * scale, SHAPE, 1))
    torch.linalg.slogdet(matrix)[1].backward()

    assert torch.allclose(layer.weight.grad, weight.grad, atol=1e-10)


@pytest.mark.parametrize("kernel_size", [1, 3, 5])
def test_inverse_round_trip(kernel_size: int) -> None:
    shape = torch.Size([3, 5, 6])
    layer = random_layer(shape, kernel_size)
    x = torch.randn(4, *shape, dtype=torch.float64)
    z, _ = layer(x)

    assert torch.allclose(layer.inverse(z), x, atol=1e-8)


def test_kernel_norm_bounded() -> None:
    layer = random_layer(max_norm=0.5)

    with torch.no_grad():
        layer.weight.mul_(100.0)

    kernel = layer.kernel()
    spectral_norm = torch.linalg.matrix_norm(conv_matrix(kernel, SHAPE, 1), ord=2)

    assert operator_norm_bound(kernel) <= 0.5 + 1e-12
    assert spectral_norm <= 0.5 + 1e-12


def test_small_kernel_not_rescaled() -> None:
    layer = random_layer()

    with torch.no_grad():
        layer.weight.mul_(1e-3)

    assert torch.equal(layer.kernel(), layer.weight)


def test_terms_recorded() -> None:
    layer = random_layer()
    x = torch.randn(2, *SHAPE, dtype=torch.float64)
    layer(x)

    assert 1 <= layer.last_terms <= 20

    # After ten terms this kernel's last term is still far above float64 machine epsilon.
    capped = random_layer(terms=10)
    capped(x)

    assert capped.last_terms == 10


def test_tolerance_stops_series() -> None:
    x = torch.randn(2, *SHAPE, dtype=torch.float64)
    loose = random_layer(tolerance=1e-3)
    tight = random_layer(tolerance=1e-12)
    loose(x)
    tight(x)

    assert loose.last_terms < tight.last_terms


def test_initialization_near_identity() -> None:
    layer = ConvExponential2d(4, 3)

    assert layer.weight.abs().max() < 0.01
    assert layer.weight.abs().max() > 0.0


def test_invalid_arguments_rejected() -> None:
    with pytest.raises(ValueError, match="kernel_size must be a positive odd integer"):
        ConvExponential2d(2, 2)

    with pytest.raises(ValueError, match="terms must be a positive number"):
        ConvExponential2d(2, 3, terms=0)

    with pytest.raises(ValueError, match="max_norm must be a positive bound"):
        ConvExponential2d(2, 3, max_norm=0.0)

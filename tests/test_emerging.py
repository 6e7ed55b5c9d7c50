import pytest
import torch
from helpers import jacobian_logabsdet

from snf_core.conv import conv_matrix
from snf_core.emerging import EmergingConv2d

SHAPE = torch.Size([2, 3, 3])


def random_layer(shape: torch.Size = SHAPE, kernel_size: int = 3) -> EmergingConv2d:
    layer = EmergingConv2d(shape[0], kernel_size).double()

    with torch.no_grad():
        layer.weight_lower.add_(0.3 * torch.randn_like(layer.weight_lower))
        layer.weight_upper.add_(0.3 * torch.randn_like(layer.weight_upper))
        layer.bias.normal_()

    return layer


def raster_matrix(matrix: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Reorder a matrix over (C, H, W) features to the raster order (H, W, C)."""

    channels, pixels = shape[0], shape[1] * shape[2]
    order = torch.arange(channels * pixels).view(channels, pixels).T.flatten()

    return matrix[order][:, order]


@pytest.mark.parametrize("kernel_size", [1, 3, 5])
def test_masked_convs_triangular(kernel_size: int) -> None:
    shape = torch.Size([3, 4, 5])
    layer = random_layer(shape, kernel_size)
    lower, upper = layer.kernels()
    matrix_lower = raster_matrix(conv_matrix(lower, shape, layer.padding), shape)
    matrix_upper = raster_matrix(conv_matrix(upper, shape, layer.padding), shape)

    assert torch.equal(matrix_lower, matrix_lower.tril())
    assert torch.equal(matrix_upper, matrix_upper.triu())
    assert torch.count_nonzero(matrix_lower.tril(-1)) > 0
    assert torch.count_nonzero(matrix_upper.triu(1)) > 0


def test_masked_parameters_do_not_leak() -> None:
    """Masked-out weights, even if non-zero, change neither the output nor the log-det."""

    layer = random_layer()
    x = torch.randn(2, *SHAPE, dtype=torch.float64)
    z, logabsdet = layer(x)

    with torch.no_grad():
        layer.weight_lower.add_(torch.randn_like(layer.weight_lower) * (1 - layer.mask_lower))
        layer.weight_upper.add_(torch.randn_like(layer.weight_upper) * (1 - layer.mask_upper))

    z_after, logabsdet_after = layer(x)

    assert torch.equal(z, z_after)
    assert torch.equal(logabsdet, logabsdet_after)


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
    layer = random_layer()
    layer.logabsdet(SHAPE).backward()

    lower = layer.weight_lower.detach().clone().requires_grad_()
    upper = layer.weight_upper.detach().clone().requires_grad_()
    matrix_lower = conv_matrix(lower * layer.mask_lower, SHAPE, 1)
    matrix_upper = conv_matrix(upper * layer.mask_upper, SHAPE, 1)
    torch.linalg.slogdet(matrix_upper @ matrix_lower)[1].backward()

    assert torch.allclose(layer.weight_lower.grad, lower.grad, atol=1e-10)
    assert torch.allclose(layer.weight_upper.grad, upper.grad, atol=1e-10)


@pytest.mark.parametrize(
    ("shape", "kernel_size"),
    [(SHAPE, 3), (torch.Size([3, 5, 6]), 3), (torch.Size([3, 4, 4]), 1), ((2, 7, 5), 5)],
)
def test_inverse_round_trip(shape: tuple[int, ...], kernel_size: int) -> None:
    layer = random_layer(torch.Size(shape), kernel_size)
    x = torch.randn(4, *shape, dtype=torch.float64)
    z, _ = layer(x)

    assert torch.allclose(layer.inverse(z), x, atol=1e-8)


def test_inverse_matches_dense_solve() -> None:
    shape = torch.Size([3, 4, 5])
    layer = random_layer(shape)
    lower, upper = layer.kernels()
    matrix = conv_matrix(upper, shape, 1) @ conv_matrix(lower, shape, 1)
    z = torch.randn(2, *shape, dtype=torch.float64)
    y = (z - layer.bias.view(-1, 1, 1)).flatten(1)
    expected = torch.linalg.solve(matrix, y.T).T.reshape(z.shape)

    assert torch.allclose(layer.inverse(z), expected, atol=1e-10)


def test_initialization_near_identity() -> None:
    layer = EmergingConv2d(4, 3)
    lower, upper = layer.kernels()
    dirac = torch.nn.init.dirac_(torch.empty_like(lower))

    assert (lower - dirac).abs().max() < 0.01
    assert (upper - dirac).abs().max() < 0.01
    assert (lower - dirac).abs().max() > 0.0
    assert torch.equal(layer.weight_lower.detach(), lower.detach())


def test_even_kernel_rejected() -> None:
    with pytest.raises(ValueError, match="kernel_size must be a positive odd integer"):
        EmergingConv2d(2, 4)

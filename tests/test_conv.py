import pytest
import torch
from helpers import jacobian_logabsdet

from snf_core import ExactConv2d, Flow, SelfNormalizingConv2d
from snf_core.conv import conv_matrix, flip_kernel, kernel_multiple
from snf_core.flow import StandardNormal

SHAPE = torch.Size([2, 4, 5])


def random_layer(layer_class: type, kernel_size: int = 3) -> torch.nn.Module:
    layer = layer_class(SHAPE[0], kernel_size).double()

    with torch.no_grad():
        layer.weight.add_(0.2 * torch.randn_like(layer.weight))
        layer.bias.normal_()

    return layer


def centre_tap_kernels(channels: int, kernel_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return kernels w and r with only the centre tap non-zero and T(r) = T(w)^-1."""

    matrix = torch.eye(channels, dtype=torch.float64) + 0.4 * torch.randn(
        channels, channels, dtype=torch.float64
    )
    centre = kernel_size // 2
    weight = torch.zeros(channels, channels, kernel_size, kernel_size, dtype=torch.float64)
    inverse = torch.zeros_like(weight)
    weight[:, :, centre, centre] = matrix
    inverse[:, :, centre, centre] = torch.linalg.inv(matrix)

    return weight, inverse


@pytest.mark.parametrize("kernel_size", [1, 3, 5])
def test_kernel_multiple_counts_matrix_entries(kernel_size: int) -> None:
    channels = SHAPE[0]
    padding = kernel_size // 2
    multiple = kernel_multiple(
        torch.Size([channels, channels, kernel_size, kernel_size]), SHAPE, padding
    )
    counts = torch.zeros_like(multiple)

    for index in torch.cartesian_prod(*(torch.arange(n) for n in multiple.shape)):
        kernel = torch.zeros_like(multiple)
        kernel[tuple(index)] = 1.0
        counts[tuple(index)] = torch.count_nonzero(conv_matrix(kernel, SHAPE, padding))

    assert torch.equal(multiple, counts)


def test_logdet_term_matches_frobenius_gradient() -> None:
    """For any kernels, flip(r) * m is the gradient of <T(w), T(r)^T> with T(r) held fixed."""

    layer = SelfNormalizingConv2d(SHAPE[0], 3).double()

    with torch.no_grad():
        layer.weight.normal_()
        layer.inverse_weight.normal_()

    x = torch.randn(4, *SHAPE, dtype=torch.float64)
    _, logabsdet, _ = layer.train_forward(x)
    logabsdet.sum().backward()

    weight = layer.weight.detach().clone().requires_grad_()
    inverse = layer.inverse_weight.detach().clone().requires_grad_()
    product_w = (conv_matrix(weight, SHAPE, 1) * conv_matrix(inverse.detach(), SHAPE, 1).T).sum()
    product_r = (conv_matrix(inverse, SHAPE, 1) * conv_matrix(weight.detach(), SHAPE, 1).T).sum()
    product_w.backward()
    product_r.backward()

    # The placeholder's upstream gradient is 1 per sample, so the term is scaled by N / 2.
    assert torch.allclose(layer.weight.grad, 0.5 * 4 * weight.grad, atol=1e-10)
    assert torch.allclose(layer.inverse_weight.grad, -0.5 * 4 * inverse.grad, atol=1e-10)


@pytest.mark.parametrize("kernel_size", [1, 3])
def test_self_normalizing_gradient_exact_inverse(kernel_size: int) -> None:
    channels = SHAPE[0]
    layer = SelfNormalizingConv2d(channels, kernel_size).double()
    weight, inverse = centre_tap_kernels(channels, kernel_size)

    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.inverse_weight.copy_(inverse)
        layer.bias.normal_()

    x = torch.randn(6, *SHAPE, dtype=torch.float64)
    Flow([layer], SHAPE, reconstruction_weight=0.0).loss(x).backward()

    weight.requires_grad_()
    inverse.requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()
    padding = kernel_size // 2
    matrix_w = conv_matrix(weight, SHAPE, padding)
    matrix_r = conv_matrix(inverse, SHAPE, padding)
    flat = x.flatten(1)
    flat_bias = bias.repeat_interleave(SHAPE[1] * SHAPE[2])
    base = StandardNormal((flat.shape[1],))
    log_p_f = base.log_prob(flat @ matrix_w.T + flat_bias) + torch.linalg.slogdet(matrix_w)[1]
    z_g = torch.linalg.solve(matrix_r, flat.T).T + flat_bias
    log_p_g = base.log_prob(z_g) - torch.linalg.slogdet(matrix_r)[1]
    (-0.5 * log_p_f - 0.5 * log_p_g).mean().backward()

    assert torch.allclose(layer.weight.grad, weight.grad, atol=1e-10)
    assert torch.allclose(layer.inverse_weight.grad, inverse.grad, atol=1e-10)
    assert torch.allclose(layer.bias.grad, bias.grad, atol=1e-10)


def test_reconstruction_gradient_matches_autograd() -> None:
    layer = random_layer(SelfNormalizingConv2d)

    with torch.no_grad():
        layer.inverse_weight.add_(0.1 * torch.randn_like(layer.inverse_weight))

    x = torch.randn(3, *SHAPE, dtype=torch.float64, requires_grad=True)
    _, _, error = layer.train_forward(x)
    (2.5 * error.mean()).backward()

    weight = layer.weight.detach().clone().requires_grad_()
    inverse = layer.inverse_weight.detach().clone().requires_grad_()
    h = x.detach()
    conv = torch.nn.functional.conv2d
    reference = (conv(conv(h, weight, padding=1), inverse, padding=1) - h).square()
    (2.5 * reference.sum(dim=(1, 2, 3)).mean()).backward()

    assert torch.allclose(layer.weight.grad, weight.grad, atol=1e-10)
    assert torch.allclose(layer.inverse_weight.grad, inverse.grad, atol=1e-10)
    assert torch.count_nonzero(x.grad) == 0


def test_data_gradient_matches_autograd() -> None:
    """The gradient passed to the layer's input is the usual one of the convolution."""

    layer = random_layer(SelfNormalizingConv2d)
    x = torch.randn(3, *SHAPE, dtype=torch.float64, requires_grad=True)
    z, _, _ = layer.train_forward(x)
    (z.square().sum() / 2).backward()

    x_reference = x.detach().clone().requires_grad_()
    z_reference = torch.nn.functional.conv2d(x_reference, layer.weight, layer.bias, padding=1)
    (z_reference.square().sum() / 2).backward()

    assert torch.allclose(x.grad, x_reference.grad, atol=1e-12)


@pytest.mark.parametrize("layer_class", [ExactConv2d, SelfNormalizingConv2d])
def test_logabsdet_matches_jacobian(layer_class: type) -> None:
    layer = random_layer(layer_class)
    x = torch.randn(2, *SHAPE, dtype=torch.float64)
    _, logabsdet = layer(x)

    assert torch.allclose(logabsdet, jacobian_logabsdet(layer, x), atol=1e-9)


def test_exact_logabsdet_differentiable() -> None:
    layer = random_layer(ExactConv2d)
    layer.logabsdet(SHAPE).backward()

    weight = layer.weight.detach().clone().requires_grad_()
    torch.linalg.slogdet(conv_matrix(weight, SHAPE, 1))[1].backward()

    assert torch.allclose(layer.weight.grad, weight.grad, atol=1e-10)


@pytest.mark.parametrize("layer_class", [ExactConv2d, SelfNormalizingConv2d])
def test_inverse_exact_round_trip(layer_class: type) -> None:
    layer = random_layer(layer_class)
    x = torch.randn(3, *SHAPE, dtype=torch.float64)
    z, _ = layer(x)

    assert torch.allclose(layer.inverse_exact(z), x, atol=1e-9)


def test_learned_inverse_round_trip() -> None:
    layer = SelfNormalizingConv2d(SHAPE[0], 3).double()
    weight, inverse = centre_tap_kernels(SHAPE[0], 3)

    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.inverse_weight.copy_(inverse)

    x = torch.randn(3, *SHAPE, dtype=torch.float64)

    assert torch.allclose(layer.inverse(layer(x)[0]), x, atol=1e-10)


def test_initialization_dirac_plus_noise() -> None:
    layer = SelfNormalizingConv2d(4, 3)
    dirac = torch.nn.init.dirac_(torch.empty_like(layer.weight))
    noise = layer.weight.detach() - dirac

    assert noise.abs().max() < 0.01
    assert noise.abs().max() > 0.0
    assert torch.equal(layer.inverse_weight.detach(), flip_kernel(layer.weight.detach()))


def test_even_kernel_rejected() -> None:
    with pytest.raises(ValueError, match="kernel_size must be a positive odd integer"):
        SelfNormalizingConv2d(2, 4)

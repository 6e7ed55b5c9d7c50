import pytest
import torch
from helpers import jacobian_logabsdet

from snf_core import SmoothLeakyReLU


def test_logabsdet_matches_jacobian() -> None:
    activation = SmoothLeakyReLU(alpha=0.3)
    x = 3.0 * torch.randn(4, 6, dtype=torch.float64)
    _, logabsdet = activation(x)

    assert torch.allclose(logabsdet, jacobian_logabsdet(activation, x), atol=1e-12)


@pytest.mark.parametrize("scale", [0.1, 3.0, 30.0])
def test_inverse_round_trip(scale: float) -> None:
    activation = SmoothLeakyReLU(alpha=0.3, tolerance=1e-12)
    x = scale * torch.randn(500, dtype=torch.float64).view(50, 10)
    y, _ = activation(x)

    assert torch.allclose(activation.inverse(y), x, atol=1e-9)


def test_inverse_meets_tolerance_float32() -> None:
    activation = SmoothLeakyReLU(alpha=0.3, tolerance=1e-5)
    x = 5.0 * torch.randn(100, 784)
    y, _ = activation(x)
    residual = activation(activation.inverse(y))[0] - y

    assert residual.abs().max() <= 1e-5


def test_inverse_warns_without_convergence() -> None:
    activation = SmoothLeakyReLU(alpha=0.3, tolerance=1e-14, max_iterations=1)
    y = torch.linspace(-5.0, 5.0, 11, dtype=torch.float64).view(1, -1)

    with pytest.warns(RuntimeWarning, match="stopped after 1 Newton iterations"):
        activation.inverse(y)


def test_alpha_out_of_range_rejected() -> None:
    with pytest.raises(ValueError, match="alpha must lie in"):
        SmoothLeakyReLU(alpha=1.5)

import pytest
import torch
from helpers import jacobian_logabsdet

from snf_core.spline import RationalQuadraticSpline

SHAPE = (2, 3, 3)
BOUND = 3.0


def random_spline() -> RationalQuadraticSpline:
    """Return a float64 spline whose parameters are far from the identity."""

    return RationalQuadraticSpline(SHAPE, bins=5, bound=BOUND, init_std=1.0).double()


def test_spline_shapes() -> None:
    layer = RationalQuadraticSpline(SHAPE, bins=5)
    x = torch.randn(4, *SHAPE)
    y, logabsdet = layer(x)

    assert layer.unconstrained_widths.shape == (*SHAPE, 5)
    assert layer.unconstrained_heights.shape == (*SHAPE, 5)
    assert layer.unconstrained_derivatives.shape == (*SHAPE, 4)
    assert y.shape == x.shape
    assert logabsdet.shape == (4,)
    assert layer.inverse(y).shape == x.shape


def test_spline_logabsdet_matches_jacobian() -> None:
    layer = random_spline()

    # A standard deviation of 2 puts about 13% of the inputs outside [-3, 3], on the tails.
    x = 2.0 * torch.randn(3, *SHAPE, dtype=torch.float64)
    _, logabsdet = layer(x)

    assert (x.abs() > BOUND).any()
    assert (x.abs() < BOUND).any()
    assert torch.allclose(logabsdet, jacobian_logabsdet(layer, x), atol=1e-10)


def test_spline_is_not_identity_when_random() -> None:
    layer = random_spline()
    x = torch.linspace(-2.0, 2.0, 18, dtype=torch.float64).view(1, *SHAPE)
    y, _ = layer(x)

    assert (y - x).abs().max() > 0.1


@pytest.mark.parametrize("region", ["inside", "outside"])
def test_spline_round_trip(region: str) -> None:
    layer = random_spline()
    magnitude = 0.99 * BOUND * torch.rand(5, *SHAPE, dtype=torch.float64)

    if region == "outside":
        magnitude = magnitude + 1.01 * BOUND

    x = magnitude * torch.randn(5, *SHAPE, dtype=torch.float64).sign()
    y, _ = layer(x)

    assert torch.allclose(layer.inverse(y), x, rtol=0.0, atol=1e-6)


def test_spline_tails_are_identity() -> None:
    layer = random_spline()
    x = torch.full((2, *SHAPE), 1.5 * BOUND, dtype=torch.float64)
    x[1] = -x[1]
    y, logabsdet = layer(x)

    assert torch.equal(y, x)
    assert torch.equal(layer.inverse(x), x)
    assert torch.equal(logabsdet, torch.zeros(2, dtype=torch.float64))


def test_spline_continuous_at_bound() -> None:
    layer = random_spline()
    step = 1e-7
    x = torch.tensor([BOUND - step, BOUND + step], dtype=torch.float64)
    x = x.view(2, 1, 1, 1).expand(2, *SHAPE).contiguous()
    y, _ = layer(x)

    assert torch.allclose(y[0], y[1], rtol=0.0, atol=1e-6)


def test_spline_identity_at_initialization() -> None:
    layer = RationalQuadraticSpline(SHAPE).double()
    x = 4.0 * torch.randn(8, *SHAPE, dtype=torch.float64)
    y, logabsdet = layer(x)
    features = torch.Size(SHAPE).numel()

    # With noise of std 0.01 on the parameters, a (1, 28, 28) spline at bound 10 moved
    # inputs by at most 0.2 and had slopes within exp(±0.08) on a grid of 2001 inputs.
    assert torch.allclose(y, x, rtol=0.0, atol=0.03 * layer.bound)
    assert logabsdet.abs().max() < 0.1 * features


def test_spline_exact_identity_without_noise() -> None:
    layer = RationalQuadraticSpline(SHAPE, init_std=0.0).double()
    x = 4.0 * torch.randn(8, *SHAPE, dtype=torch.float64)
    y, logabsdet = layer(x)

    assert torch.allclose(y, x, rtol=0.0, atol=1e-12)
    assert logabsdet.abs().max() < 1e-12


def test_spline_gradient_matches_finite_difference() -> None:
    layer = random_spline()
    x = 2.0 * torch.randn(4, *SHAPE, dtype=torch.float64)
    parameter = layer.unconstrained_heights
    index = (1, 2, 0, 3)

    def loss() -> torch.Tensor:
        y, logabsdet = layer(x)

        return y.square().sum() + logabsdet.sum()

    loss().backward()
    analytic = parameter.grad[index].item()

    step = 1e-6
    with torch.no_grad():
        parameter[index] += step
        upper = loss().item()
        parameter[index] -= 2.0 * step
        lower = loss().item()

    numeric = (upper - lower) / (2.0 * step)

    assert analytic != 0.0
    assert analytic == pytest.approx(numeric, rel=1e-6, abs=1e-8)


def test_spline_gradient_reaches_all_parameters() -> None:
    layer = random_spline()
    x = 2.0 * torch.randn(4, *SHAPE, dtype=torch.float64)
    y, logabsdet = layer(x)
    (y.square().sum() + logabsdet.sum()).backward()

    assert layer.unconstrained_widths.grad.abs().sum() > 0.0
    assert layer.unconstrained_heights.grad.abs().sum() > 0.0
    assert layer.unconstrained_derivatives.grad.abs().sum() > 0.0


def test_spline_rejects_wrong_input_shape() -> None:
    layer = RationalQuadraticSpline(SHAPE)

    with pytest.raises(ValueError, match="shape"):
        layer(torch.randn(4, 3, 3, 3))


@pytest.mark.parametrize(
    "arguments",
    [{"shape": ()}, {"shape": (2, 0, 3)}, {"bins": 0}, {"bound": 0.0}, {"min_slope": 1.0}],
)
def test_spline_rejects_invalid_arguments(arguments: dict) -> None:
    arguments = {"shape": SHAPE} | arguments

    with pytest.raises(ValueError):
        RationalQuadraticSpline(**arguments)

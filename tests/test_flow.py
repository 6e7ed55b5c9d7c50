import torch

from snf_core import ExactLinear, Flow, SelfNormalizingLinear, SmoothLeakyReLU


def small_flow() -> Flow:
    first = SelfNormalizingLinear(2).double()
    second = ExactLinear(2).double()

    with torch.no_grad():
        first.weight.copy_(torch.tensor([[1.2, 0.4], [-0.3, 0.8]]))
        first.bias.copy_(torch.tensor([0.2, -0.1]))
        second.weight.copy_(torch.tensor([[0.9, -0.5], [0.2, 1.1]]))

    return Flow([first, SmoothLeakyReLU(alpha=0.3), second], (2,))


def test_density_integrates_to_one() -> None:
    flow = small_flow()
    axis = torch.linspace(-12.0, 12.0, 801, dtype=torch.float64)
    grid = torch.cartesian_prod(axis, axis)
    cell = (axis[1] - axis[0]) ** 2

    with torch.no_grad():
        mass = flow.log_prob(grid).exp().sum() * cell

    assert abs(mass.item() - 1.0) < 1e-3


def test_exact_sampling_inverts_forward() -> None:
    flow = small_flow()
    flow.layers[1].tolerance = 1e-12
    z = torch.randn(20, 2, dtype=torch.float64)
    x = flow.inverse(z, exact=True)

    with torch.no_grad():
        assert torch.allclose(flow(x)[0], z, atol=1e-9)


def test_sample_shapes_and_learned_inverse() -> None:
    flow = small_flow()

    with torch.no_grad():
        flow.layers[0].inverse_weight.copy_(torch.linalg.inv(flow.layers[0].weight))

    generator = torch.Generator().manual_seed(3)
    learned = flow.sample(7, generator=generator)
    generator.manual_seed(3)
    exact = flow.sample(7, exact=True, generator=generator)

    assert learned.shape == (7, 2)
    assert torch.allclose(learned, exact, atol=1e-4)


def test_loss_value_leaves_out_self_normalizing_logdet() -> None:
    flow = small_flow()
    flow.reconstruction_weight = 0.0
    x = torch.randn(4, 2, dtype=torch.float64)
    snf_logabsdet = flow.layers[0].logabsdet()

    with torch.no_grad():
        exact_nll = -flow.log_prob(x).mean()

    assert torch.isclose(flow.loss(x).detach(), exact_nll + snf_logabsdet)


def test_log_prob_gradient_is_exact() -> None:
    """Differentiating log_prob of a self-normalizing flow gives the exact gradient."""

    layer = SelfNormalizingLinear(4).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    (-Flow([layer], (4,)).log_prob(x).mean()).backward()

    weight = layer.weight.detach().clone().requires_grad_()
    z = x @ weight.T + layer.bias.detach()
    nll = 0.5 * z.square().sum(dim=1) - torch.linalg.slogdet(weight)[1]
    nll.mean().backward()

    assert torch.allclose(layer.weight.grad, weight.grad, atol=1e-10)

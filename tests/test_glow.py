from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from helpers import jacobian_logabsdet

from snf_core import Flow, Squeeze
from snf_core.flow import StandardNormal
from snf_core.glow import (
    ActNorm,
    AffineCoupling,
    InvertibleConv1x1,
    SelfNormalizingConv1x1,
    Split,
    glow_flow,
)

SHAPE = torch.Size([4, 3, 3])
HIDDEN = 8

LAYERS: dict[str, Callable[[], torch.nn.Module]] = {
    "actnorm": lambda: ActNorm(4),
    "conv1x1": lambda: InvertibleConv1x1(4),
    "snf_conv1x1": lambda: SelfNormalizingConv1x1(4),
    "coupling": lambda: AffineCoupling(4, HIDDEN),
    "split": lambda: Split([ActNorm(2), InvertibleConv1x1(2), AffineCoupling(2, HIDDEN)]),
    "split_snf": lambda: Split([ActNorm(2), SelfNormalizingConv1x1(2), AffineCoupling(2, HIDDEN)]),
}


def perturb_(module: torch.nn.Module, scale: float = 0.1) -> None:
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(scale * torch.randn_like(parameter))


def random_layer(name: str) -> torch.nn.Module:
    """Build a float64 layer, initialize its actnorms on a batch, then perturb every weight,
    so that the zero-initialized coupling outputs and R = W^-1 no longer hold."""

    layer = LAYERS[name]().double()

    with torch.no_grad():
        layer(2.0 * torch.randn(8, *SHAPE, dtype=torch.float64) + 1.0)

    perturb_(layer)

    return layer


def small_glow(self_normalizing: bool) -> Flow:
    """Build a float64 flow with blocks=2, steps=2, hidden=8 on (1, 8, 8), actnorms initialized."""

    flow = glow_flow(self_normalizing, blocks=2, steps=2, hidden=HIDDEN, shape=(1, 8, 8)).double()

    with torch.no_grad():
        flow(torch.randn(16, 1, 8, 8, dtype=torch.float64))

    return flow


def perturb_couplings_(flow: Flow) -> None:
    for module in flow.modules():
        if isinstance(module, AffineCoupling):
            perturb_(module)


@pytest.mark.parametrize("name", list(LAYERS))
def test_logabsdet_matches_jacobian(name: str) -> None:
    layer = random_layer(name)
    x = torch.randn(2, *SHAPE, dtype=torch.float64)
    _, logabsdet = layer(x)

    assert torch.allclose(logabsdet, jacobian_logabsdet(layer, x), atol=1e-9)


@pytest.mark.parametrize("name", list(LAYERS))
def test_exact_inverse_round_trip(name: str) -> None:
    layer = random_layer(name)
    x = torch.randn(3, *SHAPE, dtype=torch.float64)

    with torch.no_grad():
        z, _ = layer(x)
        inverse = layer.inverse_exact if hasattr(layer, "inverse_exact") else layer.inverse

        assert torch.allclose(inverse(z), x, atol=1e-10)


@pytest.mark.parametrize("name", ["actnorm", "coupling", "split"])
def test_inverse_round_trip(name: str) -> None:
    layer = random_layer(name)
    x = torch.randn(3, *SHAPE, dtype=torch.float64)

    with torch.no_grad():
        assert torch.allclose(layer.inverse(layer(x)[0]), x, atol=1e-10)


def test_actnorm_data_dependent_init() -> None:
    layer = ActNorm(3)
    x = torch.randn(16, 3, 5, 5) * torch.tensor([0.5, 2.0, 4.0]).view(1, 3, 1, 1) + 3.0

    with torch.no_grad():
        z, _ = layer(x)

    mean = z.mean(dim=(0, 2, 3))
    variance = z.var(dim=(0, 2, 3), unbiased=False)

    assert torch.allclose(mean, torch.zeros(3), atol=1e-5)
    assert torch.allclose(variance, torch.ones(3), atol=1e-4)


def test_actnorm_initializes_once() -> None:
    layer = ActNorm(3)

    with torch.no_grad():
        layer(torch.randn(8, 3, 4, 4))
        log_scale = layer.log_scale.clone()
        layer(5.0 * torch.randn(8, 3, 4, 4))

    assert torch.equal(layer.log_scale, log_scale)


def test_actnorm_loaded_state_not_reinitialized() -> None:
    source = ActNorm(3)

    with torch.no_grad():
        source(torch.randn(8, 3, 4, 4) + 2.0)

    target = ActNorm(3)
    target.load_state_dict(source.state_dict())

    with torch.no_grad():
        target(torch.randn(8, 3, 4, 4))

    assert torch.equal(target.bias, source.bias)


def test_snf_conv_logabsdet_matches_dense() -> None:
    layer = random_layer("snf_conv1x1")
    dense = torch.linalg.slogdet(layer.weight_matrix(SHAPE))[1]

    assert torch.allclose(layer.logabsdet(SHAPE), dense, atol=1e-10)


def test_snf_conv_orthogonal_init() -> None:
    layer = SelfNormalizingConv1x1(6)
    matrix = layer.weight.detach()[:, :, 0, 0]
    inverse = layer.inverse_weight.detach()[:, :, 0, 0]

    assert torch.allclose(matrix @ matrix.T, torch.eye(6), atol=1e-5)
    assert torch.equal(inverse, matrix.T)


def test_exact_conv_orthogonal_init() -> None:
    matrix = InvertibleConv1x1(6).weight.detach()[:, :, 0, 0]

    assert torch.allclose(matrix @ matrix.T, torch.eye(6), atol=1e-5)


def test_snf_conv_gradient_exact_inverse() -> None:
    """With R = W^-1 and no reconstruction, the modified gradient is the exact one."""

    channels, height, width = SHAPE
    layer = SelfNormalizingConv1x1(channels).double()
    matrix = torch.eye(channels, dtype=torch.float64) + 0.4 * torch.randn(
        channels, channels, dtype=torch.float64
    )

    with torch.no_grad():
        layer.weight.copy_(matrix[:, :, None, None])
        layer.inverse_weight.copy_(torch.linalg.inv(matrix)[:, :, None, None])
        layer.bias.normal_()

    x = torch.randn(6, *SHAPE, dtype=torch.float64)
    Flow([layer], SHAPE, reconstruction_weight=0.0).loss(x).backward()

    weight = layer.weight.detach().clone().requires_grad_()
    inverse = layer.inverse_weight.detach().clone().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()
    pixels = height * width
    base = StandardNormal(SHAPE)
    z_f = F.conv2d(x, weight, bias)
    log_p_f = base.log_prob(z_f) + pixels * torch.linalg.slogdet(weight[:, :, 0, 0])[1]
    inverse_of_r = torch.linalg.inv(inverse[:, :, 0, 0])[:, :, None, None]
    z_g = F.conv2d(x, inverse_of_r, bias)
    log_p_g = base.log_prob(z_g) - pixels * torch.linalg.slogdet(inverse[:, :, 0, 0])[1]
    (-0.5 * log_p_f - 0.5 * log_p_g).mean().backward()

    assert torch.allclose(layer.weight.grad, weight.grad, atol=1e-10)
    assert torch.allclose(layer.inverse_weight.grad, inverse.grad, atol=1e-10)
    assert torch.allclose(layer.bias.grad, bias.grad, atol=1e-10)


def test_snf_conv_learned_inverse_at_init() -> None:
    # W is orthogonal to float32 precision, so R = W^T inverts it to about 1e-7.
    layer = SelfNormalizingConv1x1(4).double()
    x = torch.randn(3, *SHAPE, dtype=torch.float64)

    with torch.no_grad():
        assert torch.allclose(layer.inverse(layer(x)[0]), x, atol=1e-5)


def test_split_logabsdet_is_inner() -> None:
    split = random_layer("split")
    x = torch.randn(3, *SHAPE, dtype=torch.float64)

    with torch.no_grad():
        z, logabsdet = split(x)
        h = x[:, 2:]
        inner_logabsdet = torch.zeros(3, dtype=torch.float64)

        for layer in split.layers:
            h, ladj = layer(h)
            inner_logabsdet = inner_logabsdet + ladj

    assert torch.equal(z[:, :2], x[:, :2])
    assert torch.allclose(z[:, 2:], h)
    assert torch.allclose(logabsdet, inner_logabsdet)


def test_split_train_forward_sums_errors() -> None:
    split = random_layer("split_snf")
    x = torch.randn(3, *SHAPE, dtype=torch.float64)
    z, _, reconstruction = split.train_forward(x)

    with torch.no_grad():
        _, _, inner_error = split.layers[1].train_forward(split.layers[0](x[:, 2:])[0])

    assert torch.allclose(z, split(x)[0])
    assert torch.allclose(reconstruction, inner_error)
    assert torch.all(reconstruction > 0.0)


def test_split_train_forward_without_snf() -> None:
    split = random_layer("split")
    x = torch.randn(3, *SHAPE, dtype=torch.float64)
    z, logabsdet, reconstruction = split.train_forward(x)

    assert torch.allclose(z, split(x)[0])
    assert torch.allclose(logabsdet, split(x)[1])
    assert torch.equal(reconstruction, torch.zeros(3, dtype=torch.float64))


def test_split_rejects_reshaping_layers() -> None:
    with pytest.raises(ValueError, match="must keep the shape"):
        Split([Squeeze()])(torch.randn(2, 4, 4, 4))


@pytest.mark.parametrize("self_normalizing", [False, True])
def test_glow_log_prob_matches_jacobian(self_normalizing: bool) -> None:
    flow = small_glow(self_normalizing)
    perturb_(flow, scale=0.05)
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64)

    with torch.no_grad():
        log_prob = flow.log_prob(x)
        z, _ = flow(x)

    reference = flow.base.log_prob(z) + jacobian_logabsdet(flow, x)

    assert torch.allclose(log_prob, reference, atol=1e-8)


@pytest.mark.parametrize("self_normalizing", [False, True])
def test_glow_samples_agree_at_init(self_normalizing: bool) -> None:
    flow = small_glow(self_normalizing)
    perturb_couplings_(flow)
    generator = torch.Generator().manual_seed(3)
    learned = flow.sample(5, generator=generator)
    generator.manual_seed(3)
    exact = flow.sample(5, exact=True, generator=generator)

    assert learned.shape == (5, 1, 8, 8)
    assert exact.shape == (5, 1, 8, 8)

    # The 1x1 weights start orthogonal to float32 precision, so R = W^T matches W^-1 to ~1e-7.
    assert torch.allclose(learned, exact, atol=1e-5)


@pytest.mark.parametrize("self_normalizing", [False, True])
def test_glow_exact_round_trip(self_normalizing: bool) -> None:
    flow = small_glow(self_normalizing)
    perturb_(flow, scale=0.05)
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)

    with torch.no_grad():
        z, _ = flow(x)

    assert z.shape == (3, 16, 2, 2)
    assert torch.allclose(flow.inverse(z, exact=True), x, atol=1e-9)


@pytest.mark.parametrize("self_normalizing", [False, True])
def test_glow_adam_step(self_normalizing: bool) -> None:
    flow = glow_flow(self_normalizing, blocks=2, steps=2, hidden=HIDDEN, shape=(1, 8, 8))
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-3)
    x = torch.randn(8, 1, 8, 8)
    conv = flow.layers[2]
    before = conv.weight.detach().clone()

    loss = flow.loss(x)
    loss.backward()
    optimizer.step()

    assert torch.isfinite(loss)
    assert conv.weight.grad is not None
    assert not torch.equal(conv.weight.detach(), before)


def test_snf_glow_trains_inverse_weights() -> None:
    flow = glow_flow(True, blocks=2, steps=2, hidden=HIDDEN, shape=(1, 8, 8))
    flow.loss(torch.randn(8, 1, 8, 8)).backward()
    convs = [module for module in flow.modules() if isinstance(module, SelfNormalizingConv1x1)]

    assert len(convs) == 4
    assert all(conv.inverse_weight.grad is not None for conv in convs)


@pytest.mark.parametrize("self_normalizing", [False, True])
def test_glow_reconstruction_weight(self_normalizing: bool) -> None:
    flow = glow_flow(self_normalizing, blocks=2, steps=2, hidden=HIDDEN, shape=(1, 8, 8))

    assert flow.reconstruction_weight == (100.0 if self_normalizing else 0.0)


def test_glow_full_size_structure() -> None:
    flow = glow_flow(False)
    actnorms = [module for module in flow.modules() if isinstance(module, ActNorm)]
    splits = [module for module in flow.modules() if isinstance(module, Split)]

    assert flow.latent_shape == (16, 7, 7)
    assert len(actnorms) == 32
    assert len(splits) == 1
    assert [actnorm.log_scale.numel() for actnorm in actnorms] == [4] * 16 + [8] * 16


def test_glow_three_blocks_round_trip() -> None:
    flow = glow_flow(False, blocks=3, steps=1, hidden=HIDDEN, shape=(1, 8, 8)).double()
    perturb_(flow, scale=0.05)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)

    with torch.no_grad():
        z, _ = flow(x)

    assert z.shape == (2, 64, 1, 1)
    assert torch.allclose(flow.inverse(z), x, atol=1e-9)


def test_glow_rejects_indivisible_shape() -> None:
    with pytest.raises(ValueError, match="divisible by 2\\*\\*blocks = 4"):
        glow_flow(False, shape=(1, 6, 6))

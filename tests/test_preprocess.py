import math

import torch
from helpers import jacobian_logabsdet

from snf_core import Flow, LogitTransform, SelfNormalizingLinear, bits_per_dim, dequantize
from snf_core.data import load_embedded_mnist


def test_logit_logabsdet_matches_jacobian() -> None:
    transform = LogitTransform()
    x = dequantize(torch.randint(0, 256, (3, 10)).double())
    _, logabsdet = transform(x)

    assert torch.allclose(logabsdet, jacobian_logabsdet(transform, x), atol=1e-8)


def test_logit_inverse_round_trip() -> None:
    transform = LogitTransform()
    x = dequantize(torch.randint(0, 256, (4, 10)).double())

    assert torch.allclose(transform.inverse(transform(x)[0]), x, atol=1e-8)


def test_preprocessing_logabsdet_counted_in_log_prob() -> None:
    layer = SelfNormalizingLinear(10).double()
    transform = LogitTransform()
    x = dequantize(torch.randint(0, 256, (5, 10)).double())
    y, preprocess_logabsdet = transform(x)

    with torch.no_grad():
        with_preprocessing = Flow([transform, layer], (10,)).log_prob(x)
        without = Flow([layer], (10,)).log_prob(y)

    assert torch.allclose(with_preprocessing - without, preprocess_logabsdet, atol=1e-9)


def test_preprocessing_logabsdet_on_embedded_digits() -> None:
    """Keller et al. measured the preprocessing steps at 272.7 nats per MNIST image."""

    images, _ = load_embedded_mnist()
    generator = torch.Generator().manual_seed(0)
    _, logabsdet = LogitTransform()(dequantize(images.double().flatten(1), generator))

    assert abs(logabsdet.mean().item() - 272.7) < 0.05 * 272.7


def test_bits_per_dim() -> None:
    nll = torch.tensor(784 * math.log(2.0))

    assert torch.isclose(bits_per_dim(nll, 784), torch.tensor(1.0))

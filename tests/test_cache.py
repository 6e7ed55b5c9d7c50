import pytest
import torch

from snf_core import ExactConv2d, ExactLinear, SelfNormalizingConv2d, SelfNormalizingLinear
from snf_core.cache import WeightCache, fingerprint
from snf_core.glow import InvertibleConv1x1, SelfNormalizingConv1x1

LAYERS = {
    "exact-linear": (lambda: ExactLinear(6), (6,)),
    "snf-linear": (lambda: SelfNormalizingLinear(6), (6,)),
    "exact-conv": (lambda: ExactConv2d(2, 3), (2, 4, 4)),
    "snf-conv": (lambda: SelfNormalizingConv2d(2, 3), (2, 4, 4)),
    "conv1x1": (lambda: InvertibleConv1x1(4), (4, 3, 3)),
    "snf-conv1x1": (lambda: SelfNormalizingConv1x1(4), (4, 3, 3)),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_logabsdet_follows_fused_adam(name: str) -> None:
    """Fused Adam changes weights in place without bumping their version counter; the
    cached log-abs-det must still follow the new weights."""

    make, shape = LAYERS[name]
    layer = make()
    x = torch.randn(3, *shape)
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.1, fused=True)

    with torch.no_grad():
        before = layer(x)[1]

    for parameter in layer.parameters():
        parameter.grad = torch.randn_like(parameter)

    version = layer.weight._version
    optimizer.step()

    with torch.no_grad():
        after = layer(x)[1]

    fresh = make()
    fresh.load_state_dict(layer.state_dict())

    with torch.no_grad():
        expected = fresh(x)[1]

    assert layer.weight._version == version
    assert not torch.allclose(after, before)
    assert torch.allclose(after, expected)


def test_cache_reuses_value_for_same_weight() -> None:
    weight = torch.randn(4, 4)
    cache = WeightCache()
    calls = []

    def compute(matrix: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return torch.linalg.slogdet(matrix)[1]

    cache.get(weight, compute)
    cache.get(weight, compute)

    assert len(calls) == 1


def test_fingerprint_sees_swapped_entries() -> None:
    weight = torch.arange(6.0).reshape(2, 3)
    swapped = weight.flatten()[[1, 0, 2, 3, 4, 5]].reshape(2, 3)

    assert fingerprint(weight) != fingerprint(swapped)

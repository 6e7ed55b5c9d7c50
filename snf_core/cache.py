"""A cache of values computed from a weight, valid until the weight changes."""

from typing import Callable

import torch
from torch import Tensor


def fingerprint(weight: Tensor) -> list[float]:
    """Return three float64 sums of the weight's values: plain, squared and position-weighted.

    Computing them is :math:`O(D^2)` for a :math:`D \\times D` weight, far below the
    :math:`O(D^3)` factorizations that the cache saves, and on a GPU it costs one host sync.
    """

    flat = weight.detach().flatten().double()
    positions = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device)
    sums = torch.stack((flat.sum(), flat.square().sum(), (flat * positions).sum()))

    return sums.tolist()


class WeightCache:
    """Cache one value per weight version.

    The key is the weight's storage pointer, dtype, device and any extra key of the caller,
    such as an input shape, plus a fingerprint of its values. The in-place version counter
    alone is not enough: torch's fused Adam (``torch.optim.Adam(fused=True)``, torch 2.14)
    updates parameters without incrementing it. The value is computed without autograd, so
    it is for evaluation, not for training.
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._value: Tensor | None = None

    def get(
        self, weight: Tensor, compute: Callable[[Tensor], Tensor], extra: tuple = ()
    ) -> Tensor:
        key = (weight.data_ptr(), weight.dtype, weight.device, *extra, *fingerprint(weight))

        if key != self._key or self._value is None:
            with torch.no_grad():
                self._value = compute(weight.detach())
            self._key = key

        return self._value

    def clear(self) -> None:
        self._key = None
        self._value = None

"""A cache of values computed from a weight, valid until the weight changes."""

from typing import Callable

import torch
from torch import Tensor


class WeightCache:
    """Cache one value per weight version.

    The key is the weight's storage pointer and its in-place version counter, which every
    optimizer step and every ``copy_`` under ``torch.no_grad()`` increments, plus any extra
    key of the caller, such as an input shape. The value is computed without autograd, so it
    is for evaluation, not for training.
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._value: Tensor | None = None

    def get(
        self, weight: Tensor, compute: Callable[[Tensor], Tensor], extra: tuple = ()
    ) -> Tensor:
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device, *extra)

        if key != self._key or self._value is None:
            with torch.no_grad():
                self._value = compute(weight.detach())
            self._key = key

        return self._value

    def clear(self) -> None:
        self._key = None
        self._value = None

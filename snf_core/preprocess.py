r"""MNIST preprocessing as flow steps whose log-abs-det counts in the likelihood.

Pixels :math:`x \in \{0, \dots, 255\}` are dequantized with uniform noise to
:math:`[0, 256)`, scaled to :math:`[0, 1)`, squeezed to :math:`[\delta, 1 - \delta]` and
mapped through the logit. The negative log-likelihood of the dequantized image under the
whole flow is then in nats per image of 0-255 pixels, an upper bound on the discrete one.
"""

import math

import torch
import torch.nn as nn
from torch import Tensor


def dequantize(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Add uniform noise on :math:`[0, 1)` to integer pixel values."""

    noise = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)

    return x + noise


class LogitTransform(nn.Module):
    r"""Map dequantized pixels in :math:`[0, 256)` to the real line.

    :math:`y = \mathrm{logit}(\delta + (1 - 2\delta) x / 256)`, with the per-sample
    log-abs-det of every step.

    Arguments:
        delta: The margin :math:`\delta` that keeps the logit finite at 0 and 256.
        levels: The number of pixel levels, 256 for 8-bit images.
    """

    def __init__(self, delta: float = 1e-6, levels: int = 256) -> None:
        super().__init__()

        self.delta = delta
        self.levels = levels

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        scale = (1.0 - 2.0 * self.delta) / self.levels
        p = self.delta + scale * x
        y = torch.log(p) - torch.log1p(-p)

        # d logit(p)/dp = 1 / (p (1 - p)), and dp/dx = scale.
        logabsdet = math.log(scale) - torch.log(p) - torch.log1p(-p)

        return y, logabsdet.flatten(1).sum(dim=1)

    def inverse(self, y: Tensor) -> Tensor:
        scale = (1.0 - 2.0 * self.delta) / self.levels

        return (torch.sigmoid(y) - self.delta) / scale


def bits_per_dim(nll: Tensor, features: int) -> Tensor:
    """Convert a negative log-likelihood in nats per image to bits per dimension."""

    return nll / (features * math.log(2.0))

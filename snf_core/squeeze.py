"""Squeeze: trade spatial resolution for channels, a volume-preserving reshape."""

import torch.nn as nn
from torch import Tensor


class Squeeze(nn.Module):
    r"""Move each 2×2 spatial block into channels: :math:`(C, H, W) \to (4C, H/2, W/2)`.

    A permutation of the inputs, so its log-abs-det is zero.
    """

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        n, c, h, w = x.shape

        if h % 2 or w % 2:
            raise ValueError(f"Squeeze needs an even height and width, got {h}x{w}")

        z = x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
        z = z.reshape(n, 4 * c, h // 2, w // 2)

        return z, x.new_zeros(n)

    def inverse(self, z: Tensor) -> Tensor:
        n, c, h, w = z.shape
        x = z.view(n, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)

        return x.reshape(n, c // 4, 2 * h, 2 * w)

r"""Elementwise invertible activations."""

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


class SmoothLeakyReLU(nn.Module):
    r"""Smooth Leaky ReLU :math:`y = \alpha x + (1 - \alpha) \log(1 + e^x)`.

    Its slope :math:`\alpha + (1 - \alpha) \sigma(x)` lies in :math:`(\alpha, 1)`, so the map
    is a bijection of the real line. There is no closed-form inverse: :meth:`inverse` runs
    Newton's method from an upper bound of the root, which converges monotonically because
    the map is increasing and convex.

    Arguments:
        alpha: The slope for :math:`x \to -\infty`, in :math:`(0, 1)`.
        tolerance: The largest absolute error :math:`|y(x) - y|` accepted by the inverse.
        max_iterations: The Newton iterations after which the inverse warns and stops.

    References:
        Relative gradient optimization of the Jacobian term in unsupervised deep learning
        (Gresele, Fissore, Javaloy, Schölkopf and Hyvärinen, 2020)
        https://arxiv.org/abs/2006.15090
    """

    def __init__(
        self, alpha: float = 0.3, tolerance: float = 1e-5, max_iterations: int = 100
    ) -> None:
        super().__init__()

        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must lie in (0, 1), got {alpha}")

        self.alpha = alpha
        self.tolerance = tolerance
        self.max_iterations = max_iterations

    def _map(self, x: Tensor) -> Tensor:
        return self.alpha * x + (1.0 - self.alpha) * F.softplus(x)

    def _slope(self, x: Tensor) -> Tensor:
        return self.alpha + (1.0 - self.alpha) * torch.sigmoid(x)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logabsdet = torch.log(self._slope(x)).flatten(1).sum(dim=1)

        return self._map(x), logabsdet

    @torch.no_grad()
    def inverse(self, y: Tensor) -> Tensor:
        # softplus(x) >= max(x, 0), so y(y) >= y for y > 0 and y(y / alpha) >= y for y <= 0:
        # both starts lie right of the root, where Newton steps on a convex map stay.
        x = torch.where(y > 0, y, y / self.alpha)

        for _ in range(self.max_iterations):
            residual = self._map(x) - y

            if residual.abs().max() <= self.tolerance:
                return x

            x = x - residual / self._slope(x)

        warnings.warn(
            f"SmoothLeakyReLU.inverse stopped after {self.max_iterations} Newton iterations "
            f"with a residual of {residual.abs().max().item():.3g}, above the tolerance "
            f"{self.tolerance}; raise max_iterations or the tolerance",
            RuntimeWarning,
            stacklevel=2,
        )

        return x

r"""Convolution exponential: :math:`z = \exp(M) x + b` with :math:`M` a convolution.

With zero padding that keeps the shape, the diagonal of the convolution matrix :math:`M` is
the centre tap :math:`m_{cc}` of each channel, :math:`H W` times each, so
:math:`\log |\det \exp(M)| = \operatorname{tr} M = H W \sum_c m_{cc}`: exact, :math:`O(C)`
and the same for every sample. The map and its inverse are power series of convolutions.

References:
    The Convolution Exponential and Generalized Sylvester Flows (Hoogeboom, Garcia Satorras,
    Tomczak and Welling, 2020) https://arxiv.org/abs/2006.01910
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from snf_core.conv import _check_kernel_size


def operator_norm_bound(kernel: Tensor) -> Tensor:
    r"""Return an upper bound on the spectral norm of the convolution with ``kernel``.

    The convolution is :math:`\sum_t S_t \otimes k_t` over the taps :math:`t`, where each
    zero-padded shift :math:`S_t` has norm at most 1, so its norm is at most
    :math:`\sum_t \|k_t\|_2`, the sum of the :math:`C \times C` tap matrices' largest singular
    values. The bound holds for every input size and costs :math:`K^2` singular value
    decompositions of :math:`C \times C` matrices. On inputs of at least :math:`K \times K`
    pixels every tap matrix is a block of the convolution matrix, so the bound is at most
    :math:`K^2` times the true norm.
    """

    taps = kernel.permute(2, 3, 0, 1).flatten(0, 1)

    return torch.linalg.matrix_norm(taps, ord=2).sum()


def conv_exponential(
    x: Tensor, kernel: Tensor, padding: int, terms: int, tolerance: float
) -> tuple[Tensor, int]:
    r"""Apply :math:`\exp(M) x = \sum_k M^k x / k!` for the convolution :math:`M` with ``kernel``.

    The series stops after the first term :math:`M^k x / k!` whose norm is at most
    ``tolerance`` times the norm of :math:`x`, for every sample, or after ``terms`` terms.
    If :math:`\|M\|_2 \le c` and the series stops at term :math:`k`, the terms left out sum to
    at most :math:`c / (k + 1 - c)` times the last one. Each term is one convolution,
    :math:`O(N C^2 K^2 H W)`, and the tolerance test reads one value back to the host.

    Returns:
        The result and the number of convolutions applied.
    """

    threshold = tolerance * x.detach().flatten(1).norm(dim=1)
    result = x
    term = x

    for k in range(1, terms + 1):
        term = F.conv2d(term, kernel, padding=padding) / k
        result = result + term

        if bool((term.detach().flatten(1).norm(dim=1) <= threshold).all()):
            return result, k

    return result, terms


class ConvExponential2d(nn.Module):
    r"""Convolution exponential layer :math:`z = \exp(M) x + b`, trained with the exact gradient.

    :math:`M` is the convolution with the kernel :math:`m` of :meth:`kernel`, the parameter
    ``weight`` scaled down so that a bound on :math:`\|M\|_2` stays at most ``max_norm``:
    :math:`m = v \min(1, c / \beta(v))` with :math:`\beta` of :func:`operator_norm_bound`.
    The scaling is part of the graph, so gradients reach :math:`v` through it. Unlike a power
    iteration estimate of the norm, :math:`\beta` is a guaranteed bound, so
    :math:`\|M^k x / k!\| \le c^k / k! \, \|x\|`. With :math:`c = 0.95` the float64 machine
    epsilon is reached by the 18th term, so the default ``terms=20`` is only a safeguard.

    The log-abs-det is :math:`\operatorname{tr} M` of the untruncated exponential. The
    inverse is the series of :math:`\exp(-M)`. Each direction costs one convolution per
    term, and :attr:`last_terms` stores how many the latest call used. ``weight`` starts as
    Xavier-normal noise of gain 0.01, so the layer starts near the identity.

    Arguments:
        channels: The number of channels :math:`C`.
        kernel_size: The odd kernel size :math:`K`.
        terms: The maximum number of powers of :math:`M` in each series.
        tolerance: The series stops once a term's norm is at most this fraction of the
            input's norm, for every sample. ``None`` means the machine epsilon of the
            input's dtype.
        max_norm: The bound :math:`c` on the spectral norm of :math:`M`.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 3,
        terms: int = 20,
        tolerance: float | None = None,
        max_norm: float = 0.95,
    ) -> None:
        super().__init__()

        if terms < 1:
            raise ValueError(f"terms must be a positive number of series terms, got {terms}")

        if max_norm <= 0.0:
            raise ValueError(f"max_norm must be a positive bound on the norm of M, got {max_norm}")

        self.padding = _check_kernel_size(kernel_size)
        self.terms = terms
        self.tolerance = tolerance
        self.max_norm = max_norm
        self.last_terms = 0

        weight = torch.empty(channels, channels, kernel_size, kernel_size)
        self.weight = nn.Parameter(nn.init.xavier_normal_(weight, gain=0.01))
        self.bias = nn.Parameter(torch.zeros(channels))

    def kernel(self) -> Tensor:
        """Return the kernel :math:`m` of :math:`M`, ``weight`` scaled to the norm bound."""

        bound = operator_norm_bound(self.weight)
        scale = torch.clamp(self.max_norm / bound, max=1.0)

        return self.weight * scale

    def logabsdet(self, shape: torch.Size) -> Tensor:
        """Return :math:`\\operatorname{tr} M` for inputs of shape :math:`(C, H, W)`."""

        return self._trace(self.kernel(), shape)

    def _trace(self, kernel: Tensor, shape: torch.Size) -> Tensor:
        centre = self.padding

        return shape[1] * shape[2] * kernel[:, :, centre, centre].diagonal().sum()

    def _series(self, x: Tensor, kernel: Tensor) -> Tensor:
        if self.tolerance is None:
            tolerance = torch.finfo(x.dtype).eps
        else:
            tolerance = self.tolerance

        result, self.last_terms = conv_exponential(x, kernel, self.padding, self.terms, tolerance)

        return result

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        kernel = self.kernel()
        z = self._series(x, kernel) + self.bias.view(-1, 1, 1)

        return z, self._trace(kernel, x.shape[1:]).expand(x.shape[0])

    def inverse(self, z: Tensor) -> Tensor:
        """Map back with the series of :math:`\\exp(-M)`."""

        return self._series(z - self.bias.view(-1, 1, 1), -self.kernel())

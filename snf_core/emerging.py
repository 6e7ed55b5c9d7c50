r"""Emerging convolution: two masked autoregressive convolutions with a triangular Jacobian.

Order the features of one sample in raster order: pixels row by row, left to right, and the
channels of a pixel together, so feature :math:`(h, w, c)` has index :math:`(h W + w) C + c`.
Take a kernel that keeps only the taps before the centre, and at the centre only the input
channels :math:`i \le o` of each output channel :math:`o`. Its convolution is then lower
triangular, and its diagonal is the centre diagonal :math:`w_{cc}`, repeated at each of the
:math:`H W` pixels. The mirror mask gives an upper triangular convolution. Their composition
mixes each pixel with a :math:`(2K - 1) \times (2K - 1)` neighbourhood.

References:
    Emerging Convolutions for Generative Normalizing Flows (Hoogeboom, van den Berg and
    Welling, 2019) https://arxiv.org/abs/1901.11137
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from snf_core.conv import _check_kernel_size, dirac_init_


def lower_mask(channels: int, kernel_size: int) -> Tensor:
    """Return the 0/1 mask of a kernel whose convolution is lower triangular in raster order.

    The mask keeps the taps before the centre in raster order and, at the centre, the input
    channels :math:`i \\le o` of each output channel :math:`o`. Flipping it along all four
    dimensions gives the upper triangular mask.
    """

    centre = kernel_size // 2
    mask = torch.zeros(channels, channels, kernel_size, kernel_size)
    mask.view(channels, channels, -1)[:, :, : centre * kernel_size + centre] = 1.0
    mask[:, :, centre, centre] = torch.ones(channels, channels).tril()

    return mask


def _wavefront_schedule(
    height: int, width: int, kernel_size: int, device: torch.device
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Group the pixels of a causal solve into steps whose pixels are independent.

    A causal tap reads a pixel one or more rows up and at most ``r = kernel_size // 2``
    columns right, or one in the same row to the left. So pixel :math:`(h, w)` only needs
    pixels of a smaller step :math:`(r + 1) h + w`, and one step solves all pixels that share
    it: :math:`(r + 1)(H - 1) + W` steps instead of :math:`H W`.

    Each step is ``(taps, centres, pixels)``: the flat indices of the causal taps of each
    pixel, of shape ``(S, T)``, and of the pixel itself, in the zero-padded image and in the
    unpadded one.
    """

    radius = kernel_size // 2
    padded_width = width + 2 * radius
    causal = torch.arange(radius * kernel_size + radius, device=device)
    tap_rows = causal // kernel_size
    tap_cols = causal % kernel_size

    rows, cols = torch.meshgrid(
        torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij"
    )
    rows, cols = rows.flatten(), cols.flatten()

    # Without spatial taps every pixel only depends on itself, so one step solves them all.
    if radius == 0:
        step = torch.zeros_like(rows)
    else:
        step = (radius + 1) * rows + cols

    schedule = []

    for t in range(int(step.max()) + 1):
        h = rows[step == t]
        w = cols[step == t]
        taps = (h[:, None] + tap_rows) * padded_width + (w[:, None] + tap_cols)
        centres = (h + radius) * padded_width + (w + radius)
        schedule.append((taps, centres, h * width + w))

    return schedule


def causal_solve(
    y: Tensor, kernel: Tensor, schedule: list[tuple[Tensor, Tensor, Tensor]]
) -> Tensor:
    r"""Solve :math:`k \star x = y` for a kernel with the lower triangular mask.

    Back-substitution in raster order, one wavefront of independent pixels per step (see
    :func:`_wavefront_schedule`) and the whole batch at once. The work is that of one
    convolution, :math:`O(N C^2 K^2 H W)`, but it runs as :math:`(r + 1)(H - 1) + W`
    sequential steps of a few small kernels each, so latency, not arithmetic, dominates.

    Arguments:
        y: The output :math:`(N, C, H, W)`.
        kernel: A kernel :math:`(C, C, K, K)` with :func:`lower_mask` applied and a non-zero
            centre diagonal.
        schedule: The steps of :func:`_wavefront_schedule` for this shape.
    """

    n, channels, height, width = y.shape
    kernel_size = kernel.shape[-1]
    radius = kernel_size // 2
    causal = radius * kernel_size + radius

    # With L the centre's lower triangular channel matrix and A the causal taps, each pixel
    # solves x_p = L^-1 y_p - (L^-1 A) x_past, so L^-1 is applied to all of y up front.
    centre = kernel[:, :, radius, radius]
    identity = torch.eye(channels, dtype=y.dtype, device=y.device)
    centre_inverse = torch.linalg.solve_triangular(centre, identity, upper=False)
    taps = kernel.flatten(2)[:, :, :causal].permute(0, 2, 1).reshape(channels, -1)
    taps = centre_inverse @ taps
    y = torch.einsum("oi,nip->npo", centre_inverse, y.flatten(2))

    # Channels last, so that the gathered taps of a pixel are one contiguous row.
    padded = y.new_zeros(n, (height + 2 * radius) * (width + 2 * radius), channels)

    for tap_index, centre_index, pixel_index in schedule:
        past = padded[:, tap_index].flatten(2)
        padded[:, centre_index] = y[:, pixel_index] - past @ taps.T

    padded = padded.view(n, height + 2 * radius, width + 2 * radius, channels)
    x = padded[:, radius : radius + height, radius : radius + width]

    return x.permute(0, 3, 1, 2).contiguous()


class EmergingConv2d(nn.Module):
    r"""Emerging convolution :math:`z = u \star (l \star x) + b`, trained with the exact gradient.

    :math:`l` and :math:`u` are :math:`K \times K` kernels with the lower and upper triangular
    masks, so :math:`\log |\det J| = H W \sum_c (\log |l_{cc}| + \log |u_{cc}|)` over the
    centre taps, exact, :math:`O(C)` and the same for every sample. A forward pass is two
    convolutions, :math:`O(N C^2 K^2 H W)`.

    The inverse solves the two triangular systems by back-substitution (see
    :func:`causal_solve`), :math:`(r + 1)(H - 1) + W` sequential steps each with
    :math:`r = K / 2` rounded down. Both kernels start as the identity at the centre plus
    Xavier-normal noise of gain 0.01, masked.

    Note:
        The layer is invertible only while every centre diagonal tap is non-zero. Nothing
        keeps them away from zero during training, where the log-abs-det tends to
        :math:`-\infty`.

    Arguments:
        channels: The number of channels :math:`C`.
        kernel_size: The odd kernel size :math:`K` of each masked convolution.
    """

    def __init__(self, channels: int, kernel_size: int = 3) -> None:
        super().__init__()

        self.padding = _check_kernel_size(kernel_size)
        self.kernel_size = kernel_size

        mask = lower_mask(channels, kernel_size)
        self.register_buffer("mask_lower", mask, persistent=False)
        self.register_buffer("mask_upper", mask.flip(0, 1, 2, 3), persistent=False)

        shape = (channels, channels, kernel_size, kernel_size)
        self.weight_lower = nn.Parameter(dirac_init_(torch.empty(shape)) * self.mask_lower)
        self.weight_upper = nn.Parameter(dirac_init_(torch.empty(shape)) * self.mask_upper)
        self.bias = nn.Parameter(torch.zeros(channels))

        self._schedules: dict[tuple, list[tuple[Tensor, Tensor, Tensor]]] = {}

    def kernels(self) -> tuple[Tensor, Tensor]:
        """Return the masked lower and upper kernels."""

        return self.weight_lower * self.mask_lower, self.weight_upper * self.mask_upper

    def logabsdet(self, shape: torch.Size) -> Tensor:
        """Return the exact log-abs-det for inputs of shape :math:`(C, H, W)`, with gradient."""

        centre = self.padding
        lower = self.weight_lower[:, :, centre, centre].diagonal()
        upper = self.weight_upper[:, :, centre, centre].diagonal()
        pixels = shape[1] * shape[2]

        return pixels * (lower.abs().log().sum() + upper.abs().log().sum())

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        lower, upper = self.kernels()
        y = F.conv2d(x, lower, padding=self.padding)
        z = F.conv2d(y, upper, self.bias, padding=self.padding)

        return z, self.logabsdet(x.shape[1:]).expand(x.shape[0])

    def inverse(self, z: Tensor) -> Tensor:
        """Invert by two sequential triangular solves; see :func:`causal_solve` for the cost."""

        lower, upper = self.kernels()
        key = (z.shape[2], z.shape[3], z.device)

        if key not in self._schedules:
            self._schedules[key] = _wavefront_schedule(*key[:2], self.kernel_size, z.device)

        schedule = self._schedules[key]
        y = z - self.bias.view(-1, 1, 1)

        # Reversing the channels and both spatial axes turns the upper triangular convolution
        # into a lower triangular one with the kernel flipped along all four dimensions.
        y = causal_solve(y.flip(1, 2, 3), upper.flip(0, 1, 2, 3), schedule).flip(1, 2, 3)

        return causal_solve(y, lower, schedule)

r"""Glow-like multi-scale flows: actnorm, invertible 1×1 convolutions and affine couplings.

A step of flow is actnorm, then an invertible 1×1 convolution, then an affine coupling, on
inputs of shape :math:`(N, C, H, W)`. The exact model uses :class:`InvertibleConv1x1`, the
self-normalizing model :class:`SelfNormalizingConv1x1`. :func:`glow_flow` stacks the steps
into blocks separated by squeezes and splits.

References:
    Glow: Generative Flow with Invertible 1x1 Convolutions (Kingma and Dhariwal, 2018)
    https://arxiv.org/abs/1807.03039

    Self Normalizing Flows (Keller, Peters, Jaini, Hoogeboom, Forré and Welling, 2020)
    https://arxiv.org/abs/2011.07248
"""

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from snf_core.cache import WeightCache
from snf_core.conv import SelfNormalizingConv2d, flip_kernel
from snf_core.flow import Flow, train_forward_layers
from snf_core.squeeze import Squeeze


def orthogonal_kernel(channels: int) -> Tensor:
    """Return a random orthogonal :math:`C \\times C` matrix as a 1×1 kernel."""

    matrix = nn.init.orthogonal_(torch.empty(channels, channels))

    return matrix.view(channels, channels, 1, 1)


def _matrix(kernel: Tensor) -> Tensor:
    return kernel[:, :, 0, 0]


def _kernel_logabsdet(kernel: Tensor, height: int, width: int) -> Tensor:
    """Return :math:`H W \\log |\\det W|` of a 1×1 kernel, an :math:`O(C^3)` factorization."""

    return height * width * torch.linalg.slogdet(_matrix(kernel))[1]


def _inverse_kernel(kernel: Tensor) -> Tensor:
    # inv_ex skips the singularity check of inv, which waits for the GPU on every call, so a
    # singular weight gives non-finite values instead of an error.
    inverse, _ = torch.linalg.inv_ex(_matrix(kernel))

    return inverse[:, :, None, None]


class ActNorm(nn.Module):
    r"""Per-channel affine map :math:`z = x e^{s} + b` with data-dependent initialization.

    The first call of :meth:`forward` sets :math:`s` and :math:`b` so that the output on its
    batch has zero mean and unit variance per channel, over the batch and spatial positions. The
    log-abs-det is :math:`H W \sum_c s_c` per sample.

    Note:
        :meth:`inverse` before any forward call maps with the identity, because the
        statistics are not known yet.

    Arguments:
        channels: The number of channels :math:`C`.
        eps: Added to the standard deviation so that constant channels get a finite scale.
    """

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()

        self.log_scale = nn.Parameter(torch.zeros(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

        # A buffer, so that a loaded state dict does not initialize again. The Python flag
        # spares reading the buffer, a host-device sync on GPUs, on every call.
        self.register_buffer("initialized", torch.tensor(False))
        self._initialized = False

    def _load_from_state_dict(self, *args: object, **kwargs: object) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._initialized = False

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Set the scale and bias from the batch ``x`` and mark the layer initialized."""

        mean = x.mean(dim=(0, 2, 3))
        std = x.std(dim=(0, 2, 3), unbiased=False)
        log_scale = -torch.log(std + self.eps)

        self.log_scale.copy_(log_scale)
        self.bias.copy_(-mean * log_scale.exp())
        self.initialized.fill_(True)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if not self._initialized:
            if not self.initialized:
                self.initialize(x)

            self._initialized = True

        z = x * self.log_scale.exp().view(-1, 1, 1) + self.bias.view(-1, 1, 1)
        logabsdet = x.shape[2] * x.shape[3] * self.log_scale.sum()

        return z, logabsdet.expand(x.shape[0])

    def inverse(self, z: Tensor) -> Tensor:
        return (z - self.bias.view(-1, 1, 1)) * (-self.log_scale).exp().view(-1, 1, 1)


class InvertibleConv1x1(nn.Module):
    r"""Invertible 1×1 convolution :math:`z = W x` at each pixel, trained with the exact
    gradient.

    The log-abs-det is :math:`H W \log |\det W|`, an :math:`O(C^3)` factorization of the
    :math:`C \times C` weight. While autograd records, it is computed inside the graph, and
    otherwise it is cached per weight version without gradient. There is no bias, because the
    actnorm before it has one.

    Arguments:
        channels: The number of channels :math:`C`. The weight starts as a random orthogonal
            matrix.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()

        self.weight = nn.Parameter(orthogonal_kernel(channels))
        self._logabsdet = WeightCache()

    def logabsdet(self, height: int, width: int) -> Tensor:
        """Return :math:`H W \\log |\\det W|`."""

        if torch.is_grad_enabled() and self.weight.requires_grad:
            return _kernel_logabsdet(self.weight, height, width)

        def compute(weight: Tensor) -> Tensor:
            return _kernel_logabsdet(weight, height, width)

        return self._logabsdet.get(self.weight, compute, extra=(height, width))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = F.conv2d(x, self.weight)

        return z, self.logabsdet(x.shape[2], x.shape[3]).expand(x.shape[0])

    def inverse_exact(self, z: Tensor) -> Tensor:
        """Convolve with :math:`W^{-1}`, an :math:`O(C^3)` inversion per call.

        Note:
            The inverse is not cached, as in Glow's reference code, so every sample pays
            for one inversion per layer, also when the weight has not changed.
        """

        return F.conv2d(z, _inverse_kernel(self.weight))

    def inverse(self, z: Tensor) -> Tensor:
        return self.inverse_exact(z)


class SelfNormalizingConv1x1(SelfNormalizingConv2d):
    r"""Self-normalizing 1×1 convolution with a learned inverse :math:`R \approx W^{-1}`.

    :meth:`train_forward` and :meth:`inverse` are those of :class:`SelfNormalizingConv2d`
    with ``kernel_size=1``. The exact log-abs-det and the exact inverse use the
    :math:`C \times C` weight, :math:`O(C^3)`, instead of the dense :math:`C H W` square
    matrix of the parent, whose :meth:`weight_matrix` is kept for reference.

    Arguments:
        channels: The number of channels :math:`C`. The weight :math:`W` starts as a random
            orthogonal matrix and :math:`R` as :math:`W^T = W^{-1}`.
    """

    def __init__(self, channels: int) -> None:
        super().__init__(channels, kernel_size=1)

        with torch.no_grad():
            self.weight.copy_(orthogonal_kernel(channels))
            self.inverse_weight.copy_(flip_kernel(self.weight))

    def logabsdet(self, shape: torch.Size) -> Tensor:
        """Return :math:`H W \\log |\\det W|`: inside the autograd graph while autograd
        records a weight that requires grad, else cached per weight version and shape."""

        height, width = shape[1], shape[2]

        if torch.is_grad_enabled() and self.weight.requires_grad:
            return _kernel_logabsdet(self.weight, height, width)

        def compute(weight: Tensor) -> Tensor:
            return _kernel_logabsdet(weight, height, width)

        return self._logabsdet.get(self.weight, compute, extra=tuple(shape))

    def inverse_exact(self, z: Tensor) -> Tensor:
        """Convolve with :math:`W^{-1}` after removing the bias, an :math:`O(C^3)` inversion
        per call."""

        return F.conv2d(z - self.bias.view(-1, 1, 1), _inverse_kernel(self.weight))


class AffineCoupling(nn.Module):
    r"""Glow's affine coupling layer.

    The first :math:`\lfloor C/2 \rfloor` channels pass unchanged and condition the rest:
    :math:`z_2 = (x_2 + t) \odot \sigma(u + 2)`, where the shift :math:`t` and the raw
    log-scale :math:`u` come from a 3×3 convolution, ReLU, 1×1 convolution, ReLU and a
    zero-initialized 3×3 convolution of :math:`x_1`. The offset of 2 makes the initial scale
    :math:`\sigma(2) \approx 0.88`, and the sigmoid bounds it by 1, which Glow's reference
    code does for stability. The log-abs-det is :math:`\sum \log \sigma(u + 2)`.

    Note:
        The hidden convolutions have biases where Glow's code puts actnorm, and the last
        convolution lacks the learned output scale of Glow's zero-initialized convolution.

    Arguments:
        channels: The number of channels :math:`C`, at least 2.
        hidden: The channels of the two hidden layers.
    """

    def __init__(self, channels: int, hidden: int = 512) -> None:
        super().__init__()

        if channels < 2:
            raise ValueError(
                f"AffineCoupling needs at least 2 channels to split, got channels={channels}"
            )

        self.identity_channels = channels // 2
        transformed = channels - self.identity_channels
        last = nn.Conv2d(hidden, 2 * transformed, 3, padding=1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

        self.net = nn.Sequential(
            nn.Conv2d(self.identity_channels, hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 1),
            nn.ReLU(),
            last,
        )

    def _shift_and_raw_scale(self, identity: Tensor) -> tuple[Tensor, Tensor]:
        shift, raw = self.net(identity).chunk(2, dim=1)

        return shift, raw + 2.0

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        identity, transformed = x[:, : self.identity_channels], x[:, self.identity_channels :]
        shift, raw = self._shift_and_raw_scale(identity)
        z = (transformed + shift) * torch.sigmoid(raw)

        return torch.cat([identity, z], dim=1), F.logsigmoid(raw).sum(dim=(1, 2, 3))

    def inverse(self, z: Tensor) -> Tensor:
        identity, transformed = z[:, : self.identity_channels], z[:, self.identity_channels :]
        shift, raw = self._shift_and_raw_scale(identity)
        x = transformed / torch.sigmoid(raw) - shift

        return torch.cat([identity, x], dim=1)


class Split(nn.Module):
    r"""Factor out the first :math:`\lfloor C/2 \rfloor` channels and transform the rest.

    The first half passes unchanged to the output, where the flow's standard normal base
    models it. The inner layers map the second half and must keep its shape, so the output
    has the input's shape. Layers with ``train_forward`` or ``inverse_exact`` use them in
    :meth:`train_forward` and :meth:`inverse_exact`.

    Arguments:
        layers: The inner layers, data side first.
    """

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        super().__init__()

        self.layers = nn.ModuleList(layers)

    @staticmethod
    def _halves(x: Tensor) -> tuple[Tensor, Tensor]:
        channels = x.shape[1]

        if channels < 2:
            raise ValueError(f"Split needs at least 2 channels, got an input of shape {x.shape}")

        return x[:, : channels // 2], x[:, channels // 2 :]

    @staticmethod
    def _join(factored: Tensor, h: Tensor, shape: torch.Size) -> Tensor:
        if h.shape != shape:
            raise ValueError(
                f"Split's inner layers must keep the shape {tuple(shape)} of the second half, "
                f"got {tuple(h.shape)}. Put squeezes outside the split"
            )

        return torch.cat([factored, h], dim=1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        factored, h = self._halves(x)
        shape = h.shape
        logabsdet = x.new_zeros(x.shape[0])

        for layer in self.layers:
            h, ladj = layer(h)
            logabsdet = logabsdet + ladj

        return self._join(factored, h, shape), logabsdet

    def train_forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Map ``x`` as in ``Flow.loss`` and return the output, the summed log-abs-det
        (placeholders for self-normalizing layers) and the summed reconstruction error."""

        factored, h = self._halves(x)
        shape = h.shape
        h, logabsdet, reconstruction = train_forward_layers(self.layers, h)

        return self._join(factored, h, shape), logabsdet, reconstruction

    def inverse(self, z: Tensor) -> Tensor:
        factored, h = self._halves(z)

        for layer in reversed(self.layers):
            h = layer.inverse(h)

        return torch.cat([factored, h], dim=1)

    def inverse_exact(self, z: Tensor) -> Tensor:
        factored, h = self._halves(z)

        for layer in reversed(self.layers):
            h = layer.inverse_exact(h) if hasattr(layer, "inverse_exact") else layer.inverse(h)

        return torch.cat([factored, h], dim=1)


def glow_step(channels: int, hidden: int, self_normalizing: bool) -> list[nn.Module]:
    """Return one step of flow: actnorm, invertible 1×1 convolution, affine coupling."""

    conv = SelfNormalizingConv1x1(channels) if self_normalizing else InvertibleConv1x1(channels)

    return [ActNorm(channels), conv, AffineCoupling(channels, hidden)]


def glow_flow(
    self_normalizing: bool,
    blocks: int = 2,
    steps: int = 16,
    hidden: int = 512,
    shape: Sequence[int] = (1, 28, 28),
) -> Flow:
    r"""Build the Glow-like multi-scale flow of Keller et al., exact or self-normalizing.

    Each of the ``blocks`` blocks is a squeeze and ``steps`` steps of flow, and a split
    factors out half of the channels between blocks. The base is standard normal for all
    variables, the factored-out ones included, where Glow learns a conditional prior.

    Glow squeezes the continuing half after its split. Here each squeeze acts on the whole
    tensor, and the split takes the second half of the squeezed channels, which is the squeeze
    of the second half before it because a squeeze maps channel :math:`c` to channels
    :math:`4c` to :math:`4c + 3`. The map is thus Glow's, up to a permutation of the
    factored-out variables, and every layer keeps the batch a single tensor. Block :math:`b`
    (from 0) nests its steps in :math:`b` splits.

    Arguments:
        self_normalizing: Whether to use :class:`SelfNormalizingConv1x1` and a
            reconstruction weight of 100, or :class:`InvertibleConv1x1` and none.
        blocks: The number of blocks :math:`L`.
        steps: The number of steps of flow per block :math:`K`.
        hidden: The channels of the coupling networks' hidden layers. Keller et al. build
            the couplings "as in Glow" and give no width; 512 is the default ``--width`` of
            Glow's reference code (github.com/openai/glow, ``train.py``).
        shape: The data shape :math:`(C, H, W)`, with :math:`H` and :math:`W` divisible by
            :math:`2^L`.

    Returns:
        A :class:`~snf_core.flow.Flow` whose ``latent_shape`` is
        :math:`(4^L C, H / 2^L, W / 2^L)`.
    """

    channels, height, width = shape
    scale = 2**blocks

    if blocks < 1 or steps < 1:
        raise ValueError(f"blocks and steps must be at least 1, got {blocks} and {steps}")

    if height % scale or width % scale:
        raise ValueError(
            f"height and width must be divisible by 2**blocks = {scale} for the squeezes, "
            f"got shape {tuple(shape)}. Pad the images or use fewer blocks"
        )

    layers: list[nn.Module] = []

    for block in range(blocks):
        # The squeezes multiply the channels by 4 per block and each split halves them.
        active = channels * 4 ** (block + 1) // 2**block
        inner: list[nn.Module] = []

        for _ in range(steps):
            inner.extend(glow_step(active, hidden, self_normalizing))

        for _ in range(block):
            inner = [Split(inner)]

        layers.append(Squeeze())
        layers.extend(inner)

    latent_shape = (channels * 4**blocks, height // scale, width // scale)

    return Flow(
        layers,
        shape,
        reconstruction_weight=100.0 if self_normalizing else 0.0,
        latent_shape=latent_shape,
    )

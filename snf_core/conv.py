r"""Convolutional flow layers: exact and self-normalizing.

Both layers map :math:`z = w \star x + b` with a square kernel of odd size, stride 1 and
zero padding that keeps the shape :math:`(N, C, H, W)`. The Jacobian of the map is the
dense :math:`D \times D` matrix :math:`T(w)` of the convolution, with :math:`D = C H W`.

References:
    Self Normalizing Flows (Keller, Peters, Jaini, Hoogeboom, Forré and Welling, 2020)
    https://arxiv.org/abs/2011.07248
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.nn.grad import conv2d_weight

from snf_core.cache import WeightCache


def flip_kernel(kernel: Tensor) -> Tensor:
    """Return the kernel of the transposed convolution: channels swapped, taps mirrored."""

    return kernel.transpose(0, 1).flip(2, 3)


def kernel_multiple(kernel_shape: torch.Size, shape: torch.Size, padding: int) -> Tensor:
    r"""Count how often each kernel element appears in the convolution matrix :math:`T(w)`.

    The count is the weight gradient of a convolution between an all-ones input and an
    all-ones output of one sample, with the same padding as the layer.

    Arguments:
        kernel_shape: The kernel shape :math:`(C, C, K, K)`.
        shape: The input shape :math:`(C, H, W)` of one sample.
        padding: The zero padding on each side.
    """

    ones = torch.ones(1, *shape)

    return conv2d_weight(ones, kernel_shape, ones, padding=padding)


def conv_matrix(kernel: Tensor, shape: torch.Size, padding: int) -> Tensor:
    r"""Return the dense :math:`D \times D` matrix of a convolution on inputs of ``shape``.

    Column :math:`j` is the convolution of the :math:`j`-th basis image, so building the
    matrix costs :math:`D` convolutions and :math:`O(D^2)` memory. Autograd flows to
    ``kernel``.
    """

    features = shape.numel()
    basis = torch.eye(features, dtype=kernel.dtype, device=kernel.device).view(-1, *shape)

    return F.conv2d(basis, kernel, padding=padding).view(features, features).T


def dirac_init_(kernel: Tensor, gain: float = 0.01) -> Tensor:
    """Set a kernel to the Dirac delta plus Xavier-normal noise of the given gain."""

    with torch.no_grad():
        nn.init.xavier_normal_(kernel, gain=gain)
        kernel.add_(nn.init.dirac_(torch.empty_like(kernel)))

    return kernel


def _check_kernel_size(kernel_size: int) -> int:
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(
            f"kernel_size must be a positive odd integer so that padding keeps the shape, "
            f"got {kernel_size}"
        )

    return kernel_size // 2


class _ConvFlow(nn.Module):
    """Kernel, bias and the exact quantities shared by both convolutional layers."""

    def __init__(self, channels: int, kernel_size: int) -> None:
        super().__init__()

        self.padding = _check_kernel_size(kernel_size)
        kernel = torch.empty(channels, channels, kernel_size, kernel_size)
        self.weight = nn.Parameter(dirac_init_(kernel))
        self.bias = nn.Parameter(torch.zeros(channels))
        self._logabsdet = WeightCache()

    def weight_matrix(self, shape: torch.Size) -> Tensor:
        """Return the dense matrix of the convolution on inputs of shape :math:`(C, H, W)`."""

        return conv_matrix(self.weight, shape, self.padding)

    def logabsdet(self, shape: torch.Size) -> Tensor:
        """Return the exact :math:`\\log |\\det T(w)|`.

        While autograd records a kernel that requires grad, slogdet of the dense matrix runs
        inside the graph at :math:`O(D^3)`, so that differentiating :meth:`Flow.log_prob`
        gives the exact gradient. Otherwise the value is cached per weight version and shape.
        """

        if torch.is_grad_enabled() and self.weight.requires_grad:
            return torch.linalg.slogdet(self.weight_matrix(shape))[1]

        def compute(weight: Tensor) -> Tensor:
            return torch.linalg.slogdet(conv_matrix(weight, shape, self.padding))[1]

        return self._logabsdet.get(self.weight, compute, extra=tuple(shape))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = F.conv2d(x, self.weight, self.bias, padding=self.padding)

        return z, self.logabsdet(x.shape[1:]).expand(x.shape[0])

    def inverse_exact(self, z: Tensor) -> Tensor:
        """Solve with the dense convolution matrix, :math:`O(D^3)` per call.

        Note:
            The factorization is not cached: during training the kernel changes after every
            step, so a sample drawn between steps pays for it.
        """

        matrix = self.weight_matrix(z.shape[1:])
        y = (z - self.bias.view(-1, 1, 1)).flatten(1)

        return torch.linalg.solve(matrix, y.T).T.reshape(z.shape)


class ExactConv2d(_ConvFlow):
    r"""Convolutional flow layer trained with the exact gradient.

    While autograd records, the log-abs-det is :func:`torch.linalg.slogdet` of the dense
    convolution matrix inside the graph: :math:`O(D^3)` per training step with
    :math:`D = C H W`. The inverse solves with that matrix.

    Arguments:
        channels: The number of channels :math:`C`.
        kernel_size: The odd kernel size :math:`K`.
    """

    def __init__(self, channels: int, kernel_size: int = 3) -> None:
        super().__init__(channels, kernel_size)

    def inverse(self, z: Tensor) -> Tensor:
        return self.inverse_exact(z)


class SelfNormalizingConv2dFunction(torch.autograd.Function):
    r"""Convolution whose backward returns the self-normalizing gradient.

    Inputs are :math:`x` of shape :math:`(N, C, H, W)`, the forward kernel :math:`w`, the
    inverse kernel :math:`r`, the bias and the kernel multiple :math:`m`. Outputs are
    :math:`z = w \star x + b`, a per-sample log-abs-det placeholder of zeros and the
    per-sample reconstruction error :math:`\|r \star (w \star x) - x\|^2`.

    The gradient of :math:`\log |\det T(w)|` with respect to :math:`w` is replaced by
    :math:`\mathrm{flip}(r) \odot m`, and that of :math:`-\log |\det T(r)|` with respect to
    :math:`r` by :math:`-\mathrm{flip}(w) \odot m`, each scaled by the summed upstream
    gradient of the placeholder. The data and reconstruction terms are convolution weight
    gradients, the likelihood terms halved as in the mixture of the forward and inverse
    densities.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: Tensor,
        weight: Tensor,
        inverse_weight: Tensor,
        bias: Tensor,
        multiple: Tensor,
        padding: int,
    ) -> tuple[Tensor, Tensor, Tensor]:
        wx = F.conv2d(x, weight, padding=padding)
        error = F.conv2d(wx, inverse_weight, padding=padding) - x

        ctx.save_for_backward(x, weight, inverse_weight, wx, error, multiple)
        ctx.padding = padding
        ctx.set_materialize_grads(False)

        logabsdet = x.new_zeros(x.shape[0])
        reconstruction = error.square().sum(dim=(1, 2, 3))

        return wx + bias.view(-1, 1, 1), logabsdet, reconstruction

    @staticmethod
    @once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx,
        grad_z: Tensor | None,
        grad_logabsdet: Tensor | None,
        grad_reconstruction: Tensor | None,
    ) -> tuple[Tensor | None, ...]:
        x, weight, inverse_weight, wx, error, multiple = ctx.saved_tensors
        padding = ctx.padding

        if grad_z is None:
            grad_z = torch.zeros_like(wx)

        # With stride 1 and padding k // 2, the input gradient of a convolution is the
        # convolution with the flipped kernel. PyTorch 2.14's convolution_backward takes over
        # ten times longer for this on one-channel inputs on the CPU.
        grad_x = F.conv2d(grad_z, flip_kernel(weight), padding=padding)
        grad_wx = 0.5 * grad_z
        grad_rwx = -0.5 * grad_x

        # The reconstruction error joins the data terms before the two weight gradients.
        if grad_reconstruction is not None:
            error = error * (2.0 * grad_reconstruction).view(-1, 1, 1, 1)
            grad_wx = grad_wx + F.conv2d(error, flip_kernel(inverse_weight), padding=padding)
            grad_rwx = grad_rwx + error

        grad_weight = conv2d_weight(x, weight.shape, grad_wx, padding=padding)
        grad_inverse = conv2d_weight(wx, inverse_weight.shape, grad_rwx, padding=padding)

        if grad_logabsdet is not None:
            scale = 0.5 * grad_logabsdet.sum()
            grad_weight.addcmul_(flip_kernel(inverse_weight) * multiple, scale)
            grad_inverse.addcmul_(flip_kernel(weight) * multiple, -scale)

        grad_bias = grad_z.sum(dim=(0, 2, 3))

        return grad_x, grad_weight, grad_inverse, grad_bias, None, None


class SelfNormalizingConv2d(_ConvFlow):
    r"""Convolutional flow layer with a learned inverse kernel :math:`r`.

    :meth:`forward` gives the exact log-abs-det of the dense convolution matrix, cached per
    weight version. :meth:`inverse` convolves with :math:`r`, :meth:`inverse_exact` solves
    with the dense matrix, and :meth:`train_forward` gives the self-normalizing gradient of
    :class:`SelfNormalizingConv2dFunction`.

    Note:
        The inverse of a convolution is in general not a convolution, so :math:`r` only
        approximates it, and the reconstruction error keeps :math:`w` close to the kernels
        whose inverse is one.

    Arguments:
        channels: The number of channels :math:`C`.
        kernel_size: The odd kernel size :math:`K`.
    """

    def __init__(self, channels: int, kernel_size: int = 3) -> None:
        super().__init__(channels, kernel_size)

        self.inverse_weight = nn.Parameter(flip_kernel(self.weight.detach()).contiguous())
        self._multiple: dict[tuple, Tensor] = {}

    def multiple(self, shape: torch.Size) -> Tensor:
        """Return the kernel multiple :math:`m` for inputs of shape :math:`(C, H, W)`."""

        key = (tuple(shape), self.weight.dtype, self.weight.device)

        if key not in self._multiple:
            multiple = kernel_multiple(self.weight.shape, shape, self.padding)
            self._multiple[key] = multiple.to(dtype=self.weight.dtype, device=self.weight.device)

        return self._multiple[key]

    def train_forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Map ``x`` and return the output, a log-abs-det placeholder of zeros whose
        gradient is the self-normalizing one, and the per-sample reconstruction error."""

        multiple = self.multiple(x.shape[1:])

        return SelfNormalizingConv2dFunction.apply(
            x, self.weight, self.inverse_weight, self.bias, multiple, self.padding
        )

    def inverse(self, z: Tensor) -> Tensor:
        """Map back with the learned inverse kernel, :math:`r \\star (z - b)`."""

        y = z - self.bias.view(-1, 1, 1)

        return F.conv2d(y, self.inverse_weight, padding=self.padding)

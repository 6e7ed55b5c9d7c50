r"""Fully connected flow layers: exact and self-normalizing.

Both layers map :math:`z = W x + b` for inputs of shape :math:`(N, D)` and return the
output with the per-sample log-abs-det :math:`\log |\det W|`.

References:
    Self Normalizing Flows (Keller, Peters, Jaini, Hoogeboom, Forré and Welling, 2020)
    https://arxiv.org/abs/2011.07248
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from snf_core.cache import WeightCache


def identity_init_(weight: Tensor, gain: float = 0.01) -> Tensor:
    """Set a square weight to the identity plus Xavier-normal noise of the given gain."""

    with torch.no_grad():
        nn.init.xavier_normal_(weight, gain=gain)
        weight.add_(torch.eye(weight.shape[0], dtype=weight.dtype, device=weight.device))

    return weight


class _LinearFlow(nn.Module):
    """Weight, bias and the exact quantities shared by both linear layers."""

    def __init__(self, features: int) -> None:
        super().__init__()

        self.features = features
        self.weight = nn.Parameter(identity_init_(torch.empty(features, features)))
        self.bias = nn.Parameter(torch.zeros(features))
        self._logabsdet = WeightCache()

    def logabsdet(self) -> Tensor:
        """Return the exact :math:`\\log |\\det W|`.

        While autograd records a weight that requires grad, slogdet runs inside the graph at
        :math:`O(D^3)`, so that differentiating :meth:`Flow.log_prob` gives the exact gradient.
        Otherwise the value is cached per weight version.
        """

        if torch.is_grad_enabled() and self.weight.requires_grad:
            return torch.linalg.slogdet(self.weight)[1]

        return self._logabsdet.get(self.weight, lambda weight: torch.linalg.slogdet(weight)[1])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = F.linear(x, self.weight, self.bias)

        return z, self.logabsdet().expand(x.shape[0])

    def inverse_exact(self, z: Tensor) -> Tensor:
        """Solve :math:`W x = z - b`, an :math:`O(D^3)` factorization per call.

        Note:
            The factorization is not cached: during training the weight changes after every
            step, so a sample drawn between steps pays for it.
        """

        return torch.linalg.solve(self.weight, (z - self.bias).T).T


class ExactLinear(_LinearFlow):
    r"""Linear flow layer trained with the exact gradient.

    The log-abs-det is :func:`torch.linalg.slogdet` of :math:`W` inside the autograd graph,
    so each training step costs :math:`O(D^3)` for the factorization and
    its backward, on top of the :math:`O(N D^2)` products. The inverse solves with :math:`W`.

    Arguments:
        features: The dimension :math:`D`.
    """

    def inverse(self, z: Tensor) -> Tensor:
        return self.inverse_exact(z)


class SelfNormalizingLinearFunction(torch.autograd.Function):
    r"""Linear map whose backward returns the self-normalizing gradient.

    Inputs are :math:`x` of shape :math:`(N, D)`, the forward weight :math:`W`, the inverse
    weight :math:`R` and the bias :math:`b`. Outputs are :math:`z = W x + b`, a per-sample
    log-abs-det placeholder of zeros and the per-sample reconstruction error
    :math:`\|R W x - x\|^2`.

    In the backward pass, with :math:`g_z` the upstream gradient, :math:`g_x = W^T g_z` and
    :math:`s` the summed gradient of the log-abs-det placeholder, the gradient of
    :math:`\log |\det W|`, which is :math:`W^{-T}`, is replaced by :math:`R^T`:

    .. math:: \nabla_W = \tfrac12 \textstyle\sum_n g_z x^T + \tfrac12 s R^T,
              \quad \nabla_R = -\tfrac12 \textstyle\sum_n g_x (W x)^T - \tfrac12 s W^T

    plus the gradient of the reconstruction error weighted by its upstream gradient, with
    :math:`x` treated as a constant. The reconstruction reuses :math:`W x` from the forward
    pass, so a training step costs six :math:`N \times D \times D` products and no inverse.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: Tensor,
        weight: Tensor,
        inverse_weight: Tensor,
        bias: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        wx = x @ weight.T
        error = torch.addmm(x, wx, inverse_weight.T, beta=-1.0)

        ctx.save_for_backward(x, weight, inverse_weight, wx, error)
        ctx.set_materialize_grads(False)

        logabsdet = x.new_zeros(x.shape[0])
        reconstruction = error.square().sum(dim=1)

        return wx + bias, logabsdet, reconstruction

    @staticmethod
    @once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx,
        grad_z: Tensor | None,
        grad_logabsdet: Tensor | None,
        grad_reconstruction: Tensor | None,
    ) -> tuple[Tensor | None, ...]:
        x, weight, inverse_weight, wx, error = ctx.saved_tensors

        if grad_z is None:
            grad_z = torch.zeros_like(wx)

        grad_x = grad_z @ weight

        # The reconstruction error has d/dW = R^T e x^T and d/dR = e (Wx)^T per sample, so it
        # joins the data terms before the two weight products instead of adding two more.
        if grad_reconstruction is not None:
            error = error * (2.0 * grad_reconstruction).unsqueeze(1)
            grad_wx = torch.add(error @ inverse_weight, grad_z, alpha=0.5)
            grad_rwx = torch.add(error, grad_x, alpha=-0.5)
        else:
            grad_wx = 0.5 * grad_z
            grad_rwx = -0.5 * grad_x

        grad_weight = grad_wx.T @ x
        grad_inverse = grad_rwx.T @ wx

        # The placeholder stands for log|det W| per sample: its exact gradient is s W^-T,
        # replaced by s R^T for W and, symmetrically, by -s W^T for R. In-place addcmul with
        # a 0-dim scale avoids a host sync on GPUs and a temporary D x D tensor.
        if grad_logabsdet is not None:
            scale = 0.5 * grad_logabsdet.sum()
            grad_weight.addcmul_(inverse_weight.T, scale)
            grad_inverse.addcmul_(weight.T, -scale)

        grad_bias = grad_z.sum(dim=0)

        return grad_x, grad_weight, grad_inverse, grad_bias


class SelfNormalizingLinear(_LinearFlow):
    r"""Linear flow layer with a learned inverse :math:`R \approx W^{-1}`.

    :meth:`forward` gives the exact log-abs-det, cached per weight version, :meth:`inverse`
    uses :math:`R`, :meth:`inverse_exact` solves with :math:`W`, and :meth:`train_forward`
    gives the self-normalizing gradient of :class:`SelfNormalizingLinearFunction`, which
    needs no inverse or determinant.

    Arguments:
        features: The dimension :math:`D`.
    """

    def __init__(self, features: int) -> None:
        super().__init__(features)

        self.inverse_weight = nn.Parameter(self.weight.detach().T.contiguous())

    def train_forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Map ``x`` and return the output, a log-abs-det placeholder of zeros whose
        gradient is the self-normalizing one, and the per-sample reconstruction error."""

        return SelfNormalizingLinearFunction.apply(x, self.weight, self.inverse_weight, self.bias)

    def inverse(self, z: Tensor) -> Tensor:
        """Map back with the learned inverse :math:`R (z - b)`, an :math:`O(N D^2)` product."""

        return F.linear(z - self.bias, self.inverse_weight)

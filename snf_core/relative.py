r"""Linear flow layer trained with the relative gradient.

The relative gradient multiplies the gradient of each weight on the right by
:math:`W^T W`. For the log-abs-det term that turns :math:`W^{-T}` into :math:`W`, so no
inverse or determinant is needed, and the data term :math:`g_z x^T W^T W` is computed as
:math:`g_z (W^T W x)^T`, two :math:`N \times D \times D` products instead of a
:math:`D \times D \times D` one.

References:
    Relative gradient optimization of the Jacobian term in unsupervised deep learning
    (Gresele, Fissore, Javaloy, Schölkopf and Hyvärinen, 2020)
    https://arxiv.org/abs/2006.15090
"""

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from snf_core.linear import ExactLinear


class RelativeGradientLinearFunction(torch.autograd.Function):
    r"""Linear map whose backward returns the relative gradient of the weight.

    Outputs are :math:`z = W x + b`, a per-sample log-abs-det placeholder of zeros and a
    reconstruction error of zeros (there is no inverse weight). With :math:`s` the summed
    gradient of the placeholder, the weight gets :math:`\sum_n g_z (W^T W x)^T + s W`, the
    input the usual :math:`W^T g_z`, and the bias the usual :math:`\sum_n g_z`.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, x: Tensor, weight: Tensor, bias: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        wx = x @ weight.T

        ctx.save_for_backward(weight, wx)
        ctx.set_materialize_grads(False)

        zeros = x.new_zeros(x.shape[0])
        reconstruction = x.new_zeros(x.shape[0])
        ctx.mark_non_differentiable(reconstruction)

        return wx + bias, zeros, reconstruction

    @staticmethod
    @once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx,
        grad_z: Tensor | None,
        grad_logabsdet: Tensor | None,
        grad_reconstruction: Tensor | None,
    ) -> tuple[Tensor | None, ...]:
        weight, wx = ctx.saved_tensors

        if grad_z is None:
            grad_z = torch.zeros_like(wx)

        grad_x = grad_z @ weight
        grad_weight = grad_z.T @ (wx @ weight)

        if grad_logabsdet is not None:
            grad_weight.add_(weight * grad_logabsdet.sum())

        return grad_x, grad_weight, grad_z.sum(dim=0)


class RelativeGradientLinear(ExactLinear):
    r"""Linear flow layer whose :meth:`train_forward` gives the relative gradient.

    Exact log-likelihood and inverse as :class:`ExactLinear`; only training differs.

    Arguments:
        features: The dimension :math:`D`.
    """

    def train_forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Map ``x`` and return the output, a log-abs-det placeholder of zeros whose
        gradient is the relative one, and a reconstruction error of zeros."""

        return RelativeGradientLinearFunction.apply(x, self.weight, self.bias)

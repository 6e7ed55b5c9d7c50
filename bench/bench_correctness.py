r"""asv tracks of how close self-normalizing training stays to the exact flow.

They sit in the same history as the timings of :mod:`bench.bench_layers`, so a commit that
makes the self-normalizing layers faster by making their gradient wrong shows here too. The
case is the Table 2 SNF FC layer (D = 784) on the embedded MNIST digits, from
:mod:`bench.cases`, after :data:`TRAIN_STEPS` Adam steps. Both tracks are deterministic on
one machine, because the model, the data order and the dequantization noise are seeded.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.bench_layers import THREADS
from bench.cases import PRESETS, Case, build_workload

# Steps before measuring: 40 of the 50 batches of 100 embedded digits. The other 10
# batches are held out for the measurements.
TRAIN_STEPS = 40


def reconstruction_error(flow: torch.nn.Module, x: Tensor) -> float:
    r"""Return the mean over samples of :math:`\|g(f(x)) - x\|`, the Euclidean distance
    between a sample and its reconstruction through the learned inverse."""

    with torch.no_grad():
        error = flow.reconstruct(x) - x

    return error.flatten(1).norm(dim=1).mean().item()


def logdet_gradient_gap(flow: torch.nn.Module, x: Tensor) -> float:
    r"""Return :math:`\|G - E\|_F / \|E\|_F` for the first layer's weight :math:`W`.

    :math:`E = -\frac12 W^{-T}` is the exact gradient of :math:`-\frac12 \log|\det W|`.
    :math:`G` is the self-normalizing training gradient of :math:`W` on the batch ``x``
    with the reconstruction term switched off, less the exact gradient of the data term
    :math:`-\frac12 \log \mathcal N(W x + b)`. A correct self-normalizing layer gives
    :math:`G = -\frac12 R^T`, so the gap is :math:`\|R^T - W^{-T}\|_F / \|W^{-T}\|_F`.
    """

    layer = flow.layers[0]
    weight = layer.weight
    reconstruction_weight = flow.reconstruction_weight

    flow.reconstruction_weight = 0.0
    try:
        (training_grad,) = torch.autograd.grad(flow.loss(x), weight)
    finally:
        flow.reconstruction_weight = reconstruction_weight

    z = F.linear(x, weight, layer.bias)
    (data_grad,) = torch.autograd.grad(-0.5 * flow.base.log_prob(z).mean(), weight)
    (exact_grad,) = torch.autograd.grad(-0.5 * torch.linalg.slogdet(weight)[1], weight)

    gap = torch.linalg.norm(training_grad - data_grad - exact_grad) / torch.linalg.norm(exact_grad)

    return gap.item()


def snf_fc_case() -> Case:
    """Return the Table 2 case of one self-normalizing FC layer."""

    cases = [case for case in PRESETS["table2"]() if (case.model, case.method) == ("fc", "snf")]

    if len(cases) != 1:
        raise NotImplementedError(f"expected one SNF FC case in table2, found {len(cases)}")

    return cases[0]


class SelfNormalizingFC:
    """The SNF FC layer of Table 2 after TRAIN_STEPS training steps, on held-out digits."""

    # Both values repeat exactly on one machine, so one process is enough.
    processes = 1
    timeout = 300.0

    def setup(self) -> None:
        # The thread count changes the order of float sums, so the tracked values with it.
        torch.set_num_threads(THREADS)
        workload = build_workload(snf_fc_case())
        flow = workload.model
        layer = flow.layers[0]

        # The names these tracks use: a commit without one skips instead of failing.
        required = [
            (flow, "reconstruct"),
            (flow, "reconstruction_weight"),
            (flow, "base"),
            (layer, "inverse_weight"),
            (layer, "train_forward"),
        ]
        for owner, name in required:
            if not hasattr(owner, name):
                raise NotImplementedError(f"{type(owner).__name__} has no {name!r}")

        if len(workload.batches) <= TRAIN_STEPS:
            raise NotImplementedError(
                f"{len(workload.batches)} batches leave none held out after {TRAIN_STEPS} steps"
            )

        for step in range(TRAIN_STEPS):
            workload.train_step(step)

        self.flow = flow
        self.held_out = torch.cat(workload.batches[TRAIN_STEPS:])

    def track_reconstruction_error(self) -> float:
        """Mean distance between a held-out digit and its reconstruction, in logit space."""

        return reconstruction_error(self.flow, self.held_out)

    track_reconstruction_error.unit = "L2 distance"

    def track_logdet_gradient_gap(self) -> float:
        """Relative gap between the self-normalizing and exact log-det gradients of W."""

        return logdet_gradient_gap(self.flow, self.held_out)

    track_logdet_gradient_gap.unit = "relative"

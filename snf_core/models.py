"""The flows of Table 3 of Keller et al., "Self Normalizing Flows" (2020), appendix A.3.3.

Each builder takes the training method and returns a :class:`~snf_core.flow.Flow` on MNIST
shapes in logit space, with the reconstruction weight of that model.
"""

from snf_core.activations import SmoothLeakyReLU
from snf_core.flow import Flow
from snf_core.linear import ExactLinear, SelfNormalizingLinear
from snf_core.relative import RelativeGradientLinear

FC_METHODS = ("exact", "relative", "snf")


def fc2_flow(method: str, features: int = 784, layers: int = 2) -> Flow:
    """Return ``layers`` times (linear D×D, Smooth Leaky ReLU with alpha 0.3).

    Arguments:
        method: ``"exact"`` (slogdet in the graph), ``"relative"`` (relative gradient) or
            ``"snf"`` (self-normalizing, reconstruction weight 1).
        features: The dimension D.
        layers: The number of linear layers.
    """

    linear_classes = {
        "exact": ExactLinear,
        "relative": RelativeGradientLinear,
        "snf": SelfNormalizingLinear,
    }

    if method not in linear_classes:
        raise ValueError(f"unknown FC method {method!r}; expected one of {FC_METHODS}")

    stack = []

    for _ in range(layers):
        stack += [linear_classes[method](features), SmoothLeakyReLU(alpha=0.3)]

    weight = 1.0 if method == "snf" else 0.0

    return Flow(stack, (features,), reconstruction_weight=weight)

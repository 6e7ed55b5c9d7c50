"""Self-normalizing flows and the exact-gradient layers they are compared with."""

from snf_core.activations import SmoothLeakyReLU
from snf_core.conv import ExactConv2d, SelfNormalizingConv2d
from snf_core.flow import Flow, StandardNormal
from snf_core.linear import ExactLinear, SelfNormalizingLinear
from snf_core.preprocess import LogitTransform, bits_per_dim, dequantize
from snf_core.squeeze import Squeeze

__all__ = [
    "ExactConv2d",
    "ExactLinear",
    "Flow",
    "LogitTransform",
    "SelfNormalizingConv2d",
    "SelfNormalizingLinear",
    "SmoothLeakyReLU",
    "Squeeze",
    "StandardNormal",
    "bits_per_dim",
    "dequantize",
]

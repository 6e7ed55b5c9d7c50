"""Self-normalizing flows and the exact-gradient layers they are compared with."""

from snf_core.activations import SmoothLeakyReLU
from snf_core.conv import ExactConv2d, SelfNormalizingConv2d
from snf_core.conv_exponential import ConvExponential2d
from snf_core.emerging import EmergingConv2d
from snf_core.flow import Flow, StandardNormal
from snf_core.glow import ActNorm, AffineCoupling, InvertibleConv1x1, SelfNormalizingConv1x1, Split
from snf_core.linear import ExactLinear, SelfNormalizingLinear
from snf_core.preprocess import LogitTransform, bits_per_dim, dequantize
from snf_core.relative import RelativeGradientLinear
from snf_core.spline import RationalQuadraticSpline
from snf_core.squeeze import Squeeze

__all__ = [
    "ActNorm",
    "AffineCoupling",
    "ConvExponential2d",
    "EmergingConv2d",
    "InvertibleConv1x1",
    "RationalQuadraticSpline",
    "RelativeGradientLinear",
    "SelfNormalizingConv1x1",
    "Split",
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

"""Benchmark cases: what is timed, defined once for the sweep CLI and the asv suite.

A :class:`Case` names a model, a training method, a per-sample shape, a batch size and a
data source. :func:`build_workload` turns it into a model, an optimizer, batches on the
device and the two callables that the harness times: one training step and one sample.
"""

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch import Tensor

from snf_core import (
    ExactConv2d,
    ExactLinear,
    Flow,
    LogitTransform,
    SelfNormalizingConv2d,
    SelfNormalizingLinear,
    dequantize,
    models,
)
from snf_core.data import MNIST_SHAPE, DataError, gaussian_inputs, load_mnist

# The training methods of each model: single layers (fc, conv) for Table 2 and Figure 3,
# whole flows (fc2, conv9, glow) for Table 3.
MODEL_METHODS = {
    "fc": ("snf", "exact", "linear"),
    "conv": ("snf", "exact"),
    "fc2": ("snf", "exact", "relative"),
    "conv9": ("snf", "exact", "emerging", "convexp"),
    "glow": ("snf", "exact"),
}
MODELS = tuple(MODEL_METHODS)
METHODS = ("snf", "exact", "linear", "relative", "emerging", "convexp")
DATA_SOURCES = ("mnist-embedded", "mnist", "gaussian")

# Adam learning rates of Keller et al., appendix A.3.1: 1e-4 for FC and 1e-3 for conv and
# Glow-like flows.
LEARNING_RATES = {"fc": 1e-4, "conv": 1e-3, "fc2": 1e-4, "conv9": 1e-3, "glow": 1e-3}

# MNIST has 60,000 training images: an epoch of Gaussian inputs has as many samples.
EPOCH_SAMPLES = 60_000

FIGURE3_DIMS = tuple(32 * k for k in range(1, 128, 3))


@dataclass(frozen=True)
class Case:
    """One benchmark configuration.

    Arguments:
        model: ``"fc"`` for one linear flow layer, ``"conv"`` for one 3×3 convolution, or a
            whole flow of Table 3: ``"fc2"``, ``"conv9"`` or ``"glow"``.
        method: One of :data:`MODEL_METHODS` for the model: ``"snf"`` (self-normalizing
            gradient), ``"exact"`` (autograd through slogdet), ``"linear"`` (a plain
            :class:`torch.nn.Linear` reference), ``"relative"`` (relative gradient),
            ``"emerging"`` (emerging convolutions) or ``"convexp"`` (convolution exponential).
        shape: The per-sample shape, ``(D,)`` for FC and ``(C, H, W)`` for conv.
        batch_size: The training batch size.
        data: ``"mnist-embedded"``, ``"mnist"`` (a local folder) or ``"gaussian"``.
        layers: The number of flow layers.
        device: A torch device string such as ``"cpu"`` or ``"cuda:0"``.
        dtype: A torch floating dtype name.
    """

    model: str
    method: str
    shape: tuple[int, ...]
    batch_size: int
    data: str
    layers: int = 1
    device: str = "cpu"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; expected one of {MODELS}")

        if self.method not in MODEL_METHODS[self.model]:
            raise ValueError(
                f"unknown method {self.method!r} for model {self.model!r}; expected one of "
                f"{MODEL_METHODS[self.model]}"
            )

        if self.data not in DATA_SOURCES:
            raise ValueError(f"unknown data {self.data!r}; expected one of {DATA_SOURCES}")

        if any(size <= 0 for size in self.shape) or self.batch_size <= 0 or self.layers <= 0:
            raise ValueError(
                f"shape, batch_size and layers must be positive, got shape={self.shape}, "
                f"batch_size={self.batch_size}, layers={self.layers}"
            )

    @property
    def dim(self) -> int:
        """The dimension :math:`D` of one sample."""

        return math.prod(self.shape)

    @property
    def samples(self) -> bool:
        """Whether the case has a sampling benchmark: the nn.Linear reference has none."""

        return self.method != "linear"

    def to_record(self, threads: int) -> dict:
        """Return the case as a flat dict for a result record."""

        record = asdict(self)
        record["shape"] = list(self.shape)
        record["dim"] = self.dim
        record["threads"] = threads

        return record

    @property
    def name(self) -> str:
        """A short readable name, such as ``fc-snf-784``."""

        return f"{self.model}-{self.method}-{'x'.join(map(str, self.shape))}"


def table2_cases(device: str = "cpu", data: str = "mnist-embedded") -> list[Case]:
    """Return the single-layer cases of Table 2: FC on 784 and 3×3 conv on 1×28×28."""

    cases = [
        Case("fc", method, (784,), 100, data, device=device) for method in MODEL_METHODS["fc"]
    ]
    cases += [
        Case("conv", method, MNIST_SHAPE, 100, data, device=device)
        for method in MODEL_METHODS["conv"]
    ]

    return cases


def figure3_cases(device: str = "cpu", dims: tuple[int, ...] = FIGURE3_DIMS) -> list[Case]:
    """Return the cases of Figure 3: one FC and one conv layer on Gaussian inputs of shape
    ``(D,)`` and ``(1, D, 1)``, batch 128, smallest D first."""

    cases = []

    for dim in dims:
        cases += [
            Case("fc", method, (dim,), 128, "gaussian", device=device)
            for method in MODEL_METHODS["fc"]
        ]
        cases += [
            Case("conv", method, (1, dim, 1), 128, "gaussian", device=device)
            for method in MODEL_METHODS["conv"]
        ]

    return cases


def table3_cases(device: str = "cpu", data: str = "mnist-embedded") -> list[Case]:
    """Return the whole flows of Table 3 on MNIST batches of 100, every method of each."""

    shapes = {"fc2": (784,), "conv9": MNIST_SHAPE, "glow": MNIST_SHAPE}

    return [
        Case(model, method, shape, 100, data, device=device)
        for model, shape in shapes.items()
        for method in MODEL_METHODS[model]
    ]


PRESETS: dict[str, Callable[..., list[Case]]] = {
    "table2": table2_cases,
    "figure3": figure3_cases,
    "table3": table3_cases,
}


def build_model(case: Case) -> nn.Module:
    """Return the model of a case, on its device and dtype, seeded for reproducibility."""

    torch.manual_seed(0)

    if case.model in ("fc2", "conv9", "glow"):
        model = models.build_flow(case.model, case.method)
    elif case.method == "linear":
        model = nn.Linear(case.dim, case.dim)
    elif case.model == "fc":
        layer_class = SelfNormalizingLinear if case.method == "snf" else ExactLinear
        model = Flow([layer_class(case.dim) for _ in range(case.layers)], case.shape)
    else:
        layer_class = SelfNormalizingConv2d if case.method == "snf" else ExactConv2d
        channels = case.shape[0]
        model = Flow([layer_class(channels, 3) for _ in range(case.layers)], case.shape)

    return model.to(device=case.device, dtype=getattr(torch, case.dtype))


def load_batches(
    case: Case, data_root: str | None = None, count: int | None = None
) -> list[Tensor]:
    """Return training batches on the case's device.

    MNIST batches are dequantized and mapped through the logit once, here, so that the
    timed step is the layer alone, as in the single-layer timings of Keller et al. Gaussian
    batches are drawn fresh; ``count`` limits how many are kept in memory, and the harness
    cycles through them.
    """

    dtype = getattr(torch, case.dtype)
    generator = torch.Generator().manual_seed(0)

    if case.data == "gaussian":
        count = count or 8
        inputs = gaussian_inputs(count * case.batch_size, case.shape, generator, dtype)
    else:
        root = data_root if case.data == "mnist" else None
        images, _ = load_mnist(root, train=True)
        images = images[torch.randperm(images.shape[0], generator=generator)]
        inputs, _ = LogitTransform()(dequantize(images.double(), generator))
        inputs = inputs.to(dtype).reshape(-1, *case.shape)
        batches = inputs.shape[0] // case.batch_size

        if batches == 0:
            raise DataError(
                f"MNIST has {inputs.shape[0]} images, fewer than one batch of "
                f"{case.batch_size}; use a complete MNIST folder"
            )

        count = min(count or batches, batches)

    inputs = inputs[: count * case.batch_size].to(case.device)

    return list(inputs.split(case.batch_size))


def batches_per_epoch(case: Case, data_root: str | None = None) -> int:
    """Return the batches in one epoch: the data set's size, or 60,000 Gaussian samples."""

    if case.data == "gaussian":
        return EPOCH_SAMPLES // case.batch_size

    if case.data == "mnist-embedded":
        return 5000 // case.batch_size

    images, _ = load_mnist(data_root, train=True)

    return images.shape[0] // case.batch_size


def make_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """Return Adam with betas (0.9, 0.999), the fused implementation where torch has it.

    Every method of a comparison gets the same optimizer, so the choice changes the times
    of all of them alike. The fused kernel exists on CPU and CUDA from torch 2.4.
    """

    try:
        return torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999), fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999))


@dataclass
class Workload:
    """A built case: the model, its optimizer and the callables that the harness times."""

    case: Case
    model: nn.Module
    optimizer: torch.optim.Optimizer
    batches: list[Tensor]
    epoch_batches: int

    def train_step(self, index: int) -> None:
        """Run one training step on batch ``index``: forward, backward and Adam step."""

        x = self.batches[index % len(self.batches)]

        if self.case.method == "linear":
            # The self-normalizing layer always computes its input gradient, because the
            # gradient of R needs it. The reference does too, as a layer inside a flow would,
            # so three products against six is the 2x floor of the comparison.
            x = x.detach().requires_grad_()
            loss = 0.5 * self.model(x).square().sum(dim=1).mean()
        else:
            loss = self.model.loss(x)

        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def sample(self) -> Tensor:
        """Draw one sample, through the learned inverse for SNF and the exact one otherwise."""

        if not self.case.samples:
            raise ValueError(f"case {self.case.name} has no sampling benchmark")

        return self.model.sample(1, exact=self.case.method == "exact")


def build_workload(
    case: Case, data_root: str | None = None, batches: list[Tensor] | None = None
) -> Workload:
    """Build a case: model, Adam optimizer with the learning rate of its model, batches.

    Pass ``batches`` from :func:`load_batches` to build several workloads on the same data.
    """

    model = build_model(case)
    optimizer = make_optimizer(model, LEARNING_RATES[case.model])

    if batches is None:
        batches = load_batches(case, data_root)

    epoch_batches = batches_per_epoch(case, data_root)

    return Workload(case, model, optimizer, batches, epoch_batches)

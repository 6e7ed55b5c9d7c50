r"""asv benchmarks of single flow layers: time per training batch, time per sample, memory.

The cases are the sweep CLI's, from :mod:`bench.cases`: the Table 2 layers on the 5,000
embedded MNIST digits (batch 100) and the Figure 3 layers on Gaussian inputs (batch 128) for
the dimensions in :data:`FIGURE3_DIMS`. Each class measures one model, FC or conv, over the
parameters ``size``, ``method`` and ``device``. A ``size`` names the preset and the dimension
:math:`D` of one sample, such as ``"table2-784"`` (FC on 784 inputs, conv on 1×28×28) or
``"figure3-512"`` (FC on 512 inputs, conv on 1×512×1).

asv imports this folder from the working tree as the package ``bench``, ahead of the
installed one, so :mod:`bench.cases` and :mod:`bench.memory` are always this checkout's,
while :mod:`snf_core` is the measured commit's. A commit whose :mod:`snf_core` lacks a name
that :mod:`bench.cases` imports fails to import this module, and asv records its benchmarks
here as failed.

asv starts a fresh worker process for every benchmark and parameter set, with
``launch_method`` ``"spawn"`` in ``asv.conf.json``, so CUDA starts clean in each and no
benchmark inherits another's peak memory.
"""

import itertools
from collections.abc import Callable, Collection, Iterable

import torch

from bench.cases import PRESETS, Case, Workload, build_workload

try:
    from bench.memory import peak_memory_mib
except ImportError as error:
    # The CUDA memory benchmarks skip in setup, and the others still run.
    peak_memory_mib = None
    PEAK_MEMORY_IMPORT_ERROR = str(error)

try:
    from asv_runner.benchmarks.mark import SkipNotImplemented
except ImportError:
    # Outside asv_runner, a plain NotImplementedError is the nearest skip.
    SkipNotImplemented = NotImplementedError

# A few sizes of the Figure 3 grid D = 32k (k = 4, 16 and 31), so that a quick asv run
# stays short on CPUs. The sweep CLI measures the whole grid.
FIGURE3_DIMS = (128, 512, 992)

DEVICES = ("cpu", "cuda")

# Torch's CPU threads in every benchmark. With two, an op stalls whenever another process holds
# the other core: on a 2-core VM (torch 2.14.1, a busy loop on the other core) one conv sample
# went from 0.19 ms to 9 ms, and asv reported that as a regression between two commits with
# the same layer code.
THREADS = 1


def size_key(preset: str, case: Case) -> str:
    """Return the ``size`` parameter of a case: its preset and its dimension D."""

    return f"{preset}-{case.dim}"


def preset_cases(device: str) -> list[tuple[str, Case]]:
    """Return the (preset, case) pairs on a device: all of Table 2, Figure 3 at FIGURE3_DIMS."""

    pairs = [("table2", case) for case in PRESETS["table2"](device=device)]
    pairs += [("figure3", case) for case in PRESETS["figure3"](device=device, dims=FIGURE3_DIMS)]

    return pairs


# The cases by their asv parameters (model, size, method, device).
CASES: dict[tuple[str, str, str, str], Case] = {
    (case.model, size_key(preset, case), case.method, device): case
    for device in DEVICES
    for preset, case in preset_cases(device)
}


def _unique(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))


def case_grid(model: str, devices: Collection[str] = DEVICES) -> list[list[str]]:
    """Return asv ``params`` of a model: the sizes, methods and devices of its cases.

    Raises:
        ValueError: When the product of the three lists has a set without a case.
    """

    keys = [key[1:] for key in CASES if key[0] == model and key[3] in devices]
    grid = [_unique(key[axis] for key in keys) for axis in range(3)]

    if len(keys) != len(list(itertools.product(*grid))):
        raise ValueError(f"the {model} cases do not form a grid of size, method and device")

    return grid


def _synchronizer(device: str) -> Callable[[], None]:
    if device == "cuda":
        return torch.cuda.synchronize

    return lambda: None


class _LayerBenchmark:
    """Shared setup: build the case's workload once per parameter set and warm it up."""

    model: str
    param_names = ["size", "method", "device"]

    # The cases by their asv parameters (model, size, method, device).
    cases: dict[tuple[str, str, str, str], Case] = CASES

    # Headroom over asv's default of 60 s on slow or busy machines: setup loads data and runs a
    # warm-up step, and one exact conv step at D = 992 took up to 0.3 s on a 2-core VM.
    timeout = 300.0

    def setup(self, size: str, method: str, device: str) -> None:
        torch.set_num_threads(THREADS)
        self.case = self.cases[(self.model, size, method, device)]

        if device == "cuda" and not torch.cuda.is_available():
            raise SkipNotImplemented(f"CUDA is not available to torch {torch.__version__}")

        self.check_case(self.case)

        self.workload: Workload = self.build(self.case)
        self.synchronize = _synchronizer(device)
        self.steps = itertools.count()

        self.warm_up()
        self.synchronize()

    def build(self, case: Case) -> Workload:
        """Return the case's model, optimizer and batches."""

        return build_workload(case)

    def check_case(self, case: Case) -> None:
        """Raise NotImplementedError for a case that this benchmark does not measure."""

    def warm_up(self) -> None:
        self.train_step()

    def train_step(self) -> None:
        self.workload.train_step(next(self.steps))


class _Train(_LayerBenchmark):
    """One training step: forward, backward and Adam step on one batch.

    ``peakmem_train_batch`` is asv's peak resident memory of the whole worker process, on the
    host only. The interpreter, torch, the data, the model and the warm-up step are in it,
    and GPU memory is not: the CUDAMemory classes track that.
    """

    def time_train_batch(self, size: str, method: str, device: str) -> None:
        self.train_step()

        # asv reads a host clock, and CUDA kernels run asynchronously: wait for them.
        self.synchronize()

    def peakmem_train_batch(self, size: str, method: str, device: str) -> None:
        self.train_step()


class _Sample(_LayerBenchmark):
    """Time to draw one sample through the layer's inverse."""

    def check_case(self, case: Case) -> None:
        if not case.samples:
            raise NotImplementedError(f"case {case.name} has no sampling benchmark")

    def warm_up(self) -> None:
        if not hasattr(self.workload.model, "sample"):
            raise NotImplementedError(f"{type(self.workload.model).__name__} has no sample()")

        self.workload.sample()

    def time_sample(self, size: str, method: str, device: str) -> None:
        self.workload.sample()

        # asv reads a host clock, and CUDA kernels run asynchronously: wait for them.
        self.synchronize()


class _CUDAMemory(_LayerBenchmark):
    """GPU memory of one training step, from :func:`bench.memory.peak_memory_mib`."""

    # Memory varies little from one process to the next, so one process per set is enough.
    processes = 1

    def check_case(self, case: Case) -> None:
        if peak_memory_mib is None:
            raise NotImplementedError(
                f"bench.memory cannot be imported: {PEAK_MEMORY_IMPORT_ERROR}"
            )

    def track_train_allocator_peak(self, size: str, method: str, device: str) -> float:
        """Peak of the caching allocator's tensor memory during one step, above the
        memory allocated before it."""

        return peak_memory_mib(self.train_step, device)["peak_mib"]

    track_train_allocator_peak.unit = "MiB"

    def track_train_nvml_used(self, size: str, method: str, device: str) -> float:
        """Used memory of the whole GPU after one step, every process and the allocator's
        cache included, as NVML reports it."""

        memory = peak_memory_mib(self.train_step, device)

        if "nvml_used_mib" not in memory:
            raise SkipNotImplemented("NVML is unavailable: install nvidia-ml-py")

        return memory["nvml_used_mib"]

    track_train_nvml_used.unit = "MiB"


class FCTrain(_Train):
    model = "fc"
    params = case_grid(model)


class ConvTrain(_Train):
    model = "conv"
    params = case_grid(model)


class FCSample(_Sample):
    model = "fc"
    params = case_grid(model)


class ConvSample(_Sample):
    model = "conv"
    params = case_grid(model)


class FCCUDAMemory(_CUDAMemory):
    model = "fc"
    params = case_grid(model, devices=["cuda"])


class ConvCUDAMemory(_CUDAMemory):
    model = "conv"
    params = case_grid(model, devices=["cuda"])

r"""asv benchmarks of the whole flows of Table 3: time per training batch, time per sample, memory.

The cases are the sweep CLI's ``table3`` preset from :mod:`bench.cases`: the FC 2-layer
(``fc2``), conv 9-layer (``conv9``) and Glow-like 32-layer (``glow``) flows, every method of
each, on the 5,000 embedded MNIST digits in batches of 100. Each class measures one model
over the parameters of :mod:`bench.bench_layers`: ``size``, ``method`` and ``device``. Every
Table 3 flow takes 784 inputs, so ``size`` has the single value ``"table3-784"``.

asv reruns a benchmark's setup before every sample (asv_runner 0.3.2), and setup builds the
flow and runs one warm-up training step or sample. The digits are loaded once per process
instead (:func:`cached_batches`), because loading them took 2 to 4 s. Each class sets asv's
sampling attributes for the cost of its model, with the reasons beside them. The costs quoted
were measured by calling :func:`bench.cases.build_workload`, ``train_step`` and ``sample``
directly on a shared 2-core AMD EPYC VM, torch 2.14.1 on one thread.
"""

import functools
import itertools

from torch import Tensor

from bench.bench_layers import (
    DEVICES,
    _CUDAMemory,
    _LayerBenchmark,
    _Sample,
    _Train,
    size_key,
)
from bench.cases import PRESETS, Case, Workload, build_workload, load_batches

PRESET = "table3"

# The cases by their asv parameters (model, size, method, device).
CASES: dict[tuple[str, str, str, str], Case] = {
    (case.model, size_key(PRESET, case), case.method, device): case
    for device in DEVICES
    for case in PRESETS[PRESET](device=device)
}


def flow_grid(model: str, devices: tuple[str, ...] = DEVICES) -> list[list[str]]:
    """Return asv ``params`` of a Table 3 model: its sizes, methods and devices.

    Raises:
        ValueError: When the model has no Table 3 case, or when the product of the three lists
            has a set without a case.
    """

    keys = [key[1:] for key in CASES if key[0] == model and key[3] in devices]
    grid = [list(dict.fromkeys(key[axis] for key in keys)) for axis in range(3)]

    if not keys or len(keys) != len(list(itertools.product(*grid))):
        raise ValueError(
            f"the {PRESET} cases of model {model!r} do not form a grid of size, method and "
            f"device; check {PRESET}_cases in bench/cases.py"
        )

    return grid


@functools.lru_cache(maxsize=1)
def cached_batches(case: Case) -> list[Tensor]:
    """Return the case's training batches, loaded once per process for all its setups.

    The batches are only read, never changed, by training steps and sampling.
    """

    return load_batches(case)


class _FlowBenchmark(_LayerBenchmark):
    """Setup of the bench_layers classes, for the Table 3 cases and with batches cached."""

    # One call per sample. The timed call is longer than asv's 10 ms sample_time in every
    # training case, and asv reruns setup before each call when number > 1, so more calls
    # per sample would add setups without making a sample more precise.
    number = 1

    # No warm-up loop: setup has just run one training step or sample on the workload, and
    # asv would rerun setup before each warm-up call.
    warmup_time = 0.0

    # asv's default minimum of 2 calls is below the minimum repeat of every class, so the
    # repeat attribute alone decides how many samples a process takes.
    min_run_count = 2

    cases = CASES

    def build(self, case: Case) -> Workload:
        """Return the case's workload on the batches that this process loaded first."""

        return build_workload(case, batches=cached_batches(case))


class _FlowTrain(_FlowBenchmark, _Train):
    pass


class _FlowSample(_FlowBenchmark, _Sample):
    """Time to draw one sample from the flow as built, before any training.

    Note:
        The sweep CLI samples after its training steps. Two inverses iterate to a tolerance,
        the Newton steps of the FC 2-layer activation and the series of the convolution
        exponential, so their cost depends on the weights and can differ from the sweep's.
    """


class _FlowCUDAMemory(_FlowBenchmark, _CUDAMemory):
    pass


class _FC2:
    model = "fc2"
    params = flow_grid(model)

    # At least 10 samples, at most 40, and no new one after 10 s. A training sample is a setup
    # with its warm-up step, then the timed step, of 15 to 70 ms each on a 2-core VM, so 40
    # fit in a few seconds. Sampling is faster.
    repeat = (10, 40, 10.0)

    # Headroom over asv's default of 60 s for a busy machine: a process takes about 20 s.
    timeout = 300.0


class _Conv9:
    model = "conv9"
    params = flow_grid(model)

    # At least 5 samples, at most 20, and no new one after 20 s. A training sample is a
    # warm-up step and a timed step of 0.1 to 0.45 s each on a 2-core VM.
    repeat = (5, 20, 20.0)

    # Headroom over asv's default of 60 s for a busy machine: a process takes about 30 s.
    timeout = 300.0


class _Glow:
    model = "glow"
    params = flow_grid(model)

    # Headroom over asv's default of 60 s for sampling and the GPU tracks, whose processes
    # run one setup with a warm-up step or sample and then a few calls. GlowTrain sets its own.
    timeout = 300.0


class FC2Train(_FC2, _FlowTrain):
    pass


class Conv9Train(_Conv9, _FlowTrain):
    pass


class GlowTrain(_Glow, _FlowTrain):
    # At least 3 samples, at most 5, and no new one after 180 s. One training step took 16 to
    # 23 s on a 2-core VM, so a sample (setup with its warm-up step, then the timed step) takes
    # about 40 s, and the 3 samples take about 100 s.
    repeat = (3, 5, 180.0)

    # One process: a second would double the 2 to 4 minutes that each method takes.
    processes = 1

    # A process runs at most about 3.5 minutes with 20-s steps: the first setup, 180 s of
    # samples and the one that ends past them. The SNF flow's took 141 s under asv on the VM,
    # with 13-s steps. 600 s leaves room for a machine twice as slow, and also covers
    # peakmem_train_batch (one setup and one step).
    timeout = 600.0


class FC2Sample(_FC2, _FlowSample):
    pass


class Conv9Sample(_Conv9, _FlowSample):
    pass


class GlowSample(_Glow, _FlowSample):
    # At least 5 samples, at most 20, and no new one after 30 s. Building the flow took 0.1 to
    # 0.2 s and one sample 45 to 120 ms on a 2-core VM, so 20 samples with their setups fit
    # in 4 to 9 s.
    repeat = (5, 20, 30.0)


class FC2CUDAMemory(_FC2, _FlowCUDAMemory):
    params = flow_grid("fc2", devices=("cuda",))


class Conv9CUDAMemory(_Conv9, _FlowCUDAMemory):
    params = flow_grid("conv9", devices=("cuda",))


class GlowCUDAMemory(_Glow, _FlowCUDAMemory):
    params = flow_grid("glow", devices=("cuda",))

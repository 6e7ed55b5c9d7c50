"""Peak CPU memory of one case, measured in a fresh process.

Run as ``python -m bench.probe CASE_JSON METRIC THREADS [DATA_ROOT]``, which prints one JSON
object. Within one long-lived process a case reuses memory that an earlier case freed and
shows no growth, so each measurement gets a fresh process. That process also sets glibc's
mmap threshold to 64 KiB, so freed tensors leave the resident set at once instead of
staying in the heap for the next allocation. Timing never runs under that setting.

The baseline is the process after imports, data loading and a tiny warm-up case. The peak
covers building the model and optimizer and three calls of the metric's work, so it counts
the parameters, the Adam state, the gradients and the temporaries of a step.
"""

import dataclasses
import json
import os
import subprocess
import sys

import torch

from bench.cases import Case, build_workload, load_batches
from bench.memory import peak_memory_mib

CALLS = 3
METRICS = ("train_peak_memory", "sample_peak_memory")


def measure_in_process(case: Case, metric: str, data_root: str | None) -> dict | None:
    """Measure the peak of building ``case`` and running its ``metric`` work three times."""

    batches = load_batches(case, data_root)

    # A tiny case of the same model and method first loads the BLAS, LAPACK and kernel
    # state that the first call of any size allocates, so the baseline includes it. The
    # whole flows of Table 3 have fixed MNIST shapes, so their warm-up keeps the shape and
    # takes a batch of 2.
    if case.model == "fc":
        tiny = dataclasses.replace(case, shape=(8,), batch_size=4, data="gaussian")
    elif case.model == "conv":
        tiny = dataclasses.replace(
            case, shape=(case.shape[0], 4, 4), batch_size=4, data="gaussian"
        )
    else:
        tiny = dataclasses.replace(case, batch_size=2, data="gaussian")

    tiny_workload = build_workload(tiny)

    for index in range(CALLS):
        tiny_workload.train_step(index)

        if tiny.samples:
            tiny_workload.sample()

    del tiny_workload

    def run() -> None:
        workload = build_workload(case, data_root, batches)

        for index in range(CALLS):
            if metric == "train_peak_memory":
                workload.train_step(index)
            else:
                workload.sample()

    return peak_memory_mib(run, case.device)


def measure_in_subprocess(
    case: Case, metric: str, data_root: str | None, threads: int
) -> dict | None:
    """Run :func:`measure_in_process` in a fresh Python process and return its result.

    Raises:
        RuntimeError: When the process fails, with its last line of stderr.
    """

    if metric not in METRICS:
        raise ValueError(f"unknown memory metric {metric!r}; expected one of {METRICS}")

    case_json = json.dumps({**case.__dict__, "shape": list(case.shape)})
    command = [sys.executable, "-m", "bench.probe", case_json, metric, str(threads)]

    if data_root is not None:
        command.append(data_root)

    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=environment)

    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["no output"]
        raise RuntimeError(f"memory probe of {case.name} failed: {lines[-1]}")

    return json.loads(done.stdout)


def main(argv: list[str]) -> None:
    fields = json.loads(argv[0])
    fields["shape"] = tuple(fields["shape"])
    torch.set_num_threads(int(argv[2]))
    data_root = argv[3] if len(argv) > 3 else None
    result = measure_in_process(Case(**fields), argv[1], data_root)

    if result is not None:
        result["source"] = f"{result['source']}-fresh-process"
        result["calls"] = CALLS

    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])

"""Sweeps: measure every case of a preset and append one record per metric.

Records go to ``<results>/<preset>-<machine label>.jsonl``. Cases already measured in that
file (same case, metric, protocol and machine label) are skipped, so an interrupted sweep
resumes where it stopped. A shard ``i/n`` measures every n-th case only, so that several jobs
split one sweep and their result files merge by concatenation.
"""

import gc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.cases import PRESETS, Case, Workload, build_workload
from bench.gpu_state import GpuStateRecorder, measure_with_state, recorder_for
from bench.memory import peak_memory_mib
from bench.probe import measure_in_subprocess
from bench.results import (
    append_record,
    case_key,
    code_version,
    machine_info,
    make_record,
    read_records,
)
from bench.timing import measure_sample, measure_train

Progress = Callable[[str], None]


@dataclass
class SweepSettings:
    """Options of one sweep, as given on the command line."""

    preset: str
    results: Path
    device: str = "cpu"
    protocol: str = "adaptive"
    budget_s: float = 10.0
    dims: tuple[int, ...] | None = None
    max_dim: int | None = None
    data_root: str | None = None
    threads: int | None = None
    label: str | None = None
    force: bool = False
    memory: bool = True
    models: tuple[str, ...] | None = None
    methods: tuple[str, ...] | None = None
    shard: tuple[int, int] | None = None


def select_cases(settings: SweepSettings) -> list[Case]:
    """Return the preset's cases on the sweep's device, limited by ``dims`` and ``max_dim``.

    Raises:
        ValueError: When ``dims`` lists a D more than once, which would measure a case twice.
    """

    make_cases = PRESETS[settings.preset]

    if settings.dims is not None:
        duplicates = sorted({dim for dim in settings.dims if settings.dims.count(dim) > 1})

        if duplicates:
            raise ValueError(
                f"dims {list(settings.dims)} repeat D {', '.join(map(str, duplicates))}; "
                "list each dimension once"
            )

    if settings.preset in ("table2", "table3"):
        data = "mnist" if settings.data_root else "mnist-embedded"
        cases = make_cases(device=settings.device, data=data)
    elif settings.dims is not None:
        cases = make_cases(device=settings.device, dims=settings.dims)
    else:
        cases = make_cases(device=settings.device)

    if settings.max_dim is not None:
        cases = [case for case in cases if case.dim <= settings.max_dim]

    if settings.models is not None:
        cases = [case for case in cases if case.model in settings.models]

    if settings.methods is not None:
        cases = [case for case in cases if case.method in settings.methods]

    return cases


def shard_cases(cases: list[Case], shard: tuple[int, int] | None) -> list[Case]:
    """Return the cases of shard ``(i, n)``: those at 0-based positions p with p % n == i - 1.

    The n shards of one list are disjoint and together contain every case, provided that every
    shard selects its cases with the same options. Taking every n-th case spreads small and
    large D evenly over the shards. ``None`` returns every case.
    """

    if shard is None:
        return cases

    index, count = shard

    if not 1 <= index <= count:
        raise ValueError(f"shard {index}/{count} is invalid; expected i/n with 1 <= i <= n")

    return [case for position, case in enumerate(cases) if position % count == index - 1]


def protocol_params(settings: SweepSettings) -> dict:
    """Return the protocol parameters that the sweep's options set."""

    if settings.protocol == "adaptive":
        return {"budget_s": settings.budget_s}

    return {}


METRICS = ("train_time", "sample_time", "train_peak_memory", "sample_peak_memory")


def case_metrics(case: Case, memory: bool = True) -> tuple[str, ...]:
    """Return the metrics a case has: the nn.Linear reference has no sampling metrics."""

    metrics = METRICS if memory else METRICS[:2]

    if case.samples:
        return metrics

    return tuple(metric for metric in metrics if not metric.startswith("sample"))


def _peak_memory_row(
    metric: str,
    call: Callable[[], object],
    workload: Workload,
    settings: SweepSettings,
    progress: Progress,
) -> tuple | None:
    case = workload.case

    # On CUDA the allocator's peak resets per call. Resident memory on the CPU does not
    # shrink when tensors are freed, so the CPU peak needs a fresh process.
    if case.device.startswith("cuda"):
        memory = peak_memory_mib(call, case.device)
    else:
        try:
            memory = measure_in_subprocess(
                case, metric, settings.data_root, torch.get_num_threads()
            )
        except RuntimeError as error:
            progress(f"  {metric}: skipped, {error}")
            return None

    if memory is None:
        return None

    peak = memory["peak_mib"]
    stats = {"n": 1, "mean": peak, "std": 0.0, "median": peak, "cv": 0.0}
    stats.update({name: peak for name in ("q1", "q3", "min", "max")})
    protocol = {"name": "peak-once", **{k: v for k, v in memory.items() if k != "peak_mib"}}

    return metric, "MiB", "call", stats, protocol


def measure_case(
    workload: Workload,
    settings: SweepSettings,
    metrics: tuple[str, ...],
    progress: Progress,
    gpu: GpuStateRecorder | None = None,
) -> Iterator[tuple[str, str, str, dict, dict, dict | None]]:
    """Yield (metric, unit, per, stats, protocol, gpu_state) for each requested metric.

    ``gpu_state`` holds the recorder's snapshots from just before and after a timing
    measurement. It is None for memory metrics, without a recorder, or when NVML failed.
    """

    device = workload.case.device
    params = protocol_params(settings)

    if "train_time" in metrics:
        train, state = measure_with_state(
            gpu,
            lambda: measure_train(
                workload.train_step,
                device,
                settings.protocol,
                batches_per_epoch=workload.epoch_batches,
                **params,
            ),
        )
        yield "train_time", "ms", "batch", train.stats, train.protocol, state

    if "sample_time" in metrics:
        sample, state = measure_with_state(
            gpu, lambda: measure_sample(workload.sample, device, settings.protocol, **params)
        )
        yield "sample_time", "ms", "sample", sample.stats, sample.protocol, state

    calls = {
        "train_peak_memory": lambda: workload.train_step(0),
        "sample_peak_memory": workload.sample,
    }

    for metric, call in calls.items():
        if metric not in metrics:
            continue

        row = _peak_memory_row(metric, call, workload, settings, progress)

        if row is None:
            progress(f"  {metric}: skipped, not measurable on this system")
        else:
            yield *row, None


def _describe(metric: str, stats: dict, unit: str, per: str) -> str:
    cv = stats.get("cv") or 0.0

    return f"{metric} {stats['median']:.4g} {unit}/{per} (n={stats['n']}, cv {100 * cv:.1f}%)"


def run_sweep(settings: SweepSettings, progress: Progress = print) -> Path:
    """Measure every case of the preset not yet in the results file; return the file.

    Each metric is appended as soon as it is measured, so an interruption keeps every
    finished metric and a rerun measures only what is missing. With ``settings.shard``, only
    that shard's cases are measured and each record's protocol stores the shard. The shard is
    not part of the resume key, so a case measured in any shard counts as measured.
    """

    if settings.threads is not None:
        torch.set_num_threads(settings.threads)

    threads = torch.get_num_threads()
    machine = machine_info(settings.device, settings.label)
    code = code_version()
    path = settings.results / f"{settings.preset}-{machine['label']}.jsonl"
    done = set()

    # Read the file even with --force: a corrupt line must stop the sweep before it appends
    # to a file that no report could read.
    if path.exists():
        records = read_records(path)

        if not settings.force:
            done = {case_key(record) for record in records}

    cases = shard_cases(select_cases(settings), settings.shard)

    if not cases:
        raise ValueError(
            f"no {settings.preset} case matches the options (--dims, --max-dim, --models, "
            f"--methods, --shard); widen them"
        )
    shard = None
    shard_text = ""

    if settings.shard is not None:
        shard = {"index": settings.shard[0], "count": settings.shard[1]}
        shard_text = f" (shard {settings.shard[0]}/{settings.shard[1]})"

    gpu = recorder_for(settings.device, progress)
    progress(
        f"{settings.preset}: {len(cases)} cases{shard_text} on {settings.device}, writing {path}"
    )

    for number, case in enumerate(cases, start=1):
        case_record = case.to_record(threads)
        missing = []

        for metric in case_metrics(case, settings.memory):
            probe = make_record(
                settings.preset, case_record, metric, "-", "-", {}, {}, machine, code
            )
            probe["protocol"] = {"name": "peak-once" if "memory" in metric else settings.protocol}

            if case_key(probe) not in done:
                missing.append(metric)

        if not missing:
            progress(f"[{number}/{len(cases)}] {case.name}: already measured, skipped")
            continue

        progress(f"[{number}/{len(cases)}] {case.name}")
        workload = build_workload(case, settings.data_root)

        for metric, unit, per, stats, protocol, state in measure_case(
            workload, settings, tuple(missing), progress, gpu
        ):
            if shard is not None:
                protocol = {**protocol, "shard": shard}

            record = make_record(
                settings.preset, case_record, metric, unit, per, stats, protocol, machine, code
            )

            if state is not None:
                record["gpu_state"] = state

            append_record(path, record)
            progress(f"  {_describe(metric, stats, unit, per)}")

        del workload
        gc.collect()

    return path

r"""NVML snapshots of a CUDA device: clocks, temperature, power and throttle reasons.

A sweep on a CUDA device takes one snapshot just before and one just after each timing
measurement and stores both in the record as ``"gpu_state": {"before": {...}, "after": {...}}``,
so that a report can tell a slow GPU from a throttled one. A snapshot is a dict:

.. code-block:: text

    {"sm_clock_mhz": 1980, "memory_clock_mhz": 3201, "temperature_c": 41, "power_w": 118.5,
     "throttle_mask": 4, "throttle_reasons": ["sw_power_cap"]}

A field that the GPU does not report is None. The values come from NVML (package
``nvidia-ml-py``, module ``pynvml``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from types import ModuleType
from typing import TypeVar

import torch

from bench.timing import resolve_device

__all__ = [
    "SLOWDOWN_REASONS",
    "THROTTLE_REASONS",
    "GpuStateError",
    "GpuStateRecorder",
    "measure_with_state",
    "read_gpu_state",
    "recorder_for",
    "slowdowns",
]

_T = TypeVar("_T")

# Bits of NVML's clocks event (formerly throttle) reason mask, as nvidia-ml-py 13.615 defines
# them (nvmlClocksEventReason* and nvmlClocksThrottleReason*).
THROTTLE_REASONS: dict[int, str] = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
    0x200: "board_limit",
    0x400: "reliability",
}

# The reasons that hold the clocks below what the workload requests. An idle GPU, clocks set
# by the user, sync boost and display clocks are not slowdowns of a running measurement.
SLOWDOWN_REASONS = frozenset(
    {
        "sw_power_cap",
        "hw_slowdown",
        "sw_thermal_slowdown",
        "hw_thermal_slowdown",
        "hw_power_brake_slowdown",
        "board_limit",
        "reliability",
    }
)

# NVML deprecated nvmlDeviceGetCurrentClocksThrottleReasons for ...ClocksEventReasons, which
# the R525 API lacks. Older bindings have only the old name, and a driver without the new C
# symbol raises NVMLError_FunctionNotFound for it, so both names are tried.
_REASON_QUERIES = (
    "nvmlDeviceGetCurrentClocksEventReasons",
    "nvmlDeviceGetCurrentClocksThrottleReasons",
)


class GpuStateError(Exception):
    """Error raised when NVML cannot describe the device. The message names the reason."""


def _reason_names(mask: int) -> list[str]:
    names = []

    for bit in range(mask.bit_length()):
        flag = 1 << bit
        if mask & flag:
            names.append(THROTTLE_REASONS.get(flag, f"0x{flag:x}"))

    return names


def _throttle_mask(nvml: ModuleType, handle: object) -> int:
    error = None

    for name in _REASON_QUERIES:
        query = getattr(nvml, name, None)
        if query is None:
            continue

        try:
            return int(query(handle))
        except nvml.NVMLError as failure:
            error = failure

    if error is not None:
        raise error

    raise nvml.NVMLError(nvml.NVML_ERROR_FUNCTION_NOT_FOUND)


def _snapshot(nvml: ModuleType, uuid: str) -> dict:
    handle = nvml.nvmlDeviceGetHandleByUUID(uuid)

    queries: dict[str, Callable[[], object]] = {
        "sm_clock_mhz": lambda: int(nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM)),
        "memory_clock_mhz": lambda: int(nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_MEM)),
        "temperature_c": lambda: int(
            nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)
        ),
        # NVML reports power in milliwatts.
        "power_w": lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000,
        "throttle_mask": lambda: _throttle_mask(nvml, handle),
    }

    snapshot: dict = {}
    errors = []

    for key, query in queries.items():
        try:
            snapshot[key] = query()
        except nvml.NVMLError as error:
            # One field unsupported on this board leaves the others usable.
            snapshot[key] = None
            errors.append(f"{key}: {error}")

    if len(errors) == len(queries):
        raise GpuStateError(f"every NVML query failed ({'; '.join(errors)})")

    mask = snapshot["throttle_mask"]
    snapshot["throttle_reasons"] = None if mask is None else _reason_names(mask)

    return snapshot


def read_gpu_state(uuid: str) -> dict:
    r"""Read one snapshot of the GPU with this UUID, between ``nvmlInit`` and ``nvmlShutdown``.

    The device is found by UUID rather than by index because NVML indices ignore
    ``CUDA_VISIBLE_DEVICES``. A field whose query raises ``NVMLError`` (such as
    ``NotSupported``) is None.

    Arguments:
        uuid: The UUID as ``torch.cuda.get_device_properties(i).uuid`` prints it, with or
            without NVML's ``GPU-`` prefix.

    Raises:
        GpuStateError: When ``pynvml`` is not installed, NVML fails to start, the device is
            not found, or every query fails.
    """
    if not uuid.startswith(("GPU-", "MIG-")):
        uuid = f"GPU-{uuid}"

    try:
        import pynvml
    except ImportError:
        raise GpuStateError(
            "the pynvml module is missing; install the nvidia-ml-py package"
        ) from None

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as error:
        raise GpuStateError(f"NVML failed to start ({error})") from None

    try:
        return _snapshot(pynvml, uuid)
    except pynvml.NVMLError as error:
        raise GpuStateError(f"NVML found no device {uuid} ({error})") from None
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            # The snapshot is complete; a failed shutdown does not change it.
            pass


class GpuStateRecorder:
    r"""Source of NVML snapshots of one CUDA device during a sweep.

    The first failure prints one progress line and turns the recorder off, so a machine
    without NVML costs one line and no further attempts. Each snapshot starts and stops NVML,
    which takes milliseconds and happens outside the timed calls.

    Arguments:
        device: The CUDA device, such as ``"cuda"`` or ``"cuda:1"``.
        progress: Receives the one-line message when NVML fails.
    """

    def __init__(self, device: torch.device | str, progress: Callable[[str], None]) -> None:
        self.device = resolve_device(device)
        self.progress = progress
        self.enabled = True

    def snapshot(self) -> dict | None:
        """Return a snapshot of the device, or None once NVML has failed."""
        if not self.enabled:
            return None

        try:
            uuid = getattr(torch.cuda.get_device_properties(self.device), "uuid", None)
            if uuid is None:
                raise GpuStateError(
                    f"torch {torch.__version__} does not report the device UUID that NVML needs"
                )

            return read_gpu_state(str(uuid))
        except GpuStateError as error:
            self.enabled = False
            self.progress(
                f"GPU state: not recorded for {self.device}, {error}; records carry no gpu_state"
            )

            return None


def recorder_for(
    device: torch.device | str, progress: Callable[[str], None]
) -> GpuStateRecorder | None:
    """Return a recorder for a CUDA device, or None for the CPU, which has no NVML state."""
    if torch.device(device).type != "cuda":
        return None

    return GpuStateRecorder(device, progress)


def measure_with_state(
    recorder: GpuStateRecorder | None, measure: Callable[[], _T]
) -> tuple[_T, dict | None]:
    r"""Run ``measure()`` between two snapshots.

    Returns:
        The measurement, and ``{"before": ..., "after": ...}``, or None without a recorder or
        when either snapshot failed.
    """
    before = None if recorder is None else recorder.snapshot()
    result = measure()
    after = None if recorder is None else recorder.snapshot()

    if before is None or after is None:
        return result, None

    return result, {"before": before, "after": after}


def slowdowns(gpu_state: dict | None) -> list[str]:
    """Return the slowdown reasons in a record's ``gpu_state``, before or after, sorted."""
    if not gpu_state:
        return []

    snapshots: Iterable[dict | None] = (gpu_state.get("before"), gpu_state.get("after"))
    found = set()

    for snapshot in snapshots:
        reasons = (snapshot or {}).get("throttle_reasons") or []
        found.update(reason for reason in reasons if reason in SLOWDOWN_REASONS)

    return sorted(found)

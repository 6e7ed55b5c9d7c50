r"""Peak memory of one call, on a CUDA device or in the CPU process.

On CUDA the numbers come from PyTorch's caching allocator, plus the device's used memory
from NVML (package ``nvidia-ml-py``, module ``pynvml``) where available. On the CPU they
come from the kernel's resident-set counters of this process (Linux only).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TypeVar

import torch

from bench.timing import resolve_device

__all__ = ["MIB", "nvml_query", "nvml_used_mib", "peak_memory_mib"]

MIB = 2**20

_T = TypeVar("_T")

_PROC_STATUS = Path("/proc/self/status")
_PROC_CLEAR_REFS = Path("/proc/self/clear_refs")


def peak_memory_mib(fn: Callable[[], object], device: torch.device | str) -> dict | None:
    r"""Run ``fn`` once and measure its peak memory above the memory in use before the call.

    On CUDA (``source="cuda-allocator"``), ``peak_mib`` is ``max_memory_allocated`` after
    the call minus ``memory_allocated`` before it, with the peak statistics reset first. It
    counts tensors only, not the allocator's cached blocks or the CUDA context. The key
    ``nvml_used_mib``, the device's used memory after the call as NVML reports it (every
    process and the allocator cache included), is present only when the NVML query succeeds.

    On the CPU (``source="linux-vmhwm"``), the process's high-water mark of resident memory
    is reset by writing 5 to ``/proc/self/clear_refs``, and ``peak_mib`` is VmHWM after the
    call minus VmRSS before it, so a case does not inherit an earlier case's peak. It
    counts every thread of the process, not only ``fn``'s allocations.

    Arguments:
        fn: The call to measure.
        device: The device that ``fn`` runs on.

    Returns:
        A dict with ``peak_mib``, ``baseline_mib`` and ``source``, plus ``nvml_used_mib`` on
        CUDA when NVML is available and ``hwm_reset`` on the CPU. None when the CPU peak
        cannot be measured honestly. That happens without ``/proc/self/status`` (systems
        other than Linux), or when ``clear_refs`` is not writable and an earlier, higher
        peak of the process hides ``fn``'s own peak.
    """
    device = resolve_device(device)

    if device.type == "cuda":
        return _peak_cuda(fn, device)

    return _peak_linux(fn)


def _peak_cuda(fn: Callable[[], object], device: torch.device) -> dict:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)

    fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - baseline

    result = {"peak_mib": peak / MIB, "baseline_mib": baseline / MIB, "source": "cuda-allocator"}

    uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
    used = None if uuid is None else nvml_used_mib(str(uuid))
    if used is not None:
        result["nvml_used_mib"] = used

    return result


def _read_status_kib() -> dict[str, int]:
    """Read the ``Vm*`` fields of ``/proc/self/status``, in KiB."""
    text = _PROC_STATUS.read_text()

    return {key: int(value) for key, value in re.findall(r"^(Vm\w+):\s+(\d+) kB", text, re.M)}


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current VmRSS; return False when the kernel does not allow it."""
    try:
        with open(_PROC_CLEAR_REFS, "w") as f:
            f.write("5")
    except OSError:
        return False

    return True


def _peak_linux(fn: Callable[[], object]) -> dict | None:
    if not _PROC_STATUS.exists():
        return None

    reset = _reset_peak_rss()
    before = _read_status_kib()
    baseline, hwm_before = before["VmRSS"], before["VmHWM"]

    fn()
    hwm_after = _read_status_kib()["VmHWM"]

    # Without the reset, VmHWM is the peak of the whole process lifetime. It equals fn's own
    # peak only if fn raised it, or if nothing before fn had gone above the current RSS.
    honest = reset or hwm_after > hwm_before or hwm_before <= baseline
    if not honest:
        return None

    return {
        "peak_mib": max(hwm_after - baseline, 0) / 1024,
        "baseline_mib": baseline / 1024,
        "source": "linux-vmhwm",
        "hwm_reset": reset,
    }


def nvml_query(query: Callable[[ModuleType], _T]) -> _T | None:
    r"""Run ``query(pynvml)`` between ``nvmlInit`` and ``nvmlShutdown``.

    Returns:
        The query's result, or None when ``pynvml`` cannot be imported or an NVML call
        raises ``NVMLError`` (no driver, no library, unknown device, and so on).
    """
    try:
        import pynvml
    except ImportError:
        return None

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None

    try:
        return query(pynvml)
    except pynvml.NVMLError:
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            # The query's result is still valid.
            pass


def nvml_used_mib(uuid: str) -> float | None:
    r"""Return the used memory of the GPU with this UUID, in MiB, or None if NVML fails.

    The device is found by UUID rather than by index because NVML indices ignore
    ``CUDA_VISIBLE_DEVICES``.

    Arguments:
        uuid: The UUID as ``torch.cuda.get_device_properties(i).uuid`` prints it, with or
            without NVML's ``GPU-`` prefix.
    """
    if not uuid.startswith(("GPU-", "MIG-")):
        uuid = f"GPU-{uuid}"

    def used(nvml: ModuleType) -> float:
        handle = nvml.nvmlDeviceGetHandleByUUID(uuid)

        return nvml.nvmlDeviceGetMemoryInfo(handle).used / MIB

    return nvml_query(used)

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bench.cases import Case, build_workload
from bench.gpu_state import (
    GpuStateError,
    GpuStateRecorder,
    measure_with_state,
    read_gpu_state,
    recorder_for,
    slowdowns,
)
from bench.memory import MIB, peak_memory_mib
from bench.sweep import SweepSettings, measure_case

UUID = "58eb0bd5-1111-2222-3333-444455556666"

# CPU training steps take other code paths when torch.cuda.is_available() returns True.
REAL_IS_AVAILABLE = torch.cuda.is_available


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """Replace the pynvml calls of a snapshot with a fake GPU, recording the calls."""
    import pynvml

    calls = SimpleNamespace(handles=[], inits=0, shutdowns=0)

    def init() -> None:
        calls.inits += 1

    def shutdown() -> None:
        calls.shutdowns += 1

    def get_handle(uuid: str) -> str:
        calls.handles.append(uuid)
        return "handle"

    clocks = {pynvml.NVML_CLOCK_SM: 1980, pynvml.NVML_CLOCK_MEM: 3201}
    monkeypatch.setattr(pynvml, "nvmlInit", init)
    monkeypatch.setattr(pynvml, "nvmlShutdown", shutdown)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByUUID", get_handle)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetClockInfo", lambda handle, kind: clocks[kind])
    monkeypatch.setattr(pynvml, "nvmlDeviceGetTemperature", lambda handle, sensor: 41)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetPowerUsage", lambda handle: 118_500)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", lambda handle: 0x5)
    monkeypatch.setattr(
        pynvml, "nvmlDeviceGetMemoryInfo", lambda handle: SimpleNamespace(used=3 * MIB)
    )

    return calls


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make torch.cuda report one device with a UUID, without touching a GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda device: SimpleNamespace(uuid=UUID)
    )


def nvml_error(code_name: str) -> Exception:
    import pynvml

    return pynvml.NVMLError(getattr(pynvml, code_name))


def test_snapshot_fields(nvml: SimpleNamespace) -> None:
    state = read_gpu_state(UUID)

    assert state["sm_clock_mhz"] == 1980
    assert state["memory_clock_mhz"] == 3201
    assert state["temperature_c"] == 41
    assert state["power_w"] == pytest.approx(118.5)
    assert state["throttle_mask"] == 5
    assert state["throttle_reasons"] == ["gpu_idle", "sw_power_cap"]
    assert nvml.handles == [f"GPU-{UUID}"]
    assert nvml.shutdowns == 1


def test_snapshot_older_reason_name(
    nvml: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pynvml

    monkeypatch.delattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons")
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCurrentClocksThrottleReasons", lambda h: 0x40)

    assert read_gpu_state(UUID)["throttle_reasons"] == ["hw_thermal_slowdown"]


def test_snapshot_driver_lacks_new_name(
    nvml: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pynvml

    def missing(handle: str) -> int:
        raise nvml_error("NVML_ERROR_FUNCTION_NOT_FOUND")

    monkeypatch.setattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", missing)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCurrentClocksThrottleReasons", lambda h: 0x804)

    # Bit 0x800 has no name in nvidia-ml-py 13.615; it is kept as hex rather than dropped.
    assert read_gpu_state(UUID)["throttle_reasons"] == ["sw_power_cap", "0x800"]


def test_snapshot_unsupported_field(
    nvml: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pynvml

    def unsupported(handle: str) -> int:
        raise nvml_error("NVML_ERROR_NOT_SUPPORTED")

    monkeypatch.setattr(pynvml, "nvmlDeviceGetPowerUsage", unsupported)
    state = read_gpu_state(UUID)

    assert state["power_w"] is None
    assert state["sm_clock_mhz"] == 1980


def test_snapshot_every_field_fails(
    nvml: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pynvml

    def unsupported(*args: object) -> int:
        raise nvml_error("NVML_ERROR_NOT_SUPPORTED")

    for name in (
        "nvmlDeviceGetClockInfo",
        "nvmlDeviceGetTemperature",
        "nvmlDeviceGetPowerUsage",
        "nvmlDeviceGetCurrentClocksEventReasons",
        "nvmlDeviceGetCurrentClocksThrottleReasons",
    ):
        monkeypatch.setattr(pynvml, name, unsupported)

    with pytest.raises(GpuStateError, match="every NVML query failed"):
        read_gpu_state(UUID)

    assert nvml.shutdowns == 1


def test_snapshot_init_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    import pynvml

    def fail() -> None:
        raise nvml_error("NVML_ERROR_LIBRARY_NOT_FOUND")

    monkeypatch.setattr(pynvml, "nvmlInit", fail)

    with pytest.raises(GpuStateError, match="NVML failed to start"):
        read_gpu_state(UUID)


def test_snapshot_unknown_device(nvml: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    import pynvml

    def not_found(uuid: str) -> str:
        raise nvml_error("NVML_ERROR_NOT_FOUND")

    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByUUID", not_found)

    with pytest.raises(GpuStateError, match="found no device GPU-"):
        read_gpu_state(UUID)

    assert nvml.shutdowns == 1


def test_snapshot_missing_module(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)

    with pytest.raises(GpuStateError, match="install the nvidia-ml-py package"):
        read_gpu_state(UUID)


def test_recorder_snapshot(nvml: SimpleNamespace, fake_cuda: None) -> None:
    lines = []
    recorder = GpuStateRecorder("cuda", lines.append)

    assert recorder.snapshot()["temperature_c"] == 41
    assert str(recorder.device) == "cuda:0"
    assert lines == []


def test_recorder_failure_reported_once(fake_cuda: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    lines = []
    recorder = GpuStateRecorder("cuda:0", lines.append)

    snapshots = [recorder.snapshot() for _ in range(3)]

    assert snapshots == [None, None, None]
    assert len(lines) == 1
    assert "not recorded for cuda:0" in lines[0]
    assert "nvidia-ml-py" in lines[0]


def test_recorder_without_uuid(nvml: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace())
    lines = []

    assert GpuStateRecorder("cuda", lines.append).snapshot() is None
    assert "device UUID" in lines[0]


def test_recorder_for_cpu() -> None:
    assert recorder_for("cpu", print) is None


def test_measure_with_state(nvml: SimpleNamespace, fake_cuda: None) -> None:
    recorder = GpuStateRecorder("cuda", print)
    result, state = measure_with_state(recorder, lambda: 7)

    assert result == 7
    assert state["before"]["sm_clock_mhz"] == 1980
    assert state["after"]["power_w"] == pytest.approx(118.5)
    assert nvml.inits == 2


def test_measure_without_recorder() -> None:
    assert measure_with_state(None, lambda: 7) == (7, None)


def test_slowdowns() -> None:
    state = {
        "before": {"throttle_reasons": ["gpu_idle"]},
        "after": {"throttle_reasons": ["sw_thermal_slowdown", "sw_power_cap"]},
    }

    assert slowdowns(state) == ["sw_power_cap", "sw_thermal_slowdown"]
    assert slowdowns({"before": {"throttle_reasons": ["gpu_idle"]}, "after": None}) == []
    assert slowdowns(None) == []


def tiny_workload() -> tuple:
    case = Case("fc", "snf", (8,), 4, "gaussian")
    settings = SweepSettings(preset="figure3", results=Path("unused"), budget_s=0.05)

    return build_workload(case), settings


def test_sweep_records_gpu_state(
    nvml: SimpleNamespace, fake_cuda: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweep's measurement loop on a CPU workload, with the recorder of a mocked GPU."""
    workload, settings = tiny_workload()
    lines = []
    recorder = GpuStateRecorder("cuda", lines.append)
    monkeypatch.setattr(torch.cuda, "is_available", REAL_IS_AVAILABLE)

    rows = list(measure_case(workload, settings, ("train_time", "sample_time"), print, recorder))
    states = {row[0]: row[5] for row in rows}

    assert set(states) == {"train_time", "sample_time"}
    assert states["train_time"]["before"]["sm_clock_mhz"] == 1980
    assert states["sample_time"]["after"]["throttle_reasons"] == ["gpu_idle", "sw_power_cap"]
    assert all(row[3]["cv"] >= 0 for row in rows)
    assert lines == []


def test_sweep_without_nvml(fake_cuda: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    workload, settings = tiny_workload()
    lines = []
    recorder = GpuStateRecorder("cuda", lines.append)
    monkeypatch.setattr(torch.cuda, "is_available", REAL_IS_AVAILABLE)

    rows = list(
        measure_case(workload, settings, ("train_time", "sample_time"), lines.append, recorder)
    )

    assert [row[5] for row in rows] == [None, None]
    assert sum("GPU state: not recorded" in line for line in lines) == 1


def test_cuda_peak_memory_mocked(
    nvml: SimpleNamespace, fake_cuda: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CUDA allocator path of peak memory, with torch.cuda and pynvml calls mocked."""
    allocated = iter([16 * MIB])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: next(allocated))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 80 * MIB)
    calls = []

    result = peak_memory_mib(lambda: calls.append(1), "cuda")

    assert calls == [1]
    assert result["source"] == "cuda-allocator"
    assert result["baseline_mib"] == 16
    assert result["peak_mib"] == 64
    assert result["nvml_used_mib"] == 3
    assert nvml.handles == [f"GPU-{UUID}"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_snapshot_real_gpu() -> None:
    lines = []
    state = GpuStateRecorder("cuda", lines.append).snapshot()

    assert lines == []
    assert state["sm_clock_mhz"] > 0
    assert state["temperature_c"] > 0
    assert isinstance(state["throttle_reasons"], list)

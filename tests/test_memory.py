import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bench import memory
from bench.memory import MIB, nvml_used_mib, peak_memory_mib

linux_only = pytest.mark.skipif(
    not Path("/proc/self/status").exists(), reason="needs Linux /proc/self/status"
)
needs_clear_refs = pytest.mark.skipif(
    not os.access("/proc/self/clear_refs", os.W_OK), reason="needs a writable clear_refs"
)


def allocate(mib: int) -> Callable[[], None]:
    """Return a call that fills a float32 tensor of ``mib`` MiB, so its pages are resident."""

    def fn() -> None:
        x = torch.ones(mib * MIB // 4)
        del x

    return fn


@linux_only
@needs_clear_refs
def test_cpu_peak_large_tensor() -> None:
    result = peak_memory_mib(allocate(200), "cpu")

    assert result["source"] == "linux-vmhwm"
    assert result["hwm_reset"] is True
    assert result["baseline_mib"] > 0
    assert 190 <= result["peak_mib"] <= 230


@linux_only
@needs_clear_refs
def test_cpu_peak_not_inherited() -> None:
    first = peak_memory_mib(allocate(200), "cpu")
    second = peak_memory_mib(allocate(40), "cpu")

    # The second call may reuse pages the first freed, so its rise can be below 40 MiB.
    assert first["peak_mib"] >= 190
    assert second["peak_mib"] <= 60


@linux_only
def test_cpu_peak_without_reset(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Opening a folder for writing fails, as an unwritable clear_refs would.
    monkeypatch.setattr(memory, "_PROC_CLEAR_REFS", tmp_path)

    allocate(300)()
    hidden = peak_memory_mib(allocate(40), "cpu")
    raised = peak_memory_mib(allocate(400), "cpu")

    # The 40 MiB peak lies below the earlier 300 MiB one, so VmHWM cannot show it.
    assert hidden is None
    assert raised["hwm_reset"] is False
    assert 390 <= raised["peak_mib"] <= 440


def test_cpu_peak_without_proc(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(memory, "_PROC_STATUS", tmp_path / "missing")
    calls = []

    assert peak_memory_mib(lambda: calls.append(1), "cpu") is None
    assert calls == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_peak_tensor() -> None:
    def fn() -> None:
        x = torch.ones(64 * MIB // 4, device="cuda")
        del x

    existing = torch.ones(16 * MIB // 4, device="cuda")
    result = peak_memory_mib(fn, "cuda")

    assert result["source"] == "cuda-allocator"
    assert result["baseline_mib"] >= 16
    assert result["peak_mib"] == pytest.approx(64, abs=1)
    assert result.get("nvml_used_mib", 1.0) > 0
    del existing


@pytest.fixture
def pynvml(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """Replace the pynvml calls that the code makes, recording them."""
    import pynvml

    calls = SimpleNamespace(handles=[], shutdowns=0)

    def get_handle(uuid: str) -> str:
        calls.handles.append(uuid)
        return "handle"

    def shutdown() -> None:
        calls.shutdowns += 1

    monkeypatch.setattr(pynvml, "nvmlInit", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByUUID", get_handle)
    monkeypatch.setattr(
        pynvml, "nvmlDeviceGetMemoryInfo", lambda handle: SimpleNamespace(used=3 * MIB)
    )
    monkeypatch.setattr(pynvml, "nvmlShutdown", shutdown)

    return calls


def test_nvml_used_mib(pynvml: SimpleNamespace) -> None:
    assert nvml_used_mib("58eb0bd5-1111-2222-3333-444455556666") == 3.0
    assert pynvml.handles == ["GPU-58eb0bd5-1111-2222-3333-444455556666"]
    assert pynvml.shutdowns == 1


def test_nvml_used_mib_prefixed(pynvml: SimpleNamespace) -> None:
    nvml_used_mib("GPU-abc")

    assert pynvml.handles == ["GPU-abc"]


def test_nvml_query_failure(pynvml: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    import pynvml as module

    def fail(handle: str) -> None:
        raise module.NVMLError(module.NVML_ERROR_NOT_FOUND)

    monkeypatch.setattr(module, "nvmlDeviceGetMemoryInfo", fail)

    assert nvml_used_mib("abc") is None
    assert pynvml.shutdowns == 1


def test_nvml_init_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    import pynvml

    def fail() -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", fail)

    assert nvml_used_mib("abc") is None


def test_nvml_shutdown_failure(pynvml: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    import pynvml as module

    def fail() -> None:
        raise module.NVMLError(module.NVML_ERROR_UNINITIALIZED)

    monkeypatch.setattr(module, "nvmlShutdown", fail)

    assert nvml_used_mib("abc") == 3.0


def test_nvml_missing_module(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)

    assert nvml_used_mib("abc") is None

import pytest

from bench.cases import Case, build_model
from bench.probe import measure_in_subprocess

MIB = 2**20


@pytest.mark.parametrize("method", ["snf", "exact"])
def test_flow_training_peak_counts_adam_state(method: str) -> None:
    """A training step of the FC 2-layer flow keeps its parameters, their gradients and
    Adam's two moment buffers: four times the parameter bytes, plus small temporaries.

    The lower bound is three times: the warm-up case frees same-sized tensors before the
    baseline, and the allocator reused a few MiB of them in one full-suite run (35.7 MiB
    measured against 37.5 MiB of parameter-sized buffers), while a missing Adam state would
    leave two times."""

    case = Case("fc2", method, (784,), 100, "mnist-embedded")
    parameters = sum(p.numel() * p.element_size() for p in build_model(case).parameters())
    memory = measure_in_subprocess(case, "train_peak_memory", None, threads=1)

    assert memory["source"].endswith("-fresh-process")
    assert memory["peak_mib"] >= 3 * parameters / MIB
    assert memory["peak_mib"] <= 4 * parameters / MIB + 8.0


def test_probe_rejects_unknown_metric() -> None:
    case = Case("fc2", "snf", (784,), 100, "mnist-embedded")

    with pytest.raises(ValueError, match="unknown memory metric 'train_time'"):
        measure_in_subprocess(case, "train_time", None, threads=1)

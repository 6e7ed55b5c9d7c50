import time
from collections.abc import Callable

import numpy as np
import pytest
import torch

from bench.timing import (
    PROTOCOLS,
    CallTimer,
    Measurement,
    get_protocol,
    measure_sample,
    measure_train,
    median_ci,
    summarize,
)


class FakeTimer:
    """Runs the call and returns preset durations instead of reading a clock."""

    clock = "fake"

    def __init__(self, durations: Callable[[int], float]) -> None:
        self.durations = durations
        self.calls = 0

    def __call__(self, fn: Callable[[], object]) -> float:
        fn()
        duration = self.durations(self.calls)
        self.calls += 1

        return duration


def test_summarize_values() -> None:
    samples = [4.0, 1.0, 3.0, 2.0, 10.0]
    stats = summarize(samples)

    assert stats["n"] == 5
    assert stats["mean"] == pytest.approx(4.0)
    assert stats["std"] == pytest.approx(np.std(samples, ddof=1))
    assert stats["median"] == 3.0
    assert stats["q1"] == 2.0
    assert stats["q3"] == 4.0
    assert stats["min"] == 1.0
    assert stats["max"] == 10.0
    assert stats["cv"] == pytest.approx(stats["std"] / 4.0)


def test_summarize_single_sample() -> None:
    stats = summarize([2.5])

    assert stats["n"] == 1
    assert stats["std"] == 0.0
    assert stats["cv"] == 0.0
    assert stats["q1"] == stats["q3"] == 2.5


def test_summarize_all_zero() -> None:
    assert summarize([0.0, 0.0])["cv"] == 0.0


@pytest.mark.parametrize("samples", [[], [1.0, float("nan")], [1.0, -0.5]])
def test_summarize_rejects_invalid(samples: list[float]) -> None:
    with pytest.raises(ValueError, match="samples_ms"):
        summarize(samples)


def test_median_ci_too_few_samples() -> None:
    assert median_ci([]) is None
    assert median_ci([1.0, 2.0, 3.0, 4.0, 5.0]) is None


def test_median_ci_ranks() -> None:
    # Six samples: the extremes cover the median with probability 1 - 2 / 64 >= 95%.
    assert median_ci([6.0, 1.0, 5.0, 2.0, 4.0, 3.0]) == (1.0, 6.0)

    # One hundred samples: the 95% interval is [x_(40), x_(61)], with coverage 0.965.
    samples = [float(k) for k in range(1, 101)]
    assert median_ci(samples) == (40.0, 61.0)


def test_median_ci_coverage() -> None:
    generator = np.random.default_rng(0)
    trials = 2000
    covered = 0

    for _ in range(trials):
        samples = generator.exponential(size=30).tolist()
        low, high = median_ci(samples)
        covered += low <= np.log(2) <= high

    # The exact coverage at n = 30 is 0.957, and 0.94 allows for the sampling error of 2000 trials.
    assert covered / trials >= 0.94


def test_median_ci_rejects_confidence() -> None:
    with pytest.raises(ValueError, match="confidence=1.5"):
        median_ci([1.0] * 10, confidence=1.5)


def test_call_timer_cpu_sleep() -> None:
    timer = CallTimer("cpu")

    duration = timer(lambda: time.sleep(0.02))

    assert timer.clock == "perf_counter_ns"
    assert 20.0 <= duration < 1000.0


def test_call_timer_rejects_device() -> None:
    with pytest.raises(ValueError, match="'meta'"):
        CallTimer("meta")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_call_timer_cuda_missing() -> None:
    with pytest.raises(ValueError, match="cuda.is_available"):
        CallTimer("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_call_timer_cuda_events() -> None:
    timer = CallTimer("cuda")
    x = torch.randn(2048, 2048, device="cuda")

    duration = timer(lambda: x @ x)

    assert timer.clock == "cuda-event"
    assert timer.device.index is not None
    assert duration > 0.0


def test_get_protocol_names() -> None:
    assert set(PROTOCOLS) == {"paper", "adaptive"}
    assert get_protocol("paper").name == "paper"

    with pytest.raises(ValueError, match="'fast'.*adaptive, paper"):
        get_protocol("fast")


def test_paper_train_trims_each_epoch() -> None:
    timer = FakeTimer(lambda k: float(k))
    indices = []

    measurement = get_protocol("paper").train(
        indices.append, timer, batches_per_epoch=60, epochs=2
    )

    # 60 batches are fewer than 600, so the trim of 100 is scaled to round(60 / 6) = 10.
    assert indices == list(range(120))
    assert measurement.protocol["trim_requested"] == 100
    assert measurement.protocol["trim"] == 10
    assert measurement.protocol["kept_per_epoch"] == 40
    assert measurement.samples_ms == [float(k) for k in [*range(10, 50), *range(70, 110)]]
    assert measurement.stats["n"] == 80


def test_paper_train_full_trim() -> None:
    timer = FakeTimer(lambda k: 1.0)

    measurement = get_protocol("paper").train(
        lambda i: None, timer, batches_per_epoch=1200, epochs=1
    )

    assert measurement.protocol["trim"] == 100
    assert measurement.stats["n"] == 1000
    assert measurement.protocol["clock"] == "fake"


def test_paper_train_single_batch() -> None:
    measurement = get_protocol("paper").train(
        lambda i: None, FakeTimer(lambda k: 2.0), batches_per_epoch=1, epochs=3
    )

    assert measurement.protocol["trim"] == 0
    assert measurement.samples_ms == [2.0, 2.0, 2.0]


def test_paper_train_needs_batches_per_epoch() -> None:
    with pytest.raises(ValueError, match="batches_per_epoch is missing"):
        measure_train(lambda i: None, "cpu", protocol="paper")


def test_paper_sample_keeps_middle() -> None:
    durations = [5.0, 0.0, 9.0, 3.0, 8.0, 1.0, 7.0, 2.0, 6.0, 4.0]
    timer = FakeTimer(lambda k: durations[k])

    measurement = get_protocol("paper").sample(lambda: None, timer, draws=10)

    # The 2 lowest (0, 1) and 2 highest (8, 9) are dropped. The rest keep their call order.
    assert measurement.samples_ms == [5.0, 3.0, 7.0, 2.0, 6.0, 4.0]
    assert measurement.protocol["dropped_low"] == 2
    assert measurement.protocol["dropped_high"] == 2
    assert measurement.protocol["draws"] == 10


def test_paper_sample_default_draws() -> None:
    timer = FakeTimer(lambda k: float(k))

    measurement = get_protocol("paper").sample(lambda: None, timer)

    assert timer.calls == 100
    assert measurement.samples_ms == [float(k) for k in range(20, 80)]


def test_adaptive_converges_on_constant() -> None:
    timer = FakeTimer(lambda k: 1.0)

    measurement = get_protocol("adaptive").sample(
        lambda: None, timer, warmup_calls=2, warmup_s=0.0, min_repeats=12
    )

    assert measurement.protocol["converged"] is True
    assert measurement.protocol["stop_reason"] == "converged"
    assert measurement.protocol["n"] == 12
    assert measurement.protocol["warmup_calls_run"] == 2
    assert measurement.protocol["ci_low_ms"] == measurement.protocol["ci_high_ms"] == 1.0
    assert timer.calls == 14


def test_adaptive_stops_at_max_repeats() -> None:
    timer = FakeTimer(lambda k: 1.0 if k % 2 else 3.0)

    measurement = get_protocol("adaptive").sample(
        lambda: None, timer, warmup_calls=0, warmup_s=0.0, max_repeats=50
    )

    assert measurement.protocol["converged"] is False
    assert measurement.protocol["stop_reason"] == "max_repeats"
    assert measurement.stats["n"] == 50
    assert len(measurement.samples_ms) == 50


def test_adaptive_stops_at_budget() -> None:
    measurement = measure_sample(
        lambda: time.sleep(0.01),
        "cpu",
        warmup_calls=1,
        warmup_s=0.0,
        rel_tol=1e-9,
        budget_s=0.05,
    )

    assert measurement.protocol["stop_reason"] == "budget"
    assert measurement.protocol["converged"] is False
    assert measurement.protocol["elapsed_s"] >= 0.05
    assert 1 <= measurement.protocol["n"] <= 6


def test_adaptive_warmup_duration() -> None:
    timer = CallTimer("cpu")

    measurement = get_protocol("adaptive").sample(
        lambda: time.sleep(0.005), timer, warmup_calls=1, warmup_s=0.05, budget_s=0.01
    )

    assert measurement.protocol["warmup_elapsed_s"] >= 0.05
    assert measurement.protocol["warmup_calls_run"] >= 2


def test_adaptive_train_counts_warmup() -> None:
    indices = []

    get_protocol("adaptive").train(
        indices.append, FakeTimer(lambda k: 1.0), warmup_calls=3, warmup_s=0.0
    )

    assert indices == list(range(len(indices)))
    assert len(indices) == 3 + 10


def test_adaptive_records_parameters() -> None:
    measurement = get_protocol("adaptive").sample(lambda: None, FakeTimer(lambda k: 1.0))
    protocol = measurement.protocol

    assert protocol["name"] == "adaptive"
    assert protocol["warmup_calls"] == 3
    assert protocol["warmup_s"] == 0.2
    assert protocol["min_repeats"] == 10
    assert protocol["max_repeats"] == 2000
    assert protocol["budget_s"] == 10.0
    assert protocol["rel_tol"] == 0.02
    assert protocol["confidence"] == 0.95


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"budget_s": 0}, "budget_s=0 is invalid"),
        ({"budget_s": float("inf")}, "budget_s=inf is invalid"),
        ({"rel_tol": 0.0}, r"rel_tol=0.0 is invalid; expected a number in the range \(0, 1\)"),
        ({"rel_tol": 1.5}, "rel_tol=1.5 is invalid"),
        ({"min_repeats": 0}, "min_repeats=0 is invalid; expected an integer >= 1"),
        ({"min_repeats": 2.5}, "min_repeats=2.5 is invalid"),
        ({"max_repeats": 5}, "max_repeats=5 is invalid; expected an integer >= min_repeats"),
        ({"warmup_s": -1}, "warmup_s=-1 is invalid"),
        ({"warmup_calls": True}, "warmup_calls=True is invalid"),
        ({"epochs": 3}, "epochs are invalid for the 'adaptive' protocol"),
    ],
)
def test_adaptive_rejects_parameters(params: dict, message: str) -> None:
    calls = []

    with pytest.raises(ValueError, match=message):
        measure_sample(lambda: calls.append(1), "cpu", **params)

    assert calls == []


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"epochs": 0}, "epochs=0 is invalid"),
        ({"trim": -1}, "trim=-1 is invalid"),
        ({"batches_per_epoch": 0}, "batches_per_epoch=0 is invalid"),
        ({"budget_s": 1.0}, "budget_s are invalid for the 'paper' protocol"),
    ],
)
def test_paper_rejects_parameters(params: dict, message: str) -> None:
    params = {"batches_per_epoch": 10, **params}

    with pytest.raises(ValueError, match=message):
        measure_train(lambda i: None, "cpu", protocol="paper", **params)


def test_paper_rejects_draws() -> None:
    with pytest.raises(ValueError, match="draws=0 is invalid"):
        measure_sample(lambda: None, "cpu", protocol="paper", draws=0)


def test_measure_train_cpu_step() -> None:
    model = torch.nn.Linear(16, 16)
    optimizer = torch.optim.Adam(model.parameters())
    batches = [torch.randn(8, 16) for _ in range(4)]
    messages = []

    def step(i: int) -> None:
        optimizer.zero_grad()
        loss = model(batches[i % len(batches)]).square().mean()
        loss.backward()
        optimizer.step()

    measurement = measure_train(step, "cpu", warmup_s=0.0, budget_s=0.5, progress=messages.append)

    assert isinstance(measurement, Measurement)
    assert measurement.protocol["name"] == "adaptive"
    assert measurement.protocol["clock"] == "perf_counter_ns"
    assert measurement.stats["n"] == len(measurement.samples_ms)
    assert measurement.stats["min"] > 0.0
    assert len(messages) == 2


def test_measure_sample_paper_cpu() -> None:
    measurement = measure_sample(lambda: torch.randn(1, 64), "cpu", protocol="paper", draws=20)

    assert measurement.protocol["name"] == "paper"
    assert measurement.stats["n"] == 12


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_measure_train_cuda_step() -> None:
    x = torch.randn(512, 512, device="cuda", requires_grad=True)

    def step(i: int) -> None:
        (x @ x).sum().backward()

    measurement = measure_train(step, "cuda", protocol="paper", batches_per_epoch=12, epochs=2)

    assert measurement.protocol["clock"] == "cuda-event"
    assert measurement.stats["n"] == 16
    assert measurement.stats["min"] > 0.0

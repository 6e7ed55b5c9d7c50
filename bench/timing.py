r"""Timing harness: per-call timers, summary statistics and the measurement protocols.

Two protocols are available by name through :func:`get_protocol`:

- ``"paper"`` follows Keller et al., "Self Normalizing Flows" (2021), appendix A.3.2. Time
  per batch is the mean and standard deviation over 10 epochs, ignoring the first and last
  100 batches of each epoch. Time per sample keeps the middle 60% of 100 single draws.
- ``"adaptive"`` (the default) warms up, then repeats until the distribution-free 95%
  confidence interval of the median is tight or a time budget is spent.

References:
    | Self Normalizing Flows (Keller et al., 2021)
    | https://arxiv.org/abs/2011.07248
"""

from __future__ import annotations

import itertools
import math
import numbers
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Protocol

import numpy as np
import torch

__all__ = [
    "DEFAULT_PROTOCOL",
    "PROTOCOLS",
    "AdaptiveProtocol",
    "CallTimer",
    "Measurement",
    "PaperProtocol",
    "TimingProtocol",
    "get_protocol",
    "measure_sample",
    "measure_train",
    "median_ci",
    "resolve_device",
    "summarize",
]

DEFAULT_PROTOCOL = "adaptive"

Progress = Callable[[str], None] | None


class Timer(Protocol):
    """A callable that runs ``fn`` once and returns its duration in milliseconds."""

    clock: str

    def __call__(self, fn: Callable[[], object]) -> float: ...


class CallTimer:
    r"""Per-call timer for one device.

    On CUDA, the call is bracketed by two ``torch.cuda.Event(enable_timing=True)`` recorded
    on the current stream, after a device synchronization so that earlier queued work is not
    counted. On the CPU, the host clock ``time.perf_counter_ns`` is read around the call.

    Arguments:
        device: A CPU or CUDA device, such as ``"cpu"``, ``"cuda"`` or ``"cuda:1"``.

    Note:
        CUDA events time the current stream only. Work that the call launches on other
        streams is waited for by the final synchronization but is not part of the elapsed
        time unless the current stream waits for it.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = resolve_device(device)
        self.clock = "cuda-event" if self.device.type == "cuda" else "perf_counter_ns"

    def __call__(self, fn: Callable[[], object]) -> float:
        """Run ``fn`` once and return its duration in milliseconds."""
        if self.device.type == "cuda":
            return self._time_cuda(fn)

        start = time.perf_counter_ns()
        fn()
        end = time.perf_counter_ns()

        return (end - start) / 1e6

    def _time_cuda(self, fn: Callable[[], object]) -> float:
        with torch.cuda.device(self.device):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)

            torch.cuda.synchronize(self.device)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(self.device)

            return float(start.elapsed_time(end))


def resolve_device(device: torch.device | str) -> torch.device:
    """Return ``device`` as a ``torch.device`` with an explicit CUDA index."""
    device = torch.device(device)

    if device.type == "cpu":
        return device

    if device.type != "cuda":
        raise ValueError(f"device {str(device)!r} is not supported; use 'cpu' or 'cuda[:index]'")

    if not torch.cuda.is_available():
        raise ValueError(
            f"device {str(device)!r} was requested, but torch.cuda.is_available() is False; "
            "use 'cpu' or run on a machine with a CUDA GPU"
        )

    index = torch.cuda.current_device() if device.index is None else device.index

    return torch.device("cuda", index)


@dataclass
class Measurement:
    r"""Timing samples of one measured callable.

    Attributes:
        samples_ms: The samples kept after trimming, in milliseconds, in call order.
        stats: The summary of ``samples_ms`` from :func:`summarize`.
        protocol: The protocol's ``name`` and every parameter that it used, including
            derived values such as the trim applied and the elapsed seconds.
    """

    samples_ms: list[float]
    stats: dict = field(default_factory=dict)
    protocol: dict = field(default_factory=dict)


def summarize(samples_ms: list[float]) -> dict:
    r"""Summarize timing samples.

    Quartiles use numpy's default linear interpolation between order statistics.

    Arguments:
        samples_ms: Durations in milliseconds, finite and non-negative.

    Returns:
        A dict with ``n``, ``mean``, ``std`` (sample standard deviation, ddof=1, and 0.0
        when ``n == 1``), ``median``, ``q1``, ``q3``, ``min``, ``max`` and ``cv``
        (``std / mean``, and 0.0 when every sample is 0).
    """
    if len(samples_ms) == 0:
        raise ValueError("samples_ms is empty; summarize needs at least one sample")

    x = np.asarray(samples_ms, dtype=np.float64)

    if not np.all(np.isfinite(x)):
        raise ValueError("samples_ms contains NaN or infinite values; times must be finite")
    if np.any(x < 0):
        raise ValueError(f"samples_ms contains a negative time ({x.min()}); times must be >= 0")

    n = len(x)
    mean = float(x.mean())
    std = float(x.std(ddof=1)) if n > 1 else 0.0
    q1, median, q3 = (float(q) for q in np.percentile(x, [25, 50, 75]))

    # A mean of 0 implies every sample is 0 because negative samples were rejected.
    cv = std / mean if mean > 0 else 0.0

    return {
        "n": n,
        "mean": mean,
        "std": std,
        "median": median,
        "q1": q1,
        "q3": q3,
        "min": float(x.min()),
        "max": float(x.max()),
        "cv": cv,
    }


@lru_cache(maxsize=4096)
def _median_ci_rank(n: int, confidence: float) -> int:
    """Return the 1-based rank ``j`` such that ``[x_(j), x_(n+1-j)]`` covers the median.

    ``j`` is the largest rank with ``P(B <= j - 1) <= (1 - confidence) / 2`` for
    ``B ~ Binomial(n, 1/2)``, so the interval's coverage is at least ``confidence``.
    Returns 0 when no such interval exists (too few samples).
    """
    i = np.arange(1, n + 1, dtype=np.float64)

    # log C(n, k) for k = 0..n as cumulative sums of log((n - k + 1) / k).
    log_comb = np.concatenate(([0.0], np.cumsum(np.log((n - i + 1) / i))))
    cdf = np.cumsum(np.exp(log_comb - n * math.log(2.0)))

    return int(np.count_nonzero(cdf <= (1.0 - confidence) / 2))


def median_ci(samples_ms: list[float], confidence: float = 0.95) -> tuple[float, float] | None:
    r"""Compute the distribution-free confidence interval of the median.

    The bounds are order statistics whose ranks come from the Binomial(n, 1/2)
    distribution, so the coverage is at least ``confidence`` for any continuous
    distribution of the samples.

    Arguments:
        samples_ms: Durations in milliseconds.
        confidence: The coverage, in (0, 1).

    Returns:
        The ``(low, high)`` bounds, or None when there are too few samples for that
        coverage (fewer than 6 at 95%).
    """
    _check_open_unit("confidence", confidence)

    n = len(samples_ms)
    if n == 0:
        return None

    rank = _median_ci_rank(n, float(confidence))
    if rank == 0:
        return None

    ordered = sorted(samples_ms)

    return float(ordered[rank - 1]), float(ordered[n - rank])


# Parameter validation


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name}={value!r} is invalid; expected an integer >= {minimum}")

    return int(value)


def _check_seconds(name: str, value: object, allow_zero: bool) -> float:
    valid = isinstance(value, numbers.Real) and not isinstance(value, bool)
    valid = valid and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)

    if not valid:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}={value!r} is invalid; expected a number of seconds {bound}")

    return float(value)


def _check_open_unit(name: str, value: object) -> float:
    valid = isinstance(value, numbers.Real) and not isinstance(value, bool)

    if not (valid and 0 < value < 1):
        raise ValueError(f"{name}={value!r} is invalid; expected a number in the range (0, 1)")

    return float(value)


def _check_names(protocol: str, params: dict, valid: tuple[str, ...]) -> None:
    unknown = sorted(set(params) - set(valid))

    if unknown:
        raise ValueError(
            f"parameter(s) {', '.join(unknown)} are invalid for the {protocol!r} protocol; "
            f"valid parameters: {', '.join(valid)}"
        )


# Protocols


class TimingProtocol:
    r"""Base class of the measurement protocols.

    Subclasses time training steps with :meth:`train` and sampling draws with
    :meth:`sample`. Both validate every parameter before the first call.
    """

    name: str = ""

    def train(
        self,
        step: Callable[[int], object],
        timer: Timer,
        batches_per_epoch: int | None = None,
        progress: Progress = None,
        **params: object,
    ) -> Measurement:
        """Time training steps, where ``step(i)`` runs batch ``i``."""
        raise NotImplementedError

    def sample(
        self,
        draw: Callable[[], object],
        timer: Timer,
        progress: Progress = None,
        **params: object,
    ) -> Measurement:
        """Time sampling draws, where each ``draw()`` call is one sample."""
        raise NotImplementedError


class PaperProtocol(TimingProtocol):
    r"""The protocol of Keller et al. (2021), appendix A.3.2.

    Training: ``epochs`` epochs of ``batches_per_epoch`` calls, with the first and last
    ``trim`` batches of each epoch ignored. The trim applied is at most
    ``round(batches_per_epoch / 6)``, so at least two thirds of each epoch is kept. This
    lowers the default of 100 for epochs of fewer than 600 batches. The trim applied is
    recorded as ``trim`` and the requested one as ``trim_requested``.

    Sampling: ``draws`` single calls, of which the lowest and highest
    ``floor(0.2 * draws)`` are dropped, keeping the middle 60%.

    Note:
        This protocol runs no warm-up. Trimming the first batches of each epoch plays that
        role for training, and the lowest and highest draws are dropped for sampling.
    """

    name = "paper"

    train_defaults = {"epochs": 10, "trim": 100}
    sample_defaults = {"draws": 100}
    sample_trim_fraction = 0.2

    def train(
        self,
        step: Callable[[int], object],
        timer: Timer,
        batches_per_epoch: int | None = None,
        progress: Progress = None,
        **params: object,
    ) -> Measurement:
        """Time ``epochs`` epochs of ``step(i)``, with ``i`` counting every call from 0."""
        if batches_per_epoch is None:
            raise ValueError(
                "batches_per_epoch is missing; the 'paper' protocol needs the number of "
                "batches in one epoch of the data set"
            )

        _check_names(self.name, params, tuple(self.train_defaults))
        settings = {**self.train_defaults, **params}
        epochs = _check_int("epochs", settings["epochs"], 1)
        trim_requested = _check_int("trim", settings["trim"], 0)
        batches_per_epoch = _check_int("batches_per_epoch", batches_per_epoch, 1)

        trim = min(trim_requested, round(batches_per_epoch / 6))
        kept_per_epoch = batches_per_epoch - 2 * trim

        # Time every batch, then keep the middle of each epoch.
        start = time.perf_counter()
        kept: list[float] = []

        for epoch in range(epochs):
            times = []
            for batch in range(batches_per_epoch):
                i = epoch * batches_per_epoch + batch
                times.append(timer(lambda i=i: step(i)))

            kept.extend(times[trim : batches_per_epoch - trim])

            if progress is not None:
                progress(f"paper protocol: epoch {epoch + 1}/{epochs} timed")

        elapsed = time.perf_counter() - start

        protocol = {
            "name": self.name,
            "clock": timer.clock,
            "epochs": epochs,
            "batches_per_epoch": batches_per_epoch,
            "trim_requested": trim_requested,
            "trim": trim,
            "kept_per_epoch": kept_per_epoch,
            "calls": epochs * batches_per_epoch,
            "warmup_calls": 0,
            "elapsed_s": elapsed,
        }

        return Measurement(samples_ms=kept, stats=summarize(kept), protocol=protocol)

    def sample(
        self,
        draw: Callable[[], object],
        timer: Timer,
        progress: Progress = None,
        **params: object,
    ) -> Measurement:
        """Time ``draws`` single draws and keep the middle 60%."""
        _check_names(self.name, params, tuple(self.sample_defaults))
        settings = {**self.sample_defaults, **params}
        draws = _check_int("draws", settings["draws"], 1)

        start = time.perf_counter()
        times = [timer(draw) for _ in range(draws)]
        elapsed = time.perf_counter() - start

        # Drop the extremes by rank but keep the remaining samples in call order.
        dropped = math.floor(self.sample_trim_fraction * draws)
        order = sorted(range(draws), key=lambda k: times[k])
        kept_indices = sorted(order[dropped : draws - dropped])
        kept = [times[k] for k in kept_indices]

        if progress is not None:
            progress(f"paper protocol: {draws} draws timed, {len(kept)} kept")

        protocol = {
            "name": self.name,
            "clock": timer.clock,
            "draws": draws,
            "trim_fraction": self.sample_trim_fraction,
            "dropped_low": dropped,
            "dropped_high": dropped,
            "calls": draws,
            "warmup_calls": 0,
            "elapsed_s": elapsed,
        }

        return Measurement(samples_ms=kept, stats=summarize(kept), protocol=protocol)


class AdaptiveProtocol(TimingProtocol):
    r"""Warm up, then repeat until the median is known precisely or a limit is reached.

    Warm-up runs at least ``warmup_calls`` calls and at least ``warmup_s`` seconds. Timing
    then stops at the first of:

    - converged: at least ``min_repeats`` samples and the ``confidence`` interval of the
      median (see :func:`median_ci`) has a half-width of at most ``rel_tol`` times the
      median;
    - ``budget_s`` seconds of wall-clock time spent in the timing phase, warm-up excluded;
    - ``max_repeats`` samples.

    Every sample is kept. The record stores ``converged``, ``stop_reason``, ``n``, the
    interval bounds and the elapsed seconds.

    Note:
        The interval needs at least 6 samples at 95% confidence, so with
        ``min_repeats < 6`` the protocol can converge only from the 6th sample on.
    """

    name = "adaptive"

    defaults = {
        "warmup_calls": 3,
        "warmup_s": 0.2,
        "min_repeats": 10,
        "max_repeats": 2000,
        "budget_s": 10.0,
        "rel_tol": 0.02,
        "confidence": 0.95,
    }

    def train(
        self,
        step: Callable[[int], object],
        timer: Timer,
        batches_per_epoch: int | None = None,
        progress: Progress = None,
        **params: object,
    ) -> Measurement:
        """Time ``step(i)``, with ``i`` counting every call from 0, warm-up included.

        ``batches_per_epoch`` is accepted for a uniform call signature and ignored.
        """
        counter = itertools.count()

        return self._measure(lambda: step(next(counter)), timer, progress, params)

    def sample(
        self,
        draw: Callable[[], object],
        timer: Timer,
        progress: Progress = None,
        **params: object,
    ) -> Measurement:
        """Time ``draw()`` calls."""
        return self._measure(draw, timer, progress, params)

    def _check(self, params: dict) -> dict:
        _check_names(self.name, params, tuple(self.defaults))
        settings = {**self.defaults, **params}

        checked = {
            "warmup_calls": _check_int("warmup_calls", settings["warmup_calls"], 0),
            "warmup_s": _check_seconds("warmup_s", settings["warmup_s"], allow_zero=True),
            "min_repeats": _check_int("min_repeats", settings["min_repeats"], 1),
            "max_repeats": _check_int("max_repeats", settings["max_repeats"], 1),
            "budget_s": _check_seconds("budget_s", settings["budget_s"], allow_zero=False),
            "rel_tol": _check_open_unit("rel_tol", settings["rel_tol"]),
            "confidence": _check_open_unit("confidence", settings["confidence"]),
        }

        if checked["max_repeats"] < checked["min_repeats"]:
            raise ValueError(
                f"max_repeats={checked['max_repeats']} is invalid; expected an integer "
                f">= min_repeats={checked['min_repeats']}"
            )

        return checked

    def _measure(
        self, fn: Callable[[], object], timer: Timer, progress: Progress, params: dict
    ) -> Measurement:
        settings = self._check(params)

        # Warm-up: both the call count and the duration must be reached.
        warmup_start = time.perf_counter()
        warmup_calls = 0

        while (
            warmup_calls < settings["warmup_calls"]
            or time.perf_counter() - warmup_start < settings["warmup_s"]
        ):
            timer(fn)
            warmup_calls += 1

        warmup_elapsed = time.perf_counter() - warmup_start

        if progress is not None:
            progress(f"adaptive protocol: {warmup_calls} warm-up calls in {warmup_elapsed:.2f} s")

        # Timing: stop on convergence, budget or repeat limit, checked in that order.
        samples: list[float] = []
        interval = None
        stop_reason = "max_repeats"
        start = time.perf_counter()

        while True:
            samples.append(timer(fn))

            if len(samples) >= settings["min_repeats"]:
                interval = median_ci(samples, settings["confidence"])
                if interval is not None and self._is_tight(samples, interval, settings):
                    stop_reason = "converged"
                    break

            if time.perf_counter() - start >= settings["budget_s"]:
                stop_reason = "budget"
                break

            if len(samples) >= settings["max_repeats"]:
                break

        elapsed = time.perf_counter() - start

        if interval is None:
            interval = median_ci(samples, settings["confidence"])

        if progress is not None:
            progress(f"adaptive protocol: {len(samples)} calls timed, stopped by {stop_reason}")

        protocol = {
            "name": self.name,
            "clock": timer.clock,
            **settings,
            "warmup_calls_run": warmup_calls,
            "warmup_elapsed_s": warmup_elapsed,
            "converged": stop_reason == "converged",
            "stop_reason": stop_reason,
            "n": len(samples),
            "ci_low_ms": None if interval is None else interval[0],
            "ci_high_ms": None if interval is None else interval[1],
            "elapsed_s": elapsed,
        }

        return Measurement(samples_ms=samples, stats=summarize(samples), protocol=protocol)

    @staticmethod
    def _is_tight(samples: list[float], interval: tuple[float, float], settings: dict) -> bool:
        median = float(np.median(samples))
        half_width = (interval[1] - interval[0]) / 2

        return half_width <= settings["rel_tol"] * median


PROTOCOLS: dict[str, TimingProtocol] = {
    PaperProtocol.name: PaperProtocol(),
    AdaptiveProtocol.name: AdaptiveProtocol(),
}


def get_protocol(name: str) -> TimingProtocol:
    """Return the protocol registered as ``name`` in :data:`PROTOCOLS`."""
    if name not in PROTOCOLS:
        raise ValueError(
            f"protocol {name!r} is unknown; valid protocols: {', '.join(sorted(PROTOCOLS))}"
        )

    return PROTOCOLS[name]


def measure_train(
    step: Callable[[int], object],
    device: torch.device | str,
    protocol: str = DEFAULT_PROTOCOL,
    batches_per_epoch: int | None = None,
    progress: Progress = None,
    **params: object,
) -> Measurement:
    r"""Measure the time per training batch.

    Arguments:
        step: Runs batch ``i`` (forward, backward and optimizer step). ``i`` counts every
            call from 0, so callers cycle through their data with ``i % len(batches)``.
        device: The device that ``step`` runs on, which selects the clock.
        protocol: A name in :data:`PROTOCOLS`.
        batches_per_epoch: The batches in one epoch, needed by ``"paper"`` and ignored by
            ``"adaptive"``.
        progress: Receives one-line progress messages, if given.
        params: Protocol parameters, such as ``epochs`` and ``trim`` for ``"paper"`` or
            ``budget_s`` and ``rel_tol`` for ``"adaptive"``.

    Returns:
        The kept samples in milliseconds, their summary and the protocol record.
    """
    timer = CallTimer(device)

    return get_protocol(protocol).train(step, timer, batches_per_epoch, progress, **params)


def measure_sample(
    draw: Callable[[], object],
    device: torch.device | str,
    protocol: str = DEFAULT_PROTOCOL,
    progress: Progress = None,
    **params: object,
) -> Measurement:
    r"""Measure the time per sampling call.

    Arguments:
        draw: Draws one sample (or one batch of samples, whatever the caller reports).
        device: The device that ``draw`` runs on, which selects the clock.
        protocol: A name in :data:`PROTOCOLS`.
        progress: Receives one-line progress messages, if given.
        params: Protocol parameters, such as ``draws`` for ``"paper"``.

    Returns:
        The kept samples in milliseconds, their summary and the protocol record.
    """
    timer = CallTimer(device)

    return get_protocol(protocol).sample(draw, timer, progress, **params)

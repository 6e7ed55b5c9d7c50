import importlib.util
import inspect
import itertools
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

from bench import bench_correctness, bench_flows, bench_layers
from bench.cases import Case, table3_cases
from bench.sweep import SweepSettings, select_cases
from snf_core import Flow, SelfNormalizingLinear

ROOT = Path(__file__).resolve().parents[1]

BENCHMARK_PREFIXES = ("time_", "peakmem_", "track_")


@pytest.fixture(autouse=True)
def restore_threads() -> Iterator[None]:
    """Restore torch's thread count, which the benchmarks' setup pins, for later tests."""

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def asv_classes(module: ModuleType = bench_layers) -> list[type]:
    """Return the classes of an asv module that asv collects: public, with benchmarks."""

    return [
        cls
        for name, cls in inspect.getmembers(module, inspect.isclass)
        if not name.startswith("_")
        and any(attr.startswith(BENCHMARK_PREFIXES) for attr in dir(cls))
    ]


def sweep_cases() -> set[Case]:
    """Return the cases of the sweep CLI's presets that the asv suite mirrors."""

    cases = set()

    for device in bench_layers.DEVICES:
        table2 = SweepSettings("table2", Path("unused"), device=device)
        figure3 = SweepSettings(
            "figure3", Path("unused"), device=device, dims=bench_layers.FIGURE3_DIMS
        )
        cases.update(select_cases(table2))
        cases.update(select_cases(figure3))

    return cases


def asv_cases(cls: type) -> list[Case]:
    """Return the case of each asv parameter set of a class, in asv's order."""

    return [bench_layers.CASES[(cls.model, *params)] for params in itertools.product(*cls.params)]


def test_asv_classes_found() -> None:
    names = {cls.__name__ for cls in asv_classes()}

    assert names == {
        "FCTrain",
        "ConvTrain",
        "FCSample",
        "ConvSample",
        "FCCUDAMemory",
        "ConvCUDAMemory",
    }


def test_asv_param_names_match_params() -> None:
    for cls in asv_classes() + asv_classes(bench_flows):
        assert len(cls.param_names) == len(cls.params), cls.__name__


def test_asv_params_are_sweep_cases() -> None:
    expected = sweep_cases()

    for cls in asv_classes():
        cases = asv_cases(cls)

        assert set(cases) <= expected, cls.__name__
        assert all(case.model == cls.model for case in cases), cls.__name__


def test_every_sweep_case_has_asv_params() -> None:
    expected = sweep_cases()
    trained = set(asv_cases(bench_layers.FCTrain) + asv_cases(bench_layers.ConvTrain))
    sampled = set(asv_cases(bench_layers.FCSample) + asv_cases(bench_layers.ConvSample))
    gpu = set(asv_cases(bench_layers.FCCUDAMemory) + asv_cases(bench_layers.ConvCUDAMemory))

    assert trained == expected
    assert sampled == expected
    assert gpu == {case for case in expected if case.device == "cuda"}


def test_asv_suite_has_both_presets() -> None:
    sizes = set(bench_layers.FCTrain.params[0]) | set(bench_layers.ConvTrain.params[0])

    assert "table2-784" in sizes
    assert {f"figure3-{dim}" for dim in bench_layers.FIGURE3_DIMS} <= sizes


def test_asv_linear_sample_skips() -> None:
    with pytest.raises(NotImplementedError, match="no sampling benchmark"):
        bench_layers.FCSample().setup("figure3-128", "linear", "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_asv_cuda_skips_without_gpu() -> None:
    with pytest.raises(NotImplementedError, match="CUDA is not available"):
        bench_layers.FCTrain().setup("figure3-128", "snf", "cuda")


def test_asv_train_step_runs() -> None:
    benchmark = bench_layers.FCTrain()
    benchmark.setup("figure3-128", "snf", "cpu")

    assert torch.get_num_threads() == bench_layers.THREADS

    benchmark.time_train_batch("figure3-128", "snf", "cpu")

    # One warm-up step in setup, then the timed one.
    assert next(benchmark.steps) == 2


def test_asv_sample_runs() -> None:
    benchmark = bench_layers.ConvSample()
    benchmark.setup("figure3-128", "exact", "cpu")

    assert benchmark.time_sample("figure3-128", "exact", "cpu") is None


def flow_cases(cls: type) -> list[Case]:
    """Return the Table 3 case of each asv parameter set of a bench_flows class."""

    return [bench_flows.CASES[(cls.model, *params)] for params in itertools.product(*cls.params)]


def table3_sweep_cases() -> set[Case]:
    """Return the cases of the sweep CLI's table3 preset on every device of the asv suite."""

    cases = set()

    for device in bench_flows.DEVICES:
        cases.update(select_cases(SweepSettings("table3", Path("unused"), device=device)))

    return cases


def test_flow_classes_found() -> None:
    names = {cls.__name__ for cls in asv_classes(bench_flows)}

    assert names == {
        "FC2Train",
        "Conv9Train",
        "GlowTrain",
        "FC2Sample",
        "Conv9Sample",
        "GlowSample",
        "FC2CUDAMemory",
        "Conv9CUDAMemory",
        "GlowCUDAMemory",
    }


def test_flow_params_are_table3() -> None:
    expected = table3_sweep_cases()
    classes = asv_classes(bench_flows)
    trained = [
        case for cls in classes if cls.__name__.endswith("Train") for case in flow_cases(cls)
    ]
    sampled = [
        case for cls in classes if cls.__name__.endswith("Sample") for case in flow_cases(cls)
    ]
    gpu = [
        case for cls in classes if cls.__name__.endswith("CUDAMemory") for case in flow_cases(cls)
    ]

    assert len(expected) == 2 * len(table3_cases())
    assert sorted(trained, key=repr) == sorted(expected, key=repr)
    assert sorted(sampled, key=repr) == sorted(expected, key=repr)
    assert set(gpu) == {case for case in expected if case.device == "cuda"}
    assert len(gpu) == len(set(gpu))


def test_flow_classes_match_model() -> None:
    for cls in asv_classes(bench_flows):
        assert all(case.model == cls.model for case in flow_cases(cls)), cls.__name__
        assert cls.params[0] == ["table3-784"], cls.__name__


def test_flow_grid_rejects_layer() -> None:
    with pytest.raises(ValueError, match="table3 cases of model 'fc'"):
        bench_flows.flow_grid("fc")


def test_flow_timing_fits_timeout() -> None:
    timed = [cls for cls in asv_classes(bench_flows) if hasattr(cls, "time_train_batch")]
    timed += [cls for cls in asv_classes(bench_flows) if hasattr(cls, "time_sample")]

    assert len(timed) == 6

    for cls in timed:
        min_repeat, max_repeat, max_time = cls.repeat

        assert cls.number == 1, cls.__name__
        assert cls.min_run_count <= min_repeat <= max_repeat, cls.__name__
        assert max_time < cls.timeout / 2, cls.__name__


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_flow_cuda_skips_without_gpu() -> None:
    for cls in (bench_flows.FC2Train, bench_flows.GlowSample, bench_flows.GlowCUDAMemory):
        with pytest.raises(bench_layers.SkipNotImplemented, match="CUDA is not available"):
            cls().setup("table3-784", "snf", "cuda")


@pytest.mark.parametrize("method", bench_flows.FC2Train.params[1])
def test_flow_fc2_runs(method: str) -> None:
    train = bench_flows.FC2Train()
    train.setup("table3-784", method, "cpu")

    assert torch.get_num_threads() == bench_layers.THREADS
    assert train.time_train_batch("table3-784", method, "cpu") is None

    # One warm-up step in setup, then the timed one.
    assert next(train.steps) == 2

    sample = bench_flows.FC2Sample()
    sample.setup("table3-784", method, "cpu")

    assert sample.time_sample("table3-784", method, "cpu") is None

    # Both setups read the batches that the first one loaded.
    assert sample.workload.batches is train.workload.batches


def test_gap_zero_at_exact_inverse() -> None:
    flow = Flow([SelfNormalizingLinear(16)], (16,))
    layer = flow.layers[0]
    x = torch.randn(32, 16)

    with torch.no_grad():
        layer.inverse_weight.copy_(torch.linalg.inv(layer.weight))

    assert bench_correctness.logdet_gradient_gap(flow, x) < 1e-5
    assert bench_correctness.reconstruction_error(flow, x) < 1e-4
    assert flow.reconstruction_weight == 1.0


def test_gap_at_doubled_inverse() -> None:
    flow = Flow([SelfNormalizingLinear(16)], (16,))
    layer = flow.layers[0]
    x = torch.randn(32, 16)

    with torch.no_grad():
        layer.inverse_weight.copy_(2.0 * torch.linalg.inv(layer.weight))

    # R^T = 2 W^-T, so the gap is |2 W^-T - W^-T| / |W^-T| = 1, and R W x - x = x.
    gap = bench_correctness.logdet_gradient_gap(flow, x)
    error = bench_correctness.reconstruction_error(flow, x)

    assert gap == pytest.approx(1.0, rel=1e-4)
    assert error == pytest.approx(x.norm(dim=1).mean().item(), rel=1e-4)


def test_correctness_case_is_table2() -> None:
    case = bench_correctness.snf_fc_case()

    assert (case.model, case.method, case.dim) == ("fc", "snf", 784)


def test_asv_check_passes() -> None:
    if importlib.util.find_spec("asv") is None:
        pytest.skip("asv is not installed; pip install -e '.[test]' to run this test")

    result = subprocess.run(
        [sys.executable, "-m", "asv", "check", "--python=same"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "No problems found" in result.stdout

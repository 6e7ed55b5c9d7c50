import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from bench.cli import main
from bench.compare import Column, missing_cases
from bench.report import format_ratio, format_value
from bench.results import read_records
from bench.sweep import SweepSettings, select_cases, shard_cases

SWEEP = ["sweep", "figure3", "--dims", "32,64", "--models", "fc", "--methods", "snf,exact"]
SWEEP += ["--skip-memory", "--budget", "0.1"]


def run_cli(*args: str, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    status = main([str(arg) for arg in args])
    captured = capsys.readouterr()

    return status, captured.out, captured.err


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real figure3 sweeps of the FC layer at D = 32 and 64: cpu-1t in one run, cpu-2t as
    shards 1/2 and 2/2."""
    root = tmp_path_factory.mktemp("results")
    threads = torch.get_num_threads()
    runs = {
        "cpu-1t": ["--threads", "1", "--label", "cpu-1t"],
        "cpu-2t-shard1": ["--threads", "2", "--label", "cpu-2t", "--shard", "1/2"],
        "cpu-2t-shard2": ["--threads", "2", "--label", "cpu-2t", "--shard", "2/2"],
    }

    try:
        for name, options in runs.items():
            status = main([*SWEEP, *options, "--results", str(root / name)])
            assert status == 0
    finally:
        # The sweep sets torch's thread count for the whole process.
        torch.set_num_threads(threads)

    return {name: root / name for name in runs}


def all_paths(results: dict[str, Path]) -> list[Path]:
    return list(results.values())


def table_rows(markdown: str, heading: str) -> list[dict[str, str]]:
    """Parse the first Markdown table after ``heading`` into dicts keyed by header."""
    lines = markdown.splitlines()
    start = lines.index(heading)
    start += next(i for i, line in enumerate(lines[start:]) if line.startswith("|"))
    header = [cell.strip() for cell in lines[start].strip("|").split(" | ")]
    rows = []

    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        rows.append(dict(zip(header, cells, strict=True)))

    return rows


def rewrite(source: Path, target: Path, change: Callable[[dict], None]) -> Path:
    """Copy a result file, applying ``change`` to every record."""
    target.parent.mkdir(parents=True, exist_ok=True)
    lines = []

    for line in source.read_text().splitlines():
        record = json.loads(line)
        change(record)
        lines.append(json.dumps(record))

    target.write_text("\n".join(lines) + "\n")

    return target


def is_target(record: dict) -> bool:
    """The record that the gate tests change: train time of the FC SNF layer at D = 64."""
    case = record["case"]

    return (
        record["metric"] == "train_time"
        and case["model"] == "fc"
        and case["method"] == "snf"
        and case["dim"] == 64
    )


def set_noise(record: dict, scale: float, cv: float, half_width: float | None) -> None:
    """Scale the statistics of the target record and set its cv and median interval."""
    if not is_target(record):
        return

    stats = record["stats"]
    for name in ("mean", "std", "median", "q1", "q3", "min", "max"):
        stats[name] *= scale
    stats["cv"] = cv

    median = stats["median"]
    low = None if half_width is None else median * (1 - half_width)
    high = None if half_width is None else median * (1 + half_width)
    record["protocol"].update(ci_low_ms=low, ci_high_ms=high)


def gate_files(
    results: dict[str, Path], tmp_path: Path, scale: float, cv: float, half_width: float | None
) -> tuple[Path, Path]:
    """Write a baseline copy and a new copy of cpu-1t whose target median is ``scale`` times."""
    source = next(results["cpu-1t"].glob("*.jsonl"))
    baseline = rewrite(
        source, tmp_path / "baseline" / source.name, lambda r: set_noise(r, 1, cv, half_width)
    )
    new = rewrite(
        source, tmp_path / "new" / source.name, lambda r: set_noise(r, scale, cv, half_width)
    )

    return new, baseline


def test_records_have_cv(results: dict[str, Path]) -> None:
    records = read_records(all_paths(results))

    # Two labels, two D, two methods, two metrics.
    assert len(records) == 2 * 2 * 2 * 2
    assert all(isinstance(record["stats"]["cv"], float) for record in records)
    assert all(record["stats"]["cv"] >= 0 for record in records)
    assert all("gpu_state" not in record for record in records)


def test_shard_recorded_in_protocol(results: dict[str, Path]) -> None:
    first = read_records(results["cpu-2t-shard1"])
    second = read_records(results["cpu-2t-shard2"])
    cases = {json.dumps(r["case"], sort_keys=True) for r in first}

    assert {r["protocol"]["shard"]["index"] for r in first} == {1}
    assert {r["protocol"]["shard"]["count"] for r in second} == {2}
    assert len(first) == len(second) == 4
    assert cases.isdisjoint(json.dumps(r["case"], sort_keys=True) for r in second)
    assert all("shard" not in r["protocol"] for r in read_records(results["cpu-1t"]))


def test_table_matches_records(
    results: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    status, out, _ = run_cli("compare", *all_paths(results), "--out", tmp_path, capsys=capsys)
    markdown = (tmp_path / "compare.md").read_text()
    medians = {
        (r["machine"]["label"], r["case"]["model"], r["case"]["method"], r["case"]["dim"]): r[
            "stats"
        ]["median"]
        for r in read_records(all_paths(results))
        if r["metric"] == "train_time"
    }
    rows = table_rows(markdown, "### train_time: ms per batch, median")

    assert status == 0
    assert str(tmp_path / "compare.md") in out
    assert "baseline column **cpu-1t, cpu**" in markdown
    assert len(rows) == 4

    for row in rows:
        dim = int(row["Shape"])
        base = medians[("cpu-1t", row["Model"], row["Method"], dim)]
        other = medians[("cpu-2t", row["Model"], row["Method"], dim)]

        assert row["cpu-1t, cpu"] == format_value(base)
        assert row["cpu-2t, cpu"] == f"{format_value(other)} ({format_ratio(other / base)})"


def test_baseline_option(
    results: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    status, _, _ = run_cli(
        "compare", *all_paths(results), "--baseline", "cpu-2t", "--out", tmp_path, capsys=capsys
    )
    markdown = (tmp_path / "compare.md").read_text()
    header = table_rows(markdown, "### sample_time: ms per sample, median")[0]

    assert status == 0
    assert "baseline column **cpu-2t, cpu**" in markdown
    assert list(header)[4:6] == ["cpu-2t, cpu", "cpu-1t, cpu"]
    assert header["cpu-1t, cpu"].endswith("×)")


def test_mean_statistic(
    results: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    status, _, _ = run_cli(
        "compare", *all_paths(results), "--statistic", "mean", "--out", tmp_path, capsys=capsys
    )
    rows = table_rows(
        (tmp_path / "compare.md").read_text(), "### train_time: ms per batch, mean ± std"
    )

    assert status == 0
    assert all(" ± " in row["cpu-1t, cpu"] for row in rows)


def test_machines_and_plots(
    results: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    status, out, _ = run_cli("compare", *all_paths(results), "--out", tmp_path, capsys=capsys)
    markdown = (tmp_path / "compare.md").read_text()
    machines = {row["Column"]: row for row in table_rows(markdown, "## Machines")}
    slopes = table_rows(markdown, "## Figure 3 slopes by device")

    assert status == 0
    assert machines["cpu-1t, cpu"]["Threads"] == "1"
    assert machines["cpu-2t, cpu"]["Threads"] == "2"
    assert machines["cpu-2t, cpu"]["Records"] == "8"
    assert [(row["Model"], row["Method"]) for row in slopes] == [
        ("Fully connected", "SNF"),
        ("Fully connected", "Exact"),
    ]
    assert (tmp_path / "compare-figure3.png").stat().st_size > 0
    assert (tmp_path / "compare-figure3.svg").stat().st_size > 0
    assert str(tmp_path / "compare-figure3.svg") in out
    assert "![Figure 3 by device](compare-figure3.png)" in markdown


def test_metric_option(
    results: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    status, out, _ = run_cli(
        "compare", *all_paths(results), "--metric", "sample_time", "--out", tmp_path, capsys=capsys
    )
    markdown = (tmp_path / "compare.md").read_text()

    assert status == 0
    assert "### sample_time" in markdown
    assert "### train_time" not in markdown
    assert "compare-figure3.png" not in out


def test_noisy_and_throttled_flags(
    results: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    def mark(record: dict) -> None:
        record["stats"]["cv"] = 0.5 if is_target(record) else 0.01
        if is_target(record):
            snapshot = {"sm_clock_mhz": 1410, "temperature_c": 83, "power_w": 700.0}
            record["gpu_state"] = {
                "before": {**snapshot, "throttle_reasons": ["gpu_idle"]},
                "after": {**snapshot, "throttle_reasons": ["sw_thermal_slowdown"]},
            }

    source = next(results["cpu-1t"].glob("*.jsonl"))
    copy = rewrite(source, tmp_path / "marked" / source.name, mark)
    status, _, _ = run_cli("compare", copy, "--out", tmp_path, capsys=capsys)
    markdown = (tmp_path / "compare.md").read_text()
    rows = table_rows(markdown, "### train_time: ms per batch, median")
    flags = {(row["Model"], row["Method"], row["Shape"]): row["Flags"] for row in rows}
    machine = table_rows(markdown, "## Machines")[0]

    assert status == 0
    assert "cpu-1t, cpu noisy (cv 0.50)" in flags[("fc", "snf", "64")]
    assert "throttled (sw_thermal_slowdown)" in flags[("fc", "snf", "64")]
    assert flags[("fc", "snf", "32")] == ""
    assert machine["SM clock MHz"] == "1410–1410"
    assert machine["Max °C"] == "83"
    assert machine["Throttled"] == "1 of 1"


def test_code_versions_flagged(
    results: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    def other_commit(record: dict) -> None:
        record["code"]["commit"] = "0123456789ab" + "0" * 28

    original = read_records(results["cpu-1t"])[0]["code"]["commit"]
    source = next(results["cpu-2t-shard1"].glob("*.jsonl"))
    copy = rewrite(source, tmp_path / "old" / source.name, other_commit)
    status, _, _ = run_cli(
        "compare",
        results["cpu-1t"],
        copy,
        results["cpu-2t-shard2"],
        "--out",
        tmp_path,
        capsys=capsys,
    )
    markdown = (tmp_path / "compare.md").read_text()
    note = next(line for line in markdown.splitlines() if "Code versions differ" in line)

    assert status == 0
    assert "0123456789ab" in note
    assert original[:12] in note
    assert "cpu-2t, cpu:" in note


def test_schema_flagged(
    results: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    def schema_2(record: dict) -> None:
        record["schema"] = 2

    source = next(results["cpu-2t-shard1"].glob("*.jsonl"))
    copy = rewrite(source, tmp_path / "future" / source.name, schema_2)
    status, _, err = run_cli("compare", results["cpu-1t"], copy, "--out", tmp_path, capsys=capsys)
    markdown = (tmp_path / "compare.md").read_text()

    assert status == 0
    assert f"Schema versions differ: {copy} contains schema 2 records" in markdown
    assert "cpu-2t, cpu" not in markdown
    assert err.count("Schema versions differ") == 1


def test_step_summary_appended(
    results: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))

    status, _, _ = run_cli(
        "compare", *all_paths(results), "--out", tmp_path / "out", capsys=capsys
    )
    text = summary.read_text()

    assert status == 0
    assert text.startswith("earlier step\n# Device comparison")
    assert "### train_time: ms per batch, median" in text
    assert "![" not in text
    assert "compare-figure3.png and compare-figure3.svg" in text


def test_gate_regression_exit(
    results: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    new, baseline = gate_files(results, tmp_path, scale=2.0, cv=0.01, half_width=0.01)
    status, _, err = run_cli(
        "compare",
        new,
        "--against",
        baseline,
        "--max-ratio",
        "1.10",
        "--metric",
        "train_time",
        "--out",
        tmp_path,
        capsys=capsys,
    )
    gate = table_rows(
        (tmp_path / "compare.md").read_text(), f"## Regression gate against {baseline}"
    )

    assert status == 1
    assert err.startswith("snf-bench: regression: figure3 train_time of fc snf 64, batch 128")
    assert "the median is 2.00× the baseline's (cpu-1t, cpu)" in err
    assert "limit 1.1×" in err
    assert "intervals are disjoint" in err
    assert err.count("\n") == 1
    assert gate[0]["Verdict"] == "regression"
    assert gate[0]["Ratio"] == "2.00×"
    assert [row["Verdict"] for row in gate[1:]] == ["ok"] * 3


def test_gate_overlapping_intervals(
    results: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # [0.6, 1.4] m and [0.9, 2.1] m overlap, so a 1.5× median is inside the noise.
    new, baseline = gate_files(results, tmp_path, scale=1.5, cv=0.3, half_width=0.4)
    status, _, err = run_cli(
        "compare",
        new,
        "--against",
        baseline,
        "--metric",
        "train_time",
        "--out",
        tmp_path,
        capsys=capsys,
    )
    gate = table_rows(
        (tmp_path / "compare.md").read_text(), f"## Regression gate against {baseline}"
    )

    assert status == 0
    assert "regression" not in err
    assert gate[0]["Ratio"] == "1.50×"
    assert gate[0]["Verdict"] == "slower, inside noise"
    assert gate[0]["Noise"] == "95% median intervals overlap"


@pytest.mark.parametrize(("cv", "status"), [(0.01, 1), (0.3, 0)])
def test_gate_cv_rule(
    cv: float, status: int, results: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Without median intervals, a 1.5× median is noise when 1.5 - 1 <= 2 cv."""
    new, baseline = gate_files(results, tmp_path, scale=1.5, cv=cv, half_width=None)
    result, _, err = run_cli(
        "compare",
        new,
        "--against",
        baseline,
        "--metric",
        "train_time",
        "--out",
        tmp_path,
        capsys=capsys,
    )

    assert result == status
    assert ("2·cv" in err) == (status == 1)


def test_gate_unchanged_passes(
    results: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    status, _, err = run_cli(
        "compare",
        results["cpu-1t"],
        "--against",
        results["cpu-1t"],
        "--out",
        tmp_path,
        capsys=capsys,
    )
    markdown = (tmp_path / "compare.md").read_text()

    assert status == 0
    assert err == ""
    assert "No regression in 8 cases." in markdown


def test_gate_other_label_single_column(
    results: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    status, _, _ = run_cli(
        "compare",
        results["cpu-2t-shard1"],
        results["cpu-2t-shard2"],
        "--against",
        results["cpu-1t"],
        "--max-ratio",
        "1000",
        "--out",
        tmp_path,
        capsys=capsys,
    )
    gate = table_rows(
        (tmp_path / "compare.md").read_text(), f"## Regression gate against {results['cpu-1t']}"
    )

    assert status == 0
    assert {row["Baseline"] for row in gate} == {"cpu-1t, cpu"}
    assert {row["Column"] for row in gate} == {"cpu-2t, cpu"}


def drop_target(results: dict[str, Path], tmp_path: Path) -> Path:
    """Write a copy of cpu-1t without the target record (FC SNF train time at D = 64)."""
    source = next(results["cpu-1t"].glob("*.jsonl"))
    lines = source.read_text().splitlines()
    remaining = [line for line in lines if not is_target(json.loads(line))]
    target = tmp_path / "new" / source.name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("\n".join(remaining) + "\n")

    return target


MISSING_TARGET = (
    "figure3 train_time of fc snf 64, batch 128, in cpu-1t, cpu but not in cpu-1t, cpu"
)


def test_gate_lists_missing_cases(
    results: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    new = drop_target(results, tmp_path)
    status, _, err = run_cli(
        "compare", new, "--against", results["cpu-1t"], "--out", tmp_path, capsys=capsys
    )
    markdown = (tmp_path / "compare.md").read_text()
    missing = table_rows(markdown, "### Missing from the new results")

    assert status == 0
    assert err == f"snf-bench: missing from the new results: {MISSING_TARGET}\n"
    assert "No regression in 7 cases." in markdown
    assert "1 baseline case has no record in the new results" in markdown
    assert "They do not fail the gate unless --require-all is given." in markdown
    assert len(missing) == 1
    assert missing[0]["Preset"] == "figure3"
    assert missing[0]["Metric"] == "train_time"
    assert missing[0]["Case"] == "fc snf 64, batch 128"
    assert missing[0]["Baseline"] == "cpu-1t, cpu"
    assert missing[0]["Missing from"] == "cpu-1t, cpu"


def test_gate_require_all_fails(
    results: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    new = drop_target(results, tmp_path)
    status, _, err = run_cli(
        "compare",
        new,
        "--against",
        results["cpu-1t"],
        "--require-all",
        "--out",
        tmp_path,
        capsys=capsys,
    )
    lines = err.splitlines()
    markdown = (tmp_path / "compare.md").read_text()

    assert status == 1
    assert len(lines) == 2
    assert lines[0] == f"snf-bench: missing from the new results: {MISSING_TARGET}"
    assert lines[1] == (
        f"snf-bench: missing: 1 baseline case is missing from the new results, the first: "
        f"{MISSING_TARGET}; measure the missing cases or drop --require-all"
    )
    assert "With --require-all, the gate fails because of them." in markdown


def test_gate_require_all_complete_passes(
    results: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    status, _, err = run_cli(
        "compare",
        results["cpu-1t"],
        "--against",
        results["cpu-1t"],
        "--require-all",
        "--out",
        tmp_path,
        capsys=capsys,
    )
    markdown = (tmp_path / "compare.md").read_text()

    assert status == 0
    assert err == ""
    assert "### Missing from the new results" not in markdown


def test_gate_require_all_counts_cases(
    results: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    source = next(results["cpu-1t"].glob("*.jsonl"))
    first = source.read_text().splitlines()[0]
    new = tmp_path / "new" / source.name
    new.parent.mkdir(parents=True)
    new.write_text(first + "\n")
    status, _, err = run_cli(
        "compare",
        new,
        "--against",
        results["cpu-1t"],
        "--require-all",
        "--out",
        tmp_path,
        capsys=capsys,
    )
    lines = err.splitlines()

    assert status == 1
    assert len(lines) == 8
    assert lines[-1].startswith(
        "snf-bench: missing: 7 baseline cases are missing from the new results, the first: "
    )


def test_missing_cases_unmatched_column(results: dict[str, Path]) -> None:
    new = read_records(results["cpu-1t"])
    baseline = read_records(all_paths(results))

    missing = missing_cases(new, baseline)

    assert len(missing) == 8
    assert {item.baseline for item in missing} == {Column("cpu-2t", "cpu")}
    assert {item.column for item in missing} == {None}
    assert str(missing[0]).endswith("in cpu-2t, cpu but not in the new results")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--require-all"], "--require-all applies with --against BASELINE only"),
        (["--max-ratio", "0.9", "--against", "."], "must be a ratio of at least 1, got 0.9"),
        (["--max-ratio", "1.2"], "--max-ratio and --noise-k apply with --against"),
        (["--baseline", "gpu-x"], "baseline 'gpu-x' matches no column"),
        (["--metric", "speed"], "invalid value 'speed'"),
        (["--against", "absent.jsonl"], "'absent.jsonl' does not exist"),
        (["--metric", "train_peak_memory"], "no result records with metric train_peak_memory"),
    ],
)
def test_compare_invalid_input(
    args: list[str],
    message: str,
    results: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    status, _, err = run_cli("compare", results["cpu-1t"], *args, "--out", tmp_path, capsys=capsys)

    assert status == 2
    assert message in err
    assert err.startswith("snf-bench: error: ")
    assert err.count("\n") == 1


def test_gate_without_common_case(
    results: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    def other_batch(record: dict) -> None:
        record["case"]["batch_size"] = 64

    source = next(results["cpu-1t"].glob("*.jsonl"))
    copy = rewrite(source, tmp_path / "batch64" / source.name, other_batch)
    status, _, err = run_cli(
        "compare", results["cpu-1t"], "--against", copy, "--out", tmp_path, capsys=capsys
    )

    assert status == 2
    assert "no case with metric train_time, sample_time is present in both" in err


@pytest.mark.parametrize("shard", ["0/2", "3/2", "x", "1/0", "2", "1/2/3"])
def test_shard_invalid(shard: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    status, _, err = run_cli(
        "sweep", "figure3", "--shard", shard, "--results", tmp_path, capsys=capsys
    )

    assert status == 2
    assert f"invalid shard {shard!r}" in err
    assert err.count("\n") == 1


@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_shards_partition_cases(count: int) -> None:
    cases = select_cases(SweepSettings(preset="figure3", results=Path("unused")))
    shards = [shard_cases(cases, (index, count)) for index in range(1, count + 1)]
    merged = [case for shard in shards for case in shard]

    assert sorted(merged, key=cases.index) == cases
    assert len(merged) == len(set(merged))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_shard_cases_rejects_invalid() -> None:
    cases = select_cases(SweepSettings(preset="table2", results=Path("unused")))

    with pytest.raises(ValueError, match="shard 3/2 is invalid"):
        shard_cases(cases, (3, 2))

    assert shard_cases(cases, None) == cases

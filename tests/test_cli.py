import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.cli import main
from bench.results import read_records
from bench.sweep import SweepSettings, select_cases

FAST = ["--budget", "0.3", "--label", "test-machine"]


def run_cli(*args: str, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    status = main(list(args))
    captured = capsys.readouterr()

    return status, captured.out, captured.err


@pytest.fixture(scope="module")
def figure3_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real figure3 sweep at D = 32 and 64, times only."""

    folder = tmp_path_factory.mktemp("results")
    command = [
        sys.executable,
        "-m",
        "bench",
        "sweep",
        "figure3",
        "--dims",
        "32,64",
        "--threads",
        "1",
    ]
    subprocess.run(
        [*command, "--results", str(folder), "--skip-memory", *FAST],
        check=True,
        capture_output=True,
    )

    return folder


def test_sweep_writes_every_time_metric(figure3_results: Path) -> None:
    records = read_records(figure3_results)
    keys = {
        (r["case"]["model"], r["case"]["method"], r["case"]["dim"], r["metric"]) for r in records
    }

    assert ("fc", "snf", 32, "train_time") in keys
    assert ("fc", "exact", 64, "sample_time") in keys
    assert ("conv", "snf", 64, "sample_time") in keys
    assert ("fc", "linear", 32, "train_time") in keys
    assert ("fc", "linear", 32, "sample_time") not in keys
    # Per D: four cases with train and sample time, and the nn.Linear reference.
    assert len(records) == 2 * (4 * 2 + 1)


def test_sweep_records_machine_and_code(figure3_results: Path) -> None:
    record = read_records(figure3_results)[0]

    assert record["machine"]["label"] == "test-machine"
    assert record["machine"]["cores"] >= 1
    assert record["code"]["version"] == "0.1.0"
    assert record["case"]["threads"] == 1
    assert record["stats"]["n"] >= 1


def test_sweep_peak_memory(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Peak memory of training one 512-wide SNF layer counts W, R, their gradients and
    Adam's two moments: at least 6 * 512 * 512 float32 values, 6 MiB."""

    status, _, _ = run_cli(
        "sweep",
        "figure3",
        "--dims",
        "512",
        "--models",
        "fc",
        "--methods",
        "snf",
        "--results",
        str(tmp_path),
        *FAST,
        capsys=capsys,
    )
    memory = {r["metric"]: r for r in read_records(tmp_path) if r["unit"] == "MiB"}

    assert status == 0
    assert memory["train_peak_memory"]["stats"]["median"] >= 6.0
    assert memory["train_peak_memory"]["stats"]["median"] < 64.0
    assert memory["sample_peak_memory"]["stats"]["median"] >= 2.0
    assert memory["sample_peak_memory"]["protocol"]["source"].endswith("fresh-process")


def test_sweep_resumes_without_duplicates(
    figure3_results: Path, capsys: pytest.CaptureFixture
) -> None:
    before = len(read_records(figure3_results))
    status, _, err = run_cli(
        "sweep",
        "figure3",
        "--dims",
        "32,64",
        "--threads",
        "1",
        "--results",
        str(figure3_results),
        "--skip-memory",
        *FAST,
        capsys=capsys,
    )

    assert status == 0
    assert "already measured, skipped" in err
    assert len(read_records(figure3_results)) == before


def test_report_from_result_files(
    figure3_results: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    status, out, _ = run_cli(
        "report", "--results", str(figure3_results), "--out", str(tmp_path), capsys=capsys
    )
    markdown = (tmp_path / "figure3.md").read_text()

    assert status == 0
    assert (tmp_path / "figure3.png").stat().st_size > 0
    assert (tmp_path / "figure3.svg").stat().st_size > 0
    assert str(tmp_path / "figure3.md") in out
    assert "| 32 |" in markdown


def test_table2_on_embedded_digits(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    status, _, _ = run_cli(
        "sweep",
        "table2",
        "--results",
        str(tmp_path / "results"),
        "--skip-memory",
        *FAST,
        capsys=capsys,
    )
    records = read_records(tmp_path / "results")
    status_report, _, _ = run_cli(
        "report",
        "--results",
        str(tmp_path / "results"),
        "--out",
        str(tmp_path / "reports"),
        capsys=capsys,
    )
    table = (tmp_path / "reports" / "table2.md").read_text()

    assert status == 0
    assert {r["case"]["data"] for r in records} == {"mnist-embedded"}
    assert len(records) == 9
    assert status_report == 0
    assert "Self Normalizing FC" in table
    assert "Titan X" in table


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["sweep", "table9"], "invalid choice: 'table9'"),
        (["sweep", "figure3", "--max-dim", "0"], "must be a positive integer, got 0"),
        (["sweep", "figure3", "--dims", "32,-5"], "must be a positive integer, got -5"),
        (["sweep", "figure3", "--budget", "0"], "must be a finite positive number, got 0"),
        (["sweep", "figure3", "--budget", "inf"], "must be a finite positive number, got inf"),
        (["sweep", "figure3", "--device", "tpu"], "--device 'tpu'"),
        (["sweep", "table2", "--dims", "32"], "--dims applies to preset figure3 only"),
        (["sweep", "figure3", "--dims", "32,64,32"], "duplicate D 32 in '32,64,32'"),
        (["sweep", "figure3", "--dims", "64,64,32,32"], "duplicate D 32, 64 in"),
        (["sweep", "figure3", "--data", "mnist"], "--data applies to presets table2 and table3"),
        (["sweep", "figure3", "--label", "a b"], "a b"),
        (["sweep", "figure3", "--label", ".."], "machine label '..' is invalid"),
        (["sweep", "figure3", "--label", "../x"], "starting with a letter or digit"),
        (["sweep", "figure3", "--label", "a/b"], "from letters, digits, '.', '_' and '-'"),
        (["sweep", "figure3", "--methods", "snf,fast"], "invalid value 'fast'"),
        (["sweep", "figure3", "--max-dim", "1"], "no figure3 case matches the options"),
        (["report", "--results", "absent-folder"], "'absent-folder' does not exist"),
    ],
)
def test_invalid_input_one_line(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    status, _, err = run_cli(
        *args, "--results" if args[0] == "sweep" else "--out", str(tmp_path), capsys=capsys
    )

    assert status == 2
    assert message in err
    assert err.startswith("snf-bench: error: ")
    assert err.count("\n") == 1


def test_version_printed(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["--version"])

    assert caught.value.code == 0
    assert capsys.readouterr().out == f"snf-bench {importlib.metadata.version('snf-bench')}\n"


def test_table3_accepts_data(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # The table3 cases load MNIST from the folder, so an absent folder fails at loading.
    status, _, err = run_cli(
        "sweep",
        "table3",
        "--data",
        str(tmp_path / "absent"),
        "--models",
        "fc2",
        "--methods",
        "snf",
        "--skip-memory",
        "--results",
        str(tmp_path / "results"),
        *FAST,
        capsys=capsys,
    )

    assert status == 2
    assert f"MNIST folder {str(tmp_path / 'absent')!r} does not exist" in err


def test_table3_data_cases_use_folder() -> None:
    settings = SweepSettings(preset="table3", results=Path("unused"), data_root="mnist")

    cases = select_cases(settings)

    assert len(cases) == 9
    assert {case.data for case in cases} == {"mnist"}


def test_select_cases_rejects_duplicate_dims() -> None:
    settings = SweepSettings(preset="figure3", results=Path("unused"), dims=(32, 64, 32))

    with pytest.raises(ValueError, match=r"dims \[32, 64, 32\] repeat D 32; list each"):
        select_cases(settings)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_gpu_rejected(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    status, _, err = run_cli(
        "sweep", "table2", "--device", "cuda", "--results", str(tmp_path), capsys=capsys
    )

    assert status == 2
    assert "no CUDA GPU is available" in err
    assert "use --device cpu" in err


def test_unwritable_results_rejected(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    status, _, err = run_cli(
        "sweep", "table2", "--results", str(blocker / "results"), capsys=capsys
    )

    assert status == 2
    assert "is not writable" in err
    assert "--results DIR" in err


def test_corrupt_results_line_keeps_file(
    figure3_results: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    source = next(figure3_results.glob("*.jsonl"))
    copy = tmp_path / source.name
    lines = source.read_text().splitlines()
    lines.insert(2, '{"schema": 1, "preset": "figu')
    copy.write_text("\n".join(lines) + "\n")
    before = copy.read_bytes()

    status, _, err = run_cli(
        "sweep",
        "figure3",
        "--dims",
        "32,64",
        "--threads",
        "1",
        "--results",
        str(tmp_path),
        *FAST,
        capsys=capsys,
    )

    assert status == 2
    assert f"{copy}:3" in err
    assert err.count("\n") == 1
    assert copy.read_bytes() == before


def test_sweep_resumes_after_partial_row(
    figure3_results: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    source = next(figure3_results.glob("*.jsonl"))
    copy = tmp_path / source.name
    lines = source.read_text().splitlines()
    # An interrupted write of the last record: its first 40 bytes and no newline.
    copy.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:40])

    status, _, err = run_cli(
        "sweep",
        "figure3",
        "--dims",
        "32,64",
        "--threads",
        "1",
        "--skip-memory",
        "--results",
        str(tmp_path),
        *FAST,
        capsys=capsys,
    )
    warnings = []
    records = read_records(copy, warn=warnings.append)

    assert status == 0
    assert f"snf-bench: warning: {copy}:{len(lines)}: skipped a partial last row" in err
    assert len(records) == len(lines)
    assert warnings == []
    assert copy.read_text().endswith("\n")


def test_module_entry_point_help() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "sweep", "--help"], capture_output=True, text=True
    )

    assert done.returncode == 0
    assert "in seconds" in done.stdout
    assert "--max-dim" in done.stdout


def test_results_are_json_lines(figure3_results: Path) -> None:
    for path in figure3_results.glob("*.jsonl"):
        for line in path.read_text().splitlines():
            assert json.loads(line)["schema"] == 1

import json
import shutil
import statistics

import pytest
import torch

from bench import train
from bench.cli import main
from bench.results import ResultsError
from bench.table1 import find_runs, method_label, table1_markdown, write_training_reports
from bench.train import Splits, TrainSettings, run_training
from snf_core.data import load_embedded_mnist


@pytest.fixture(scope="module")
def runs_folder(tmp_path_factory: pytest.TempPathFactory):
    """Five short FC runs on 300 embedded digits: SNF and exact with two seeds each under one
    budget, and one SNF run under another budget."""

    folder = tmp_path_factory.mktemp("runs")
    images, _ = load_embedded_mnist()
    splits = Splits(images[:300], images[300:400], images[400:500], "mnist-embedded")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "load_splits", lambda data_root: splits)

        for method, seed, budget in (
            ("snf", 0, 60.0),
            ("snf", 1, 60.0),
            ("exact", 0, 60.0),
            ("exact", 1, 60.0),
            ("snf", 0, 30.0),
        ):
            settings = TrainSettings(
                model="fc2",
                method=method,
                seed=seed,
                epochs=2,
                budget_s=budget,
                runs=folder,
                name=f"{method}-{seed}-{budget:g}",
                threads=1,
            )
            run_training(settings, lambda line: None)

    return folder


def read_result(folder, name: str) -> dict:
    return json.loads((folder / name / "result.json").read_text())


def test_row_averages_seeds(runs_folder) -> None:
    markdown = table1_markdown(find_runs([runs_folder]))
    values = [read_result(runs_folder, f"snf-{seed}-60")["test_nll"] for seed in (0, 1)]
    expected = f"{statistics.fmean(values):.1f} ± {statistics.stdev(values):.1f}"
    row = next(line for line in markdown.splitlines() if line.startswith("| FC 2-layer | SNF | 2"))

    assert f"| {expected} |" in row
    assert row.endswith("| 947.1 ± 0.2 |")


def test_budgets_get_own_sections(runs_folder) -> None:
    markdown = table1_markdown(find_runs([runs_folder]))

    assert "; 60 s of training time each" in markdown
    assert "; 30 s of training time each" in markdown
    assert "| FC 2-layer | SNF | 1 |" in markdown


def test_snf_excess_over_exact(runs_folder) -> None:
    markdown = table1_markdown(find_runs([runs_folder]))
    snf = statistics.fmean(read_result(runs_folder, f"snf-{s}-60")["test_nll"] for s in (0, 1))
    exact = statistics.fmean(read_result(runs_folder, f"exact-{s}-60")["test_nll"] for s in (0, 1))

    assert f"SNF mean test NLL {snf:.1f} against exact {exact:.1f}, " in markdown
    assert f"{100 * (snf - exact) / exact:+.2f}%" in markdown


def test_snf_excess_per_seed(runs_folder) -> None:
    markdown = table1_markdown(find_runs([runs_folder]))
    snf = [read_result(runs_folder, f"snf-{seed}-60")["test_nll"] for seed in (0, 1)]
    exact = [read_result(runs_folder, f"exact-{seed}-60")["test_nll"] for seed in (0, 1)]
    excess = [100 * (a - b) / b for a, b in zip(snf, exact, strict=True)]

    assert f"Same seed: seed 0 {excess[0]:+.2f}%, seed 1 {excess[1]:+.2f}%." in markdown


def test_runs_table_gives_commands(runs_folder) -> None:
    markdown = table1_markdown(find_runs([runs_folder]))

    command = "snf-bench train fc2 --method exact --seed 1 --budget 60 --epochs 2 --threads 1"
    row = next(line for line in markdown.splitlines() if line.startswith("| `exact-1-60`"))

    assert row.endswith(f"| 0.00 (0.0) | `{command} --name exact-1-60` |")


def test_command_names_changed_settings(runs_folder) -> None:
    run = next(run for run in find_runs([runs_folder]) if run.folder.name == "snf-0-60")
    run.result.update(reconstruction_weight=0.1, lr=3e-4, data="mnist", train_time_s=60.5)
    row = next(line for line in table1_markdown([run]).splitlines() if "`snf-0-60`" in line)

    assert "--budget 60 --lr 0.0003 --reconstruction-weight 0.1 --data MNIST_FOLDER" in row
    assert "--epochs" not in row


def test_figures_are_written(runs_folder, tmp_path) -> None:
    paths = write_training_reports(find_runs([runs_folder]), tmp_path)
    names = sorted(path.name for path in paths)

    assert names == ["figure4.png", "figure4.svg", "samples.png", "table1.md"]
    assert (tmp_path / "samples.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "figure4.png").read_bytes()[:4] == b"\x89PNG"


def test_figure4_svg_is_reproducible(runs_folder, tmp_path) -> None:
    runs = find_runs([runs_folder])
    write_training_reports(runs, tmp_path / "first")
    write_training_reports(runs, tmp_path / "second")

    first = (tmp_path / "first" / "figure4.svg").read_bytes()

    assert first == (tmp_path / "second" / "figure4.svg").read_bytes()


def test_samples_of_snf_differ_little(runs_folder) -> None:
    """Both inverses of the same weights map the same base samples to nearby pixels."""

    samples = torch.load(runs_folder / "snf-0-60" / "samples.pt")
    difference = (samples["learned"].float() - samples["exact"].float()).abs()

    assert samples["learned"].shape == (64, 784)
    assert difference.mean().item() < 16.0


def test_report_command_renders_runs(runs_folder, tmp_path, capsys) -> None:
    status = main(["report", "--results", str(runs_folder), "--out", str(tmp_path)])
    printed = capsys.readouterr().out.split()

    assert status == 0
    assert str(tmp_path / "table1.md") in printed


def test_unreadable_result_is_named(tmp_path) -> None:
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "result.json").write_text("{")

    with pytest.raises(
        ResultsError, match="training run file '.*broken/result.json' is unreadable"
    ):
        find_runs([tmp_path])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[]", "not a training result"),
        ("{}", "not a training result"),
        ('{"kind": "train"}', "model None is not one of"),
    ],
)
def test_malformed_result_is_named(runs_folder, tmp_path, text, message) -> None:
    folder = tmp_path / "run"
    shutil.copytree(runs_folder / "snf-0-60", folder)
    (folder / "result.json").write_text(text)

    with pytest.raises(
        ResultsError, match=f"result.json' is unreadable or incomplete .*{message}"
    ):
        find_runs([tmp_path])


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("history.json", b'[{"epoch": 1', "Expecting"),
        ("history.json", b"[]", "no validation entries"),
        ("history.json", b'[{"epoch": 1}]', "entry 0 has train_time_s None"),
        ("samples.pt", b"", "samples.pt' is unreadable"),
        ("samples.pt", b"PK\x03\x04 truncated", "samples.pt' is unreadable"),
        ("samples.pt", b"hello\n", "samples.pt' is unreadable"),
        ("samples.pt", b"NaN", "samples.pt' is unreadable"),
    ],
)
def test_damaged_run_file_is_named(runs_folder, tmp_path, name, content, message) -> None:
    folder = tmp_path / "run"
    shutil.copytree(runs_folder / "snf-0-60", folder)
    (folder / name).write_bytes(content)

    with pytest.raises(ResultsError, match=f"run/{name}' is unreadable or incomplete") as caught:
        find_runs([tmp_path])

    assert message in str(caught.value)


def test_samples_of_other_shape_are_named(runs_folder, tmp_path) -> None:
    folder = tmp_path / "run"
    shutil.copytree(runs_folder / "snf-0-60", folder)
    torch.save(
        {"learned": torch.zeros(2, 784), "exact": torch.zeros(3, 784)}, folder / "samples.pt"
    )

    with pytest.raises(ResultsError, match="learned and exact samples differ in shape"):
        find_runs([tmp_path])


@pytest.mark.parametrize("value", [None, float("nan")])
def test_non_finite_nll_is_named(runs_folder, tmp_path, value) -> None:
    folder = tmp_path / "run"
    shutil.copytree(runs_folder / "snf-0-60", folder)
    result = read_result(tmp_path, "run")
    result["test_nll"] = value
    (folder / "result.json").write_text(json.dumps(result))

    with pytest.raises(ResultsError, match="field 'test_nll' is .*, not a finite number"):
        find_runs([tmp_path])


@pytest.mark.parametrize("key", ["lr", "reconstruction_weight"])
def test_non_numeric_setting_is_named(runs_folder, tmp_path, key) -> None:
    folder = tmp_path / "run"
    shutil.copytree(runs_folder / "snf-0-60", folder)
    result = read_result(tmp_path, "run")
    result[key] = "fast"
    (folder / "result.json").write_text(json.dumps(result))

    with pytest.raises(ResultsError, match=f"field '{key}' is 'fast', not a finite number"):
        find_runs([tmp_path])


def test_repeated_seed_is_rejected(runs_folder, tmp_path) -> None:
    shutil.copytree(runs_folder / "snf-0-60", tmp_path / "first")
    shutil.copytree(runs_folder / "snf-0-60", tmp_path / "second")

    with pytest.raises(ResultsError, match="are both seed 0 of the same model"):
        find_runs([tmp_path])


def test_method_label_names_other_weight() -> None:
    default = {"model": "fc2", "method": "snf", "reconstruction_weight": 1.0}
    other = {"model": "fc2", "method": "snf", "reconstruction_weight": 0.1}
    glow = {"model": "glow", "method": "snf", "reconstruction_weight": 100.0}

    assert method_label(default) == "SNF"
    assert method_label(other) == "SNF (λ = 0.1)"
    assert method_label(glow) == "SNF"

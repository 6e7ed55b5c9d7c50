r"""Result records: one JSON object per measured metric, stored as JSON Lines.

A record carries enough to compare runs made months apart on other machines:

.. code-block:: text

    {"schema": 1, "time": "2025-01-31T12:00:00.000+00:00", "preset": "quick",
     "case": {"model": "snf-fc", "dim": 784, ...}, "metric": "train_time",
     "unit": "ms", "per": "batch", "stats": {"n": 50, "mean": ...},
     "protocol": {"name": "adaptive", ...}, "code": {"commit": ..., "dirty": ...},
     "machine": {"label": "gpu-nvidia-h200", ...}}

Rows are appended one at a time, so an interrupted sweep keeps every row written before
the interruption and can resume by skipping the keys from :func:`case_key`.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench.memory import MIB, nvml_query
from bench.timing import resolve_device

__all__ = [
    "REQUIRED_KEYS",
    "SCHEMA_VERSION",
    "ResultsError",
    "append_record",
    "case_key",
    "code_version",
    "machine_info",
    "make_record",
    "read_records",
    "validate_label",
]

SCHEMA_VERSION = 1

REQUIRED_KEYS = (
    "schema",
    "time",
    "preset",
    "case",
    "metric",
    "unit",
    "per",
    "stats",
    "protocol",
    "code",
    "machine",
)

# A label becomes part of a file name, so it starts with a letter or digit (never "." or "..")
# and has no path separator.
_LABEL_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

_GIT_TIMEOUT_S = 10


class ResultsError(Exception):
    """Raised when a result file cannot be written or read. The message names the file and fix."""


# Provenance: code and machine


def _git(args: list[str], directory: Path) -> str | None:
    """Return git's stripped output, or None when git or the repository is unavailable."""
    try:
        completed = subprocess.run(
            ["git", *args],
            cwd=directory,
            capture_output=True,
            text=True,
            timeout=_GIT_TIMEOUT_S,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None

    return completed.stdout.strip()


def code_version(directory: str | Path | None = None) -> dict:
    r"""Describe the code that produced a measurement.

    Untracked files count as changes, except under ``results/`` and ``reports/``, which a
    sweep writes into the work tree.

    Arguments:
        directory: Where to run git, by default the folder of this package's source.

    Returns:
        A dict with ``commit`` (the HEAD commit hash), ``dirty`` (whether
        ``git status --porcelain`` lists anything) and ``version`` (the installed
        ``snf-bench`` distribution's version). Each is None where git, the repository or
        the installed distribution is missing.
    """
    directory = Path(__file__).resolve().parent if directory is None else Path(directory)

    commit = _git(["rev-parse", "HEAD"], directory)
    outputs = [":(top)", ":(exclude,top)results", ":(exclude,top)reports"]
    status = _git(["status", "--porcelain", "--", *outputs], directory) if commit else None

    try:
        version = importlib.metadata.version("snf-bench")
    except importlib.metadata.PackageNotFoundError:
        version = None

    return {
        "commit": commit or None,
        "dirty": None if status is None else status != "",
        "version": version,
    }


def _cpu_model() -> str:
    """Return the CPU model name from ``/proc/cpuinfo``, else from ``platform``."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""

    found = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    if found:
        return found.group(1).strip()

    return platform.processor() or platform.machine() or "unknown"


def _slug(text: str) -> str:
    """Lower-case ``text`` to hyphen-joined words, without trademarks and clock speeds."""
    text = text.lower().split("@")[0]
    text = re.sub(r"\((r|tm|c)\)", " ", text)
    text = re.sub(r"\b(cpu|processor)\b", " ", text)

    return re.sub(r"[^a-z0-9.]+", "-", text).strip("-.") or "unknown"


def validate_label(label: str) -> str:
    """Return ``label`` if it is 1-64 letters, digits, ``.``, ``_`` or ``-`` starting with a
    letter or digit, else raise ValueError."""
    if not isinstance(label, str) or not _LABEL_PATTERN.fullmatch(label):
        raise ValueError(
            f"machine label {label!r} is invalid; use 1-64 characters from letters, digits, "
            "'.', '_' and '-', starting with a letter or digit"
        )

    return label


def machine_info(device: torch.device | str, label: str | None = None) -> dict:
    r"""Describe the machine and device that run a measurement.

    No user name or host name is stored. The derived label names the hardware only,
    such as ``"cpu-amd-epyc-7b13-16c"`` or ``"gpu-nvidia-h200"``, so two identical
    machines share a label unless the user sets one.

    Arguments:
        device: The measured device. GPU fields are None unless it is a CUDA device.
        label: A machine label of 1-64 letters, digits, ``.``, ``_`` or ``-`` that starts
            with a letter or digit, or None to derive one from the hardware.

    Returns:
        A flat dict with ``label``, ``cpu``, ``cores``, ``torch``, ``cuda``,
        ``python``, ``os``, ``gpu``, ``gpu_memory_mib``, ``driver`` (from NVML, None
        without it) and ``compute_capability``.
    """
    if label is not None:
        validate_label(label)

    device = resolve_device(device)
    cpu = _cpu_model()
    cores = os.cpu_count()

    info = {
        "label": label,
        "cpu": cpu,
        "cores": cores,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "gpu": None,
        "gpu_memory_mib": None,
        "driver": None,
        "compute_capability": None,
    }

    derived = f"cpu-{_slug(cpu)}-{cores}c"

    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info["gpu"] = properties.name
        info["gpu_memory_mib"] = properties.total_memory / MIB
        info["driver"] = _driver_version()
        info["compute_capability"] = f"{properties.major}.{properties.minor}"
        derived = f"gpu-{_slug(properties.name)}"

    if label is None:
        info["label"] = derived[:64].rstrip("-.")

    return info


def _driver_version() -> str | None:
    version = nvml_query(lambda nvml: nvml.nvmlSystemGetDriverVersion())

    # nvidia-ml-py 13.615 returns the driver version as bytes, unlike its other strings.
    if isinstance(version, bytes):
        version = version.decode()

    return version


# Records


def _check_case(case: dict) -> dict:
    """Return a copy of ``case`` with tuples as lists, or raise unless it is flat JSON."""
    if not isinstance(case, dict):
        raise ValueError(f"case must be a dict, got {type(case).__name__}")

    scalars = (str, int, float, bool, type(None))
    checked = {}

    for key, value in case.items():
        if not isinstance(key, str):
            raise ValueError(f"case key {key!r} is invalid; case keys must be strings")

        if isinstance(value, (list, tuple)) and all(isinstance(v, scalars) for v in value):
            value = list(value)
        elif not isinstance(value, scalars):
            raise ValueError(
                f"case[{key!r}]={value!r} is invalid; expected a string, number, boolean, "
                "None or a list of those"
            )

        checked[key] = value

    return checked


def make_record(
    preset: str,
    case: dict,
    metric: str,
    unit: str,
    per: str,
    measurement_stats: dict,
    protocol: dict,
    machine: dict,
    code: dict,
) -> dict:
    r"""Build one result record, stamped with the current UTC time.

    Arguments:
        preset: The sweep preset that the case belongs to.
        case: A flat dict: model, method, dim, shape, layers, batch_size, data, device,
            dtype, threads. Values are strings, numbers, booleans, None or lists of those.
        metric: What was measured, such as ``"train_time"`` or ``"peak_memory"``.
        unit: The unit of the statistics, such as ``"ms"`` or ``"MiB"``.
        per: What one value covers, such as ``"batch"`` or ``"sample"``.
        measurement_stats: The statistics, such as :func:`bench.timing.summarize`'s output.
        protocol: The protocol record, with at least its ``name``.
        machine: The output of :func:`machine_info`.
        code: The output of :func:`code_version`.
    """
    for name, value in (("preset", preset), ("metric", metric), ("unit", unit), ("per", per)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name}={value!r} is invalid; expected a non-empty string")

    return {
        "schema": SCHEMA_VERSION,
        "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        "preset": preset,
        "case": _check_case(case),
        "metric": metric,
        "unit": unit,
        "per": per,
        "stats": dict(measurement_stats),
        "protocol": dict(protocol),
        "code": dict(code),
        "machine": dict(machine),
    }


def _hashable(value: object) -> object:
    return tuple(value) if isinstance(value, list) else value


def case_key(record: dict) -> tuple:
    """Return the key that identifies a record's measurement, to skip it when resuming.

    The key is (preset, sorted case items, metric, protocol name, machine label), so the
    same case measured under another protocol or on another machine is a different key.
    """
    case_items = tuple(sorted((k, _hashable(v)) for k, v in record["case"].items()))

    return (
        record["preset"],
        case_items,
        record["metric"],
        record["protocol"].get("name"),
        record["machine"].get("label"),
    )


# Files


def append_record(path: str | Path, record: dict) -> None:
    r"""Append ``record`` as one JSON line, creating the file and its folders if needed.

    The full line goes to the file in a single ``os.write`` on a descriptor opened with
    ``O_APPEND``, followed by ``fsync``, so an interruption keeps every earlier row. When
    the file's last row lacks its newline because a writer died mid-row, that partial row is
    cut off if it is not valid JSON (it can never be read as a record, and
    :func:`read_records` ignores it), and a newline is written first if it is valid JSON.
    Either way the new row starts on a line of its own.

    Note:
        Writers hold an exclusive ``flock`` on the file while they check its end and append,
        so that one does not cut off another's row in progress. The lock is advisory, so it
        covers writers that use this function only. Concurrent appends by several processes
        do not interleave on local Linux file systems, but NFS gives no such guarantee.

    Raises:
        ResultsError: When the folder or file cannot be created or written.
        ValueError: When the record contains NaN or infinity, which JSON cannot store.
    """
    path = Path(path)
    line = json.dumps(record, allow_nan=False, separators=(",", ":")) + "\n"
    data = line.encode()

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        created = not path.exists()
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as error:
        raise ResultsError(_write_failure(path, error)) from None

    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        start, tail = _last_line(fd, size)

        if tail and not _is_json(tail):
            os.ftruncate(fd, start)
        elif tail:
            data = b"\n" + data

        written = os.write(fd, data)
        if written != len(data):
            # A short write (a full disk) leaves a partial row at the end. Cut it off,
            # which is safe unless another writer appended after it.
            end = os.lseek(fd, 0, os.SEEK_CUR)
            os.ftruncate(fd, end - written)
            raise ResultsError(
                f"cannot append to {path}: only {written} of {len(data)} bytes were written; "
                "free disk space or choose another folder with --results DIR"
            )

        os.fsync(fd)
    except OSError as error:
        raise ResultsError(_write_failure(path, error)) from None
    finally:
        os.close(fd)

    # A new file's directory entry is durable only once its folder is synced too.
    if created:
        _fsync_folder(path.parent)


def _last_line(fd: int, size: int) -> tuple[int, bytes]:
    """Return the offset and bytes of the text after the file's last newline (empty if none)."""
    end = size
    tail = b""

    # Read backwards in blocks, because a row is a few KiB and a file can be large.
    while end > 0:
        start = max(0, end - 65536)
        block = os.pread(fd, end - start, start)
        newline = block.rfind(b"\n")

        if newline >= 0:
            tail = block[newline + 1 :] + tail
            return start + newline + 1, tail

        tail = block + tail
        end = start

    return 0, tail


def _is_json(raw: bytes) -> bool:
    try:
        json.loads(raw.decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False

    return True


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError as error:
        raise ResultsError(_write_failure(folder, error)) from None

    try:
        os.fsync(fd)
    except OSError as error:
        raise ResultsError(_write_failure(folder, error)) from None
    finally:
        os.close(fd)


def _write_failure(path: Path, error: OSError) -> str:
    reason = error.strerror or str(error)

    return f"cannot append to {path}: {reason}; choose a writable folder with --results DIR"


def _result_files(path: Path) -> list[Path]:
    if not path.exists():
        raise ResultsError(f"results path {path} not found; check the path or run a sweep first")

    if path.is_dir():
        return sorted(path.rglob("*.jsonl"))

    return [path]


def _parse_line(text: str, where: str) -> dict:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise ResultsError(
            f"{where}: not valid JSON ({error.msg} at column {error.colno}); "
            "delete or repair that line"
        ) from None

    if not isinstance(record, dict):
        raise ResultsError(
            f"{where}: not a result record (a JSON object was expected); "
            "delete or repair that line"
        )

    found = record.get("schema")
    if found != SCHEMA_VERSION:
        raise ResultsError(
            f"{where}: schema version {found!r} is not supported (this snf-bench reads "
            f"version {SCHEMA_VERSION}); read the file with the snf-bench version that wrote "
            "it, or measure the case again"
        )

    missing = [key for key in REQUIRED_KEYS if key not in record]
    if missing:
        raise ResultsError(
            f"{where}: record is missing {', '.join(missing)}; delete or repair that line"
        )

    return record


def _warn_stderr(message: str) -> None:
    print(f"snf-bench: warning: {message}", file=sys.stderr, flush=True)


def read_records(
    paths: str | Path | Iterable[str | Path], warn: Callable[[str], None] | None = None
) -> list[dict]:
    r"""Read every record from result files and folders.

    Folders are searched recursively for ``*.jsonl`` files, in sorted path order. Blank
    lines are skipped. A file's last line that has no newline and is not valid JSON is the
    partial row of an interrupted write: it is skipped with a warning, and the next
    :func:`append_record` to that file cuts it off.

    Arguments:
        paths: One path or several, each a file or a folder.
        warn: Receives the one-line warning of each skipped partial row; by default it is
            printed to stderr.

    Raises:
        ResultsError: When a path is missing or unreadable, or a line other than such a
            partial last row is not valid JSON, is not a record, lacks a required key or has
            another schema version. The message names the file and line.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]

    warn = _warn_stderr if warn is None else warn

    records = []

    for path in paths:
        for file in _result_files(Path(path)):
            try:
                lines = file.read_bytes().split(b"\n")
            except OSError as error:
                reason = error.strerror or str(error)
                raise ResultsError(
                    f"cannot read {file}: {reason}; check its permissions"
                ) from None

            # Splitting on newlines leaves b"" last exactly when the file ends with one.
            if lines[-1].strip() and not _is_json(lines[-1]):
                warn(
                    f"{file}:{len(lines)}: skipped a partial last row ({len(lines[-1])} bytes "
                    "without a newline, not valid JSON) left by an interrupted write; the next "
                    "append to this file removes it"
                )
                lines = lines[:-1]

            for number, raw in enumerate(lines, start=1):
                where = f"{file}:{number}"

                try:
                    text = raw.decode()
                except UnicodeDecodeError:
                    raise ResultsError(
                        f"{where}: not valid UTF-8; delete or repair that line"
                    ) from None

                if text.strip():
                    records.append(_parse_line(text, where))

    return records

import getpass
import json
import os
import platform
import re
import shutil
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from bench import results
from bench.results import (
    SCHEMA_VERSION,
    ResultsError,
    append_record,
    case_key,
    code_version,
    machine_info,
    make_record,
    read_records,
)

CASE = {
    "model": "snf-fc",
    "method": "snf",
    "dim": 784,
    "shape": (1, 28, 28),
    "layers": 2,
    "batch_size": 100,
    "data": "mnist",
    "device": "cpu",
    "dtype": "float32",
    "threads": 1,
}
STATS = {"n": 3, "mean": 1.5, "std": 0.1, "median": 1.5}
PROTOCOL = {"name": "adaptive", "rel_tol": 0.02}
CODE = {"commit": "0" * 40, "dirty": False, "version": "0.1.0"}


def record(metric: str = "train_time", **case: object) -> dict:
    machine = {"label": "test-machine", "cpu": "Test CPU"}

    return make_record(
        "quick", {**CASE, **case}, metric, "ms", "batch", STATS, PROTOCOL, machine, CODE
    )


def test_make_record_fields() -> None:
    row = record()

    assert row["schema"] == SCHEMA_VERSION
    assert row["case"]["shape"] == [1, 28, 28]
    assert row["stats"] == STATS
    assert row["per"] == "batch"

    stamped = datetime.fromisoformat(row["time"])
    assert stamped.utcoffset() == timedelta(0)
    assert abs(datetime.now(timezone.utc) - stamped) < timedelta(minutes=1)


def test_make_record_rejects_nested_case() -> None:
    with pytest.raises(ValueError, match="case\\['shape'\\]"):
        record(shape={"h": 28})


def test_make_record_rejects_empty_metric() -> None:
    with pytest.raises(ValueError, match="metric=''"):
        record(metric="")


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "results" / "run.jsonl"
    rows = [record(dim=dim) for dim in (32, 128, 224)]

    for row in rows:
        append_record(path, row)

    assert read_records(path) == rows
    assert read_records(str(path)) == rows


def test_read_folder_recursive(tmp_path: Path) -> None:
    append_record(tmp_path / "a.jsonl", record(dim=1))
    append_record(tmp_path / "nested" / "deeper" / "b.jsonl", record(dim=2))
    (tmp_path / "notes.txt").write_text("not a result file")

    rows = read_records([tmp_path])

    assert [row["case"]["dim"] for row in rows] == [1, 2]


def test_read_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    row = record()
    path.write_text("\n" + json.dumps(row) + "\n  \n\n")

    assert read_records(path) == [row]


def test_append_keeps_earlier_rows(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    append_record(path, record(dim=1))
    append_record(path, record(dim=2))
    before = path.read_bytes()

    append_record(path, record(dim=3))
    after = path.read_bytes()

    assert after.startswith(before)
    assert after.count(b"\n") == 3
    assert [row["case"]["dim"] for row in read_records(path)] == [1, 2, 3]


def test_append_after_half_row(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    append_record(path, record(dim=1))

    # A writer that died mid-row leaves a line without its newline.
    with open(path, "a") as f:
        f.write('{"schema": 1, "ti')
    append_record(path, record(dim=2))

    lines = path.read_text().splitlines()
    assert len(lines) == 2
    assert path.read_text().endswith("\n")
    assert [row["case"]["dim"] for row in read_records(path)] == [1, 2]


def test_append_after_long_half_row(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    append_record(path, record(dim=1))
    first = path.read_bytes()

    # Longer than one 64 KiB block of the backward search for the last newline.
    with open(path, "a") as f:
        f.write('{"schema": 1, "pad": "' + "x" * 70_000)
    append_record(path, record(dim=2))

    assert path.read_bytes().startswith(first + b"{")
    assert [row["case"]["dim"] for row in read_records(path)] == [1, 2]


def test_append_after_unterminated_row(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    path.write_text(json.dumps(record(dim=1)))

    append_record(path, record(dim=2))

    assert path.read_text().count("\n") == 2
    assert [row["case"]["dim"] for row in read_records(path)] == [1, 2]


def test_read_skips_partial_last_row(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    path.write_text(json.dumps(record(dim=1)) + "\n" + '{"schema": 1, "ti')
    warnings = []

    rows = read_records(path, warn=warnings.append)

    assert [row["case"]["dim"] for row in rows] == [1]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"{path}:2: skipped a partial last row (17 bytes")
    assert "\n" not in warnings[0]


def test_read_partial_row_warns_stderr(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "run.jsonl"
    path.write_bytes(json.dumps(record()).encode() + b"\n" + '{"case": "gr\u00fc'.encode()[:-1])

    rows = read_records(path)
    err = capsys.readouterr().err

    assert len(rows) == 1
    assert err.startswith(f"snf-bench: warning: {path}:2: skipped a partial last row")
    assert err.count("\n") == 1


def test_read_unterminated_valid_row(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    path.write_text(json.dumps(record(dim=1)) + "\n" + json.dumps(record(dim=2)))
    warnings = []

    rows = read_records(path, warn=warnings.append)

    assert [row["case"]["dim"] for row in rows] == [1, 2]
    assert warnings == []


def test_read_invalid_terminated_last_line(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    path.write_text(json.dumps(record()) + "\n" + '{"schema": 1, "ti\n')

    with pytest.raises(ResultsError, match=f"^{re.escape(str(path))}:2: not valid JSON"):
        read_records(path)


def test_read_partial_row_not_last(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    path.write_text('{"schema": 1, "ti\n' + json.dumps(record()))

    with pytest.raises(ResultsError, match=f"^{re.escape(str(path))}:1: not valid JSON"):
        read_records(path)


def test_append_short_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "run.jsonl"
    append_record(path, record(dim=1))
    before = path.read_bytes()
    real_write = os.write

    def short_write(fd: int, data: bytes) -> int:
        return real_write(fd, data[: len(data) // 2])

    monkeypatch.setattr(os, "write", short_write)
    with pytest.raises(ResultsError, match="only .* bytes were written"):
        append_record(path, record(dim=2))
    monkeypatch.undo()

    assert path.read_bytes() == before


def test_append_rejects_nan(tmp_path: Path) -> None:
    row = record()
    row["stats"] = {"mean": float("nan")}

    with pytest.raises(ValueError):
        append_record(tmp_path / "run.jsonl", row)


def test_append_unwritable_folder(tmp_path: Path) -> None:
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)

    try:
        if os.access(folder, os.W_OK):
            pytest.skip("the folder stays writable for this user (root)")

        with pytest.raises(ResultsError) as caught:
            append_record(folder / "run.jsonl", record())
    finally:
        folder.chmod(0o700)

    message = str(caught.value)
    assert str(folder / "run.jsonl") in message
    assert "--results DIR" in message
    assert "\n" not in message


def test_append_parent_is_file(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("")

    with pytest.raises(ResultsError, match="choose a writable folder with --results DIR"):
        append_record(blocker / "sub" / "run.jsonl", record())


def test_read_corrupt_line(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps(record()) + "\n" + "{not json\n" + json.dumps(record()) + "\n")

    with pytest.raises(ResultsError) as caught:
        read_records(path)

    message = str(caught.value)
    assert message.startswith(f"{path}:2: not valid JSON (")
    assert message.endswith("); delete or repair that line")
    assert "\n" not in message


def test_read_future_schema(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    future = {**record(), "schema": SCHEMA_VERSION + 1}
    path.write_text(json.dumps(record()) + "\n" + json.dumps(future) + "\n")

    with pytest.raises(ResultsError) as caught:
        read_records(path)

    message = str(caught.value)
    assert message.startswith(f"{path}:2: schema version {SCHEMA_VERSION + 1} ")
    assert f"reads version {SCHEMA_VERSION}" in message


def test_read_missing_key(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    row = record()
    del row["machine"]
    path.write_text(json.dumps(row) + "\n")

    with pytest.raises(ResultsError, match=":1: record is missing machine"):
        read_records(path)


def test_read_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text("[1, 2]\n")

    with pytest.raises(ResultsError, match=":1: not a result record"):
        read_records(path)


def test_read_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nothing-here"

    with pytest.raises(ResultsError, match=re.escape(str(missing))):
        read_records([missing])


def test_case_key_ignores_order() -> None:
    first = record()
    second = record()
    second["case"] = dict(reversed(list(second["case"].items())))

    assert case_key(first) == case_key(second)
    assert hash(case_key(first)) == hash(case_key(second))


def test_case_key_separates_measurements() -> None:
    base = record()
    other_protocol = {**record(), "protocol": {"name": "paper"}}
    other_machine = {**record(), "machine": {"label": "other"}}

    assert case_key(base) != case_key(record(dim=32))
    assert case_key(base) != case_key(record(metric="sample_time"))
    assert case_key(base) != case_key(other_protocol)
    assert case_key(base) != case_key(other_machine)


def test_case_key_resumes_from_file(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    append_record(path, record(dim=32))

    done = {case_key(row) for row in read_records(path)}

    assert case_key(record(dim=32)) in done
    assert case_key(record(dim=128)) not in done


@pytest.mark.parametrize("label", ["lab-gpu_1.a", "a" * 64, "X", "7", "a..b"])
def test_machine_label_valid(label: str) -> None:
    assert machine_info("cpu", label=label)["label"] == label


@pytest.mark.parametrize(
    "label",
    ["", "a" * 65, "has space", "grün", "a/b", "x;rm", ".", "..", "../x", "a\\b", ".hidden", "-x"],
)
def test_machine_label_invalid(label: str) -> None:
    with pytest.raises(ValueError) as caught:
        machine_info("cpu", label=label)

    message = str(caught.value)
    assert repr(label) in message
    assert "letters, digits, '.', '_' and '-', starting with a letter or digit" in message


def test_machine_info_cpu() -> None:
    info = machine_info("cpu")

    assert re.fullmatch(r"cpu-[a-z0-9.-]+-\d+c", info["label"])
    assert len(info["label"]) <= 64
    assert info["cores"] == os.cpu_count()
    assert info["python"] == platform.python_version()
    assert info["gpu"] is None
    assert info["driver"] is None


def test_machine_info_private() -> None:
    text = json.dumps(machine_info("cpu"))

    host = platform.node()
    if host:
        assert host not in text

    user = getpass.getuser()
    assert not re.search(rf"\b{re.escape(user)}\b", text)


def test_driver_version_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    import pynvml

    monkeypatch.setattr(pynvml, "nvmlInit", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlSystemGetDriverVersion", lambda: b"570.86.15")
    monkeypatch.setattr(pynvml, "nvmlShutdown", lambda: None)

    assert results._driver_version() == "570.86.15"


def test_code_version_outside_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))

    version = code_version(tmp_path)

    assert version["commit"] is None
    assert version["dirty"] is None
    assert "version" in version


def test_code_version_without_git(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))

    version = code_version()

    assert version["commit"] is None
    assert version["dirty"] is None


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_code_version_in_repo(tmp_path: Path) -> None:
    identity = ["-c", "user.name=test", "-c", "user.email=test@localhost"]
    commit = [*identity, "commit", "-q", "--allow-empty", "-m", "empty"]

    for args in (["init", "-q"], commit):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    clean = code_version(tmp_path)
    (tmp_path / "new.py").write_text("")
    dirty = code_version(tmp_path)

    assert re.fullmatch(r"[0-9a-f]{40}", clean["commit"])
    assert clean["dirty"] is False
    assert dirty["dirty"] is True

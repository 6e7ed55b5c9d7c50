import json
import math
import shutil

import pytest
import torch

from bench import train
from bench.train import Splits, TrainingDiverged, TrainSettings, evaluate_nll, run_training
from snf_core import ExactLinear, Flow
from snf_core.data import load_embedded_mnist


@pytest.fixture
def small_splits(monkeypatch: pytest.MonkeyPatch) -> Splits:
    """300 training, 100 validation and 100 test digits of the embedded MNIST."""

    images, _ = load_embedded_mnist()
    images = images[torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(5))]
    splits = Splits(images[:300], images[300:400], images[400:500], "mnist-embedded")
    monkeypatch.setattr(train, "load_splits", lambda data_root: splits)

    return splits


def settings(tmp_path, **overrides) -> TrainSettings:
    options = {"model": "fc2", "method": "snf", "epochs": 2, "runs": tmp_path, "threads": 1}

    return TrainSettings(**{**options, **overrides})


def quiet(line: str) -> None:
    pass


def test_known_density_gives_known_nll() -> None:
    """A flow z = 2y on logit inputs y: log p(x) = log N(2y) + D log 2 + the logit's
    log-abs-det, computed here from the formulas, with the evaluation's noise."""

    images, _ = load_embedded_mnist()
    images = images[:50]
    layer = ExactLinear(784)

    with torch.no_grad():
        layer.weight.copy_(2.0 * torch.eye(784))

    flow = Flow([layer], (784,))
    nll = evaluate_nll(flow, images, noise_seed=7, device="cpu", batch_size=100)

    noise = torch.rand(
        images.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64
    )
    delta, scale = 1e-6, (1 - 2e-6) / 256
    p = (delta + scale * (images.double() + noise)).flatten(1)
    y = torch.log(p) - torch.log1p(-p)
    log_normal = -0.5 * ((2 * y).square().sum(dim=1) + 784 * math.log(2 * math.pi))
    logit_logabsdet = (math.log(scale) - torch.log(p) - torch.log1p(-p)).sum(dim=1)
    expected = -(log_normal + 784 * math.log(2.0) + logit_logabsdet)

    assert nll.dtype == torch.float64
    assert torch.allclose(nll, expected, rtol=1e-5)


def test_evaluation_computes_logdets_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ten batches through two exact linear layers factorize each weight once."""

    images, _ = load_embedded_mnist()
    flow = train.models.fc2_flow("exact")
    slogdet = torch.linalg.slogdet
    calls = []

    def counting(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(matrix.shape)
        return slogdet(matrix)

    monkeypatch.setattr(torch.linalg, "slogdet", counting)
    nll = evaluate_nll(flow, images[:1000], noise_seed=0, device="cpu", batch_size=100)

    assert nll.shape == (1000,)
    assert len(calls) == 2


def test_run_writes_result_and_best_weights(tmp_path, small_splits) -> None:
    outcome = run_training(settings(tmp_path), quiet)
    folder = outcome.folder
    history = json.loads((folder / "history.json").read_text())
    result = json.loads((folder / "result.json").read_text())

    flow = train.build_model(settings(tmp_path))
    flow.load_state_dict(torch.load(folder / "best.pt"))
    validation = evaluate_nll(flow, small_splits.validation, train.VALIDATION_NOISE_SEED, "cpu")
    test = evaluate_nll(flow, small_splits.test, train.TEST_NOISE_SEED, "cpu")

    assert [entry["epoch"] for entry in history] == [1.0, 2.0]
    assert result["steps"] == 6
    best = min(entry["validation_nll"] for entry in history)

    assert validation.mean().item() == pytest.approx(best, rel=1e-5)
    assert result["test_nll"] == pytest.approx(test.mean().item(), rel=1e-5)
    assert result["test_bpd"] == pytest.approx(result["test_nll"] / (784 * math.log(2)))
    assert outcome.result == result


def test_budget_stops_after_one_step(tmp_path, small_splits) -> None:
    outcome = run_training(settings(tmp_path, budget_s=1e-9), quiet)
    history = json.loads((outcome.folder / "history.json").read_text())

    assert outcome.result["steps"] == 1
    assert history[-1]["epoch"] == pytest.approx(1 / 3)


def test_samples_of_exact_flow_match(tmp_path, small_splits) -> None:
    """Without learned inverses, both sample sets come from the same exact inverse."""

    outcome = run_training(settings(tmp_path, method="exact", epochs=1), quiet)
    samples = torch.load(outcome.folder / "samples.pt")

    assert samples["learned"].shape == (64, 784)
    assert samples["learned"].dtype == torch.uint8
    assert torch.equal(samples["learned"], samples["exact"])


def test_interrupted_run_resumes_to_same_weights(tmp_path, small_splits, monkeypatch) -> None:
    """Stopping in the second epoch and rerunning gives the weights of an unbroken run."""

    unbroken = run_training(settings(tmp_path, name="unbroken"), quiet)
    loss_terms = Flow.loss_terms
    calls = []

    def interrupt_at_fifth(self, x):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return loss_terms(self, x)

    monkeypatch.setattr(Flow, "loss_terms", interrupt_at_fifth)

    with pytest.raises(KeyboardInterrupt):
        run_training(settings(tmp_path, name="resumed"), quiet)

    lines = []
    resumed = run_training(settings(tmp_path, name="resumed"), lines.append)
    expected = torch.load(unbroken.folder / "best.pt")
    actual = torch.load(resumed.folder / "best.pt")

    assert lines[0].startswith("resuming")
    assert resumed.result["steps"] == unbroken.result["steps"]
    assert all(torch.equal(expected[key], actual[key]) for key in expected)
    assert resumed.result["test_nll"] == unbroken.result["test_nll"]


def test_divergence_keeps_last_good_checkpoint(tmp_path, small_splits, monkeypatch) -> None:
    first = run_training(settings(tmp_path, epochs=1), quiet)
    checkpoint = torch.load(first.folder / "checkpoint.pt", weights_only=False)

    # Without its result the folder is that of a run interrupted after one epoch.
    (first.folder / "result.json").unlink()
    loss_terms = Flow.loss_terms

    def nan_loss(self, x):
        nll, reconstruction = loss_terms(self, x)
        return nll * float("nan"), reconstruction

    monkeypatch.setattr(Flow, "loss_terms", nan_loss)

    with pytest.raises(TrainingDiverged, match="loss is nan at epoch 2, step 4"):
        run_training(settings(tmp_path, epochs=2), quiet)

    kept = torch.load(first.folder / "checkpoint.pt", weights_only=False)

    assert kept["state"]["epoch"] == 1
    assert all(torch.equal(kept["model"][k], checkpoint["model"][k]) for k in kept["model"])
    assert not (first.folder / "result.json").exists()


def test_reconstruction_bound_stops_run(tmp_path, small_splits) -> None:
    with pytest.raises(TrainingDiverged, match="--max-reconstruction 1e-12"):
        run_training(settings(tmp_path, max_reconstruction=1e-12), quiet)

    assert not (tmp_path / "fc2-snf-seed0" / "result.json").exists()
    assert not (tmp_path / "fc2-snf-seed0" / "checkpoint.pt").exists()


def test_resume_refuses_other_settings(tmp_path, small_splits) -> None:
    run_training(settings(tmp_path, epochs=1), quiet)

    with pytest.raises(ValueError, match="lr=0.0001, not 0.01; pass the same settings"):
        run_training(settings(tmp_path, epochs=1, lr=0.01), quiet)


def test_restart_discards_checkpoint(tmp_path, small_splits) -> None:
    run_training(settings(tmp_path, epochs=1), quiet)
    outcome = run_training(settings(tmp_path, epochs=1, lr=0.01, restart=True), quiet)

    assert outcome.result["lr"] == 0.01
    assert outcome.result["steps"] == 3


def test_settings_reject_unknown_method() -> None:
    with pytest.raises(ValueError, match="unknown method 'emerging' for model 'fc2'"):
        TrainSettings(model="fc2", method="emerging")


def test_settings_reject_weight_without_inverse() -> None:
    with pytest.raises(ValueError, match="applies to method snf only: method 'exact'"):
        TrainSettings(model="fc2", method="exact", reconstruction_weight=2.0)


def test_settings_default_to_paper_schedule() -> None:
    fc = TrainSettings(model="fc2")
    conv = TrainSettings(model="conv9", method="exact")

    assert (fc.epochs, fc.lr) == (6000, 1e-4)
    assert (conv.epochs, conv.lr) == (1000, 1e-3)


def test_warmup_rises_linearly_to_full_rate() -> None:
    factors = [train._warmup_factor(step, 4) for step in range(6)]

    assert factors == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_cli_trains_on_embedded_digits(tmp_path, capsys) -> None:
    from bench.cli import main

    status = main(["train", "fc2", "--epochs", "1", "--threads", "1", "--runs", str(tmp_path)])
    printed = capsys.readouterr()
    result = json.loads((tmp_path / "fc2-snf-seed0" / "result.json").read_text())

    assert status == 0
    assert printed.out.strip() == str(tmp_path / "fc2-snf-seed0" / "result.json")
    assert "test NLL" in printed.err
    assert result["data"] == "mnist-embedded"
    assert result["train_images"] == 3000
    assert result["test_images"] == 1000
    assert result["steps"] == 30


def test_cli_reports_divergence(tmp_path, small_splits, capsys) -> None:
    from bench.cli import EXIT_DIVERGED, main

    arguments = ["train", "fc2", "--runs", str(tmp_path), "--max-reconstruction", "1e-12"]
    status = main(arguments)
    message = capsys.readouterr().err

    assert status == EXIT_DIVERGED
    assert "snf-bench: diverged: the reconstruction error is" in message
    assert "no epoch finished, so there is no checkpoint" in message
    assert "--restart" not in message


def test_cli_rejects_method_of_other_model(tmp_path, capsys) -> None:
    from bench.cli import EXIT_USAGE, main

    runs = tmp_path / "runs"
    status = main(["train", "conv9", "--method", "relative", "--runs", str(runs)])

    assert status == EXIT_USAGE
    assert "unknown method 'relative' for model 'conv9'" in capsys.readouterr().err
    assert not runs.exists()


def test_damaged_checkpoint_is_named(tmp_path, small_splits) -> None:
    outcome = run_training(settings(tmp_path, epochs=1), quiet)
    (outcome.folder / "checkpoint.pt").write_bytes(b"truncated")

    with pytest.raises(ValueError, match="checkpoint.pt' is unreadable .*--restart"):
        run_training(settings(tmp_path, epochs=2), quiet)


def test_finished_run_keeps_result_on_rerun(tmp_path, small_splits, monkeypatch) -> None:
    """Rerunning a finished run scores it again and never removes its result first."""

    first = run_training(settings(tmp_path, epochs=1), quiet)
    removed = []
    unlink = type(first.folder).unlink

    def record(path, missing_ok=False):
        removed.append(path.name)
        return unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(type(first.folder), "unlink", record)
    second = run_training(settings(tmp_path, epochs=1), quiet)

    assert "result.json" not in removed
    assert second.result["test_nll"] == first.result["test_nll"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"epochs": 3}, "contains a finished run with --epochs 2 and no --budget; to train"),
        ({"epochs": 3, "budget_s": 1e6}, "on to --epochs 3 and --budget 1000000 and keep"),
        ({"epochs": 1}, "has trained for 2 full epochs and .* past --epochs 1"),
    ],
)
def test_finished_run_rejects_other_limits(tmp_path, small_splits, overrides, message) -> None:
    first = run_training(settings(tmp_path), quiet)
    result = (first.folder / "result.json").read_text()

    with pytest.raises(ValueError, match=message):
        run_training(settings(tmp_path, **overrides), quiet)

    assert (first.folder / "result.json").read_text() == result


def test_copy_of_finished_run_trains_on(tmp_path, small_splits) -> None:
    """The route that the rejection names: a copy without its result trains on."""

    first = run_training(settings(tmp_path, epochs=1), quiet)
    copy = tmp_path / "fc2-snf-seed0-longer"
    shutil.copytree(first.folder, copy)
    (copy / "result.json").unlink()
    second = run_training(settings(tmp_path, epochs=2, name=copy.name), quiet)

    assert second.result["steps"] == 6
    assert json.loads((first.folder / "result.json").read_text())["steps"] == 3


def test_resume_rejects_passed_budget(tmp_path, small_splits) -> None:
    first = run_training(settings(tmp_path, epochs=2), quiet)
    (first.folder / "result.json").unlink()

    with pytest.raises(ValueError, match="has trained for 2 full epochs and .* past --epochs 1"):
        run_training(settings(tmp_path, epochs=1), quiet)

    assert not (first.folder / "result.json").exists()


def test_resume_accepts_larger_limits(tmp_path, small_splits) -> None:
    first = run_training(settings(tmp_path, epochs=1), quiet)
    (first.folder / "result.json").unlink()
    second = run_training(settings(tmp_path, epochs=2), quiet)

    assert second.result["steps"] == 6


def test_failed_start_leaves_no_folder(tmp_path, small_splits) -> None:
    with pytest.raises(train.DataError, match="lower --batch-size"):
        run_training(settings(tmp_path, batch_size=1000), quiet)

    assert not (tmp_path / "fc2-snf-seed0").exists()


def test_cli_interrupt_before_first_epoch(tmp_path, small_splits, capsys, monkeypatch) -> None:
    from bench.cli import main

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Flow, "loss_terms", interrupt)
    status = main(["train", "fc2", "--runs", str(tmp_path)])
    message = capsys.readouterr().err

    assert status == 130
    assert "no epoch finished, so no checkpoint was saved" in message
    assert not (tmp_path / "fc2-snf-seed0" / "checkpoint.pt").exists()


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--name", "../x", "run name '../x' is invalid"),
        ("--budget", "inf", "must be a finite positive number, got inf"),
    ],
)
def test_cli_rejects_bad_option(tmp_path, capsys, option, value, message) -> None:
    from bench.cli import EXIT_USAGE, main

    status = main(["train", "fc2", "--runs", str(tmp_path), option, value])

    assert status == EXIT_USAGE
    assert message in capsys.readouterr().err


def test_cli_rejects_runs_file(tmp_path, capsys) -> None:
    from bench.cli import EXIT_USAGE, main

    path = tmp_path / "file"
    path.write_text("not a folder")
    status = main(["train", "fc2", "--runs", str(path)])

    assert status == EXIT_USAGE
    assert "--runs '" in capsys.readouterr().err

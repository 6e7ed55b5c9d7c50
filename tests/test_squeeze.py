import torch

from snf_core.squeeze import Squeeze


def test_squeeze_round_trip() -> None:
    x = torch.randn(3, 2, 6, 4)
    z, logabsdet = Squeeze()(x)

    assert z.shape == (3, 8, 3, 2)
    assert torch.equal(Squeeze().inverse(z), x)
    assert torch.equal(logabsdet, torch.zeros(3))


def test_squeeze_moves_blocks_to_channels() -> None:
    x = torch.arange(16.0).view(1, 1, 4, 4)
    z, _ = Squeeze()(x)

    assert torch.equal(z[0, :, 0, 0], torch.tensor([0.0, 1.0, 4.0, 5.0]))

import torch

from snf_core import Flow, LogitTransform, SelfNormalizingLinear, dequantize
from snf_core.data import load_embedded_mnist


def test_self_normalizing_fc_learns_embedded_digits() -> None:
    """Three hundred steps at the learning rate of Keller et al. lower the exact NLL and
    keep R W close to the identity, relative to the squared norm of the logit inputs."""

    images, _ = load_embedded_mnist()
    images = images.flatten(1)[torch.randperm(images.shape[0])]
    train, test = images[:4000], images[4000:]
    generator = torch.Generator().manual_seed(1)
    flow = Flow([LogitTransform(), SelfNormalizingLinear(784)], (784,), reconstruction_weight=1.0)
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-4)
    test_batch = dequantize(test, generator)

    with torch.no_grad():
        nll_before = -flow.log_prob(test_batch).mean().item()

    for _ in range(300):
        index = torch.randint(0, train.shape[0], (100,), generator=generator)
        loss = flow.loss(dequantize(train[index], generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    with torch.no_grad():
        nll_after = -flow.log_prob(test_batch).mean().item()
        logit_inputs = flow.layers[0](test_batch)[0]
        error = flow.reconstruction_error(test_batch).item()
        scale = logit_inputs.square().sum(dim=1).mean().item()

    assert nll_after < nll_before - 5000.0
    assert error < 2e-3 * scale

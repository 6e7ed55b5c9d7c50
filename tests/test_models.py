import pytest
import torch

from bench.cases import MODEL_METHODS, table3_cases
from snf_core.models import conv9_flow, fc2_flow


@pytest.mark.parametrize("method", MODEL_METHODS["conv9"])
def test_conv9_trains_and_samples(method: str) -> None:
    flow = conv9_flow(method, shape=(1, 8, 8))
    x = torch.randn(6, 1, 8, 8)
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-3)
    loss = flow.loss(x)
    loss.backward()
    optimizer.step()

    with torch.no_grad():
        log_prob = flow.log_prob(x)

    assert torch.isfinite(loss)
    assert torch.isfinite(log_prob).all()
    assert flow.latent_shape == (16, 2, 2)
    assert flow.sample(2).shape == (2, 1, 8, 8)
    assert flow.sample(2, exact=True).shape == (2, 1, 8, 8)


@pytest.mark.parametrize("method", MODEL_METHODS["conv9"])
def test_conv9_exact_round_trip(method: str) -> None:
    flow = conv9_flow(method, shape=(1, 8, 8)).double()
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)

    with torch.no_grad():
        z, _ = flow(x)

    assert torch.allclose(flow.inverse(z, exact=True), x, atol=1e-6)


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_fc2_puts_activations_between_linear_layers(layers: int) -> None:
    kinds = [type(layer).__name__ for layer in fc2_flow("exact", features=8, layers=layers).layers]

    assert kinds == ["ExactLinear"] + ["SmoothLeakyReLU", "ExactLinear"] * (layers - 1)


def test_fc2_reconstruction_weights() -> None:
    assert fc2_flow("snf", features=8).reconstruction_weight == 1.0
    assert fc2_flow("exact", features=8).reconstruction_weight == 0.0


def test_table3_preset_lists_every_model() -> None:
    cases = table3_cases()
    names = {(case.model, case.method) for case in cases}

    assert len(cases) == 9
    assert ("fc2", "relative") in names
    assert ("conv9", "emerging") in names
    assert ("conv9", "convexp") in names
    assert ("glow", "snf") in names
    assert {case.batch_size for case in cases} == {100}

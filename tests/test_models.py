import pytest
import torch

from fl_sim.models import build_model, model_names


@pytest.mark.parametrize("name", model_names())
@pytest.mark.parametrize("shape,classes", [((3, 32, 32), 10), ((1, 28, 28), 10), ((3, 32, 32), 100)])
def test_output_shape(name, shape, classes):
    model = build_model(name, shape, classes, seed=0)
    assert model(torch.rand(4, *shape)).shape == (4, classes)


def test_lenet_matches_dlg_reference():
    model = build_model("lenet", (3, 32, 32), 100, init="paper", seed=0)
    assert model[-1].in_features == 768
    for p in model.parameters():
        assert p.min() >= -0.5 and p.max() <= 0.5 and p.std() > 0.2  # U(-0.5, 0.5): std 0.29


def test_cnn6_logit_head_and_no_bias():
    model = build_model("cnn6", (3, 32, 32), 10, head="logit")
    assert model[-1].in_features == 3200 and model[-1].out_features == 1
    assert all(m.bias is None for m in model if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    assert build_model("cnn6d", (3, 32, 32), 10)[2].out_channels == 20


def test_seeded_build_is_repeatable_and_leaves_global_rng():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = build_model("cnn6", (1, 28, 28), 10, seed=7)
    b = build_model("cnn6", (1, 28, 28), 10, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        build_model("resnet", (3, 32, 32), 10)


def test_femnist_cnn_is_dimitrov_et_als_network():
    """Their flax ``CNN`` on 1x28x28: conv 3x3 (32, bias, same padding), ReLU, 2x2 average pool,
    conv 3x3 (64), ReLU, pool, dense 3136 -> 100, ReLU, head; ``kaiming`` gives their LeCun-normal
    weights (std sqrt(1/fan_in)) and zero biases."""
    model = build_model("femnist_cnn", (1, 28, 28), 62, init="kaiming", seed=0)
    convs = [m for m in model if isinstance(m, torch.nn.Conv2d)]
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    assert [(c.out_channels, c.kernel_size, c.padding) for c in convs] == [(32, (3, 3), (1, 1)), (64, (3, 3), (1, 1))]
    assert sum(isinstance(m, torch.nn.AvgPool2d) for m in model) == 2
    assert [(m.in_features, m.out_features) for m in linears] == [(3136, 100), (100, 62)]
    assert sum(p.numel() for p in model.parameters()) == 320 + 18496 + 313700 + 6262
    dense = linears[0].weight
    assert abs(float(dense.std()) - (1 / 3136) ** 0.5) < 0.1 * (1 / 3136) ** 0.5
    assert all(float(m.bias.abs().max()) == 0 for m in convs + linears)

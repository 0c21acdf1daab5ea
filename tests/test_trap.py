"""The active server's trap weights (attacks.trap): the model it sends keeps the honest model's
entries, and an update of it gives the batch back, from one client and from a sum of two."""

import pytest
import torch
from torch.nn import functional as F

from attacks import SUCCESS_PSNR, Update, construct, score_batch
from attacks.trap import expected_recovery, plant_trap, trap, trap_rate
from fl_sim.data import load_dataset, to_float
from fl_sim.models import build_model
from fl_sim.mods.audit import tampering


@pytest.fixture(scope="module")
def digits():
    return load_dataset("mnist5k", "")


@pytest.fixture(scope="module")
def models(digits):
    """The honest mlp and the trap the server builds from it for 32 images per gradient."""
    honest = build_model("mlp", digits.input_shape, digits.num_classes, seed=0)
    trapped = construct("trap", honest, digits.input_shape, to_float(digits.test_x), 500, images=32)
    return honest, trapped


def _gradient(model, data, n, seed):
    idx = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(seed))[:n]
    x, y = to_float(data.train_x[idx]), data.train_y[idx]
    return x, torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))


def _recovered(result, truth) -> int:
    return sum(s["psnr"] >= SUCCESS_PSNR for s in score_batch(result.images, truth))


def test_trap_weights_keep_the_models_entries_shapes_and_row_norms_and_pass_the_copied_rows_check(digits, models):
    honest, trapped = models
    own, sent = honest.state_dict(), trapped.state_dict()
    assert {k: (v.shape, v.dtype) for k, v in sent.items()} == {k: (v.shape, v.dtype) for k, v in own.items()}
    assert all(torch.equal(sent[k], own[k]) for k in ("3.weight", "3.bias"))  # only the first layer changes
    w = sent["1.weight"]
    assert not torch.equal(w, own["1.weight"])
    assert torch.allclose(w.norm(dim=1), own["1.weight"].norm(dim=1), rtol=1e-4)
    assert ((w < 0).float().mean(1) == 0.5).all()  # each row: half of its entries negative
    unit = w / w.norm(dim=1, keepdim=True)
    cos = unit @ unit.T
    cos.fill_diagonal_(0)
    assert cos.abs().max() < 0.5  # no two rows alike
    assert tampering(own, sent) == ""  # the clients' audit sees no constructed layer ...
    imprint = construct("imprint", honest, digits.input_shape, to_float(digits.test_x), 500)
    assert "copies of one another" in tampering(own, imprint.state_dict())  # ... where it sees the imprint
    # each unit fires for few of the server's public images, and for an image of the clients' few units
    fires = trapped[1](to_float(digits.train_x[:500]).flatten(1)) > 0
    assert 0.2 / 32 < fires.float().mean() < 3 / 32
    assert (fires.sum(1) > 0).float().mean() > 0.95


def test_trap_round_of_16_images_is_read_back_exactly(digits, models):
    _, trapped = models
    x, grads = _gradient(trapped, digits, 16, seed=3)
    res = trap(trapped, Update(tuple(grads)), digits.input_shape)
    psnr = torch.tensor([s["psnr"] for s in score_batch(res.images, x)])
    assert (psnr >= SUCCESS_PSNR).sum() >= 15
    assert psnr.median() > 100
    # the consistency checks keep no blend: every image returned is one of the batch
    assert res.diagnostics["images"] == int((psnr >= SUCCESS_PSNR).sum())
    assert res.diagnostics["agreed"] >= 10  # most images were trapped by several units
    # a one-step FedAvg delta (-lr x the gradient) reads the same
    delta = Update(tuple(-0.1 * g for g in grads), "weight_delta", lr=0.1)
    assert torch.allclose(trap(trapped, delta, digits.input_shape).images, res.images, atol=1e-4)


def test_trap_reads_the_sum_of_two_clients_gradients(digits, models):
    """The SecAgg+ case without the protocol: the mean of 2 clients' batch gradients is the
    gradient of their 32 images, and the trap separates them."""
    _, trapped = models
    (xa, ga), (xb, gb) = _gradient(trapped, digits, 16, seed=11), _gradient(trapped, digits, 16, seed=12)
    mean = tuple((a + b) / 2 for a, b in zip(ga, gb))
    res = trap(trapped, Update(mean), digits.input_shape)
    assert _recovered(res, torch.cat([xa, xb])) >= 29  # of 32
    assert expected_recovery(1024, 32, trap_rate(32)) > 0.99


def test_trap_refuses_a_model_whose_first_layer_is_not_linear_on_the_image(digits):
    model = build_model("lenet", digits.input_shape, digits.num_classes)
    with pytest.raises(ValueError, match="first layer is linear on the image"):
        plant_trap(model, digits.input_shape, to_float(digits.test_x[:50]), rate=0.1)

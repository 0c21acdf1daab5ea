"""R-GAP: closed-form recursive reconstruction from one sample's gradient."""

import numpy as np
import pytest
import torch
from torch import nn

from attacks.base import ThreatModel, Update, training_loss
from attacks.metrics import psnr
from attacks.rgap import ra_index, rank_analysis, rgap
from fl_sim.models import build_model


def _image(shape):
    """A real photograph (scikit-image's astronaut), resized to (C, H, W) in [0, 1]."""
    from skimage import data
    from skimage.transform import resize

    c, h, w = shape
    img = resize(data.astronaut(), (h, w), anti_aliasing=True)  # float in [0, 1], H x W x 3
    if c == 1:
        img = img.mean(axis=2, keepdims=True)
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)[:c])).float()


def _gradient(model, x, y=None):
    """One sample's gradient; for a logit head the label is opposite to the prediction (the
    R-GAP demo's rule, which makes the head's equation have one root)."""
    pred = model(x.unsqueeze(0))
    if y is None:
        y = 0 if pred.item() > 0 else 1
    target = torch.tensor([y])
    grads = torch.autograd.grad(training_loss(pred, target), list(model.parameters()))
    return [g.detach() for g in grads], y


SHAPE = (3, 16, 16)


@pytest.fixture(scope="module")
def image():
    return _image(SHAPE)


@pytest.mark.parametrize("granted", [True, False])
def test_logit_head_recovers_image_and_label(image, granted):
    model = build_model("cnn6", SHAPE, 10, head="logit", init="paper", seed=0).eval()
    grads, y = _gradient(model, image)
    threat = ThreatModel(labels=torch.tensor([y])) if granted else ThreatModel()
    res = rgap(model, grads, SHAPE, threat, rank=False)
    assert res.attack == "rgap" and res.status == "ok" and res.steps == 0
    assert res.images.shape == (1, *SHAPE) and res.images.dtype == torch.float32
    assert 0 <= res.images.min() and res.images.max() <= 1
    assert psnr(res.images[0], image) > 60
    assert res.labels.tolist() == [y]
    assert len(res.diagnostics["residuals"]) == 6
    assert all(r["rel_residual"] < 1e-4 for r in res.diagnostics["residuals"])


def test_multiclass_head_without_bias_recovers_label(image):
    model = build_model("cnn6", SHAPE, 10, head="multiclass", init="paper", seed=1).eval()
    grads, y = _gradient(model, image, y=7)
    res = rgap(model, grads, SHAPE, rank=False)
    assert res.labels.tolist() == [7]
    assert psnr(res.images[0], image) > 60


def test_multiclass_head_with_bias_and_update_object(image):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=1, padding=1), nn.LeakyReLU(0.2),
        nn.Conv2d(8, 8, 3, stride=1, padding=1), nn.LeakyReLU(0.2),
        nn.Flatten(), nn.Linear(8 * 16 * 16, 5),
    )
    grads, y = _gradient(model, image, y=3)
    for threat in (ThreatModel(), ThreatModel(labels=torch.tensor([3]))):
        res = rgap(model, Update(tuple(grads)), SHAPE, threat, rank=False)
        assert res.labels.tolist() == [3]
        assert psnr(res.images[0], image) > 60


@pytest.mark.parametrize(
    "block",
    [
        lambda: [nn.Sigmoid(), nn.AvgPool2d(2)],  # pool after an invertible activation
        lambda: [nn.Tanh(), nn.AvgPool2d(2)],
        lambda: [nn.AvgPool2d(2), nn.LeakyReLU(0.2)],  # pool straight after the convolution
    ],
    ids=["sigmoid-pool", "tanh-pool", "pool-leaky"],
)
def test_sigmoid_tanh_and_avgpool(block):
    torch.manual_seed(0)
    small = (3, 8, 8)
    x = _image(small)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), *block(),
        nn.Conv2d(16, 32, 3, padding=1), nn.Tanh(),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    ).double()
    grads, y = _gradient(model, x.double(), y=2)
    res = rgap(model, grads, small, rank=False)
    assert res.labels.tolist() == [2]
    assert psnr(res.images[0], x) > 50, res.diagnostics["residuals"]


def test_relu_drops_the_unknown_rows():
    torch.manual_seed(0)
    small = (3, 8, 8)
    x = _image(small)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 8 * 8, 10),
    ).double()
    grads, _ = _gradient(model, x.double(), y=4)
    res = rgap(model, grads, small, rank=False)
    assert res.labels.tolist() == [4] and res.status == "ok"
    assert psnr(res.images[0], x) > 50


def test_refuses_unsupported_layers_and_bad_updates(image):
    model = build_model("cnn6_maxpool", SHAPE, 10, head="logit", seed=0)
    grads, _ = _gradient(model, image)
    with pytest.raises(ValueError, match=r"layer 6 \(MaxPool2d\)"):
        rgap(model, grads, SHAPE)
    model = build_model("cnn6", SHAPE, 10, head="logit", seed=0)
    grads, _ = _gradient(model, image)
    with pytest.raises(ValueError, match="tensors"):
        rgap(model, grads[:-1], SHAPE)
    with pytest.raises(ValueError, match="shape"):
        rgap(model, grads[:-1] + [torch.zeros(3)], SHAPE)
    bad = [g.clone() for g in grads]
    bad[0][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        rgap(model, bad, SHAPE)


def test_batch_gives_a_blend():
    torch.manual_seed(0)
    small = (3, 8, 8)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(8 * 64, 1))
    batch = torch.stack([_image(small), _image(small).flip(-1)])
    target = torch.tensor([0, 1])
    grads = torch.autograd.grad(training_loss(model(batch), target), list(model.parameters()))
    res = rgap(model, grads, small, ThreatModel(labels=target), rank=False)
    assert res.status == "blend" and res.images.shape == (2, *small)
    assert res.labels.tolist() == [0, 1]


def test_rank_analysis_flags_cnn6d_only():
    shape = (3, 32, 32)
    full = rank_analysis(build_model("cnn6", shape, 1, head="logit", init="paper", seed=0), shape)
    deficient = rank_analysis(build_model("cnn6d", shape, 1, head="logit", init="paper", seed=0), shape)
    assert len(full) == len(deficient) == 6
    assert all(r["deficit"] == 0 for r in full) and ra_index(full) == 0
    assert full[-1]["unknowns"] == 3 * 36 * 36 and full[-1]["padding"] == 3 * (36 * 36 - 32 * 32)
    assert any(r["deficit"] > 0 for r in deficient) and ra_index(deficient) > 0


def test_cifar10_on_cnn6(shared_data):
    data = np.load(shared_data / "cifar10_test150.npz")
    shape = (3, 32, 32)
    model = build_model("cnn6", shape, 10, head="logit", init="paper", seed=0).eval()
    for i in range(2):
        x = torch.from_numpy(data["images"][i]).permute(2, 0, 1).float() / 255
        grads, y = _gradient(model, x)
        res = rgap(model, grads, shape, ThreatModel(labels=torch.tensor([y])), rank=False)
        assert psnr(res.images[0], x) > 50


def test_multiclass_head_when_the_model_predicts_the_true_label():
    """Regression: with a bias-free softmax head, a scale t -> inf also zeroes the naive
    head residual whenever the model already predicts the label; the true scale must win."""
    from fl_sim.data import load_dataset
    from fl_sim.task import batch_gradient

    data = load_dataset("mnist5k")
    model = build_model("cnn6", data.input_shape, 10, init="kaiming", seed=0)
    for i in (0, 2):  # the model's prediction for both is their label, 0
        x, y = data.train_x[i : i + 1].float() / 255, data.train_y[i : i + 1]
        assert int(model(x).argmax()) == int(y)
        grads, _ = batch_gradient(model, x, y)
        res = rgap(model, grads, data.input_shape, ThreatModel(batch_size=1), rank=False)
        assert psnr(res.images[0], x[0]) > 60 and int(res.labels[0]) == int(y)

"""R-GAP: closed-form recursive reconstruction from one sample's gradient."""

import numpy as np
import pytest
import torch
from torch import nn

import attacks.rgap as rgap_module
from attacks.base import ThreatModel, Update, training_loss
from attacks.metrics import psnr
from attacks.rgap import RGAP, RGAPOptions, ra_index, rank_analysis, rgap
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
@pytest.mark.parametrize("agree", [False, True], ids=["demo-label", "predicted-label"])
def test_logit_head_recovers_image_and_label(image, granted, agree):
    # demo label: opposite to the model's prediction, one root of the head's equation;
    # predicted label: two roots, and (not granted) two labels, so four candidates
    model = build_model("cnn6", SHAPE, 10, head="logit", init="paper", seed=0).eval()
    demo = 0 if model(image.unsqueeze(0)).item() > 0 else 1
    grads, y = _gradient(model, image, y=1 - demo if agree else demo)
    threat = ThreatModel(labels=torch.tensor([y])) if granted else ThreatModel()
    res = rgap(model, grads, SHAPE, threat, rank=False)
    assert len(res.diagnostics["candidates"]) == (1 + agree) * (1 + (not granted))
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
        nn.Conv2d(3, 8, 3, stride=1, padding=1),
        nn.LeakyReLU(0.2),
        nn.Conv2d(8, 8, 3, stride=1, padding=1),
        nn.LeakyReLU(0.2),
        nn.Flatten(),
        nn.Linear(8 * 16 * 16, 5),
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
        nn.Conv2d(3, 16, 3, padding=1),
        *block(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
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
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 8 * 8, 10),
    ).double()
    grads, _ = _gradient(model, x.double(), y=4)
    res = rgap(model, grads, small, rank=False)
    assert res.labels.tolist() == [4] and res.status == "ok"
    assert psnr(res.images[0], x) > 50


def test_refuses_unsupported_layers_and_bad_updates(image):
    model = build_model("cnn6_maxpool3", SHAPE, 10, head="logit", seed=0)
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


def test_batch_returns_one_repeated_reconstruction_marked_blend():
    torch.manual_seed(0)
    small = (3, 8, 8)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(8 * 64, 1))
    batch = torch.stack([_image(small), _image(small).flip(-1)])
    target = torch.tensor([0, 1])
    grads = torch.autograd.grad(training_loss(model(batch), target), list(model.parameters()))
    res = rgap(model, grads, small, ThreatModel(labels=target), rank=False)
    assert res.status == "blend" and res.images.shape == (2, *small)
    assert torch.equal(res.images[0], res.images[1])  # one reconstruction, repeated
    assert all(psnr(res.images[0], x) < 30 for x in batch)  # which is neither image
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


def test_rgap_module_keeps_no_mutable_state():
    mutable = [
        name
        for name, value in vars(rgap_module).items()
        if not name.startswith("__") and isinstance(value, (dict, list, set, bytearray))
    ]
    assert mutable == []


def test_held_solver_reuses_the_weights_matrices_and_gives_the_same_image(image):
    model = build_model("cnn6", SHAPE, 10, head="logit", init="paper", seed=0).eval()
    solver = RGAP(RGAPOptions(rank=False))
    first_grads, y1 = _gradient(model, image)
    second_image = image.flip(-1)
    second_grads, y2 = _gradient(model, second_image)
    first = solver(model, first_grads, SHAPE, ThreatModel(labels=torch.tensor([y1])))
    misses = solver.cache.misses
    second = solver(model, second_grads, SHAPE, ThreatModel(labels=torch.tensor([y2])))
    assert solver.cache.misses == misses and solver.cache.hits > 0  # nothing rebuilt for the same weights
    fresh = rgap(model, second_grads, SHAPE, ThreatModel(labels=torch.tensor([y2])), rank=False)
    assert torch.equal(second.images, fresh.images) and psnr(second.images[0], second_image) > 60
    assert psnr(first.images[0], image) > 60


def test_solver_cache_tells_apart_layers_that_differ_only_in_stride_or_padding():
    # Same weights, same input shape, same position: only the geometry differs. A cache keyed
    # by weights and input shape alone would hand the second model the first one's matrices.
    small = (3, 8, 8)
    x = _image(small)
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, stride=1, padding=1)
    second = nn.Conv2d(8, 8, 3, padding=1)
    models = []
    for stride, padding in [(1, 1), (2, 1), (1, 0)]:
        first = nn.Conv2d(3, 8, 3, stride=stride, padding=padding)
        first.load_state_dict(conv.state_dict())
        out = (8 + 2 * padding - 3) // stride + 1
        models.append(
            nn.Sequential(
                first, nn.LeakyReLU(0.2), second, nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(8 * out * out, 5)
            ).double()
        )
    solver = RGAP(RGAPOptions(rank=False))
    for model in models:
        grads, _ = _gradient(model, x.double(), y=1)
        res = solver(model, grads, small)
        assert res.labels.tolist() == [1] and psnr(res.images[0], x) > 50, model[0]


def test_solver_caches_the_rank_table_per_model():
    small = (3, 8, 8)

    def net(seed, channels):
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv2d(3, channels, 3, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(channels, 4, 3, padding=1),
            nn.LeakyReLU(0.2),
            nn.Flatten(),
            nn.Linear(64, 1),
        )

    solver = RGAP()
    a, narrow = net(0, 8), net(0, 2)  # two channels cannot hold the 3 x 8 x 8 input: a deficit
    assert solver.rank_analysis(a, small) == rank_analysis(a, small)
    misses = solver.cache.misses
    assert solver.rank_analysis(a, small) == rank_analysis(a, small) and solver.cache.misses == misses
    table = solver.rank_analysis(narrow, small)  # another model: computed, not the cached one
    assert solver.cache.misses > misses and table == rank_analysis(narrow, small)
    assert ra_index(solver.rank_analysis(a, small)) == 0 < ra_index(table)


def test_options_are_validated_with_one_line_errors(image):
    model = build_model("cnn6", SHAPE, 10, head="logit", seed=0)
    grads, _ = _gradient(model, image)
    for bad, message in [
        (dict(nope=1), "rgap has no option nope (options: rank,"),
        (dict(rank="yes"), "option rank must be True or False"),
        (dict(tikhonov=0.0), "option tikhonov must be > 0"),
        (dict(pool_damping=2.0), "option pool_damping must be in (0, 1]"),
    ]:
        with pytest.raises(ValueError) as info:
            rgap(model, grads, SHAPE, **bad)
        assert message in str(info.value) and "\n" not in str(info.value), bad

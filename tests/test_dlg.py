"""DLG / iDLG on DLG's LeNet with a small real image (offline: scikit-image's camera)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from attacks.base import ThreatModel, Update, training_loss
from attacks.dlg import DEFAULT, FAITHFUL, SETTLE, DLGOptions, dlg
from attacks.idlg import estimate_batch_size, idlg, idlg_labels
from attacks.lbfgs import CompactLBFGS, strong_wolfe_search
from attacks.metrics import psnr
from fl_sim.models import build_model

SHAPE = (1, 16, 16)


def _camera16() -> torch.Tensor:
    from skimage import data, transform

    img = data.camera()[100:356, 150:406].astype(np.float64) / 255.0
    img = transform.resize(img, SHAPE[1:], anti_aliasing=True)
    return torch.tensor(img, dtype=torch.float32)[None, None]


def _gradient(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    return [g.detach() for g in torch.autograd.grad(training_loss(model(x), y), list(model.parameters()))]


@pytest.fixture(scope="module")
def setting():
    model = build_model("lenet", SHAPE, 10, init="paper", seed=0)
    x, y = _camera16(), torch.tensor([3])
    return model, x, y, _gradient(model, x, y)


def test_dlg_recovers_image_and_soft_label(setting):
    model, x, y, grads = setting
    before = [p.detach().clone() for p in model.parameters()]
    result = dlg(model, grads, SHAPE, seed=1, max_steps=60)
    assert result.attack == "dlg" and result.status == "ok"
    # it stopped because the gradients matched and the image had settled
    last = result.diagnostics["attempts"][-1]
    assert last["outcome"] == "ok" and last["image_step"] < SETTLE
    assert result.diagnostics["relative_objective"] < DEFAULT.tol
    assert result.images.shape == (1, *SHAPE) and result.images.dtype == torch.float32
    assert 0.0 <= float(result.images.min()) and float(result.images.max()) <= 1.0
    assert psnr(result.images[0], x[0]) > 40.0
    assert result.labels.dtype == torch.int64 and int(result.labels[0]) == int(y[0])  # argmax of the soft label
    assert result.history and result.steps == len(result.history)
    assert result.diagnostics["optimizer"] == "compact" and 0 < result.diagnostics["evaluations"] < 1500
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # model untouched
    assert all(p.grad is None for p in model.parameters())


def test_dlg_is_deterministic(setting):
    model, _, _, grads = setting
    a = dlg(model, grads, SHAPE, seed=2, max_steps=2, max_iter=5, max_restarts=0)
    b = dlg(model, grads, SHAPE, seed=2, max_steps=2, max_iter=5, max_restarts=0)
    assert torch.equal(a.images, b.images) and a.history == b.history


# Restarts on PyTorch's L-BFGS without line search from the paper's start (standard-normal
# image and soft label).
TORCH_ROBUST = DLGOptions(
    optimizer="torch",
    line_search="none",
    label_init="random",
    image_mean=0.0,
    image_std=1.0,
    history_size=100,
    tol=2e-9,
    settle=0.0,
    stall_checks=((25, 1e-2), (120, 1e-5)),
)


def test_stalled_start_is_restarted(setting):
    # With seed 10 the first draw settles on a plateau (objective ~2 after 25 steps): it is
    # abandoned and the second draw converges.
    model, x, y, grads = setting
    result = dlg(model, grads, SHAPE, seed=10, options=TORCH_ROBUST, max_steps=60)
    outcomes = [a["outcome"] for a in result.diagnostics["attempts"]]
    assert result.diagnostics["restarts"] >= 1 and outcomes[0] in ("stalled", "diverged", "stuck")
    assert result.status == "ok" and psnr(result.images[0], x[0]) > 40.0
    faithful = dlg(model, grads, SHAPE, seed=10, options=FAITHFUL, max_steps=15)
    assert faithful.diagnostics["restarts"] == 0 and psnr(faithful.images[0], x[0]) < 20.0


def test_compact_lbfgs_solves_a_quadratic():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(40, 40, generator=gen, dtype=torch.float64)
    a = q @ q.T + 0.1 * torch.eye(40, dtype=torch.float64)  # condition number ~ 1e3
    b = torch.randn(40, generator=gen, dtype=torch.float64)
    v = torch.zeros(40, dtype=torch.float64, requires_grad=True)
    opt = CompactLBFGS([v], history_size=10, max_iter=20)

    def closure():
        value = 0.5 * v @ a @ v - b @ v
        (v.grad,) = torch.autograd.grad(value, [v])
        return value.detach()

    for _ in range(10):
        opt.step(closure)
    assert torch.allclose(v.detach(), torch.linalg.solve(a, b), atol=1e-4)
    assert opt.evaluations <= 220


def test_compact_lbfgs_direction_is_the_two_loop_direction():
    """After the memory has wrapped round, the compact form gives L-BFGS's two-loop direction."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(30, 30, generator=gen, dtype=torch.float64)
    a = q @ q.T + 0.05 * torch.eye(30, dtype=torch.float64)
    v = torch.randn(30, generator=gen, dtype=torch.float64).requires_grad_(True)
    opt = CompactLBFGS([v], history_size=7, max_iter=13)

    def closure():
        value = 0.5 * v @ a @ v + (v**4).sum()  # not a quadratic: pairs keep changing
        (v.grad,) = torch.autograd.grad(value, [v])
        return value.detach()

    opt.step(closure)
    mem = opt.memory
    assert len(mem.order) == 7 and mem.order[0] != 0  # full, and rotated
    g = mem.g
    pairs = [(mem.W[i], mem.W[7 + i]) for i in mem.order]  # oldest first
    q_vec, alphas = g.clone(), []
    for s, y in reversed(pairs):
        alpha = (s @ q_vec) / (s @ y)
        q_vec -= alpha * y
        alphas.append(alpha)
    s, y = pairs[-1]
    r = (s @ y) / (y @ y) * q_vec
    for (s, y), alpha in zip(pairs, reversed(alphas)):
        r += s * (alpha - (y @ r) / (s @ y))
    d, wd = mem.direction(g, mem.wg)
    assert torch.allclose(d, -r, rtol=1e-9, atol=1e-12)
    assert torch.allclose(wd, mem.W @ d, rtol=1e-9, atol=1e-9)


def _phi(f):
    """``evaluate`` for a 1-D function along d = 1: value, gradient (a tensor), slope."""

    def evaluate(t):
        t_ = torch.tensor(float(t), dtype=torch.float64, requires_grad=True)
        value = f(t_)
        (grad,) = torch.autograd.grad(value, [t_])
        return float(value.detach()), grad.reshape(1), float(grad)

    return evaluate


@pytest.mark.parametrize("t0", [1e-3, 1.0, 50.0])
def test_line_search_meets_the_strong_wolfe_conditions(t0):
    f = lambda t: (t - 3.0) ** 2 + 0.1 * t**4 - 9.0  # noqa: E731
    f0, _, slope0 = _phi(f)(0.0)
    t, ft, g = strong_wolfe_search(_phi(f), t0, f0, slope0)
    assert t > 0 and g is not None
    assert ft <= f0 + 1e-4 * t * slope0  # sufficient decrease
    assert abs(float(g)) <= 0.9 * abs(slope0)  # curvature


def test_line_search_backs_off_from_nan():
    f = lambda t: torch.where(t > 0.5, torch.full_like(t, math.nan), (t - 3.0) ** 2)  # noqa: E731
    f0, _, slope0 = _phi(f)(0.0)
    t, ft, g = strong_wolfe_search(_phi(f), 10.0, f0, slope0)
    assert 0 < t <= 0.5 and math.isfinite(ft) and ft < f0 and g is not None


def test_line_search_without_a_lower_point_returns_zero():
    # a wrong slope at 0 (the function rises): nothing lower is found within the budget
    f = lambda t: t**2  # noqa: E731
    t, ft, g = strong_wolfe_search(_phi(f), 1.0, 0.0, -1.0, max_evals=10)
    assert (t, ft, g) == (0.0, 0.0, None)


def test_nan_objective_counts_as_divergence(setting):
    model, _, _, grads = setting
    # A learning rate this large throws the first L-BFGS step into saturation / overflow.
    result = dlg(model, grads, SHAPE, seed=0, max_steps=5, lr=1e30, max_restarts=2)
    assert result.diagnostics["restarts"] == 2
    assert result.status in ("diverged", "not_converged")
    assert torch.isfinite(result.images).all()


@pytest.mark.parametrize("label", [0, 3, 7, 9])
def test_idlg_label_rule(setting, label):
    model, x, _, _ = setting
    y = torch.tensor([label])
    grads = _gradient(model, x, y)
    assert idlg_labels(model, grads).tolist() == [label]
    # without a bias: the weight-row-sum rule (the last layer's inputs are sigmoid outputs)
    no_bias = [g for g, (name, _) in zip(grads, model.named_parameters()) if name != f"{len(model) - 1}.bias"]
    head = torch.nn.Linear(model[-1].in_features, 10, bias=False)
    bias_free = torch.nn.Sequential(*list(model)[:-1], head)
    assert idlg_labels(bias_free, no_bias).tolist() == [label]
    # a one-step weight delta carries the same label
    assert idlg_labels(model, Update(tuple(-0.1 * g for g in grads), "weight_delta", lr=0.1)).tolist() == [label]


def test_idlg_attack_uses_recovered_label(setting):
    model, x, y, grads = setting
    result = idlg(model, grads, SHAPE, seed=1, max_steps=60)
    assert result.attack == "idlg" and result.diagnostics["label_source"] == "idlg"
    assert int(result.labels[0]) == int(y[0]) and psnr(result.images[0], x[0]) > 40.0


def test_idlg_batch_heuristic_distinct_labels():
    model = build_model("lenet", SHAPE, 10, init="paper", seed=0)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((4, *SHAPE), generator=gen)
    y = torch.tensor([1, 4, 6, 8])
    labels = idlg_labels(model, _gradient(model, x, y), batch_size=4)
    # class 4 can be masked when the model is confidently wrong on the other images (mean
    # p_4 > 1/B, see attacks.idlg): require most of the classes, not all
    assert len(labels) == 4 and len(set(labels.tolist()) & {1, 4, 6, 8}) >= 3


@pytest.mark.parametrize("bias", [True, False])
def test_single_logit_label_is_the_sign_of_the_head_gradient(bias):
    # dL/dz = sigmoid(z) - y is negative exactly when y = 1: the bias gradient's sign, or
    # without a bias the weight gradient's sum when the head's inputs are non-negative
    # (sigmoid outputs here), gives the label, for confident and unconfident models alike.
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.Sigmoid(), torch.nn.Flatten(), torch.nn.Linear(4 * 14 * 14, 1, bias=bias)
    )
    gen = torch.Generator().manual_seed(0)
    for i in range(4):
        x = torch.rand((1, *SHAPE), generator=gen)
        for y in (0, 1):
            grads = _gradient(model, x, torch.tensor([y]))
            assert idlg_labels(model, grads).tolist() == [y], (i, y)
            assert idlg_labels(model, grads, batch_size=3).tolist() == [y] * 3


def test_dlg_on_a_batch_of_two_finds_both_labels(setting):
    # A batch of two 16x16 noise images on DLG's LeNet: the batch rules apply (pixels kept in
    # [0, 1], a small TV prior) and the two soft labels' argmaxes are the batch's two classes
    # (in either order). Natural images: tests/test_batches.py.
    model, _, _, _ = setting
    x = torch.rand((2, *SHAPE), generator=torch.Generator().manual_seed(1))
    grads = _gradient(model, x, torch.tensor([2, 5]))
    result = dlg(model, grads, SHAPE, ThreatModel(batch_size=2), seed=0, max_steps=40)
    assert result.images.shape == (2, *SHAPE) and result.diagnostics["batch_size_source"] == "granted"
    assert result.diagnostics["box"] == "project" and result.diagnostics["relative_objective"] < 1e-4
    assert sorted(result.labels.tolist()) == [2, 5]


def test_batch_size_estimated_when_not_granted(setting):
    model, x1, y1, grads1 = setting
    assert estimate_batch_size(model, grads1) == 1
    x = torch.rand((2, *SHAPE), generator=torch.Generator().manual_seed(1))
    grads = _gradient(model, x, torch.tensor([2, 5]))
    assert estimate_batch_size(model, grads) == 2
    # a shared label is counted once: the estimate is a lower bound
    assert estimate_batch_size(model, _gradient(model, x, torch.tensor([5, 5]))) == 1
    result = dlg(model, grads, SHAPE, ThreatModel(), seed=0, max_steps=1, max_restarts=0)
    assert result.images.shape == (2, *SHAPE)
    assert result.diagnostics["batch_size_source"] == "estimated" and result.diagnostics["batch_size"] == 2
    granted = dlg(model, grads, SHAPE, ThreatModel(batch_size=3), seed=0, max_steps=1, max_restarts=0)
    assert granted.images.shape == (3, *SHAPE) and granted.diagnostics["batch_size_source"] == "granted"


def test_options_are_validated_once_with_one_line_errors(setting):
    model, _, _, grads = setting
    for bad, message in [
        (dict(image_std=0.0), "image_std > 0"),
        (dict(no_such=1), "dlg has no option no_such (options: max_steps,"),
        (dict(max_steps=2.5), "option max_steps must be an integer"),
        (dict(optimizer="adam"), "option optimizer must be one of 'compact', 'torch'"),
        (dict(optimizer="compact", line_search="none"), "use optimizer='torch'"),
        (dict(stall_checks=((25,),)), "option stall_checks"),
    ]:
        with pytest.raises(ValueError) as info:
            dlg(model, grads, SHAPE, **bad)
        assert message in str(info.value) and "\n" not in str(info.value), bad
    with pytest.raises(ValueError, match="idlg has no option"):
        idlg(model, grads, SHAPE, no_such=1)
    with pytest.raises(ValueError, match="must be a DLGOptions"):
        dlg(model, grads, SHAPE, options={"max_steps": 3})
    # lenient only where nothing is lost: ints for floats, lists for tuples, dtype names
    opts = DEFAULT.override({"tol": 0, "stall_checks": [[3, 1]], "dtype": "float32"})
    assert opts.tol == 0.0 and isinstance(opts.tol, float) and opts.stall_checks == ((3, 1.0),)
    assert opts.dtype == torch.float32 and DEFAULT.dtype == torch.float64  # frozen: the default is untouched


def test_faithful_is_the_original_algorithm():
    assert (FAITHFUL.optimizer, FAITHFUL.line_search, FAITHFUL.history_size) == ("torch", "none", 100)
    assert (FAITHFUL.image_mean, FAITHFUL.image_std, FAITHFUL.label_init) == (0.0, 1.0, "random")
    assert (FAITHFUL.dtype, FAITHFUL.max_steps, FAITHFUL.max_restarts) == (torch.float32, 300, 0)
    assert FAITHFUL.tol == 0.0 and FAITHFUL.explode == math.inf and FAITHFUL.stall_checks is None
    assert (FAITHFUL.lr, FAITHFUL.max_iter) == (1.0, 20)  # PyTorch's L-BFGS defaults


def test_overrides_on_a_preset_equal_the_preset_with_those_fields(setting):
    model, _, _, grads = setting
    a = dlg(model, grads, SHAPE, seed=3, options=FAITHFUL, max_steps=3)
    b = dlg(model, grads, SHAPE, seed=3, options=dataclasses.replace(FAITHFUL, max_steps=3))
    assert a.history == b.history and len(a.history) == 3 and a.diagnostics["optimizer"] == "torch"


def test_settling_rule_runs_on_where_the_mismatch_rule_alone_stops(setting):
    # The same start with the mismatch threshold alone (settle=0) stops while the image still
    # moves more than `settle` per step; the default rule takes the same steps up to there and
    # runs on until the image has settled.
    model, x, _, grads = setting
    both = dlg(model, grads, SHAPE, seed=1, max_steps=60)
    alone = dlg(model, grads, SHAPE, seed=1, max_steps=60, settle=0.0)
    assert both.status == alone.status == "ok"
    assert alone.diagnostics["attempts"][-1]["image_step"] >= SETTLE  # the mismatch rule stopped a moving image
    assert both.diagnostics["attempts"][-1]["image_step"] < SETTLE
    assert alone.steps < both.steps and alone.diagnostics["evaluations"] < both.diagnostics["evaluations"]
    assert both.history[: len(alone.history)] == alone.history  # the same start, run on
    assert psnr(both.images[0], x[0]) >= psnr(alone.images[0], x[0]) - 0.5


def test_torch_lbfgs_with_line_search_recovers_the_image(setting):
    model, x, y, grads = setting
    result = dlg(model, grads, SHAPE, seed=1, max_steps=60, optimizer="torch")
    assert result.status == "ok" and result.diagnostics["line_search"] == "strong_wolfe"
    assert psnr(result.images[0], x[0]) > 40.0 and int(result.labels[0]) == int(y[0])


def test_bad_updates_raise(setting):
    model, _, _, grads = setting
    with pytest.raises(ValueError, match="tensors"):
        dlg(model, grads[:-1], SHAPE)
    wrong = list(grads)
    wrong[0] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="shape"):
        dlg(model, wrong, SHAPE)
    nan = list(grads)
    nan[2] = grads[2].clone()
    nan[2].view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        idlg(model, nan, SHAPE)
    with pytest.raises(ValueError):
        dlg(model, grads, (16, 16))
    with pytest.raises(ValueError):
        idlg_labels(model, grads[1:])


def test_idlg_labels_on_cifar100(shared_data):
    z = np.load(shared_data / "cifar100_test20.npz")
    images = torch.tensor(z["images"][:20]).permute(0, 3, 1, 2).float() / 255
    labels = torch.tensor(z["labels"][:20])
    model = build_model("lenet", (3, 32, 32), 100, init="paper", seed=0)
    for i in range(20):
        grads = _gradient(model, images[i : i + 1], labels[i : i + 1])
        assert int(idlg_labels(model, grads)[0]) == int(labels[i])

"""Batches: box-constrained DLG (projected L-BFGS, scipy's L-BFGS-B), the batch-size rules,
batch label recovery."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from attacks.base import ThreatModel, training_loss
from attacks.dlg import BATCH_TV, DEFAULT, PRIOR_SETTLE, SETTLE, DLGOptions, dlg, for_batch
from attacks.idlg import idlg, idlg_labels
from attacks.lbfgs import CompactLBFGS
from attacks.metrics import score_batch
from fl_sim.models import build_model

SHAPE = (1, 16, 16)


def _crops() -> torch.Tensor:
    """Two 16x16 grey crops of scikit-image's camera (offline), in [0, 1]."""
    from skimage import data, transform

    img = data.camera().astype(np.float64) / 255.0
    crops = [
        transform.resize(img[r : r + 192, c : c + 192], SHAPE[1:], anti_aliasing=True)
        for r, c in ((80, 150), (260, 40))
    ]
    return torch.tensor(np.stack(crops), dtype=torch.float32)[:, None]


def _gradient(model, x, y):
    return [g.detach() for g in torch.autograd.grad(training_loss(model(x), y), list(model.parameters()))]


@pytest.fixture(scope="module")
def pair():
    model = build_model("lenet", SHAPE, 10, init="paper", seed=0)
    x, y = _crops(), torch.tensor([7, 2])
    return model, x, y, _gradient(model, x, y)


def test_batch_rules_follow_the_batch_size():
    one, four = for_batch(DEFAULT, 1), for_batch(DEFAULT, 4)
    assert (one.box, one.tv, one.settle) == ("none", 0.0, SETTLE)  # one image: unchanged
    assert (four.box, four.tv, four.settle) == ("project", BATCH_TV, PRIOR_SETTLE)
    chosen = for_batch(DLGOptions(box="lbfgsb", tv=0.0, settle=2e-4), 4)
    assert (chosen.box, chosen.tv, chosen.settle) == ("lbfgsb", 0.0, 2e-4)  # what the caller set stays
    assert for_batch(DLGOptions(optimizer="torch"), 2).box == "lbfgsb"  # projection is the compact optimiser's
    with pytest.raises(ValueError, match="option tv"):
        DLGOptions(tv=-1.0)


def test_dlg_recovers_a_pair_without_labels(pair):
    model, x, y, grads = pair
    result = dlg(model, grads, SHAPE, ThreatModel(batch_size=2), seed=0, max_steps=120)
    assert result.diagnostics["box"] == "project" and result.diagnostics["tv"] == BATCH_TV
    assert result.images.shape == (2, *SHAPE)
    scores = score_batch(result.images, x, result.labels, y)
    assert min(s["psnr"] for s in scores) > 30.0, [s["psnr"] for s in scores]
    assert all(s["label_correct"] == 1.0 for s in scores)  # soft labels, matched image by image


def test_idlg_pair_labels_from_the_last_layer(pair):
    model, x, y, grads = pair
    assert sorted(idlg_labels(model, grads, batch_size=2).tolist()) == sorted(y.tolist())
    result = idlg(model, grads, SHAPE, ThreatModel(batch_size=2), seed=0, max_steps=120)
    assert result.diagnostics["label_source"] == "idlg"
    assert min(s["psnr"] for s in score_batch(result.images, x, result.labels, y)) > 30.0


def _dummy_ranges(model, grads, **options):
    """DLG on a copy of ``model`` whose first layer records (min, max) of every dummy batch the
    attack evaluates (the inputs that require grad), in order."""
    seen: list[tuple[float, float]] = []

    def record(_module, args):
        if args[0].requires_grad:
            seen.append((float(args[0].detach().min()), float(args[0].detach().max())))

    probe = copy.deepcopy(model)
    probe[0].register_forward_pre_hook(record)
    result = dlg(probe, grads, SHAPE, ThreatModel(batch_size=2), seed=0, max_steps=3, max_restarts=0, **options)
    return result, seen


def test_unconstrained_pair_leaves_the_box(pair):
    # without the box the match puts pixels outside [0, 1] (the result is clamped for display);
    # with the batch default (projection) no evaluated dummy ever leaves it
    model, _, _, grads = pair
    free, free_seen = _dummy_ranges(model, grads, box="none", tv=0.0)
    boxed, boxed_seen = _dummy_ranges(model, grads)
    assert free.diagnostics["box"] == "none" and boxed.diagnostics["box"] == "project"
    assert free_seen and boxed_seen
    lo, hi = free_seen[-1]  # where the unconstrained match ended
    assert lo < 0.0 or hi > 1.0, free_seen[-1]
    assert all(0.0 <= lo and hi <= 1.0 for lo, hi in boxed_seen), boxed_seen
    for result in (free, boxed):
        assert 0.0 <= float(result.images.min()) and float(result.images.max()) <= 1.0


def test_lbfgsb_option_runs_with_the_attacks_rule(pair):
    model, x, y, grads = pair
    result = dlg(
        model,
        grads,
        SHAPE,
        ThreatModel(batch_size=2),
        seed=0,
        box="lbfgsb",
        max_steps=4,
        max_restarts=0,
        history_size=20,
    )
    assert result.diagnostics["box"] == "lbfgsb" and result.steps == 4 and len(result.history) == 4
    assert result.history[-1] < result.history[0]
    assert 0.0 <= float(result.images.min()) and float(result.images.max()) <= 1.0


def test_projected_lbfgs_solves_a_box_constrained_quadratic():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(30, 30, generator=gen, dtype=torch.float64)
    a = q @ q.T + 0.5 * torch.eye(30, dtype=torch.float64)
    c = 2.0 * torch.randn(30, generator=gen, dtype=torch.float64)  # many entries outside [0, 1]
    v = torch.full((30,), 0.5, dtype=torch.float64, requires_grad=True)
    free = torch.zeros(3, dtype=torch.float64, requires_grad=True)  # an unbounded second parameter
    opt = CompactLBFGS([v, free], history_size=10, max_iter=20, bounds=[(0.0, 1.0), None])

    def f(z):
        return 0.5 * (z - c) @ a @ (z - c)

    def closure():
        value = f(v) + ((free - 3.0) ** 2).sum()
        v.grad, free.grad = torch.autograd.grad(value, [v, free])
        return value.detach()

    for _ in range(15):
        opt.step(closure)
        assert float(v.detach().min()) >= 0.0 and float(v.detach().max()) <= 1.0  # every iterate feasible
    # the KKT conditions of min f on the box: zero gradient inside, pointing outwards at a bound
    g = a @ (v.detach() - c)
    z = v.detach()
    inside = (z > 1e-9) & (z < 1 - 1e-9)
    assert float(torch.cat([g[inside].abs(), g.new_zeros(1)]).max()) < 1e-5
    assert bool((g[z <= 1e-9] >= -1e-5).all() and (g[z >= 1 - 1e-9] <= 1e-5).all())
    assert torch.allclose(free.detach(), torch.full((3,), 3.0, dtype=torch.float64), atol=1e-6)
    with pytest.raises(ValueError, match="outside its bounds"):
        CompactLBFGS([torch.full((2,), 2.0, requires_grad=True)], bounds=[(0.0, 1.0)])


def test_batch_labels_on_cifar100(shared_data):
    # the first 8 CIFAR-100 test images, batches of 4 and 8: the negative bias-gradient entries
    from fl_sim.data import read_npz

    z = read_npz(str(shared_data / "cifar100_test20.npz"))
    model = build_model("lenet", (3, 32, 32), 100, init="paper", seed=0)
    x, y = z.images[:8].float() / 255, z.labels[:8]
    for b in (4, 8):
        got = idlg_labels(model, _gradient(model, x[:b], y[:b]), batch_size=b)
        assert sorted(got.tolist()) == sorted(y[:b].tolist())


def test_batch_labels_row_minimum_rule_on_cifar10(shared_data):
    # CIFAR-10, model seed 1, the first 20 images in pairs: the bias gradient alone masks a
    # present class in two pairs (18/20); the weight rows' minima find every label.
    from collections import Counter

    from fl_sim.data import read_npz

    z = read_npz(str(shared_data / "cifar10_test150.npz"))
    model = build_model("lenet", (3, 32, 32), 10, init="paper", seed=1)
    x, y = z.images[:20].float() / 255, z.labels[:20]
    right = 0
    for s in range(0, 20, 2):
        got = idlg_labels(model, _gradient(model, x[s : s + 2], y[s : s + 2]), batch_size=2).tolist()
        right += sum((Counter(got) & Counter(y[s : s + 2].tolist())).values())
    assert right == 20

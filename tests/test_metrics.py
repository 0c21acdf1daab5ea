"""The scores as the field reports them (attacks.metrics, docs/metrics.md): Wang et al.'s SSIM
against a formula written here, registered PSNR, image identifiability (IIP) and LPIPS only
from weights on disk; on real digits (mnist5k) and real CIFAR-10 images."""

from __future__ import annotations

import math
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.metrics import structural_similarity

from attacks.metrics import (
    identified,
    lpips_distance,
    lpips_unavailable,
    psnr,
    registered_psnr,
    score_batch,
    ssim,
)
from fl_sim.data import load_dataset, read_npz, to_float


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    return to_float(load_dataset("mnist5k").train_x[:600])  # (600, 1, 28, 28) in [0, 1]


def _gaussian_ssim(x: torch.Tensor, y: torch.Tensor) -> float:
    """Wang et al.'s SSIM written out as pytorch_msssim does: an 11-tap Gaussian of sigma 1.5
    (normalised), applied separably without padding ("valid"), population moments, K1 = 0.01,
    K2 = 0.03, data range 1; the mean of the map over pixels and channels."""
    taps = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-(taps**2) / (2 * 1.5**2))
    g = g / g.sum()
    c = x.shape[0]

    def blur(z: torch.Tensor) -> torch.Tensor:
        z = F.conv2d(z[None], g.view(1, 1, 1, 11).expand(c, 1, 1, 11), groups=c)
        return F.conv2d(z, g.view(1, 1, 11, 1).expand(c, 1, 11, 1), groups=c)[0]

    x, y = x.double(), y.double()
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    ssim_map = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(ssim_map.mean())


def _pairs(images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pairs a reconstruction score meets: a noisy copy, a blurred copy, a dimmed copy and
    another real image."""
    gen = torch.Generator().manual_seed(0)
    a, b = images[0], images[1]
    noisy = (a + 0.1 * torch.randn(a.shape, generator=gen)).clamp(0, 1)
    blurred = F.avg_pool2d(a[None], 3, stride=1, padding=1, count_include_pad=False)[0]
    return [(a, noisy), (a, blurred), (a, 0.7 * a + 0.15), (a, b)]


def test_ssim_is_wangs_gaussian_window_ssim_on_real_digits_and_cifar_images(digits, shared_data):
    """On real 28x28 digits and real 32x32 RGB CIFAR-10 images, ``ssim`` equals the formula
    with an 11x11 Gaussian window (sigma 1.5) to 1e-4; scikit-image's default 7x7 uniform
    window (what ``ssim`` was before) gives other values."""
    cifar = to_float(read_npz(shared_data / "cifar10_test150.npz").images[:2])
    old_gap = 0.0
    for images in (digits[:2], cifar):
        for truth, recon in _pairs(images):
            assert ssim(recon, truth) == pytest.approx(_gaussian_ssim(truth, recon), abs=1e-4)
            old = structural_similarity(truth.numpy(), recon.numpy(), data_range=1.0, channel_axis=0)
            old_gap = max(old_gap, abs(ssim(recon, truth) - old))
    assert old_gap > 0.01
    assert ssim(digits[0], digits[0]) == pytest.approx(1.0)


def test_ssim_of_an_image_smaller_than_the_window_is_scored_not_refused():
    """An 8x8 image (an npz archive may hold such): the same Gaussian, a smaller square."""
    gen = torch.Generator().manual_seed(2)
    truth = torch.rand(1, 8, 8, generator=gen)
    assert ssim(truth, truth) == pytest.approx(1.0)
    assert ssim(torch.full_like(truth, 0.5), truth) < 0.5


def test_registered_psnr_forgives_a_shift_of_up_to_two_pixels_and_no_more(digits, shared_data):
    """A digit moved by (1, -2) pixels (its border is black: the move loses nothing) scores low
    PSNR but registers exactly; moved by 3 pixels it does not. A CIFAR-10 crop taken one
    pixel off registers exactly over the overlap. Unshifted, registered PSNR is never below
    PSNR."""
    a = digits[3]
    assert a[:, :3].sum() == 0 and a[:, -3:].sum() == 0 and a[..., :3].sum() == 0 and a[..., -3:].sum() == 0
    moved = torch.roll(a, shifts=(1, -2), dims=(1, 2))
    assert psnr(moved, a) < 20 and registered_psnr(moved, a) == math.inf
    far = torch.roll(a, shifts=(0, 3), dims=(1, 2))
    assert registered_psnr(far, a) < 25
    assert registered_psnr(far, a, max_shift=3) == math.inf
    image = to_float(read_npz(shared_data / "cifar10_test150.npz").images[0])
    truth, recon = image[:, 2:30, 2:30], image[:, 1:29, 3:31]
    assert psnr(recon, truth) < 25 and registered_psnr(recon, truth) == math.inf
    for truth, recon in _pairs(digits[:2]):
        assert registered_psnr(recon, truth) >= psnr(recon, truth)


def test_iip_finds_the_nearest_neighbour_among_the_clients_images(digits):
    """500 real digits are the client's images. A noisy copy of image 7 is identified (its
    nearest neighbour is image 7); a noisy copy of image 8 matched to image 7 is not; the
    answer is the brute-force nearest neighbour by pixel MSE, read in chunks or not; an
    exact duplicate of the true image elsewhere in the pool still counts."""
    pool = (digits[:500] * 255).round().to(torch.uint8)
    gen = torch.Generator().manual_seed(1)
    truth = digits[[7, 7, 300]]
    recon = torch.stack([digits[7], digits[8], digits[300]]) + 0.2 * torch.randn(3, 1, 28, 28, generator=gen)
    assert identified(recon, truth, pool) == [True, False, True]
    assert identified(recon, truth, pool, chunk=64) == [True, False, True]
    assert identified(recon, truth, digits[:500]) == [True, False, True]  # float pool in [0, 1]
    brute = [int(((r.clamp(0, 1) - digits[:500]) ** 2).flatten(1).mean(1).argmin()) for r in recon]
    assert brute == [7, 8, 300]
    with_copy = torch.cat([pool[:10], pool[7:8], pool[10:]])  # image 7 twice
    assert identified(recon[:1], truth[:1], with_copy) == [True]
    # a reconstruction between two digits is identified as the one it is nearer to
    blend = 0.6 * digits[20] + 0.4 * digits[21]
    assert identified(torch.stack([blend, blend]), digits[[20, 21]], pool) == [True, False]


def test_lpips_without_weights_on_disk_is_one_line_and_no_download(tmp_path, monkeypatch, digits):
    """With torch hub's cache empty, LPIPS is not scored: one line says why, the score's
    ``lpips`` is nan, and nothing opens a network connection."""

    def no_network(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(socket.socket, "connect", no_network)
    why = lpips_unavailable()
    assert why is not None and why.startswith("LPIPS not scored: ") and "\n" not in why
    assert lpips_distance(digits[:2], digits[2:4]) is None
    rows = score_batch(digits[:2], digits[:2])
    assert all(math.isnan(r["lpips"]) for r in rows) and all(r["psnr"] == math.inf for r in rows)


def test_lpips_where_its_weights_are_on_disk_ranks_a_copy_before_a_noisy_copy_before_another_image(digits):
    """Runs only where the lpips package and AlexNet's weights are on disk (never fetched)."""
    why = lpips_unavailable()
    if why is not None:
        pytest.skip(why)
    gen = torch.Generator().manual_seed(3)
    a, b = digits[:1], digits[1:2]
    noisy = (a + 0.1 * torch.randn(a.shape, generator=gen)).clamp(0, 1)
    same, near, other = lpips_distance(torch.cat([a, noisy, b]), torch.cat([a, a, a]))
    assert same == pytest.approx(0.0, abs=1e-6) and same < near < other
    assert np.isfinite(score_batch(noisy, a)[0]["lpips"])

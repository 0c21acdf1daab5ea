"""R-GAP: the Recursive Gradient Attack on Privacy (Zhu & Blaschko, ICLR 2021).

Threat model
------------
The observer (in FedSGD, the parameter server) sees the weights the client started from and
the loss gradient of ONE sample. As in the paper, the label is known to the attacker
(``threat.labels``); when it is not granted, it is recovered from the gradient and returned.
Batch size 1: for a batch of B > 1 images the gradient is a sum of B rank-one terms and R-GAP
returns a blend of the images (here: the one reconstruction repeated B times, with
``status="blend"``).

The paper's setting
-------------------
CNN6 (six bias-free convolutions with LeakyReLU(0.2) and a linear head to one logit), trained
with the logistic loss, untrained (PyTorch's default initialisation after seeding 0), CIFAR-10
images. No optimisation: walk the network from the last layer back to the first. At the head
the gradient and the weights give the derivative of the loss, hence the head's input. At each
layer below, the unknown input ``x`` satisfies

- the forward constraint ``W x = z`` (the layer's output, known from the layer above and
  inverted through the activation), and
- the gradient constraints ``dL/dW = delta (*) x`` (the weight gradient is the correlation of
  the back-propagated error ``delta`` with the input),

and zero padding is exact knowledge. The stacked system is solved by least squares; its input
then becomes the next layer's known output.

This implementation
-------------------
- Builds the convolution-as-matrix systems as ``scipy.sparse`` matrices with vectorised index
  patterns (the forward matrix and the gradient matrix share one index pattern). Padded
  entries are eliminated from the unknowns instead of being constrained to zero (the same
  solution, fewer unknowns).
- Solves each layer in float64 by the normal equations, assembled from their structure: the
  gradient part is block diagonal over input channels with ONE block shared by all channels
  (built from a single channel's gradient matrix), the forward part ``F^T F`` depends on the
  weights only (cached per set of weights, so further updates on the same weights reuse it).
  The two groups of equations are weighted by their typical row norms, the normal matrix is
  scaled to a unit diagonal (column equilibration), factorised by a dense Cholesky (a few
  thousand unknowns per layer) and the solution refined with residuals of the original
  equations until the correction is below 1e-13 (corrected semi-normal equations; one step
  is usually enough). This is exact up to rounding for a consistent full-rank system: on CNN6
  the per-layer relative residuals are ~1e-7, i.e. the float32 rounding of the observed
  gradient, and nothing grows through the recursion. A numerically singular layer
  (rank-deficient, e.g. CNN6-d) gets a Tikhonov-shifted Cholesky (close to the minimum-norm
  solution). Layers behind an average pool or a ReLU (rows missing) use a generic sparse
  path (row-normalised sparse system, same solver).
- ``rank_analysis(model, input_shape)`` counts unknowns and constraints per layer and computes
  the ranks from the weights alone (the gradient constraints are instantiated with the
  back-propagated error of a seeded random probe input, which gives the generic rank);
  ``ra_index`` condenses it into one number (see its docstring for the definition used).
- State: an :class:`RGAP` solver holds its :class:`RGAPOptions` and caches of what depends on
  the weights only (each convolution's index pattern, forward matrix ``F`` and ``F^T F``,
  keyed by the layer's geometry and a digest of its weights; the rank table, keyed by the
  architecture, every parameter and the input shape). :func:`rgap`, the registered attack,
  makes a fresh solver per call, so nothing outlives a call; a caller attacking several updates
  on the same weights (the clients of one FedSGD round) can hold one solver and call it.
  Measured with ``experiments.bench.attacks --attack rgap --option rank=False --versus
  fresh-solver`` (20 images, each attacked by a held and by a fresh solver in one process):
  CNN6 on CIFAR-10, 1.8 s per image held against 3.0 s fresh (median per-image ratio 1.6;
  2.8 with the rank analysis in the diagnostics); DLG's LeNet on MNIST, 0.17 s against
  0.22 s (1.3; 2.4 with the rank analysis).
- ``status`` is ``"ok"`` when every layer's system is solved consistently (relative residual
  below ``consistent_residual``, 1e-3), ``"inconsistent"`` otherwise (a rank-deficient layer such as CNN6-d's second
  one, or an average pool behind a LeakyReLU: the reconstruction is then unreliable), and
  ``"blend"`` for a batch.

Supported layers (a flat ``nn.Sequential``): ``nn.Conv2d`` (any kernel, stride and zero
padding; dilation 1, groups 1; with or without bias), ``nn.Linear`` (with or without bias; the
last layer must be a linear head), the invertible activations ``nn.LeakyReLU``,
``nn.Sigmoid``, ``nn.Tanh`` and ``nn.Identity``, ``nn.ReLU`` (its output fixes the
pre-activation where it is positive; zero outputs drop their forward constraint and their
error), ``nn.Flatten`` and ``nn.AvgPool2d`` between two parametric layers (a known linear
map; the layer below is solved with the pool's input as an intermediate: its forward
constraint ``pool(act(W x + b)) = known`` is linearised and re-solved until consistent).
Exact when the pool follows the convolution directly or follows a smooth activation
(sigmoid, tanh); behind a LeakyReLU/ReLU the activation pattern under the pool is not
identified by the linearisation and the iteration stalls: CNN6 with a pool after its third
convolution is NOT reconstructed (status ``"inconsistent"``). Heads: one
logit with the logistic loss (``training_loss``: BCE with logits) or softmax cross-entropy
over several classes, with or without bias. Anything else (``nn.MaxPool2d``, batch norm,
dropout, pooling on the raw image, ...) raises ``ValueError`` naming the layer.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp
import torch
from scipy.optimize import brentq, least_squares
from torch import Tensor, nn

from .base import (
    Attack,
    AttackOptions,
    AttackResult,
    ThreatModel,
    Update,
    as_update,
    check_gradients,
    check_input_shape,
)

__all__ = ["rgap", "RGAP", "RGAPOptions", "rank_analysis", "ra_index"]

_ACTS = (nn.LeakyReLU, nn.ReLU, nn.Sigmoid, nn.Tanh, nn.Identity)
_PARAM = (nn.Conv2d, nn.Linear)


@dataclass(frozen=True)
class RGAPOptions(AttackOptions):
    """The settings of :class:`RGAP` (and :func:`rgap`'s keyword options).

    ``rank``: add the weights-only rank analysis (:func:`rank_analysis`, cached per set of
    weights on the solver) to the diagnostics. ``tikhonov``: the shift, times the number of
    unknowns, of a numerically singular unit-diagonal normal matrix (rank-deficient layers;
    approaches the minimum-norm solution). ``refine_steps``: iterative-refinement steps of a
    convolution's structured solve (it stops once the correction is below 1e-13).
    ``pool_iterations``, ``pool_damping``: the linearised solves for a layer under an
    average pool, and the step on the pre-activation between them. ``consistent_residual``:
    the relative residual below which every layer counts as solved (``status="ok"``).
    """

    rank: bool = True
    tikhonov: float = 1e-10
    refine_steps: int = 5
    pool_iterations: int = 30
    pool_damping: float = 1.0
    consistent_residual: float = 1e-3

    def _check(self) -> None:
        if not self.tikhonov > 0:
            raise ValueError(f"option tikhonov must be > 0, got {self.tikhonov}")
        if self.refine_steps < 0 or self.pool_iterations < 1:
            raise ValueError(
                f"options refine_steps >= 0 and pool_iterations >= 1, got {self.refine_steps}, {self.pool_iterations}"
            )
        if not 0 < self.pool_damping <= 1:
            raise ValueError(f"option pool_damping must be in (0, 1], got {self.pool_damping}")
        if not self.consistent_residual > 0:
            raise ValueError(f"option consistent_residual must be > 0, got {self.consistent_residual}")


# --------------------------------------------------------------------------- model parsing


@dataclass
class _Layer:
    index: int  # position in the Sequential
    module: nn.Module
    in_shape: tuple[int, ...]  # without the batch dimension
    out_shape: tuple[int, ...]


@dataclass
class _Plan:
    layers: list[_Layer]
    params: list[int] = field(default_factory=list)  # positions of the parametric layers


def _refuse(i: int, m: nn.Module, why: str = "") -> ValueError:
    return ValueError(f"R-GAP cannot invert layer {i} ({type(m).__name__})" + (f": {why}" if why else ""))


def _plan(model: nn.Module, input_shape: Sequence[int]) -> _Plan:
    if not isinstance(model, nn.Sequential):
        raise ValueError("R-GAP walks a flat nn.Sequential; got " + type(model).__name__)
    mods = list(model)
    layers: list[_Layer] = []
    shape = tuple(int(s) for s in input_shape)
    x = torch.zeros((1, *shape), dtype=torch.float64)
    for i, m in enumerate(mods):
        if isinstance(m, nn.Conv2d):
            if tuple(m.dilation) != (1, 1) or m.groups != 1:
                raise _refuse(i, m, "only dilation 1 and groups 1 are supported")
            if m.padding_mode != "zeros":
                raise _refuse(i, m, f"padding mode {m.padding_mode!r} is not supported")
            if isinstance(m.padding, str) and m.padding != "valid":
                raise _refuse(i, m, f"padding={m.padding!r}: give the padding as numbers")
        elif isinstance(m, nn.AvgPool2d):
            padded = not m.count_include_pad and _pair(m.padding) != (0, 0)
            if m.ceil_mode or m.divisor_override is not None or padded:
                raise _refuse(i, m, "only floor mode, no divisor override, padding counted")
        elif not isinstance(m, (nn.Linear, nn.Flatten) + _ACTS):
            raise _refuse(i, m)
        with torch.no_grad():
            y = _forward_shape(m, x)
        layers.append(_Layer(i, m, tuple(x.shape[1:]), tuple(y.shape[1:])))
        x = y
    plan = _Plan(layers, [l.index for l in layers if isinstance(l.module, _PARAM)])
    trailing = [l for l in layers if l.index > (plan.params[-1] if plan.params else -1)]
    if not plan.params or not isinstance(layers[plan.params[-1]].module, nn.Linear):
        raise ValueError("R-GAP needs a model whose last parametric layer is an nn.Linear head")
    for l in trailing:
        if not isinstance(l.module, nn.Identity):
            raise _refuse(l.index, l.module, "nothing but nn.Identity may follow the linear head")
    for l in layers[: plan.params[0]]:
        if isinstance(l.module, nn.AvgPool2d):
            raise _refuse(l.index, l.module, "pooling on the raw input loses the image's detail")
    return plan


def _forward_shape(m: nn.Module, x: Tensor) -> Tensor:
    if isinstance(m, _PARAM):
        w = torch.zeros_like(m.weight, dtype=torch.float64, device="cpu")
        if isinstance(m, nn.Linear):
            if x.dim() == 2 and x.shape[1] == m.in_features:
                return torch.zeros((x.shape[0], m.out_features), dtype=torch.float64)
            return _bad_shape(m, x)
        return torch.nn.functional.conv2d(x, w, None, m.stride, m.padding)
    return m(x)


def _bad_shape(m: nn.Module, x: Tensor) -> Tensor:
    raise ValueError(f"{type(m).__name__} expects {m.in_features} inputs, gets shape {tuple(x.shape[1:])}")


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return int(v[0]), int(v[1])
    return int(v), int(v)


# --------------------------------------------------------------------------- sparse structure


def _conv_pattern(in_shape: tuple[int, int, int], conv: nn.Conv2d, out_shape: tuple[int, ...]):
    """Index pattern shared by a convolution's forward and gradient matrices.

    Returns ``col`` of shape (C, kh, kw, Ho, Wo): the unpadded input index each (channel,
    kernel offset, output position) reads, or -1 where it reads padding."""
    c, h, w = in_shape
    kh, kw = _pair(conv.kernel_size)
    sh, sw = _pair(conv.stride)
    if isinstance(conv.padding, str):  # "valid"
        ph = pw = 0
    else:
        ph, pw = _pair(conv.padding)
    ho, wo = out_shape[1], out_shape[2]
    rows = (np.arange(ho) * sh)[None, :] + np.arange(kh)[:, None] - ph  # (kh, Ho)
    cols = (np.arange(wo) * sw)[None, :] + np.arange(kw)[:, None] - pw  # (kw, Wo)
    r = rows[None, :, None, :, None]
    q = cols[None, None, :, None, :]
    ch = np.arange(c)[:, None, None, None, None]
    valid = (r >= 0) & (r < h) & (q >= 0) & (q < w)
    idx = ch * (h * w) + np.clip(r, 0, h - 1) * w + np.clip(q, 0, w - 1)
    col = np.where(valid, idx, -1)
    return np.broadcast_to(col, (c, kh, kw, ho, wo)).astype(np.int64)


def _conv_forward_matrix(col: np.ndarray, weight: np.ndarray, n_in: int) -> sp.csr_matrix:
    """Rows (o, ho, wo), columns the unpadded input; values the kernel weights."""
    o = weight.shape[0]
    c, kh, kw, ho, wo = col.shape
    vals = np.broadcast_to(weight[:, :, :, :, None, None], (o, c, kh, kw, ho, wo))
    out_index = np.arange(o)[:, None, None] * (ho * wo) + np.arange(ho * wo).reshape(ho, wo)[None]
    rows = np.broadcast_to(out_index.reshape(o, 1, 1, 1, ho, wo), vals.shape)
    cols = np.broadcast_to(col[None], vals.shape)
    keep = cols >= 0
    return sp.csr_matrix((vals[keep], (rows[keep], cols[keep])), shape=(o * ho * wo, n_in))


def _conv_gradient_matrix(col: np.ndarray, delta: np.ndarray, n_in: int) -> sp.csr_matrix:
    """Rows (o, c, i, j) of dL/dW, columns the unpadded input; values the error delta[o, ho, wo]."""
    o = delta.shape[0]
    c, kh, kw, ho, wo = col.shape
    vals = np.broadcast_to(delta.reshape(o, 1, 1, 1, ho, wo), (o, c, kh, kw, ho, wo))
    rows = np.broadcast_to(np.arange(o * c * kh * kw).reshape(o, c, kh, kw, 1, 1), vals.shape)
    cols = np.broadcast_to(col[None], vals.shape)
    keep = (cols >= 0) & (vals != 0)
    return sp.csr_matrix((vals[keep], (rows[keep], cols[keep])), shape=(o * c * kh * kw, n_in))


def _linear_gradient_matrix(delta: np.ndarray, n_in: int) -> sp.csr_matrix:
    """Rows (o, i) of dL/dW = delta x^T: row (o, i) reads x_i with weight delta_o."""
    return sp.kron(sp.csr_matrix(delta.reshape(-1, 1)), sp.identity(n_in, format="csr"), format="csr")


def _pool_matrix(in_shape: tuple[int, int, int], pool: nn.AvgPool2d, out_shape: tuple[int, ...]) -> sp.csr_matrix:
    c, h, w = in_shape
    kh, kw = _pair(pool.kernel_size)
    sh, sw = _pair(pool.stride if pool.stride is not None else pool.kernel_size)
    ph, pw = _pair(pool.padding)
    ho, wo = out_shape[1], out_shape[2]
    rows = (np.arange(ho) * sh)[None, :] + np.arange(kh)[:, None] - ph
    cols = (np.arange(wo) * sw)[None, :] + np.arange(kw)[:, None] - pw
    r = np.broadcast_to(rows[None, :, None, :, None], (c, kh, kw, ho, wo))
    q = np.broadcast_to(cols[None, None, :, None, :], (c, kh, kw, ho, wo))
    ch = np.broadcast_to(np.arange(c)[:, None, None, None, None], (c, kh, kw, ho, wo))
    out_idx = ch * (ho * wo) + np.arange(ho)[None, None, None, :, None] * wo + np.arange(wo)[None, None, None, None, :]
    out_idx = np.broadcast_to(out_idx, (c, kh, kw, ho, wo))
    keep = (r >= 0) & (r < h) & (q >= 0) & (q < w)
    in_idx = ch * (h * w) + r * w + q
    vals = np.full(in_idx.shape, 1.0 / (kh * kw))
    return sp.csr_matrix((vals[keep], (out_idx[keep], in_idx[keep])), shape=(c * ho * wo, c * h * w))


# --------------------------------------------------------------------------- activations


def _relu_inverse(a: np.ndarray) -> np.ndarray:
    """ReLU's pre-image where it is known: outputs that are zero up to the reconstruction's
    error (1e-7 of the largest) are marked -inf (their forward row is dropped)."""
    tol = 1e-7 * float(np.max(np.abs(a), initial=0.0))
    return np.where(a > tol, a, -np.inf)


ArrayFn = Callable[[np.ndarray], np.ndarray]


class _Activation(NamedTuple):
    """An elementwise activation: its forward map, its derivative at the pre-activation and
    its inverse."""

    forward: ArrayFn
    derivative: ArrayFn
    inverse: ArrayFn


def _activation(m: nn.Module) -> _Activation:
    if isinstance(m, nn.Identity):
        return _Activation(lambda z: z, lambda z: np.ones_like(z), lambda a: a)
    if isinstance(m, nn.LeakyReLU):
        s = float(m.negative_slope)
        if s <= 0:
            raise ValueError("LeakyReLU with a non-positive slope is not invertible")
        return _Activation(
            lambda z: np.where(z > 0, z, s * z), lambda z: np.where(z > 0, 1.0, s), lambda a: np.where(a > 0, a, a / s)
        )
    if isinstance(m, nn.ReLU):
        # The inverse is only known where the output is positive; elsewhere return -inf as a
        # marker (the forward row is dropped and the derivative is zero).
        return _Activation(lambda z: np.maximum(z, 0), lambda z: (z > 0).astype(np.float64), _relu_inverse)
    if isinstance(m, nn.Sigmoid):

        def sig(z):
            return 0.5 * (1 + np.tanh(0.5 * z))

        def inv(a):
            a = np.clip(a, 1e-300, 1 - 1e-16)
            return np.log(a) - np.log1p(-a)

        return _Activation(sig, lambda z: sig(z) * (1 - sig(z)), inv)
    if isinstance(m, nn.Tanh):
        return _Activation(
            np.tanh, lambda z: 1 - np.tanh(z) ** 2, lambda a: np.arctanh(np.clip(a, -1 + 1e-16, 1 - 1e-16))
        )
    raise ValueError(f"unsupported activation {type(m).__name__}")


class _Chain:
    """The parameter-free layers between a parametric layer's output z and the next
    parametric layer's input x: flatten, elementwise activations, average pools (each pool
    held as its sparse matrix)."""

    def __init__(self, layers: list[_Layer]):
        self.ops: list[sp.csr_matrix | _Activation] = []
        for l in layers:
            m = l.module
            if isinstance(m, nn.Flatten) or isinstance(m, nn.Identity):
                continue
            if isinstance(m, nn.AvgPool2d):
                self.ops.append(_pool_matrix(l.in_shape, m, l.out_shape))
            else:
                self.ops.append(_activation(m))
        self.has_pool = any(not isinstance(op, _Activation) for op in self.ops)

    def forward(self, z: np.ndarray) -> tuple[np.ndarray, sp.csr_matrix | None]:
        """h(z) and its Jacobian (sparse; None for the identity)."""
        jac = None
        for op in self.ops:
            if isinstance(op, _Activation):
                d = sp.diags(op.derivative(z))
                z = op.forward(z)
            else:
                d = op
                z = op @ z
            jac = d if jac is None else d @ jac
        return z, jac

    def invert(self, x: np.ndarray) -> np.ndarray:
        """A pre-image of x: exact without pooling, a minimum-norm guess through a pool."""
        for op in reversed(self.ops):
            if isinstance(op, _Activation):
                x = op.inverse(x)
            else:
                x = op.T @ sp.linalg.spsolve((op @ op.T).tocsc(), x)
        return x


# --------------------------------------------------------------------------- least squares


def _factorise(normal: np.ndarray, info: dict, tikhonov: float) -> Callable[[np.ndarray], np.ndarray]:
    """A solver for the (unit-diagonal) normal matrix: Cholesky when it is positive
    definite, else a Cholesky of the matrix shifted by ``tikhonov * n`` (close to the
    minimum-norm solution). Records rank (None when singular), condition estimate and solver."""
    n = normal.shape[0]
    lo = _cholesky(normal)
    if lo is not None:
        diag = np.abs(np.diag(lo))
        info.update(rank=n, cond_est=float((diag.max() / diag.min()) ** 2), solver="cholesky+refine")
        return lambda r: sla.cho_solve((lo, True), r, check_finite=False)
    # numerically singular (a rank-deficient layer): Tikhonov-regularised normal equations,
    # which approach the minimum-norm solution; no refinement (it would feed the null space)
    lam = tikhonov * n
    lo, bad = torch.linalg.cholesky_ex(torch.from_numpy(normal) + lam * torch.eye(n, dtype=torch.float64))
    if int(bad) != 0:
        raise ValueError("the normal matrix is indefinite: the system is corrupt (NaN or Inf?)")
    lo = lo.numpy()
    info.update(rank=None, cond_est=float("inf"), solver="regularised-cholesky", singular=True)
    return lambda r: sla.cho_solve((lo, True), r, check_finite=False)


def _solve_ls(a: sp.csr_matrix, b: np.ndarray, tikhonov: float, refine: int = 3) -> tuple[np.ndarray, dict]:
    """min ||a x - b|| for a tall sparse matrix of a few thousand columns, in float64.

    Rows are normalised to unit length and columns equilibrated; the normal matrix is
    factorised by a dense Cholesky and the solution refined (corrected semi-normal
    equations). A numerically singular normal matrix gets the Tikhonov shift instead."""
    a = sp.csr_matrix(a, dtype=np.float64)
    rn = np.sqrt(np.asarray(a.multiply(a).sum(axis=1)).ravel())
    keep = rn > 0
    r_inv = np.where(keep, 1.0 / np.where(keep, rn, 1), 0.0)
    a = sp.diags(r_inv) @ a
    b = b * r_inv
    cn = np.sqrt(np.asarray(a.multiply(a).sum(axis=0)).ravel())
    c_inv = np.where(cn > 0, 1.0 / np.where(cn > 0, cn, 1), 0.0)
    a = (a @ sp.diags(c_inv)).tocsr()
    at = a.T.tocsr()
    normal = (at @ a).toarray()
    n = normal.shape[0]
    info: dict = {"rows": int(keep.sum()), "unknowns": n}
    solve = _factorise(normal, info, tikhonov)
    y = solve(at @ b)
    for _ in range(0 if info.get("singular") else refine):
        y = y + solve(at @ (b - a @ y))
    x = y * c_inv
    r = a @ y - b
    info["residual"] = float(np.linalg.norm(r))
    info["rel_residual"] = float(np.linalg.norm(r) / max(np.linalg.norm(b), 1e-300))
    return x, info


def _cholesky(normal: np.ndarray) -> np.ndarray | None:
    """Lower Cholesky factor of a symmetric positive definite matrix (LAPACK through torch,
    several times faster here than scipy's), or None when it is not numerically positive
    definite (a pivot below 1e-14 n on the unit-diagonal matrix)."""
    lo, info = torch.linalg.cholesky_ex(torch.from_numpy(normal))
    if int(info) != 0:
        return None
    lo = lo.numpy()
    diag = np.diag(lo)
    if not (np.all(np.isfinite(diag)) and diag.min() ** 2 > 1e-14 * normal.shape[0]):
        return None  # numerically singular: let the caller take the pseudo-inverse
    return lo


def _gram(a: sp.csr_matrix) -> np.ndarray:
    """a^T a as a dense array: sparse product when rows are short, dense BLAS otherwise."""
    nnz_row = a.nnz / max(a.shape[0], 1)
    sparse_cost = a.shape[0] * nnz_row**2
    dense_cost = 2.0 * a.shape[0] * a.shape[1] ** 2 / 30.0
    if sparse_cost <= dense_cost:
        return (a.T @ a).toarray()
    t = torch.from_numpy(a.toarray())
    return (t.T @ t).numpy()


# --------------------------------------------------------------------------- what depends on the weights only


def _weights(m: nn.Module) -> tuple[np.ndarray, np.ndarray | None]:
    w = m.weight.detach().to("cpu", torch.float64).numpy()
    b = None if m.bias is None else m.bias.detach().to("cpu", torch.float64).numpy()
    return w, b


def _digest(*arrays: np.ndarray) -> str:
    """A digest of arrays' shapes, dtypes and bytes (a key for what is computed from them)."""
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class _Geometry:
    """All that a parametric layer's matrices depend on besides its weights: the module's
    hyperparameters (its repr: kernel, stride, padding, features) and the shapes around it."""

    module: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    @staticmethod
    def of(layer: _Layer) -> "_Geometry":
        return _Geometry(repr(layer.module), layer.in_shape, layer.out_shape)


@dataclass
class _ForwardOps:
    """A parametric layer's forward matrix ``F`` (rows: outputs; columns: the unpadded input),
    its transpose, and ``F^T F`` (made on first use)."""

    F: sp.csr_matrix
    FT: sp.csr_matrix
    _ftf: np.ndarray | None = None

    @property
    def ftf(self) -> np.ndarray:
        if self._ftf is None:
            self._ftf = _gram(self.F)
        return self._ftf


class _MatrixCache:
    """The matrices of R-GAP's systems that depend on a layer's geometry and weights only,
    for one solver: a convolution's index pattern (by geometry) and forward operators (by
    geometry and a digest of the weights), and rank tables (by a digest of the whole model
    and the input shape). Least recently used entries beyond ``max_entries`` per kind are
    dropped, so a solver that sees many models stays bounded."""

    def __init__(self, max_entries: int = 64) -> None:
        self.max_entries = max_entries
        self._patterns: OrderedDict[_Geometry, np.ndarray] = OrderedDict()
        self._forward: OrderedDict[tuple[_Geometry, str], _ForwardOps] = OrderedDict()
        self._ranks: OrderedDict[tuple, list[dict]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def _get(self, table: OrderedDict, key: Any, make: Callable[[], Any]) -> Any:
        if key in table:
            self.hits += 1
            table.move_to_end(key)
            return table[key]
        self.misses += 1
        value = table[key] = make()
        while len(table) > self.max_entries:
            table.popitem(last=False)
        return value

    def pattern(self, layer: _Layer) -> np.ndarray:
        """The index pattern of a convolution (see :func:`_conv_pattern`)."""
        return self._get(
            self._patterns, _Geometry.of(layer), lambda: _conv_pattern(layer.in_shape, layer.module, layer.out_shape)
        )

    def forward(self, layer: _Layer, w: np.ndarray) -> _ForwardOps:
        """``F``, ``F^T`` and ``F^T F`` of a parametric layer with weights ``w``."""

        def make() -> _ForwardOps:
            n_in = int(np.prod(layer.in_shape))
            if isinstance(layer.module, nn.Conv2d):
                fwd = _conv_forward_matrix(self.pattern(layer), w, n_in)
            else:
                fwd = sp.csr_matrix(w)
            return _ForwardOps(fwd, fwd.T.tocsr())

        return self._get(self._forward, (_Geometry.of(layer), _digest(w)), make)

    def ranks(self, model: nn.Module, shape: tuple[int, int, int], seed: int) -> list[dict]:
        """:func:`rank_analysis` of ``model`` (architecture and every parameter in the key)."""
        params = [p.detach().to("cpu", torch.float64).numpy() for p in model.parameters()]
        key = (repr(model), shape, seed, _digest(*params))
        return self._get(self._ranks, key, lambda: _rank_table(model, shape, seed, self))


# --------------------------------------------------------------------------- the recursion


def _gradient_matrix(layer: _Layer, col: np.ndarray | None, delta: np.ndarray) -> sp.csr_matrix:
    n_in = int(np.prod(layer.in_shape))
    if isinstance(layer.module, nn.Conv2d):
        return _conv_gradient_matrix(col, delta.reshape(layer.out_shape), n_in)
    return _linear_gradient_matrix(delta, n_in)


@dataclass
class _LayerFit:
    """One linearised solve of a layer's stacked system: the relative residual that ranks it,
    the input ``x``, the error ``delta`` at the layer's output it was solved with, the solver's
    report, and the gradient constraints (and, without a pool, the forward ones) for the final
    residuals."""

    residual: float
    x: np.ndarray
    delta: np.ndarray
    info: dict
    gradient_rows: sp.csr_matrix
    forward_rows: sp.csr_matrix | None = None
    forward_rhs: np.ndarray | None = None


def _solve_layer(
    layer: _Layer,
    chain: _Chain,
    x_next: np.ndarray,
    dx_next: np.ndarray,
    grad_w: np.ndarray,
    cache: _MatrixCache,
    opts: RGAPOptions,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Recover the input of one parametric layer from the next layer's input and error;
    returns the input, the error at it, and the solver's report."""
    w, b = _weights(layer.module)
    g = grad_w.reshape(-1)
    z0 = chain.invert(x_next)
    rows_ok = np.isfinite(z0)
    b_vec = 0.0 if b is None else np.repeat(b, z0.size // b.size)
    if isinstance(layer.module, nn.Conv2d) and not chain.has_pool and rows_ok.all():
        # the common case: the whole output is known; structured solve, no big sparse matrices
        _, jac = chain.forward(z0)
        delta = dx_next if jac is None else jac.T @ dx_next
        x, info, ops = _solve_conv(layer, w, delta, g, z0 - b_vec, cache, opts)
        info["iterations"] = 1
        return x, ops.ft(delta), info
    fwd = cache.forward(layer, w).F
    col = cache.pattern(layer) if isinstance(layer.module, nn.Conv2d) else None
    z0 = np.where(rows_ok, z0, -1.0)
    iters = 0
    best: _LayerFit | None = None
    stall = 0
    while True:
        iters += 1
        h, jac = chain.forward(z0)
        delta = dx_next if jac is None else jac.T @ dx_next
        if chain.has_pool:
            # linearise the chain at the current pre-activation: J (W x + b - z0) + h(z0) = x_next
            f_rows = (jac @ fwd).tocsr()
            f_rhs = x_next - h + jac @ (z0 - b_vec)
        else:
            f_rows = fwd[rows_ok] if not rows_ok.all() else fwd
            f_rhs = (z0 - b_vec)[rows_ok] if not rows_ok.all() else z0 - b_vec
        gm = _gradient_matrix(layer, col, delta)
        x, info = _solve_ls(sp.vstack([gm, f_rows], format="csr"), np.concatenate([g, f_rhs]), opts.tikhonov)
        z_new = fwd @ x + b_vec
        if not chain.has_pool:
            best = _LayerFit(info["rel_residual"], x, delta, info, gm, f_rows, f_rhs)
            break
        # the nonlinear residuals at the new point: forward through the chain, and the
        # gradient with the error back-propagated through the chain's Jacobian there
        h_new, jac_new = chain.forward(z_new)
        d_new = jac_new.T @ dx_next
        gm_new = _gradient_matrix(layer, col, d_new)
        res = math.hypot(
            np.linalg.norm(gm_new @ x - g) / max(np.linalg.norm(g), 1e-300),
            np.linalg.norm(h_new - x_next) / max(np.linalg.norm(x_next), 1e-300),
        )
        if best is None or res < 0.999 * best.residual:
            best, stall = _LayerFit(res, x, d_new, info, gm_new), 0
        else:
            stall += 1
        if res < 1e-12 or stall >= 4 or iters >= opts.pool_iterations:
            break
        z0 = z0 + opts.pool_damping * (z_new - z0)
    x, info = best.x, best.info
    info["iterations"] = iters
    info["gradient_rel_residual"] = float(np.linalg.norm(best.gradient_rows @ x - g) / max(np.linalg.norm(g), 1e-300))
    if chain.has_pool:
        info["rel_residual"] = best.residual  # of the nonlinear system
        h_x, _ = chain.forward(fwd @ x + b_vec)
        info["forward_rel_residual"] = float(np.linalg.norm(h_x - x_next) / max(np.linalg.norm(x_next), 1e-300))
    else:
        fr = best.forward_rows @ x - best.forward_rhs
        info["forward_rel_residual"] = float(np.linalg.norm(fr) / max(np.linalg.norm(best.forward_rhs), 1e-300))
    dx = fwd.T @ best.delta
    return x, dx, info


class _ConvOps:
    """A convolution's forward (cached sparse F) and gradient constraints as operators. The
    gradient matrix is block diagonal over input channels with one shared block ``g1`` (rows
    (o, i, j), columns one channel's pixels), so it is applied to all channels at once."""

    def __init__(self, forward: _ForwardOps, g1: sp.csr_matrix, layer: _Layer, o: int):
        c, h, w = layer.in_shape
        self.F, self.FT = forward.F, forward.FT
        self.g1, self.g1t = g1, g1.T.tocsr()
        self.c, self.hw, self.o = c, h * w, o
        self.kk = g1.shape[0] // o

    def f(self, x: np.ndarray) -> np.ndarray:  # forward constraints: W * x
        return self.F @ x

    def ft(self, r: np.ndarray) -> np.ndarray:
        return self.FT @ r

    def g(self, x: np.ndarray) -> np.ndarray:  # gradient constraints: dL/dW for input x, rows (o, c, i, j)
        out = self.g1 @ x.reshape(self.c, self.hw).T  # (o k k, c)
        return out.reshape(self.o, self.kk, self.c).transpose(0, 2, 1).ravel()

    def gt(self, r: np.ndarray) -> np.ndarray:
        r = r.reshape(self.o, self.c, self.kk).transpose(0, 2, 1).reshape(self.o * self.kk, self.c)
        return (self.g1t @ r).T.ravel()


class _NormalSystem(NamedTuple):
    """A convolution's stacked system in normal-equations form: the unit-diagonal normal
    matrix, the diagonal scaling ``d`` that made it so, the weights of the gradient and the
    forward equations (``alpha2``, ``beta2``), and the constraints as operators."""

    matrix: np.ndarray
    scaling: np.ndarray
    alpha2: float
    beta2: float
    ops: _ConvOps


def _conv_normal(layer: _Layer, w: np.ndarray, delta: np.ndarray, cache: _MatrixCache) -> _NormalSystem:
    """The unit-diagonal normal matrix of a convolution's stacked system, assembled from its
    structure: the gradient part is block diagonal over input channels with one block shared
    by all channels, the forward part ``F^T F`` depends on the weights only (cached)."""
    c, h, wd = layer.in_shape
    o = w.shape[0]
    dl = delta.reshape(o, -1)
    alpha2 = o / max(float(np.sum(dl * dl)), 1e-300)
    beta2 = o / max(float(np.sum(w * w)), 1e-300)
    forward = cache.forward(layer, w)
    g1 = _conv_gradient_matrix(cache.pattern(layer)[:1], delta.reshape(layer.out_shape), h * wd)
    block = torch.from_numpy((g1.T @ g1).toarray())
    normal = torch.from_numpy(forward.ftf) * beta2
    hw = h * wd
    for ch in range(c):
        normal[ch * hw : (ch + 1) * hw, ch * hw : (ch + 1) * hw] += alpha2 * block
    dt = 1.0 / torch.sqrt(torch.clamp(torch.diagonal(normal), min=1e-300))
    normal *= dt[:, None]
    normal *= dt[None, :]
    return _NormalSystem(normal.numpy(), dt.numpy(), alpha2, beta2, _ConvOps(forward, g1, layer, o))


def _solve_conv(
    layer: _Layer,
    w: np.ndarray,
    delta: np.ndarray,
    g: np.ndarray,
    f_rhs: np.ndarray,
    cache: _MatrixCache,
    opts: RGAPOptions,
) -> tuple[np.ndarray, dict, _ConvOps]:
    """Least squares for a convolution whose whole output is known (no pooling, no ReLU).

    The two blocks of equations are weighted by their typical row norms, the normal matrix
    (:func:`_conv_normal`) is scaled to a unit diagonal (column equilibration), factorised by
    Cholesky, and the solution refined with residuals computed by the convolution operators
    (semi-normal equations)."""
    c, h, wd = layer.in_shape
    n = c * h * wd
    system = _conv_normal(layer, w, delta, cache)
    d, alpha2, beta2, ops = system.scaling, system.alpha2, system.beta2, system.ops
    info: dict = {"rows": int(g.size + f_rhs.size), "unknowns": n}
    inner = _factorise(system.matrix, info, opts.tikhonov)

    def solve(rg: np.ndarray, rf: np.ndarray) -> np.ndarray:
        return d * inner(d * (alpha2 * ops.gt(rg) + beta2 * ops.ft(rf)))

    x = solve(g, f_rhs)
    rg, rf = g - ops.g(x), f_rhs - ops.f(x)
    steps = 0
    while steps < (0 if info.get("singular") else opts.refine_steps):
        step = solve(rg, rf)
        x = x + step
        rg, rf = g - ops.g(x), f_rhs - ops.f(x)
        steps += 1
        if np.linalg.norm(step) <= 1e-13 * np.linalg.norm(x):
            break
    info["refinements"] = steps
    rg, rf = -rg, -rf
    res = math.sqrt(alpha2 * float(rg @ rg) + beta2 * float(rf @ rf))
    info["residual"] = res
    info["rel_residual"] = res / max(math.sqrt(alpha2 * float(g @ g) + beta2 * float(f_rhs @ f_rhs)), 1e-300)
    info["gradient_rel_residual"] = float(np.linalg.norm(rg) / max(np.linalg.norm(g), 1e-300))
    info["forward_rel_residual"] = float(np.linalg.norm(rf) / max(np.linalg.norm(f_rhs), 1e-300))
    info["solver"] = "structured-" + info["solver"]
    return x, info, ops


def _sigmoid(z: float) -> float:
    return 0.5 * (1 + math.tanh(0.5 * z))


class _HeadState(NamedTuple):
    """One state of the head consistent with its gradient: a label, the head's input and the
    error at the logits."""

    label: int
    head_input: np.ndarray
    error: np.ndarray


def _head_candidates(
    w: np.ndarray, b: np.ndarray | None, gw: np.ndarray, gb: np.ndarray | None, label: int | None
) -> list[_HeadState]:
    """The head states consistent with the head's gradient (and the label, when granted).

    A single logit without bias: ``gw = e a`` with ``e = sigmoid(z) - y`` and ``z = w . a``, so
    ``u = gw . w = e z``; with ``t = z`` (y = 0) or ``t = -z`` (y = 1) both labels give
    ``t sigmoid(t) = u``. For ``u > 0`` (the label opposite to the model's prediction, R-GAP's
    demo) this has one root; for ``u < 0`` (the label the model predicts) two, on either side
    of the minimum of ``t sigmoid(t)``: each root and each label not excluded is a candidate."""
    k = w.shape[0]
    cands: list[_HeadState] = []
    if k == 1:
        gw = gw.reshape(-1)
        if gb is not None:
            e = float(gb.reshape(-1)[0])
            y = label if label is not None else (0 if e > 0 else 1)
            cands.append(_HeadState(y, gw / e, np.array([e])))
            return cands
        u = float(gw @ w.reshape(-1))  # = e * z
        labels = [label] if label is not None else [0, 1]
        phi = lambda t: t * _sigmoid(t) - u  # noqa: E731  (y = 0: e z = sigma(z) z)
        roots = []
        if u > 0:
            roots = [brentq(phi, 0.0, u + 50.0, xtol=1e-300, rtol=1e-15, maxiter=500)]
        elif u < 0:
            tmin = -1.2784645427610738  # argmin of t sigma(t)
            if phi(tmin) <= 0:
                roots = [
                    brentq(phi, tmin, 0.0, xtol=1e-300, rtol=1e-15),
                    brentq(phi, -800.0, tmin, xtol=1e-300, rtol=1e-15),
                ]
        for y in labels:
            for t in roots:
                z = t if y == 0 else -t
                e = _sigmoid(z) - y
                if e != 0:
                    cands.append(_HeadState(y, gw / e, np.array([e])))
        return cands
    # softmax cross-entropy
    if gb is not None:
        e = gb.reshape(-1)
        y = label if label is not None else int(np.argmin(e))
        cands.append(_HeadState(y, gw.T @ e / (e @ e), e))
        return cands
    uu, ss, vt = np.linalg.svd(gw, full_matrices=False)
    s, u, v = ss[0], uu[:, 0], vt[0]
    options = []
    if label is not None:
        sign = -1.0 if u[label] > 0 else 1.0
        options.append((label, sign))
    else:
        for sign in (1.0, -1.0):
            su = sign * u
            if (su < 0).sum() == 1:
                options.append((int(np.argmin(su)), sign))
        if not options:
            options = [(int(np.argmin(u)), 1.0)]
    for y, sign in options:
        uh, vh = sign * u, sign * v
        m = w @ vh
        onehot = np.zeros(k)
        onehot[y] = 1

        # g = e x^T with x = t v and e = s u / t, so (t / s) (softmax(t W v) - onehot) = u. In this
        # form the residual is 1 far from the root on both sides; the unscaled difference
        # e(t) - s u / t also vanishes as t -> inf whenever the model predicts y, a false root.
        def resid(logt, m=m, onehot=onehot, uh=uh):
            t = np.exp(logt)
            zz = t * m
            p = np.exp(zz - zz.max())
            p /= p.sum()
            return (t / s) * (p - onehot) - uh

        grid = np.linspace(-30, 30, 601)
        costs = [np.sum(resid(t) ** 2) for t in grid]
        t0 = grid[int(np.argmin(costs))]
        sol = least_squares(resid, x0=[t0], xtol=1e-15, ftol=1e-15, gtol=1e-15, method="lm")
        t = float(np.exp(sol.x[0]))
        cands.append(_HeadState(y, t * vh, (s / t) * uh))
    return cands


@dataclass
class _Candidate:
    """The recursion run from one head state: the image, the layers' solver reports (top to
    bottom), the root-sum-square of their relative residuals, and the share of pixels in
    range."""

    head: _HeadState
    image: np.ndarray
    layers: list[dict]
    total_rel_residual: float
    in_range: float


def _run_recursion(
    plan: _Plan, grads_by_layer: dict[int, list[np.ndarray]], head: _HeadState, cache: _MatrixCache, opts: RGAPOptions
) -> _Candidate:
    """Walk from the head's input down to the image."""
    params = plan.params
    head_layer = plan.layers[params[-1]]
    w_head, _ = _weights(head_layer.module)
    x_next = head.head_input
    dx_next = w_head.T @ head.error
    infos = []
    total = 0.0
    for pos in range(len(params) - 2, -1, -1):
        layer = plan.layers[params[pos]]
        chain = _Chain(plan.layers[params[pos] + 1 : params[pos + 1]])
        x, dx, info = _solve_layer(layer, chain, x_next, dx_next, grads_by_layer[layer.index][0], cache, opts)
        info["layer"] = layer.index
        info["type"] = type(layer.module).__name__
        infos.append(info)
        total += info["rel_residual"] ** 2
        x_next, dx_next = x, dx
    # the raw input: invert what lies before the first parametric layer
    image = _Chain(plan.layers[: params[0]]).invert(x_next)
    inside = float(np.mean((image >= -0.05) & (image <= 1.05)))
    return _Candidate(head, image, infos, math.sqrt(total), inside)


_REPORT_KEYS = (
    "layer",
    "type",
    "rel_residual",
    "gradient_rel_residual",
    "forward_rel_residual",
    "rank",
    "unknowns",
    "rows",
    "cond_est",
    "solver",
    "iterations",
)


class RGAP(Attack):
    """R-GAP (Zhu and Blaschko, ICLR 2021): the input of one sample recovered analytically from
    its gradient, layer by layer from the head down, each layer's input the least-squares
    solution of its forward and gradient constraints (no optimisation, no randomness).

    Threat model: the parameter server sees the weights a client started from and the loss
    gradient of one sample (FedSGD, batch size 1); the label is granted as in the paper, or
    recovered from the head's gradient. A batch gives a blend (``status="blend"``).

    Paper's setting: CNN6 (six bias-free convolutions with LeakyReLU(0.2), one logit, the
    logistic loss), untrained, CIFAR-10; the module docstring lists the layers supported.

    A solver: besides its :class:`RGAPOptions` it holds a cache of the matrices that depend on
    the weights only (see :class:`_MatrixCache`). Holding one solver across updates on the
    same weights (the clients of one FedSGD round, the images of a benchmark) reuses each
    convolution's ``F^T F`` and the rank table; the cache is keyed by everything they depend
    on, so updates on other weights or other architectures are safe (they miss), and the
    result is the same as a fresh solver's."""

    name = "rgap"
    Options = RGAPOptions

    def __init__(self, options: RGAPOptions | None = None, *, max_cache_entries: int = 64, **overrides: Any) -> None:
        super().__init__(options, **overrides)
        self.cache = _MatrixCache(max_cache_entries)

    def rank_analysis(self, model: nn.Module, input_shape: Sequence[int], *, seed: int = 0) -> list[dict]:
        """:func:`rank_analysis`, cached on this solver."""
        return [dict(row) for row in self.cache.ranks(model, check_input_shape(input_shape), seed)]

    def _reconstruct(
        self,
        model: nn.Module,
        update: Update | Sequence[Tensor],
        input_shape: Sequence[int],
        threat: ThreatModel,
        *,
        seed: int,
        options: RGAPOptions,
    ) -> AttackResult:
        """Reconstruct the input of one sample from its gradient (``seed`` is unused)."""
        start = time.perf_counter()
        shape = check_input_shape(input_shape)
        grads = check_gradients(model, as_update(update).as_gradients())
        plan = _plan(model, shape)
        # gradients per parametric layer, in model.parameters() order
        by_layer: dict[int, list[np.ndarray]] = {}
        it = iter(grads)
        for l in plan.layers:
            n = len(list(l.module.parameters()))
            if n:
                if not isinstance(l.module, _PARAM):
                    raise _refuse(l.index, l.module, "a parametric layer R-GAP does not know")
                by_layer[l.index] = [next(it).to("cpu", torch.float64).numpy() for _ in range(n)]
        batch = threat.resolved_batch_size()
        label = None
        if threat.labels is not None and batch == 1:
            label = int(torch.as_tensor(threat.labels).reshape(-1)[0])
        head = plan.layers[plan.params[-1]]
        w, b = _weights(head.module)
        hg = by_layer[head.index]
        gw = hg[0]
        gb = hg[1] if len(hg) > 1 else None
        if not np.any(gw):
            raise ValueError("the head's weight gradient is zero: nothing to invert")
        heads = _head_candidates(w, b, gw, gb, label)
        if not heads:
            raise ValueError("no head state is consistent with the gradient (is the label right?)")
        runs = [_run_recursion(plan, by_layer, h, self.cache, options) for h in heads]
        best_resid = min(r.total_rel_residual for r in runs)
        # among candidates as consistent as the best (within a factor 2), prefer images in range
        best = min(
            (r for r in runs if r.total_rel_residual <= 2 * best_resid + 1e-300),
            key=lambda r: (-r.in_range, r.total_rel_residual),
        )
        img = torch.from_numpy(np.ascontiguousarray(best.image.reshape(shape))).to(torch.float32)
        img = torch.nan_to_num(img, nan=0.5).clamp(0, 1)
        images = img.unsqueeze(0).repeat(batch, 1, 1, 1)
        if threat.labels is not None:
            labels = torch.as_tensor(threat.labels).reshape(-1).to(torch.int64).clone()
        else:
            labels = torch.full((batch,), int(best.head.label), dtype=torch.int64)
        worst = max((info["rel_residual"] for info in best.layers), default=0.0)
        status = "blend" if batch > 1 else ("ok" if worst < options.consistent_residual else "inconsistent")
        diagnostics: dict[str, Any] = {
            "residuals": [{k: info[k] for k in _REPORT_KEYS} for info in best.layers],
            "total_rel_residual": best.total_rel_residual,
            "candidates": [
                {"label": int(r.head.label), "total_rel_residual": r.total_rel_residual, "in_range": r.in_range}
                for r in runs
            ],
            "head_error": [float(v) for v in np.ravel(best.head.error)],
            "label_granted": threat.labels is not None,
            "device": "cpu",  # scipy's sparse solvers: R-GAP computes on the CPU whatever the model's device
        }
        if options.rank:
            diagnostics["rank"] = self.rank_analysis(model, shape)
            diagnostics["ra_index"] = ra_index(diagnostics["rank"])
        return AttackResult(
            attack="rgap",
            images=images,
            labels=labels,
            seconds=time.perf_counter() - start,
            steps=0,
            status=status,
            diagnostics=diagnostics,
        )


def rgap(
    model: nn.Module,
    update: Update | Sequence[Tensor],
    input_shape: Sequence[int],
    threat: ThreatModel = ThreatModel(),
    *,
    seed: int = 0,
    **options: Any,
) -> AttackResult:
    """Reconstruct the input of one sample from its gradient by R-GAP: ``RGAP()(...)``, a fresh
    solver (nothing is kept between calls; hold an :class:`RGAP` to reuse the weights'
    matrices across updates).

    ``seed`` is accepted for the shared calling convention and unused (R-GAP is
    deterministic). ``options``: fields of :class:`RGAPOptions`, e.g. ``rank=False`` skips
    the weights-only rank analysis in the diagnostics (the attack runner's choice: it costs
    more than the attack on CNN6).
    """
    return RGAP()(model, update, input_shape, threat, seed=seed, **options)


# --------------------------------------------------------------------------- rank analysis


def _rank_of_gram(normal: np.ndarray, rtol: float = 1e-11) -> int:
    """Numerical rank of a Gram matrix ``a^T a``: scaled to a unit diagonal (column
    equilibration of ``a``), a Cholesky that succeeds with pivots above the threshold means
    full rank; otherwise the rank is the number of pivots above ``rtol n`` (singular
    values of ``a`` below about 3e-6 sqrt(n) of the largest count as zero), using LAPACK's
    pivoted Cholesky (pstrf) with that tolerance on the pivots."""
    n = normal.shape[0]
    if n == 0:
        return 0
    t = torch.from_numpy(normal)
    d = torch.sqrt(torch.diagonal(t))
    keep = d > 0
    if not bool(keep.all()):
        t, d = t[keep][:, keep], d[keep]
    t = t / d[:, None]
    t /= d[None, :]
    normal = t.numpy()
    lo = _cholesky(normal)
    if lo is not None and np.diag(lo).min() ** 2 > rtol * normal.shape[0]:
        return int(keep.sum())
    _, _, rank, _ = sla.lapack.dpstrf(normal, tol=rtol * normal.shape[0])  # pivoted Cholesky
    return int(rank)


def _numeric_rank(a: sp.csr_matrix) -> int:
    """Rank of a sparse matrix through the smaller of its two Gram matrices."""
    a = sp.csr_matrix(a, dtype=np.float64)
    if a.shape[0] == 0:
        return 0
    return _rank_of_gram(_gram(a) if a.shape[1] <= a.shape[0] else _gram(a.T.tocsr()))


def rank_analysis(model: nn.Module, input_shape: Sequence[int], *, seed: int = 0) -> list[dict]:
    """Count, per parametric layer below the head, the unknowns and constraints of R-GAP's
    system and their ranks, from the weights alone.

    Rows (one per layer, top to bottom as R-GAP solves them): ``layer`` (position in the
    Sequential), ``type``, ``unknowns`` (the layer's input size including padding),
    ``padding`` (the padded entries, known to be zero), ``forward`` (forward constraints: the
    layer's outputs, or after an average pool the pooled outputs), ``gradient`` (gradient
    constraints: weight-gradient entries), ``forward_rank`` (rank of the forward constraints
    plus the padding constraints), ``rank`` (rank of the stacked system: forward, gradient and
    padding), ``deficit`` (unknowns - rank). The gradient constraints depend on the
    back-propagated error, which the attack reads from the gradient; here it is instantiated
    with a seeded random probe input (uniform in [0, 1]) and a random label, which gives the
    generic rank. The head (solved in closed form from its rank-one gradient) is not listed.
    Nothing is kept between calls (:meth:`RGAP.rank_analysis` caches the table on a solver).
    """
    return _rank_table(model, check_input_shape(input_shape), seed, _MatrixCache())


def _rank_table(model: nn.Module, shape: tuple[int, int, int], seed: int, cache: _MatrixCache) -> list[dict]:
    plan = _plan(model, shape)
    gen = torch.Generator().manual_seed(seed)
    probe = torch.rand((1, *shape), generator=gen, dtype=torch.float64)
    # forward the probe with float64 copies of the layers, keep every layer's input
    acts = [probe]
    x = probe
    with torch.no_grad():
        for l in plan.layers:
            m = l.module
            if isinstance(m, _PARAM):
                w, b = _weights(m)
                wt = torch.from_numpy(w)
                bt = None if b is None else torch.from_numpy(b)
                if isinstance(m, nn.Conv2d):
                    x = torch.nn.functional.conv2d(x, wt, bt, m.stride, m.padding)
                else:
                    x = torch.nn.functional.linear(x, wt, bt)
            else:
                x = m.double()(x) if list(m.parameters()) else m(x)
            acts.append(x)
    # the head's error for a random label, back-propagated with torch
    params = plan.params
    head = plan.layers[params[-1]]
    z = acts[params[-1] + 1].reshape(-1)
    if z.numel() == 1:
        e = torch.sigmoid(z) - float(torch.randint(0, 2, (1,), generator=gen))
    else:
        y = int(torch.randint(0, z.numel(), (1,), generator=gen))
        e = torch.softmax(z, 0)
        e[y] -= 1
    w_head, _ = _weights(head.module)
    dx = torch.from_numpy(w_head.T @ e.numpy())
    rows = []
    for pos in range(len(params) - 2, -1, -1):
        layer = plan.layers[params[pos]]
        zl = acts[layer.index + 1].reshape(-1).numpy()
        chain = _Chain(plan.layers[layer.index + 1 : params[pos + 1]])
        _, jac = chain.forward(zl)
        delta = dx.numpy() if jac is None else jac.T @ dx.numpy()
        w, _ = _weights(layer.module)
        fwd = cache.forward(layer, w).F
        col = cache.pattern(layer) if isinstance(layer.module, nn.Conv2d) else None
        f_rows = fwd if jac is None else (jac @ fwd).tocsr()
        nz = np.diff(sp.csr_matrix(f_rows).indptr) > 0
        f_rows = sp.csr_matrix(f_rows)[nz]
        m = layer.module
        structured = isinstance(m, nn.Conv2d) and not chain.has_pool and nz.all()
        gm = None if structured else _gradient_matrix(layer, col, delta)
        n_in = int(np.prod(layer.in_shape))
        if isinstance(m, nn.Conv2d):
            ph, pw = (0, 0) if isinstance(m.padding, str) else _pair(m.padding)
            c, h, wd = layer.in_shape
            n_pad = c * (h + 2 * ph) * (wd + 2 * pw)
        else:
            n_pad = n_in
        if gm is None:
            # structured Gram matrices, as the attack builds them
            f_rank = _rank_of_gram(cache.forward(layer, w).ftf) if fwd.shape[0] >= fwd.shape[1] else _numeric_rank(fwd)
            full = f_rank == n_in  # the forward constraints alone fix the input
            s_rank = n_in if full else _rank_of_gram(_conv_normal(layer, w, delta, cache).matrix)
        else:
            f_rank = _numeric_rank(f_rows)
            s_rank = f_rank if f_rank == n_in else _numeric_rank(sp.vstack([gm, f_rows], format="csr"))
        pad = n_pad - n_in
        rows.append(
            {
                "layer": layer.index,
                "type": type(m).__name__,
                "unknowns": n_pad,
                "padding": pad,
                "forward": int(f_rows.shape[0]),
                "gradient": int(w.size),
                "forward_rank": f_rank + pad,
                "rank": s_rank + pad,
                "deficit": n_pad - (s_rank + pad),
            }
        )
        dx = torch.from_numpy(fwd.T @ delta)
    return rows


def ra_index(rows: list[dict]) -> float:
    """The rank-analysis (RA) index of a rank table: the summed rank deficit of the layers'
    systems divided by the summed unknowns (0 when every layer's system has full rank; the
    larger, the more of the input the gradient leaves undetermined).

    The paper compares, per layer, the rank of the stacked system with the number of
    unknowns, and lets surplus constraints of a layer count ("virtual constraints") towards
    the layer below; its index is a normalised deficit of this kind. This definition is the
    simple, conservative variant: no credit for surplus constraints carried across layers.
    """
    unknowns = sum(r["unknowns"] for r in rows)
    return float(sum(max(r["deficit"], 0) for r in rows) / max(unknowns, 1))

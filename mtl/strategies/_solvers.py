"""Small on-device solvers on the ``K x K`` Gram matrix (no host round trip, fixed work).

- :func:`min_norm_simplex`: ``argmin_{w in simplex} w^T M w`` (MGDA) by enumerating the
  ``2^K - 1`` faces of the simplex and solving each face's KKT system in one batched solve
  (exact for a convex QP: the minimum over the feasible face solutions is the global minimum).
- :func:`cagrad_simplex`: CAGrad's inner problem
  ``argmin_{w in simplex} w^T M b + c sqrt(w^T M w)`` the same way: on a face the stationarity
  conditions reduce to a quadratic equation in the multiplier, solved in closed form.
- :func:`nash_weights`: the Nash bargaining solution ``M alpha = 1 / alpha`` by damped Newton on
  the strictly convex ``F(alpha) = alpha^T M alpha / 2 - sum log alpha`` (self-concordant, so
  the damped step ``1/(1+lambda)`` keeps ``alpha > 0``).

Face enumeration is used up to :data:`MAX_ENUM_TASKS` tasks (4095 faces); above that
:func:`min_norm_simplex` and :func:`cagrad_simplex` fall back to projected gradient descent
with a fixed number of iterations.

Scale: task gradients' norms can differ by orders of magnitude (a 3.5% action next to a 0.04%
one). Every linear system here is solved on its symmetrically scaled form
``D^{-1/2} A D^{-1/2}`` (``D = diag A``: a correlation matrix, unit diagonal) with a ridge
relative to that unit diagonal, and feasibility is judged on ``w_i ||g_i||`` (each weight's
contribution to the update), so no answer depends on the scale of a single task's gradient.
"""

from __future__ import annotations

import itertools
from functools import lru_cache

import torch
from torch import Tensor

from mtl.device import host_to_device
from mtl.strategies.base import psqrt

MAX_ENUM_TASKS = 12
#: ridge on the unit diagonal of a scaled system (only matters for dependent gradients)
_RIDGE = 1e-13
#: a face solution is feasible when ``w_i ||g_i|| >= -_FEAS_TOL * max_j |w_j| ||g_j||``
_FEAS_TOL = 1e-12


def spd_solve(a: Tensor, b: Tensor) -> Tensor:
    """Solve ``a x = b`` for (batches of) small symmetric positive definite ``a`` ``[..., n, n]``
    and ``b`` ``[..., n, r]`` by Gauss-Jordan elimination without pivoting (stable for SPD).

    Written with element-wise tensor ops on purpose: batched LAPACK calls on tiny matrices
    enter a parallel region per call, which on a loaded CPU costs milliseconds; this costs
    ``n`` rounds of a few small element-wise kernels on any device.
    """
    n = a.shape[-1]
    aug = torch.cat([a, b], dim=-1)
    for k in range(n):
        row = aug[..., k : k + 1, :] / aug[..., k : k + 1, k : k + 1]
        aug = aug - aug[..., :, k : k + 1] * row
        aug = torch.cat([aug[..., :k, :], row, aug[..., k + 1 :, :]], dim=-2)
    return aug[..., :, n:]


@lru_cache(maxsize=32)
def _face_masks_cpu(k: int) -> Tensor:
    rows = [m for m in itertools.product([0.0, 1.0], repeat=k) if any(m)]
    return torch.tensor(rows, dtype=torch.float64)


def face_masks(k: int, device: torch.device) -> Tensor:
    """``[2^K - 1, K]`` float64 0/1 masks of the non-empty faces of the simplex."""
    return host_to_device(_face_masks_cpu(k), device)


def _quad_forms(x: Tensor, m: Tensor) -> Tensor:
    """``[S]``: ``x_s^T m x_s`` with element-wise ops (batched tiny matmuls enter a parallel
    region per call on CPU, which is slow on a loaded machine)."""
    return ((x.unsqueeze(2) * m.unsqueeze(0)).sum(1) * x).sum(1)


def scaled_solve(a: Tensor, b: Tensor, ridge: float = _RIDGE) -> Tensor:
    """``a^{-1} b`` for (batches of) symmetric PSD ``a`` ``[..., n, n]``, ``b`` ``[..., n, r]``,
    solved on the scaled system ``(D^{-1/2} a D^{-1/2} + ridge I) z = D^{-1/2} b``,
    ``x = D^{-1/2} z`` (``D = diag a``, 1 where a diagonal entry is 0).

    The scaled matrix has a unit diagonal whatever the rows' scales, so the elimination's
    rounding and the ridge are relative to each row's own size (a ridge added to ``a`` itself
    would swamp rows far below the largest)."""
    diag = a.diagonal(dim1=-2, dim2=-1)
    inv = torch.where(diag > 0, diag, torch.ones_like(diag)).rsqrt()
    scaled = a * inv.unsqueeze(-1) * inv.unsqueeze(-2)
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    return inv.unsqueeze(-1) * spd_solve(scaled + ridge * eye, b * inv.unsqueeze(-1))


def _masked_system(m: Tensor, masks: Tensor) -> Tensor:
    """``[S, K, K]``: ``M`` restricted to each face, identity off the face."""
    outer = masks.unsqueeze(2) * masks.unsqueeze(1)
    return m.unsqueeze(0) * outer + torch.diag_embed(1.0 - masks)


def _feasible(sol: Tensor, norms: Tensor) -> Tensor:
    """``[S]``: face solutions ``sol`` ``[S, K]`` with no negative contribution ``w_i ||g_i||``
    beyond rounding (relative to the largest contribution of the same solution)."""
    y = sol * norms.unsqueeze(0)
    return (y >= -_FEAS_TOL * y.abs().amax(1, keepdim=True)).all(dim=1)


def min_norm_simplex(m: Tensor) -> Tensor:
    """The min-norm point of the convex hull: ``argmin_{w >= 0, sum w = 1} w^T m w``.

    Args:
        m: ``[K, K]`` PSD Gram matrix (float64 recommended; any scale).

    Returns ``w`` ``[K]`` (float64).
    """
    k = m.shape[0]
    if k == 1:
        return torch.ones(1, dtype=m.dtype, device=m.device)
    if k > MAX_ENUM_TASKS:
        return _projected_gradient(lambda w: 2.0 * (m @ w), m, iters=500)
    masks = face_masks(k, m.device).to(m.dtype)
    norms = psqrt(m.diagonal().clamp_min(0.0))
    # On face S the KKT conditions M_S w_S = mu 1_S, 1^T w = 1 give w_S = u / 1^T u, u = M_S^{-1} 1_S.
    u = scaled_solve(_masked_system(m, masks), masks.unsqueeze(2))[..., 0] * masks
    total = u.sum(1)
    sol = u / torch.where(total.abs() > 0, total, torch.ones_like(total)).unsqueeze(1)
    feasible = (total > 0) & _feasible(sol, norms)
    obj = _quad_forms(sol, m)
    obj = torch.where(feasible, obj, torch.full_like(obj, float("inf")))
    w = sol.index_select(0, torch.argmin(obj).view(1))[0].clamp_min(0.0)  # no host read
    return w / w.sum()


def cagrad_simplex(m: Tensor, c: Tensor) -> Tensor:
    """CAGrad's inner problem ``argmin_{w in simplex} w^T m b + c * sqrt(w^T m w)`` with
    ``b = 1/K`` (``m`` the Gram matrix, ``c = alpha * ||g_0||``).

    On a face ``S`` with ``s = ||g_w|| > 0`` stationarity reads
    ``m_S w_S = (s / c) (mu 1 - (m b)_S)``; with ``u = m_S^{-1} 1``, ``v = m_S^{-1} (m b)_S`` the
    conditions ``w^T m w = s^2`` and ``1^T w = 1`` give ``a mu^2 - 2 beta mu + gamma - c^2 = 0``
    (``a = 1^T u``, ``beta = 1^T v``, ``gamma = (m b)_S^T v``) and ``s = c / sqrt(disc)``, so
    ``w_S = (mu u - v) / sqrt(disc)``. The feasible face solution of least objective is the
    minimiser. If none exists (``c = 0``, or the minimiser has ``g_w = 0``), returns ``b``.

    Returns ``w`` ``[K]`` (float64).
    """
    k = m.shape[0]
    b = torch.full((k,), 1.0 / k, dtype=m.dtype, device=m.device)
    if k == 1:
        return b
    mb = m @ b
    if k > MAX_ENUM_TASKS:
        def grad(w: Tensor) -> Tensor:
            gw = m @ w
            return mb + c * gw / psqrt((w @ gw).clamp_min(1e-20))

        return _projected_gradient(grad, m, iters=1000)
    masks = face_masks(k, m.device).to(m.dtype)
    norms = psqrt(m.diagonal().clamp_min(0.0))
    rhs = torch.stack([masks, masks * mb.unsqueeze(0)], dim=2)  # [S, K, 2]
    sol = scaled_solve(_masked_system(m, masks), rhs) * masks.unsqueeze(2)
    u, v = sol[..., 0], sol[..., 1]
    a = u.sum(1)
    beta = v.sum(1)
    gamma = (v * mb.unsqueeze(0)).sum(1)
    disc = beta * beta - a * (gamma - c * c)
    # s = ||g_w|| = c / sqrt(disc) cannot exceed the largest task-gradient norm, so a face with
    # disc < c^2 / max_i ||g_i||^2 has no feasible stationary point (a test independent of scale)
    valid = (c > 0) & (disc > 0.25 * c * c / m.diagonal().max().clamp_min(torch.finfo(m.dtype).tiny))
    sq = psqrt(torch.where(valid, disc, torch.ones_like(disc)))
    mu = (beta + sq) / torch.where(a.abs() > 0, a, torch.ones_like(a))
    w = (mu.unsqueeze(1) * u - v) / sq.unsqueeze(1)
    feasible = valid & _feasible(w, norms) & ((w.sum(1) - 1.0).abs() < 1e-6)
    wc = w.clamp_min(0.0)
    obj = (wc * mb.unsqueeze(0)).sum(1) + c * psqrt(_quad_forms(wc, m).clamp_min(0.0))
    obj = torch.where(feasible, obj, torch.full_like(obj, float("inf")))
    best = wc.index_select(0, torch.argmin(obj).view(1))[0]  # no host read
    any_feasible = feasible.any()
    wb = best / best.sum().clamp_min(1e-30)
    return torch.where(any_feasible, wb, b)


def _project_simplex(v: Tensor) -> Tensor:
    """Euclidean projection onto the probability simplex (sort-based, no host read)."""
    k = v.shape[0]
    u, _ = torch.sort(v, descending=True)
    css = torch.cumsum(u, 0) - 1.0
    ind = torch.arange(1, k + 1, dtype=v.dtype, device=v.device)
    cond = (u - css / ind) > 0
    rho = (cond * ind).max()  # the largest index where cond holds (1-based)
    theta = css.gather(0, (rho - 1).long().view(1)) / rho
    return (v - theta).clamp_min(0.0)


def _projected_gradient(grad_fn, m: Tensor, iters: int) -> Tensor:
    k = m.shape[0]
    w = torch.full((k,), 1.0 / k, dtype=m.dtype, device=m.device)
    # 1 / (2 ||m||_F) <= 1 / (2 ||m||_2): a safe step without an SVD (whose error check
    # synchronises with the device on accelerators)
    step = 1.0 / (2.0 * torch.linalg.matrix_norm(m).clamp_min(1e-12))
    for _ in range(iters):
        w = _project_simplex(w - step * grad_fn(w))
    return w


def _rescaled(beta: Tensor, c: Tensor) -> Tensor:
    """``t beta`` with ``t = sqrt(K / beta^T C beta)``, the minimiser of ``F`` along the ray
    through ``beta`` (every solution has ``beta^T C beta = sum_i beta_i (C beta)_i = K``)."""
    k = c.shape[-1]
    q = ((beta.unsqueeze(-1) * c).sum(-2) * beta).sum(-1, keepdim=True)
    return beta * psqrt(k / q.clamp_min(torch.finfo(c.dtype).tiny))


def _nash_objective(c: Tensor, beta: Tensor) -> Tensor:
    """``[B, 1]``: ``F(beta) = beta^T C beta / 2 - sum log beta`` (``inf`` where not positive)."""
    q = ((beta.unsqueeze(1) * c).sum(2) * beta).sum(1, keepdim=True)
    logs = torch.log(beta.clamp_min(torch.finfo(beta.dtype).tiny)).sum(1, keepdim=True)
    f = 0.5 * q - logs
    return torch.where((beta > 0).all(1, keepdim=True), f, torch.full_like(f, float("inf")))


def nash_residual(c: Tensor, beta: Tensor) -> Tensor:
    """``max_i |(C beta)_i beta_i - 1|`` (batched over leading dimensions of ``beta``)."""
    return ((beta.unsqueeze(-1) * c).sum(-2) * beta - 1.0).abs().amax(-1)


def nash_weights(m: Tensor, iters: int = 20, init: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``alpha > 0`` with ``(m alpha) * alpha = 1`` (Nash-MTL), by damped Newton on
    ``F(beta) = beta^T C beta / 2 - sum log beta`` for the correlation matrix
    ``C = D^{-1/2} m D^{-1/2}`` (``D = diag m``; ``(C beta) beta = 1`` is the same condition for
    ``alpha = D^{-1/2} beta``, and ``C`` has a unit diagonal whatever the gradient scales).
    The Newton step is damped by ``1 / (1 + decrement)`` while the decrement exceeds 1/4 (F is
    self-concordant, so ``beta`` stays positive).

    Two starts run side by side, each rescaled onto ``beta^T C beta = K`` (a property of the
    solution): the warm start ``init`` (the previous step's ``beta``) and the cold start ``1``.
    The result is the one whose residual ``max_i |(C beta)_i beta_i - 1|`` is smaller — a warm
    start that has not converged after an abrupt change of the gradients falls back to the cold
    one, without a host read.

    Args:
        m: ``[K, K]`` positive definite Gram matrix (float64).
        iters: Newton iterations per start (fixed, no convergence test on the host).
        init: a warm start ``beta`` (e.g. the previous step's); ignored where not positive.

    Returns ``(alpha, beta)`` (``beta`` for the next warm start).
    """
    k = m.shape[0]
    d = psqrt(m.diagonal().clamp_min(1e-300))
    c = m / (d.unsqueeze(0) * d.unsqueeze(1))
    cold = torch.ones(k, dtype=m.dtype, device=m.device)
    warm = cold
    if init is not None:
        init = init.to(cold)
        ok = (torch.isfinite(init) & (init > 0) & (init < 1e150)).all()
        warm = torch.where(ok, init, cold)
    beta = _rescaled(torch.stack([warm, cold]), c)  # [2, K]
    eye = torch.eye(k, dtype=m.dtype, device=m.device)
    for _ in range(iters):
        inv = 1.0 / beta
        cb = (beta.unsqueeze(1) * c).sum(2)
        grad = cb - inv
        hess = c + torch.diag_embed(inv * inv) + 1e-14 * eye
        delta = -torch.linalg.solve_ex(hess, grad.unsqueeze(2)).result[..., 0]  # no error check: no sync
        decrement = psqrt((-(grad * delta).sum(1, keepdim=True)).clamp_min(0.0))
        damped = beta + delta / (1.0 + decrement)  # stays positive (self-concordance)
        full = beta + delta
        # the full step where it keeps beta positive and lowers F more than the damped step
        # (the damped phase alone can need many iterations when the start is far)
        take_full = (full > 0).all(1, keepdim=True) & (_nash_objective(c, full) <= _nash_objective(c, damped))
        beta = torch.where(take_full, full, damped).clamp_min(1e-300)
    res = nash_residual(c, beta)
    best = torch.where(res[0] <= res[1], beta[0], beta[1])
    return best / d, best

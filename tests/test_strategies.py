"""Each strategy against its paper's update on hand-checkable inputs."""

from __future__ import annotations

import io
import itertools
import math

import mpmath as mp
import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from mtl.strategies import GRADIENT_STRATEGIES, STRATEGIES, build_strategy
from mtl.strategies._solvers import cagrad_simplex, min_norm_simplex
from mtl.strategies.aligned import aligned_matrix
from mtl.strategies.cagrad import cagrad_coefficients
from mtl.strategies.gradvac import gradvac_rows
from mtl.strategies.imtl import imtl_g_coefficients
from mtl.strategies.nash import clip_coefficients, nash_coefficients
from mtl.strategies.pcgrad import pcgrad_coefficients, pcgrad_rows, random_orders

D = torch.float64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _grads(k: int, p: int, seed: int) -> torch.Tensor:
    return torch.randn(k, p, dtype=D, generator=torch.Generator().manual_seed(seed))


def _run_direct(strategy, grads: torch.Tensor, losses=None):
    """Run ``strategy.backward`` on losses ``L_i = g_i . x`` (so grad L_i = g_i) and return the
    shared gradient it writes plus the combination."""
    k, p = grads.shape
    x = torch.zeros(p, dtype=D, requires_grad=True)
    base = torch.ones(k, dtype=D) if losses is None else torch.as_tensor(losses, dtype=D)
    ls = grads @ x + base
    comb = strategy.backward(ls, shared_parameters=[x])
    return x.grad.clone(), comb


# ------------------------------------------------------------------ PCGrad


def test_pcgrad_conflicting_pair_by_hand():
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=D)  # g1.g2 = -1
    # g1' = g1 + 0.5 g2 = (0.5, 0.5); g2' = g2 + g1 = (0, 1); sum = (0.5, 1.5)
    out, _ = _run_direct(build_strategy("pcgrad", 2), g)
    assert torch.allclose(out, torch.tensor([0.5, 1.5], dtype=D))


def test_pcgrad_agreeing_pair_is_plain_sum():
    g = torch.tensor([[1.0, 0.5], [0.2, 1.0]], dtype=D)
    out, comb = _run_direct(build_strategy("pcgrad", 2), g)
    assert torch.allclose(out, g.sum(0))
    assert torch.allclose(comb.grad_scale, torch.ones(2, dtype=D))


def _pcgrad_vectors(g: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    """Algorithm 1 of Yu et al. on vectors."""
    out = []
    for i in range(g.shape[0]):
        gi = g[i].clone()
        for j in orders[i].tolist():
            d = gi @ g[j]
            if d < 0:
                gi = gi - d / (g[j] @ g[j]) * g[j]
        out.append(gi)
    return torch.stack(out)


@pytest.mark.parametrize("k", [3, 4, 7])
def test_pcgrad_gram_tracking_equals_vector_algorithm(k):
    g = _grads(k, 5, seed=k)
    orders = random_orders(k, torch.Generator().manual_seed(3))
    for i in range(k):
        assert sorted(orders[i].tolist()) == [j for j in range(k) if j != i]
    rows = pcgrad_rows(g @ g.t(), orders)
    assert torch.allclose(rows @ g, _pcgrad_vectors(g, orders), atol=1e-10)
    assert torch.allclose(pcgrad_coefficients(g @ g.t(), orders) @ g, _pcgrad_vectors(g, orders).sum(0), atol=1e-10)


def test_pcgrad_order_is_seeded_and_checkpointed():
    g = _grads(5, 6, seed=0)
    a, b = build_strategy("pcgrad", 5, seed=7), build_strategy("pcgrad", 5, seed=7)
    ca = [_run_direct(a, g)[1].grad_scale for _ in range(3)]
    cb = [_run_direct(b, g)[1].grad_scale for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(ca, cb))
    state = a.state_dict()
    nxt = _run_direct(a, g)[1].grad_scale
    c = build_strategy("pcgrad", 5, seed=99)
    c.load_state_dict(state)
    assert torch.equal(_run_direct(c, g)[1].grad_scale, nxt)
    # orders differ between draws (5 tasks: 24^5 possibilities)
    assert not torch.equal(random_orders(5, a.generator), random_orders(5, a.generator))


# ------------------------------------------------------------------ GradVac


def test_gradvac_moves_cosine_to_target():
    g = torch.tensor([[1.0, 0.0, 0.0], [-0.3, 1.0, 0.5]], dtype=D)
    targets = torch.full((2, 2), 0.4, dtype=D)
    orders = torch.tensor([[1], [0]])
    rows, new_t = gradvac_rows(g @ g.t(), targets, orders, beta=0.1)
    for i, j in [(0, 1), (1, 0)]:
        gi = rows[i] @ g
        cos = float(gi @ g[j] / (gi.norm() * g[j].norm()))
        assert cos == pytest.approx(0.4, abs=1e-10)
        phi = float(g[i] @ g[j] / (g[i].norm() * g[j].norm()))
        assert float(new_t[i, j]) == pytest.approx(0.9 * 0.4 + 0.1 * phi)


def test_gradvac_leaves_pairs_above_target_and_updates_ema():
    g = torch.tensor([[1.0, 0.2], [0.9, 0.4]], dtype=D)  # cos ~ 0.98 > target 0
    s = build_strategy("gradvac", 2, beta=0.5)
    out, comb = _run_direct(s, g)
    assert torch.allclose(out, g.sum(0))
    cos = float(g[0] @ g[1] / (g[0].norm() * g[1].norm()))
    assert torch.allclose(s.targets, torch.tensor([[0.0, 0.5 * cos], [0.5 * cos, 0.0]], dtype=D))


# ------------------------------------------------------------------ MGDA


def _simplex_grid(k: int, n: int):
    for idx in itertools.product(range(n + 1), repeat=k - 1):
        if sum(idx) <= n:
            yield np.array([*idx, n - sum(idx)], dtype=float) / n


@pytest.mark.parametrize("k,n", [(2, 2000), (3, 300)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mgda_min_norm_matches_brute_force(k, n, seed):
    g = _grads(k, 4, seed=seed + 10 * k)
    if seed == 2:
        g[1] = -0.5 * g[0] + 0.01 * g[1]  # strong conflict
    m = (g @ g.t()).numpy()
    best = min(float(w @ m @ w) for w in _simplex_grid(k, n))
    s = build_strategy("mgda", k)
    out, comb = _run_direct(s, g)
    w = comb.grad_scale
    assert float(w.sum()) == pytest.approx(1.0) and bool((w >= 0).all())
    assert float(out @ out) <= best + 1e-12
    assert float(out @ out) >= best - 5e-3 * max(best, 1e-3)  # the grid is close to optimal


def test_mgda_kkt_for_seven_tasks():
    g = _grads(7, 20, seed=5)
    m = g @ g.t()
    w = min_norm_simplex(m / m.diagonal().max())
    grad = m @ w  # KKT: (M w)_i = min_j (M w)_j on the support, >= elsewhere
    lam = float(w @ grad)
    support = w > 1e-9
    assert torch.allclose(grad[support], torch.full_like(grad[support], lam), rtol=1e-6, atol=1e-9)
    assert bool((grad[~support] >= lam - 1e-9).all())


def test_mgda_zero_gradient_gives_zero_update():
    g = _grads(3, 4, seed=1)
    g[1] = 0.0
    out, _ = _run_direct(build_strategy("mgda", 3), g)
    assert float(out.norm()) < 1e-8


# ------------------------------------------------------------------ CAGrad


def _cagrad_scipy(gg: np.ndarray, alpha: float) -> np.ndarray:
    """The official implementation's inner solve (SLSQP)."""
    k = gg.shape[0]
    x0 = np.ones(k) / k
    c = alpha * math.sqrt(gg.mean() + 1e-8)
    b = x0.copy()

    def obj(x):
        return float(x @ gg @ b + c * math.sqrt(x @ gg @ x + 1e-8))

    res = minimize(obj, x0, bounds=[(0, 1)] * k, constraints=({"type": "eq", "fun": lambda x: 1 - x.sum()},))
    return res.x


@pytest.mark.parametrize("k", [2, 3, 4, 7])
@pytest.mark.parametrize("alpha", [0.2, 0.5, 0.9])
def test_cagrad_solves_inner_problem(k, alpha):
    g = _grads(k, 12, seed=k * 7 + int(alpha * 10))
    g[0] = -0.8 * g[1] + 0.2 * g[0]
    gg = (g @ g.t()).numpy()
    b = np.ones(k) / k
    c = alpha * math.sqrt(b @ gg @ b)
    coeff, w = cagrad_coefficients(g @ g.t(), alpha, rescale=0)
    w = w.numpy()
    f = lambda x: float(x @ gg @ b + c * math.sqrt(max(x @ gg @ x, 0.0)))  # noqa: E731
    ref = _cagrad_scipy(gg, alpha)
    assert w.min() >= 0 and w.sum() == pytest.approx(1.0)
    assert f(w) <= f(ref) + 1e-7 * max(1.0, abs(f(ref)))
    # primal: d = g0 + c g_w/|g_w| maximises min_i g_i.d over the ball |d - g0| <= c
    d = coeff.numpy() @ g.numpy()
    g0 = g.numpy().mean(0)
    assert np.linalg.norm(d - g0) == pytest.approx(c, rel=1e-6)
    best = (g.numpy() @ d).min()
    rng = np.random.default_rng(0)
    for _ in range(2000):
        u = rng.normal(size=g.shape[1])
        cand = g0 + c * u / np.linalg.norm(u)
        assert (g.numpy() @ cand).min() <= best + 1e-9


@pytest.mark.parametrize("rescale,divisor", [(0, lambda a: 1.0), (1, lambda a: 1 + a * a), (2, lambda a: 1 + a)])
@pytest.mark.parametrize("alpha", [0.0, 0.7])
def test_cagrad_rescale_options_against_exact_solution(rescale, divisor, alpha):
    """The official code's ``rescale``: the update ``g_0 + c g_w / ||g_w||`` (exact, 50 digits)
    divided by 1, ``1 + alpha^2`` or ``1 + alpha``; ``alpha = 0`` is the mean gradient."""
    g = _spread_grads([1.0, 0.3, 2.0], seed=6)
    gram = g @ g.t()
    s = build_strategy("cagrad", 3, alpha=alpha, rescale=rescale)
    out, _ = _run_direct(s, g)
    if alpha == 0.0:
        expect = g.mean(0) / divisor(alpha)
    else:
        exact = _exact_cagrad(gram, alpha)
        expect = torch.tensor([float(v) for v in exact], dtype=D) @ g / divisor(alpha)
    assert torch.allclose(out, expect, rtol=1e-10, atol=1e-14)


def test_cagrad_simplex_solver_direct_k12_fallback_agrees():
    g = _grads(4, 9, seed=4)
    m = g @ g.t()
    m = m / m.diagonal().max()
    c = torch.tensor(0.3, dtype=D)
    w = cagrad_simplex(m, c)
    b = torch.full((4,), 0.25, dtype=D)
    f = lambda x: float(x @ m @ b + c * torch.sqrt(x @ m @ x))  # noqa: E731
    from mtl.strategies._solvers import _projected_gradient

    w_pg = _projected_gradient(lambda x: m @ b + c * (m @ x) / torch.sqrt(x @ m @ x), m, iters=3000)
    assert f(w) <= f(w_pg) + 1e-6


@pytest.mark.parametrize("seed", [0, 1])
def test_projected_gradient_fallback_beyond_face_enumeration_reaches_the_optimum(seed, monkeypatch):
    """K = 13 > MAX_ENUM_TASKS: MGDA's and CAGrad's projected-gradient solvers (SVD-free step)
    reach the objective of the exact face enumeration (forced for the check)."""
    import mtl.strategies._solvers as solvers

    g = torch.randn(13, 40, dtype=D, generator=torch.Generator().manual_seed(seed))
    g[:, :5] += 1.0
    m = g @ g.t()
    m = m / m.diagonal().max()
    c = torch.tensor(0.4, dtype=D)
    b = torch.full((13,), 1 / 13, dtype=D)
    cagrad_obj = lambda x: float(x @ m @ b + c * torch.sqrt(x @ m @ x))  # noqa: E731
    assert solvers.MAX_ENUM_TASKS < 13
    w_pg, w_cpg = solvers.min_norm_simplex(m), solvers.cagrad_simplex(m, c)
    monkeypatch.setattr(solvers, "MAX_ENUM_TASKS", 13)
    w_ex, w_cex = solvers.min_norm_simplex(m), solvers.cagrad_simplex(m, c)
    assert float(w_pg @ m @ w_pg) == pytest.approx(float(w_ex @ m @ w_ex), rel=1e-9)
    assert cagrad_obj(w_cpg) == pytest.approx(cagrad_obj(w_cex), rel=1e-9)
    assert float(w_pg.sum()) == pytest.approx(1.0) and bool((w_pg >= 0).all())


# ------------------------------------------------------------------ IMTL-G


@pytest.mark.parametrize("k", [2, 4, 7])
def test_imtl_g_equal_projections_and_libmtl_closed_form(k):
    g = _grads(k, 15, seed=k)
    out, comb = _run_direct(build_strategy("imtl_g", k), g)
    units = g / g.norm(dim=1, keepdim=True)
    proj = units @ out
    assert torch.allclose(proj, proj.mean().expand(k), rtol=1e-8)
    assert float(comb.grad_scale.sum()) == pytest.approx(1.0)
    # LibMTL / paper closed form
    d = g[0:1] - g[1:]
    u = units[0:1] - units[1:]
    a = (g[0] @ u.t()) @ torch.linalg.inv(d @ u.t())
    alpha = torch.cat([1 - a.sum().view(1), a])
    assert torch.allclose(comb.grad_scale, alpha, atol=1e-8)


def test_imtl_g_zero_gradient_task_gets_zero_weight():
    g = _grads(4, 6, seed=2)
    g[2] = 0.0
    c = imtl_g_coefficients(g @ g.t())
    assert float(c[2]) == 0.0
    keep = [0, 1, 3]
    assert torch.allclose(c[keep], imtl_g_coefficients(g[keep] @ g[keep].t()), atol=1e-10)


# ------------------------------------------------------------------ Nash-MTL


@pytest.mark.parametrize("k", [2, 4, 7])
@pytest.mark.parametrize("scale", [1e-4, 1.0, 1e3])
def test_nash_weights_satisfy_bargaining_condition(k, scale):
    g = _grads(k, 3 * k, seed=k) * scale
    g[0] = -0.9 * g[1] + 0.1 * g[0]  # near-conflict makes the Gram matrix ill-conditioned
    m = g @ g.t()
    alpha, beta = nash_coefficients(m)
    assert bool((alpha > 0).all())
    assert torch.allclose((m @ alpha) * alpha, torch.ones(k, dtype=D), rtol=1e-8)
    # warm start from a nearby problem's solution: few iterations suffice
    m2 = m * (1 + 0.01 * torch.rand(k, k, dtype=D, generator=torch.Generator().manual_seed(1)))
    m2 = 0.5 * (m2 + m2.t())
    a2, _ = nash_coefficients(m2, iters=5, init=beta)
    assert torch.allclose((m2 @ a2) * a2, torch.ones(k, dtype=D), rtol=1e-8)


def test_nash_frobenius_normalization_matches_reference_scaling():
    g = _grads(3, 8, seed=1)
    m = g @ g.t()
    a_ref, _ = nash_coefficients(m, gram_normalization="frobenius")
    mn = m / torch.linalg.matrix_norm(m)
    assert torch.allclose((mn @ a_ref) * a_ref, torch.ones(3, dtype=D), rtol=1e-8)


def test_nash_zero_gradient_task():
    g = _grads(3, 8, seed=1)
    g[1] = 0
    a, _ = nash_coefficients(g @ g.t())
    assert float(a[1]) == 0.0
    keep = [0, 2]
    m = g[keep] @ g[keep].t()
    assert torch.allclose((m @ a[keep]) * a[keep], torch.ones(2, dtype=D), rtol=1e-8)


# ------------------------------------------------------------------ Aligned-MTL


@pytest.mark.parametrize("k", [2, 4, 7])
def test_aligned_mtl_orthogonal_equal_norm(k):
    g = _grads(k, 20, seed=k)
    b = aligned_matrix(g @ g.t())
    aligned = b @ g
    lam_min = float(torch.linalg.eigvalsh(g @ g.t()).min())
    assert torch.allclose(aligned @ aligned.t(), lam_min * torch.eye(k, dtype=D), atol=1e-8 * lam_min * k)
    out, comb = _run_direct(build_strategy("aligned_mtl", k), g)
    assert torch.allclose(out, aligned.sum(0), atol=1e-10)


def test_aligned_mtl_rank_deficient():
    """Rank 2 of 3 (g_2 = g_0 + g_1): the rank cut keeps the two non-zero singular values; the
    update is ``sigma_min U_r V_r^T`` summed over tasks (thin SVD of ``G``, ``sigma_min`` the
    smaller kept singular value)."""
    g = _grads(3, 5, seed=0)
    g[2] = g[0] + g[1]
    out, _ = _run_direct(build_strategy("aligned_mtl", 3), g)
    u, sv, vt = np.linalg.svd(g.numpy(), full_matrices=False)
    expect = (sv[1] * u[:, :2] @ vt[:2]).sum(0)
    assert np.allclose(out.numpy(), expect, rtol=1e-8, atol=1e-10)


# ------------------------------------------------------------------ loss weighting


def test_uncertainty_log_variance_gradients_match_formula():
    s = build_strategy("uncertainty", 3, kinds=["classification", "regression", "classification"])
    with torch.no_grad():
        s.log_vars.copy_(torch.tensor([0.3, -0.2, 1.0]))
    x = torch.ones(3, requires_grad=True)
    losses = torch.tensor([0.7, 1.3, 0.2]) * x
    s.backward(losses)
    L = torch.tensor([0.7, 1.3, 0.2])
    sv = torch.tensor([0.3, -0.2, 1.0])
    fac = torch.tensor([1.0, 0.5, 1.0])
    assert torch.allclose(s.log_vars.grad, -fac * torch.exp(-sv) * L + 0.5)
    assert torch.allclose(x.grad, fac * torch.exp(-sv) * L)


def test_dwa_weights_match_formula_and_sum_to_k():
    s = build_strategy("dwa", 3, temperature=2.0)
    x = torch.ones(3, requires_grad=True)
    epochs = [[1.0, 2.0, 3.0], [0.5, 1.9, 3.3], [0.4, 1.0, 3.0]]
    seen = []
    for ep in epochs:
        for scale in (0.9, 1.1):  # two steps per epoch, mean = ep
            comb = s.backward(torch.tensor(ep) * scale * x)
            seen.append(comb.loss_weights)
        s.end_epoch()
    assert torch.equal(seen[0], torch.ones(3)) and torch.equal(seen[3], torch.ones(3))
    r = torch.tensor(epochs[1]) / torch.tensor(epochs[0])
    expect = 3 * torch.exp(r / 2) / torch.exp(r / 2).sum()
    assert torch.allclose(seen[4], expect, rtol=1e-6) and torch.allclose(seen[5], expect, rtol=1e-6)
    assert float(seen[4].sum()) == pytest.approx(3.0)
    w_next = s.weights()
    r2 = torch.tensor(epochs[2]) / torch.tensor(epochs[1])
    assert torch.allclose(w_next, 3 * torch.softmax(r2 / 2, 0), rtol=1e-6)


def test_dwa_period_steps():
    s = build_strategy("dwa", 2, period_steps=1)
    x = torch.ones(2, requires_grad=True)
    for losses in ([1.0, 1.0], [0.5, 1.0]):
        s.backward(torch.tensor(losses) * x)
    r = torch.tensor([0.5, 1.0])
    assert torch.allclose(s.weights(), 2 * torch.softmax(r / 2.0, 0))


def _gradnorm_paper(grads_seq, losses_seq, alpha: float, lr: float) -> list[torch.Tensor]:
    """Chen et al. 2018, independently: ``G_i = ||grad_W w_i L_i|| = w_i ||g_i||``, ``L~_i =
    L_i(t) / L_i(0)`` with ``L(0)`` the first step's losses, ``r_i = L~_i / mean L~``; gradient
    descent (autograd) on ``sum_i |G_i - mean(G) r_i^alpha|`` with the targets constant, then
    ``w <- K w / sum w``. Returns the weights used at each step and the final ones."""
    k = grads_seq[0].shape[0]
    w = torch.ones(k, dtype=D)
    l0 = losses_seq[0]
    used = []
    for g, losses in zip(grads_seq, losses_seq):
        used.append(w.clone())
        wv = w.clone().requires_grad_(True)
        big_g = wv * g.norm(dim=1)
        ratio = (losses / l0) / (losses / l0).mean()
        target = (big_g.mean() * ratio**alpha).detach()
        (grad,) = torch.autograd.grad((big_g - target).abs().sum(), wv)
        w = w - lr * grad
        w = k * w / w.sum()
    return used + [w]


@pytest.mark.parametrize("alpha,lr", [(1.5, 0.01), (0.5, 0.03)])
def test_gradnorm_weights_follow_the_paper_over_several_steps(alpha, lr):
    """Five steps with changing gradients and losses: the weights used at every step and the
    final ones equal the paper's update computed independently, with L(0) from the first step
    (an L(0) overwritten every step, or rates from the previous step, gives other weights)."""
    k = 3
    grads_seq = [_grads(k, 6, seed=70 + t) * torch.tensor([[3.0], [1.0], [0.5]], dtype=D) for t in range(5)]
    losses_seq = [torch.tensor(v, dtype=D) for v in
                  ([1.0, 2.0, 0.5], [0.8, 1.9, 0.5], [0.5, 1.7, 0.45], [0.4, 1.2, 0.44], [0.3, 1.1, 0.4])]
    expect = _gradnorm_paper(grads_seq, losses_seq, alpha, lr)
    s = build_strategy("gradnorm", k, alpha=alpha, lr=lr)
    for t, (g, losses) in enumerate(zip(grads_seq, losses_seq)):
        _, comb = _run_direct(s, g, losses=losses)
        assert torch.allclose(comb.loss_weights.double(), expect[t], rtol=1e-6), t
    assert torch.allclose(s.weights.double(), expect[-1], rtol=1e-6)
    assert float(expect[-1].min()) > 1e-3  # the min_weight clamp (not in the paper) never acted
    # the same run with L(0) taken as each previous step's losses would differ
    shifted = _gradnorm_paper(grads_seq[1:], losses_seq[1:], alpha, lr)
    assert not torch.allclose(shifted[-1], expect[-1], rtol=1e-3)


def _famo_reference(losses_seq, k, lr=0.025, gamma=0.01, min_losses=None):
    """A transcription of the official FAMO code (torch.optim.Adam on the logits)."""
    w = torch.zeros(k, requires_grad=True)
    opt = torch.optim.Adam([w], lr=lr, weight_decay=gamma)
    min_losses = torch.zeros(k) if min_losses is None else min_losses
    weights = []
    prev = None
    for cur in losses_seq:
        if prev is not None:
            delta = (prev - min_losses + 1e-8).log() - (cur - min_losses + 1e-8).log()
            with torch.enable_grad():
                d = torch.autograd.grad(torch.softmax(w, -1), w, grad_outputs=delta.detach())[0]
            opt.zero_grad()
            w.grad = d
            opt.step()
        # weighted loss: sum(log(D) * z / c); its gradient wrt L_i is z_i / (c D_i)
        lv = cur.clone().requires_grad_(True)
        z = torch.softmax(w, -1)
        dd = lv - min_losses + 1e-8
        c = (z / dd).sum().detach()
        (dd.log() * z / c).sum().backward()
        weights.append(lv.grad.clone())
        prev = cur
    return weights, w.detach()


def test_famo_weight_update_matches_reference():
    k = 3
    seq = [torch.tensor(v) for v in ([1.0, 2.0, 0.5], [0.9, 1.5, 0.5], [0.7, 1.4, 0.45], [0.6, 1.0, 0.5], [0.5, 0.9, 0.3])]
    ref_w, ref_logits = _famo_reference(seq, k)
    s = build_strategy("famo", k)
    x = torch.ones(k, requires_grad=True)
    for cur, rw in zip(seq, ref_w):
        comb = s.backward(cur * x)
        assert torch.allclose(comb.loss_weights, rw, rtol=1e-5)
    s.update(torch.tensor([0.45, 0.85, 0.3]))  # explicit update after the last step
    ref_w2, ref_logits2 = _famo_reference([*seq, torch.tensor([0.45, 0.85, 0.3])], k)
    assert torch.allclose(s.logits, ref_logits2, atol=1e-6)


def test_famo_with_minimum_losses_and_non_default_adam_matches_reference():
    """``set_min_losses`` (the official ``min_losses``, ``L*``): weights ``z_i / (c (L_i - L*_i))``
    and log-improvements ``log(L - L*)``; at a non-default ``lr``/``gamma``."""
    k = 3
    low = torch.tensor([0.2, 0.05, 0.25])
    seq = [torch.tensor(v) for v in ([1.0, 2.0, 0.5], [0.9, 1.5, 0.45], [0.7, 1.4, 0.4], [0.6, 1.0, 0.42])]
    ref_w, ref_logits = _famo_reference(seq, k, lr=0.1, gamma=0.05, min_losses=low)
    s = build_strategy("famo", k, lr=0.1, gamma=0.05)
    s.set_min_losses(low)
    x = torch.ones(k, requires_grad=True)
    for cur, rw in zip(seq, ref_w):
        comb = s.backward(cur * x)
        assert torch.allclose(comb.loss_weights, rw, rtol=1e-5)
    # at the first step z = 1/K: w_i = (1 / (L_i - L*_i)) / sum_j 1 / (L_j - L*_j) (the mean is 1/K)
    inv = 1.0 / (seq[0] - low)
    assert torch.allclose(ref_w[0], inv / inv.sum(), rtol=1e-5)
    s.update(torch.tensor([0.5, 0.9, 0.41]))
    _, ref_logits2 = _famo_reference([*seq, torch.tensor([0.5, 0.9, 0.41])], k, lr=0.1, gamma=0.05, min_losses=low)
    assert torch.allclose(s.logits, ref_logits2, atol=1e-6)


def test_dbmtl_matches_libmtl_formula():
    k, p = 3, 5
    s = build_strategy("dbmtl", k, beta=0.9, beta_sigma=0.5)
    buf = torch.zeros(k, p, dtype=D)
    for step in range(1, 4):
        g = _grads(k, p, seed=step)
        losses = torch.tensor([0.5, 1.0, 2.0], dtype=D) * step
        out, comb = _run_direct(s, g, losses=losses)
        lg = g / (losses + 1e-8).unsqueeze(1)
        buf = lg + (0.9 / step**0.5) * (buf - lg)
        u = buf.norm(dim=1)
        alpha = u.max() / (u + 1e-8)
        assert torch.allclose(out, alpha @ buf, atol=1e-10)
        assert torch.allclose(comb.loss_weights, 1 / (losses + 1e-8))


# ------------------------------------------------------------------ contract


def test_registry_builds_every_strategy_and_rejects_unknown():
    for name in STRATEGIES:
        s = build_strategy(name, 4)
        assert s.num_tasks == 4
    with pytest.raises(ValueError, match="unknown strategy 'nope'"):
        build_strategy("nope", 2)


def test_nan_loss_raises_naming_task():
    s = build_strategy("pcgrad", 3)
    x = torch.zeros(2, dtype=D, requires_grad=True)
    losses = torch.stack([x.sum() + 1, x.sum() + float("nan"), x.sum()])
    with pytest.raises(ValueError, match=r"non-finite loss for task\(s\) \[1\]"):
        s.backward(losses, shared_parameters=[x])


def test_deferred_nan_check_raises_later_naming_the_first_bad_step():
    s = build_strategy("pcgrad", 3, check_finite="deferred")
    x = torch.zeros(2, dtype=D, requires_grad=True)
    s.raise_if_nonfinite()  # nothing recorded yet
    for step, bad in enumerate([None, 2, 0, None]):
        shift = [0.0, 0.0, 0.0]
        if bad is not None:
            shift[bad] = float("nan")
        losses = torch.stack([x.sum() + 1 + shift[0], x.sum() + 2 + shift[1], x.sum() + 3 + shift[2]])
        s.backward(losses, shared_parameters=[x])  # no raise inside the step
        if step == 0:
            s.raise_if_nonfinite()  # a clean step records nothing
    with pytest.raises(ValueError, match=r"non-finite loss for task\(s\) \[2\] at step 1"):
        s.raise_if_nonfinite()


def test_finite_check_modes_resolve_by_device():
    assert build_strategy("equal", 2).finite_check_mode(torch.device("cpu")) == "step"
    assert build_strategy("equal", 2).finite_check_mode(torch.device("cuda")) == "deferred"
    assert build_strategy("equal", 2, check_finite=True).finite_check_mode(torch.device("cuda")) == "step"
    assert build_strategy("equal", 2, check_finite=False).finite_check_mode(torch.device("cpu")) == "off"
    with pytest.raises(ValueError, match="check_finite"):
        build_strategy("equal", 2, check_finite="sometimes")
    s = build_strategy("equal", 2, check_finite=False)
    x = torch.zeros(1, dtype=D, requires_grad=True)
    s.backward(torch.stack([x.sum() + float("nan"), x.sum()]))  # "off": no error, now or later
    s.raise_if_nonfinite()


def test_gradient_strategy_without_shared_parameters_raises():
    s = build_strategy("mgda", 2)
    x = torch.ones(2, requires_grad=True)
    with pytest.raises(ValueError, match="shared_parameters"):
        s.backward(x * 2)


def _cagrad_scipy(gram: np.ndarray, alpha: float) -> np.ndarray:
    """CAGrad's coefficients (``rescale=0``) from a numerical solve of the inner problem
    ``min_{w in simplex} w^T M b + c sqrt(w^T M w)`` (SLSQP from several starts)."""
    k = gram.shape[0]
    b = np.full(k, 1.0 / k)
    c = alpha * math.sqrt(b @ gram @ b)

    def f(w):
        return w @ gram @ b + c * math.sqrt(max(w @ gram @ w, 0.0))

    best = None
    for start in [b, *np.eye(k)]:
        r = minimize(f, start, method="SLSQP", bounds=[(0, 1)] * k, options={"ftol": 1e-15, "maxiter": 500},
                     constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0}])
        if best is None or r.fun < best.fun:
            best = r
    w = np.clip(best.x, 0, None)
    gw = math.sqrt(max(w @ gram @ w, 0.0))
    if gw < 1e-9 * math.sqrt(gram.diagonal().max()):
        # the minimiser has g_w = 0 (a zero task's vertex, F = 0): every d in the ball has
        # min_i g_i . d <= g_1 . d = 0; lambda = 0 keeps the ball's centre, d = g_0 (the
        # module's "zero task gradients only shrink g_0")
        return b
    return b + c / gw * w


@pytest.mark.parametrize("name", [*GRADIENT_STRATEGIES, "dbmtl", "gradnorm"])
def test_zero_task_gradient_gets_the_documented_update(name):
    """Task 1's gradient is zero; each strategy's documented handling, computed independently:
    PCGrad / GradVac (first step, targets 0): never projected against, contributes nothing (the
    two-task PCGrad of the others); MGDA(-UB): 0 is in the hull, zero update; CAGrad: only
    shrinks g_0 (numerical solve of the inner problem); IMTL-G and Nash-MTL: alpha_1 = 0, the
    others solved among themselves; Aligned-MTL: the rank cut (SVD of the rank-2 stack);
    DB-MTL: no effect on the shared update; GradNorm: the plain sum this step, and task 1's
    weight gets no gradient step (only the renormalisation)."""
    g = _grads(3, 5, seed=9)
    g[1] = 0.0
    a, c = g[0], g[2]
    out, comb = _run_direct(build_strategy(name, 3), g)
    if name in ("pcgrad", "gradvac"):
        d = float(a @ c)
        expect = a + c - (min(d, 0.0) / float(c @ c)) * c - (min(d, 0.0) / float(a @ a)) * a
        assert d < 0  # a conflicting pair: the projection matters
    elif name in ("mgda", "mgda_ub"):
        expect = torch.zeros(5, dtype=D)
    elif name == "cagrad":
        expect = torch.from_numpy(_cagrad_scipy((g @ g.t()).numpy(), 0.5) / 1.25) @ g
        assert torch.allclose(expect, g.mean(0) / 1.25)  # here: g_0 = (g_0 + g_2) / 3, shrunk
    elif name == "imtl_g":
        sub = torch.stack([a, c])
        expect = _vec(_exact_imtl(sub @ sub.t())) @ sub
    elif name == "nash_mtl":
        sub = torch.stack([a, c])
        gram = sub @ sub.t()
        alpha = _vec(_exact_nash(gram))
        expect = alpha * min(1.0, 1.0 / (math.sqrt(float(alpha @ gram @ alpha)) + 1e-6)) @ sub
    elif name == "aligned_mtl":
        u, sv, vt = np.linalg.svd(g.numpy(), full_matrices=False)
        keep = sv**2 > (sv**2).max() * 3 * np.finfo(np.float32).eps
        assert keep.sum() == 2
        expect = torch.from_numpy((sv[keep].min() * u[:, keep] @ vt[keep]).sum(0))
    elif name == "dbmtl":  # losses 1: m_i = 0.1 g_i, alpha_i = max ||m|| / ||m_i||
        n = g.norm(dim=1)
        expect = 0.1 * n.max() * (a / n[0] + c / n[2])
    else:  # gradnorm
        expect = g.sum(0)
        n = g.norm(dim=1)
        step = torch.sign(n - n.mean()) * n  # rates 1 at the first step: target = mean G
        new = (1 - 0.025 * step).clamp_min(1e-3)
        assert torch.allclose(build_strategy(name, 3).weights, torch.ones(3))
        s = build_strategy(name, 3)
        _run_direct(s, g)
        assert torch.allclose(s.weights.double(), 3 * new / new.sum(), rtol=1e-6)
        assert float(step[1]) == 0.0
    assert torch.allclose(out, expect, rtol=1e-6, atol=1e-9), (name, out, expect)
    assert bool(torch.isfinite(comb.loss_weights).all())


def _vec(m) -> torch.Tensor:
    return torch.tensor([float(v) for v in m], dtype=D)


@pytest.mark.parametrize("name", ["pcgrad", "cagrad", "nash_mtl"])
def test_all_zero_gradients(name):
    out, _ = _run_direct(build_strategy(name, 2), torch.zeros(2, 3, dtype=D))
    assert torch.equal(out, torch.zeros(3, dtype=D))


def test_state_dict_roundtrip_keeps_state():
    for name, kw in [("gradvac", {"beta": 0.5}), ("famo", {}), ("dwa", {"period_steps": 1}), ("gradnorm", {}),
                     ("dbmtl", {}), ("pcgrad", {"refresh_every": 2}), ("nash_mtl", {}), ("uncertainty", {})]:
        a = build_strategy(name, 3, **kw)
        for step in range(3):
            _run_direct(a, _grads(3, 4, seed=step), losses=[1.0 + step, 2.0, 0.5 * (step + 1)])
        b = build_strategy(name, 3, **kw)
        buf = io.BytesIO()
        torch.save(a.state_dict(), buf)
        buf.seek(0)
        b.load_state_dict(torch.load(buf, weights_only=True))
        g = _grads(3, 4, seed=11)
        oa, ca = _run_direct(a, g, losses=[1.0, 1.5, 2.0])
        ob, cb = _run_direct(b, g, losses=[1.0, 1.5, 2.0])
        assert torch.allclose(oa, ob) and torch.allclose(ca.loss_weights, cb.loss_weights), name


def test_grad_reducer_sees_stack_and_stat_reducer_sees_losses():
    s = build_strategy("pcgrad", 2)
    seen = {}

    def reduce_stack(t):
        seen["stack"] = t.shape
        return t * 2

    s.grad_reducer = reduce_stack
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=D)
    out, _ = _run_direct(s, g)
    assert seen["stack"] == (2, 2)
    assert torch.allclose(out, 2 * g.sum(0))
    d = build_strategy("dwa", 2, period_steps=1)
    d.stat_reducer = lambda t: t * 0 + torch.tensor([2.0, 4.0])
    x = torch.ones(2, requires_grad=True)
    d.backward(x * 1.0)
    d.backward(x * 1.0)
    assert torch.allclose(d.weights(), torch.ones(2))  # both periods saw the reduced [2, 4]


# ------------------------------------------------------------------ any gradient scale (issue 10)
# Independent references at 50 digits (mpmath): brute force over the faces of the simplex for
# MGDA and CAGrad (each face's stationarity equations, no ridge, no rescaling), IMTL-G's
# defining linear system, Nash-MTL by damped Newton to a 1e-40 decrement. The float64 Gram
# matrix handed to the code is taken as exact.

_DPS = 50


def _mp(t) -> mp.matrix:
    k = t.shape[0]
    return mp.matrix([[mp.mpf(float(t[i, j])) for j in range(k)] for i in range(k)])


def _mp_quad(m: mp.matrix, x, y=None):
    y = x if y is None else y
    return mp.fsum(x[i] * m[i, j] * y[j] for i in range(m.rows) for j in range(m.rows))


def _mp_faces(k: int):
    for r in range(1, k + 1):
        yield from itertools.combinations(range(k), r)


def _mp_sub(m: mp.matrix, face) -> mp.matrix:
    return mp.matrix([[m[i, j] for j in face] for i in face])


def _exact_mgda(gram) -> mp.matrix:
    """``argmin_{w in simplex} w^T M w``: on each face ``M_S w = mu 1``; the least feasible."""
    with mp.workdps(_DPS):
        m = _mp(gram)
        k = m.rows
        best = None
        for face in _mp_faces(k):
            u = mp.lu_solve(_mp_sub(m, face), mp.matrix([1] * len(face)))
            total = mp.fsum(u)
            if total <= 0 or min(u) < 0:
                continue
            w = mp.matrix([0] * k)
            for i, j in enumerate(face):
                w[j] = u[i] / total
            f = _mp_quad(m, w)
            if best is None or f < best[0]:
                best = (f, w)
        return best[1]


def _exact_cagrad(gram, alpha: float) -> mp.matrix:
    """CAGrad's coefficients ``b + c / ||g_w|| w`` (``rescale=0``) with ``w`` the exact minimiser
    of ``w^T M b + c sqrt(w^T M w)`` over the simplex: every vertex, and on every face the
    stationary points of ``M_S w = (s / c)(mu 1 - (M b)_S)`` with ``w^T M w = s^2``, ``1^T w = 1``
    (both roots of the quadratic in ``mu``)."""
    with mp.workdps(_DPS):
        m = _mp(gram)
        k = m.rows
        b = mp.matrix([mp.mpf(1) / k] * k)
        mb = m * b
        c = alpha * mp.sqrt(_mp_quad(m, b))

        def f(w):
            return mp.fsum(w[i] * mb[i] for i in range(k)) + c * mp.sqrt(max(_mp_quad(m, w), 0))

        cands = []
        for i in range(k):
            e = mp.matrix([0] * k)
            e[i] = 1
            cands.append(e)
        for face in _mp_faces(k):
            ms = _mp_sub(m, face)
            u = mp.lu_solve(ms, mp.matrix([1] * len(face)))
            v = mp.lu_solve(ms, mp.matrix([mb[j] for j in face]))
            a, beta = mp.fsum(u), mp.fsum(v)
            gamma = mp.fsum(v[i] * mb[j] for i, j in enumerate(face))
            disc = beta * beta - a * (gamma - c * c)
            if disc <= 0:
                continue
            for sign in (1, -1):
                mu = (beta + sign * mp.sqrt(disc)) / a
                y = [mu * u[i] - v[i] for i in range(len(face))]
                total = mp.fsum(y)
                if total <= 0:
                    continue
                w = mp.matrix([0] * k)
                for i, j in enumerate(face):
                    w[j] = y[i] / total
                if min(w) >= 0:
                    cands.append(w)
        w = min(cands, key=f)
        lam = c / mp.sqrt(_mp_quad(m, w))
        return mp.matrix([b[i] + lam * w[i] for i in range(k)])


def _exact_imtl(gram) -> mp.matrix:
    """``alpha = M^{-1} n / 1^T M^{-1} n`` (``M alpha = t n``: equal projections on unit gradients)."""
    with mp.workdps(_DPS):
        m = _mp(gram)
        a = mp.lu_solve(m, mp.matrix([mp.sqrt(m[i, i]) for i in range(m.rows)]))
        return a / mp.fsum(a)


def _exact_nash(gram) -> mp.matrix:
    """The positive solution of ``(M alpha) alpha = 1`` by damped Newton at 50 digits."""
    with mp.workdps(_DPS):
        m = _mp(gram)
        k = m.rows
        a = mp.matrix([1 / mp.sqrt(k * m[i, i]) for i in range(k)])
        for _ in range(2000):
            g = m * a - mp.matrix([1 / a[i] for i in range(k)])
            delta = -mp.lu_solve(m + mp.diag([1 / a[i] ** 2 for i in range(k)]), g)
            dec = mp.sqrt(-mp.fsum(g[i] * delta[i] for i in range(k)))
            a = a + (1 / (1 + dec) if dec > 0.25 else 1) * delta
            if dec < mp.mpf(10) ** -40:
                break
        assert max(abs((m * a)[i] * a[i] - 1) for i in range(k)) < mp.mpf(10) ** -30
        return a


def _update_error(gram, coeff, exact: mp.matrix) -> float:
    """``||sum_i (c_i - c*_i) g_i|| / ||sum_i c*_i g_i||`` from the Gram matrix, at 50 digits."""
    with mp.workdps(_DPS):
        m = _mp(gram)
        d = mp.matrix([mp.mpf(float(coeff[i])) - exact[i] for i in range(m.rows)])
        return float(mp.sqrt(_mp_quad(m, d)) / mp.sqrt(_mp_quad(m, exact)))


def _spread_grads(norms, seed: int, p: int = 12) -> torch.Tensor:
    """Random directions (task 0 conflicting with task 1) with the given norms."""
    g = _grads(len(norms), p, seed)
    g = g / g.norm(dim=1, keepdim=True)
    g[0] = -0.6 * g[1] + 0.8 * g[0]
    g = g / g.norm(dim=1, keepdim=True)
    return g * torch.tensor(norms, dtype=D).unsqueeze(1)


# norms spread over 10^3 and 10^5 (the largest ratio of two tasks' norms), a small or a large
# odd one out, and mixed
SPREADS = [
    [1.0, 1e-3, 1.0, 0.5],
    [1.0, 1e3, 0.7],
    [1e-3, 0.1, 1.0],
    [1.0, 1e-5, 1.0, 0.3],
    [1e5, 1.0, 2.0, 1.0],
    [1e-2, 1.0, 1e3],
    [1e-3, 1e-1, 1e2, 1.0],
]


def _gram_strategy(name: str, k: int, gram: torch.Tensor) -> torch.Tensor:
    ones = torch.ones(k, dtype=D)
    return build_strategy(name, k, **({"max_norm": 0.0} if name == "nash_mtl" else {})).combine(ones, ones, None, gram).grad_scale


@pytest.mark.parametrize("norms", SPREADS, ids=lambda n: "-".join(f"{x:g}" for x in n))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gram_strategies_match_exact_optimum_at_any_gradient_scale(norms, seed):
    """MGDA, MGDA-UB, CAGrad, IMTL-G and Nash-MTL (unclipped) give the update of the exact
    optimum of their own problem to 1e-8 relative, with task-gradient norms spread over 10^5."""
    g = _spread_grads(norms, seed)
    gram = g @ g.t()
    k = len(norms)
    exact = {"mgda": _exact_mgda(gram), "cagrad": _exact_cagrad(gram, 0.5), "imtl_g": _exact_imtl(gram),
             "nash_mtl": _exact_nash(gram)}
    exact["mgda_ub"] = exact["mgda"]
    for name, ref in exact.items():
        if name == "cagrad":
            coeff, _ = cagrad_coefficients(gram, 0.5, rescale=0)
        else:
            coeff = _gram_strategy(name, k, gram)
        assert _update_error(gram, coeff, ref) < 1e-8, name


@pytest.mark.parametrize("norms", SPREADS, ids=lambda n: "-".join(f"{x:g}" for x in n))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cagrad_update_agrees_in_sign_with_every_task_like_the_exact_one(norms, seed):
    """Where the exact CAGrad update has a positive inner product with every task gradient, so
    does the computed one, and each ``g_i . d / (||g_i|| ||d||)`` agrees to 1e-8. (Before the
    scale-free solver, the [0.01, 1, 1000] cases conflicted with the small task.)"""
    g = _spread_grads(norms, seed)
    gram = g @ g.t()
    coeff, _ = cagrad_coefficients(gram, 0.5, rescale=0)
    exact = _exact_cagrad(gram, 0.5)
    with mp.workdps(_DPS):
        m = _mp(gram)
        gd_exact = m * exact
        dn = mp.sqrt(_mp_quad(m, exact))
        cos_exact = [float(gd_exact[i] / (mp.sqrt(m[i, i]) * dn)) for i in range(m.rows)]
    gd = gram @ coeff
    cos = (gd / (gram.diagonal().sqrt() * (coeff @ gram @ coeff).sqrt())).tolist()
    assert cos == pytest.approx(cos_exact, abs=1e-8)
    if min(cos_exact) > 0:
        assert float(gd.min()) > 0


@pytest.mark.parametrize("ratio", [1e-3, 1e-5, 1e3])
def test_imtl_g_equal_projections_at_spread_norms(ratio):
    """IMTL-G's defining property: equal projections of the update on every unit task gradient
    (to 1e-10 relative) when one task's norm is ``ratio`` times the others'."""
    g = _spread_grads([1.0, ratio, 0.8, 1.3], seed=3)
    out = imtl_g_coefficients(g @ g.t()) @ g
    proj = (g / g.norm(dim=1, keepdim=True)) @ out
    assert torch.allclose(proj, proj.mean().expand(4), rtol=1e-10, atol=0)


def test_nash_abrupt_change_after_warm_steps_meets_the_bargaining_equations():
    """K = 7: warm steps on strongly conflicting gradients (four nearly opposed to one), then the
    gradients turn nearly parallel. The warm start from the conflict (weights up to ~5e3 on the
    correlation scale) is far from the new solution; the result still solves
    ``(G G^T alpha) alpha = 1`` and equals the high-precision solution."""
    k = 7
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(k, 20, dtype=D, generator=gen)
    conflict = base.clone()
    conflict[1:4] = -conflict[0] + 1e-3 * base[1:4]
    parallel = base[0] + 1e-2 * torch.randn(k, 20, dtype=D, generator=gen)
    scales = torch.tensor([1, 1e-2, 1e2, 1, 1e-1, 1, 1e3], dtype=D).unsqueeze(1)
    s = build_strategy("nash_mtl", k, max_norm=0.0)
    ones = torch.ones(k, dtype=D)
    for g in [conflict * scales] * 3 + [parallel * scales, conflict * scales]:
        gram = g @ g.t()
        alpha = s.combine(ones, ones, None, gram).grad_scale
        assert bool((alpha > 0).all())
        assert torch.allclose((gram @ alpha) * alpha, ones, rtol=0, atol=1e-7)
        assert _update_error(gram, alpha, _exact_nash(gram)) < 1e-8


def test_nash_warm_start_is_used_when_converged():
    """A warm start at the solution stays there in one Newton step; the cold start alone
    (from ones) needs more on an ill-conditioned problem, so a 1-step solve with the warm start
    beats one without it."""
    g = _spread_grads([1.0, 1e-2, 3.0, 1.0, 0.5], seed=4)
    g[2] = -g[1] / 1e-2 * 3.0 + 1e-3 * g[2]  # near-opposed pair: ill-conditioned
    m = g @ g.t()
    _, beta = nash_coefficients(m, iters=40)
    warm, _ = nash_coefficients(m, iters=1, init=beta)
    cold, _ = nash_coefficients(m, iters=1)
    ones = torch.ones(5, dtype=D)
    assert torch.allclose((m @ warm) * warm, ones, atol=1e-8)
    assert not torch.allclose((m @ cold) * cold, ones, atol=1e-3)


@pytest.mark.parametrize("max_norm", [1.0, 0.3, 10.0])
def test_nash_clips_the_update_norm_like_the_reference(max_norm):
    """The reference calls clip_grad_norm_(shared, max_norm) after the backward: the update is
    ``d * min(1, max_norm / (||d|| + 1e-6))`` with ``d`` the exact Nash update, whose norm is
    ``sqrt(K)`` (``alpha^T M alpha = sum_i alpha_i (M alpha)_i = K``)."""
    k = 4
    g = _spread_grads([1.0, 1e-3, 2.0, 1.0], seed=5)
    gram = g @ g.t()
    x = torch.zeros(g.shape[1], dtype=D, requires_grad=True)
    s = build_strategy("nash_mtl", k, max_norm=max_norm)
    s.backward(g @ x + 1.0, shared_parameters=[x])
    with mp.workdps(_DPS):
        exact = _exact_nash(gram)
        d = np.array([float(v) for v in exact]) @ g.numpy()
    assert np.linalg.norm(d) == pytest.approx(math.sqrt(k), rel=1e-10)
    expect = d * min(1.0, max_norm / (np.linalg.norm(d) + 1e-6))
    assert np.allclose(x.grad.numpy(), expect, rtol=1e-9, atol=1e-12 * np.abs(expect).max())
    assert torch.equal(clip_coefficients(torch.ones(2, dtype=D), torch.eye(2, dtype=D), 0.0), torch.ones(2, dtype=D))


def test_dbmtl_default_keeps_the_ema_factor_constant():
    """LibMTL's default DB_beta_sigma = 0: the buffer is ``m_t = g_t + 0.9 (m_{t-1} - g_t)`` at
    every step (the factor does not decay with t)."""
    k, p = 3, 5
    s = build_strategy("dbmtl", k)
    buf = torch.zeros(k, p, dtype=D)
    for step in range(1, 7):
        g = _grads(k, p, seed=40 + step)
        losses = torch.tensor([0.5, 1.0, 2.0], dtype=D) + 0.1 * step
        out, _ = _run_direct(s, g, losses=losses)
        lg = g / (losses + 1e-8).unsqueeze(1)
        buf = lg + 0.9 * (buf - lg)
        u = buf.norm(dim=1)
        assert torch.allclose(out, (u.max() / (u + 1e-8)) @ buf, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ options at non-default values


@pytest.mark.parametrize("normalization", ["l2", "loss", "loss+"])
def test_mgda_normalizations_against_exact_min_norm(normalization):
    """The reference code's gradient normalisation: the min-norm point of the hull of
    ``g_i / n_i`` (``n_i = ||g_i||``, ``L_i`` or ``L_i ||g_i||``), applied as ``c_i = w_i / n_i``."""
    g = _spread_grads([1.0, 0.05, 3.0, 0.7], seed=7)
    losses = torch.tensor([0.7, 0.2, 1.5, 0.9], dtype=D)
    norms = g.norm(dim=1)
    n = {"l2": norms, "loss": losses, "loss+": losses * norms}[normalization]
    gn = g / n.unsqueeze(1)
    w = torch.tensor([float(v) for v in _exact_mgda(gn @ gn.t())], dtype=D)
    out, comb = _run_direct(build_strategy("mgda", 4, normalization=normalization), g, losses=losses)
    assert torch.allclose(comb.grad_scale, w / n, rtol=1e-9, atol=1e-14)
    assert torch.allclose(out, (w / n) @ g, rtol=1e-9, atol=1e-14)
    plain = build_strategy("mgda", 4).combine(losses, losses, None, g @ g.t()).grad_scale
    assert not torch.allclose(plain, w / n, rtol=1e-3)  # the option changes the answer


@pytest.mark.parametrize("scale_mode", ["median", "rmse"])
def test_aligned_mtl_scale_modes_against_svd(scale_mode):
    """Official code: with ``G = U S V^T`` the aligned gradients are ``sigma U V^T`` with
    ``sigma^2`` the (lower, as torch.median) median or the mean of the eigenvalues ``S^2``."""
    k = 4
    g = _spread_grads([1.0, 0.3, 2.0, 0.8], seed=8)
    u, sv, vt = np.linalg.svd(g.numpy(), full_matrices=False)
    lam = np.sort(sv**2)
    scale2 = lam[(k - 1) // 2] if scale_mode == "median" else lam.mean()
    expect = (math.sqrt(scale2) * u @ vt).sum(0)
    out, _ = _run_direct(build_strategy("aligned_mtl", k, scale_mode=scale_mode), g)
    assert np.allclose(out.numpy(), expect, rtol=1e-9, atol=1e-12)


def test_dwa_non_default_temperature():
    """``w_k = K exp(r_k / T) / sum_i exp(r_i / T)`` at ``T = 0.5`` (sharper than the default 2)."""
    s = build_strategy("dwa", 3, temperature=0.5)
    x = torch.ones(3, requires_grad=True)
    epochs = [[1.0, 2.0, 3.0], [0.5, 2.2, 2.7]]
    for ep in epochs:
        s.backward(torch.tensor(ep) * x)
        s.end_epoch()
    comb = s.backward(torch.tensor([0.4, 2.0, 2.6]) * x)
    r = [b / a for a, b in zip(*epochs)]
    e = [math.exp(v / 0.5) for v in r]
    expect = torch.tensor([3 * v / sum(e) for v in e])
    assert torch.allclose(comb.loss_weights, expect, rtol=1e-6)
    assert not torch.allclose(expect, 3 * torch.softmax(torch.tensor(r) / 2.0, 0), rtol=1e-2)


def test_non_finite_loss_error_carries_tasks_step_and_losses():
    from mtl.strategies import NonFiniteLossError

    s = build_strategy("famo", 3)
    x = torch.zeros(2, dtype=D, requires_grad=True)
    s.backward(torch.stack([x.sum() + 1, x.sum() + 2, x.sum() + 3]))
    with pytest.raises(NonFiniteLossError, match=r"^FAMO: non-finite loss for task\(s\) \[0, 2\] at step 1") as info:
        s.backward(torch.stack([x.sum() + float("inf"), x.sum() + 2, x.sum() + float("nan")]))
    assert info.value.tasks == [0, 2] and info.value.step == 1
    assert info.value.losses[0] == math.inf and info.value.losses[1] == 2.0 and math.isnan(info.value.losses[2])


def test_dwa_period_means_with_unequal_lengths_and_empty_periods():
    """A period's loss is its mean over its own steps (2 steps, then 3); an end_epoch with no
    step in between changes nothing."""
    s = build_strategy("dwa", 2)
    x = torch.ones(2, requires_grad=True)
    periods = [[[1.0, 2.0], [3.0, 2.0]], [[1.0, 1.0], [2.0, 1.0], [3.0, 7.0]]]
    for period in periods:
        for losses in period:
            s.backward(torch.tensor(losses) * x)
        s.end_epoch()
    s.end_epoch()  # empty: no step since the last one
    means = [torch.tensor(p).mean(0) for p in periods]  # [2, 2] and [2, 3]
    r = means[1] / means[0]
    assert torch.allclose(s.weights(), 2 * torch.softmax(r / 2.0, 0))
    assert torch.allclose(s.history, torch.stack([means[1], means[0]]))


def test_gradvac_options_are_checked_and_seeded():
    for beta in (0.0, 1.0):
        build_strategy("gradvac", 2, beta=beta)
    for beta in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"^GradVac: beta must be in \[0, 1\], got"):
            build_strategy("gradvac", 2, beta=beta)
    with pytest.raises(ValueError, match="^CAGrad: rescale must be 0, 1 or 2, got 3$"):
        build_strategy("cagrad", 2, rescale=3)
    assert torch.equal(build_strategy("gradvac", 3, seed=7).generator.get_state(),
                       torch.Generator().manual_seed(7).get_state())


def test_gradvac_skips_pairs_with_a_zero_gradient_in_the_ema():
    """Non-zero targets for the pairs with task 1, whose gradient is zero: they are not
    updated (no EMA step), while the pair (0, 2) is."""
    s = build_strategy("gradvac", 3, beta=0.5)
    s.targets.fill_(0.3)
    g = _grads(3, 4, seed=2)
    g[1] = 0.0
    _run_direct(s, g)
    t = s.targets
    for i, j in [(0, 1), (1, 0), (2, 1), (1, 2)]:
        assert float(t[i, j]) == 0.3, (i, j)
    cos02 = float(g[0] @ g[2] / (g[0].norm() * g[2].norm()))
    assert float(t[0, 2]) == pytest.approx(0.5 * 0.3 + 0.5 * cos02, abs=1e-12)


# ------------------------------------------------------------------ the contract's errors


class _WritesGradScale(STRATEGIES["equal"]):
    """A loss-weighting strategy that (wrongly) returns gradient coefficients: no task
    gradients were taken, so the backward has nothing to combine."""

    def combine(self, losses, stats, grads, gram):
        from mtl.strategies import Combination

        return Combination(loss_weights=torch.ones_like(losses), grad_scale=torch.ones_like(losses))


class _WritesSharedGrad(STRATEGIES["equal"]):
    """Returns a direct shared gradient (like DB-MTL) without asking for task gradients."""

    def combine(self, losses, stats, grads, gram):
        from mtl.strategies import Combination

        return Combination(loss_weights=torch.ones_like(losses), shared_grad=torch.ones(2, dtype=D))


@pytest.mark.parametrize("kwargs,message", [
    ({"num_tasks": 0}, "num_tasks must be a positive int, got 0"),
    ({"num_tasks": 2.0}, "num_tasks must be a positive int, got 2.0"),
    ({"refresh_every": 0}, "refresh_every must be a positive int, got 0"),
    ({"refresh_every": 2.0}, "refresh_every must be a positive int, got 2.0"),
    ({"embedding_grad": "sum"}, "embedding_grad must be 'combined' or 'plain', got 'sum'"),
    ({"check_finite": "sometimes"},
     "check_finite must be one of ['False', 'True', 'auto', 'deferred', 'off', 'step'], got 'sometimes'"),
    ({"check_finite": 1.0}, "check_finite must be one of"),
])
def test_strategy_arguments_are_checked_by_name(kwargs, message):
    args = {"num_tasks": 2, **kwargs}
    with pytest.raises(ValueError, match="^" + __import__("re").escape(message)):
        build_strategy("pcgrad", args.pop("num_tasks"), **args)
    if "check_finite" not in kwargs:  # every argument is checked before any state is built
        with pytest.raises(ValueError, match="^" + __import__("re").escape(message)):
            STRATEGIES["uncertainty"](**{"num_tasks": 2, **kwargs})


def test_backward_input_errors_name_what_is_wrong():
    x = torch.zeros(3, dtype=D, requires_grad=True)
    losses = torch.stack([x.sum() + 1, x.sum() + 2])
    with pytest.raises(ValueError, match=r"^StaticWeights: expected losses of shape \[2\], got \(3,\)$"):
        build_strategy("equal", 2).backward(torch.ones(3, dtype=D))
    with pytest.raises(ValueError, match=r"^StaticWeights: expected losses of shape \[2\], got \(2, 1\)$"):
        build_strategy("equal", 2).backward(losses.unsqueeze(1))
    s = build_strategy("cagrad", 2)
    s.task_grad_scale()
    with pytest.raises(ValueError, match=r"^task_grad_scale must be the tensor returned by strategy\.task_grad_scale\(\) "
                                         r"for this step$"):
        s.backward(losses, shared_parameters=[x], task_grad_scale=torch.ones(2))
    for name, kw in [("mgda", {}), ("cagrad", {"embedding_grad": "plain"})]:
        with pytest.raises(ValueError, match=r"^(MGDA|CAGrad) needs shared_parameters= \(the dense shared parameters\)$"):
            build_strategy(name, 2, **kw).backward(losses, shared_parameters=[])
    ub = build_strategy("mgda_ub", 2)
    with pytest.raises(ValueError, match="^MGDAUB: representation gradients need a model called with task_grad_scale$"):
        ub.backward(losses, shared_parameters=[x], representation=x * 1.0)


@pytest.mark.parametrize("embedding_grad,rows", [("combined", 2), ("plain", 1)])
def test_task_gradients_of_the_wrong_shape_are_refused(embedding_grad, rows):
    """A ``task_gradients_fn`` must return ``[len(tasks), P]``; the plain-embedding mode asks for
    ``K - 1`` rows."""
    x = torch.zeros(3, dtype=D, requires_grad=True)
    losses = torch.stack([x.sum() + 1, 2 * x.sum()])
    s = build_strategy("cagrad", 2, embedding_grad=embedding_grad)
    asked = []

    def wrong(ls, params, tasks):
        asked.append(list(tasks))
        return torch.zeros(len(tasks), 5, dtype=D)

    with pytest.raises(ValueError, match=rf"^task gradients have shape \({rows}, 5\), expected \({rows}, 3\)$"):
        s.backward(losses, shared_parameters=[x], task_gradients_fn=wrong)
    assert asked == [list(range(rows))]


def test_a_combination_the_backward_cannot_apply_is_refused():
    x = torch.zeros(2, dtype=D, requires_grad=True)
    losses = torch.stack([x.sum() + 1, 2 * x.sum()])
    with pytest.raises(ValueError, match="^_WritesGradScale: no task gradients to combine$"):
        _WritesGradScale(2).backward(losses, shared_parameters=[x])
    with pytest.raises(ValueError, match="^_WritesSharedGrad needs shared_parameters= to write the combined gradient$"):
        _WritesSharedGrad(2).backward(losses)
    # with the parameters, the direct gradient is written and the shared .grad that was there stays
    x.grad = torch.full((2,), 0.5, dtype=D)
    _WritesSharedGrad(2).backward(losses, shared_parameters=[x])
    assert torch.equal(x.grad, torch.full((2,), 1.5, dtype=D))


@pytest.mark.parametrize("name", ["mgda", "cagrad", "nash_mtl"])
def test_plain_embedding_mode_with_an_unused_shared_parameter_matches_the_combined_mode(name):
    """``embedding_grad="plain"`` forms task K's shared gradient as the plain sum minus the
    others; a shared parameter no loss reaches (``.grad`` stays ``None`` in that backward) counts
    as zeros, so both modes write the same shared update, and earlier ``.grad`` is kept."""
    g = _grads(3, 4, seed=5)
    out = {}
    for mode in ("combined", "plain"):
        x = torch.zeros(4, dtype=D, requires_grad=True)
        unused = torch.zeros(2, dtype=D, requires_grad=True)
        unused.grad = torch.full((2,), 7.0, dtype=D)
        comb = build_strategy(name, 3, embedding_grad=mode).backward(g @ x + 1.0, shared_parameters=[x, unused])
        assert torch.equal(unused.grad, torch.full((2,), 7.0, dtype=D))
        out[mode] = (x.grad.clone(), comb.grad_scale)
    assert torch.allclose(out["plain"][1], out["combined"][1], rtol=1e-9)
    assert torch.allclose(out["plain"][0], out["combined"][1] @ g, rtol=1e-9)
    assert torch.allclose(out["combined"][0], out["combined"][1] @ g, rtol=1e-9)


def _nash_steps(strategy, g: torch.Tensor, steps: int) -> torch.Tensor:
    """Run ``steps`` backward steps of ``strategy`` on task gradients ``g``; the last ``c``."""
    for _ in range(steps):
        _, comb = _run_direct(strategy, g)
    return comb.grad_scale


def test_nash_warm_start_option_carries_newton_across_steps_and_checkpoints():
    """With one Newton iteration per step, the default warm start continues from the previous
    step's solution, so repeated steps on the same (ill-conditioned) gradients converge to the
    bargaining solution ``(G alpha) alpha = 1``, also after a checkpoint round trip;
    ``warm_start=False`` restarts cold every step and stays where one iteration gets."""
    g = _spread_grads([1.0, 1e-2, 3.0, 1.0, 0.5], seed=4)
    g[2] = -g[1] / 1e-2 * 3.0 + 1e-3 * g[2]
    m = g @ g.t()
    ones = torch.ones(5, dtype=D)
    warm = build_strategy("nash_mtl", 5, iters=1, max_norm=0.0)
    c = _nash_steps(warm, g, 40)
    assert torch.allclose((m @ c) * c, ones, atol=1e-8)
    cold = build_strategy("nash_mtl", 5, iters=1, max_norm=0.0, warm_start=False)
    c_cold = _nash_steps(cold, g, 40)
    assert not torch.allclose((m @ c_cold) * c_cold, ones, atol=1e-3)
    restored = build_strategy("nash_mtl", 5, iters=1, max_norm=0.0)
    restored.load_state_dict(warm.state_dict())
    c2 = _nash_steps(restored, g, 1)
    assert torch.allclose((m @ c2) * c2, ones, atol=1e-8)
    with pytest.raises(ValueError, match=r"^NashMTL: max_norm must be >= 0, got -1\.0$"):
        build_strategy("nash_mtl", 2, max_norm=-1.0)


@pytest.mark.parametrize("refresh_every", [1, 2])
def test_plain_embedding_mode_counts_every_step(refresh_every):
    """Refresh steps of the plain-embedding mode count like any other: after 4 steps the
    strategy is at step 4 (checkpointed), and a non-finite loss on the next names step 4."""
    g = _grads(3, 4, seed=6)
    s = build_strategy("mgda", 3, embedding_grad="plain", refresh_every=refresh_every)
    for _ in range(4):
        x = torch.zeros(4, dtype=D, requires_grad=True)
        scale = s.task_grad_scale()
        s.backward((g @ x + 1.0) * scale, shared_parameters=[x], task_grad_scale=scale)
    assert s.step_count == 4 and s.get_extra_state()["step_count"] == 4
    x = torch.zeros(4, dtype=D, requires_grad=True)
    with pytest.raises(ValueError, match=r"non-finite loss for task\(s\) \[1\] at step 4:"):
        s.backward(g @ x + torch.tensor([1.0, float("nan"), 1.0], dtype=D), shared_parameters=[x])


def test_task_gradients_keep_the_parameters_precision_under_lower_precision_losses():
    """Losses computed in float32 from float64 parameters (mixed precision): the per-task
    gradient rows are the parameters' float64 gradients, not rounded to the losses' dtype."""
    from mtl.strategies import task_gradients

    gen = torch.Generator().manual_seed(9)
    w = torch.randn(3, 5, dtype=D, generator=gen, requires_grad=True)
    v = torch.randn(5, 2, dtype=D, generator=gen)
    h = w @ v
    losses = torch.stack([(h[:, 0] ** 2).sum(), (h[:, 1] ** 3).sum()]).float()
    rows = task_gradients(losses, [w])
    assert rows.dtype == D
    for i in range(2):
        (ref,) = torch.autograd.grad(losses[i], [w], retain_graph=True)
        assert torch.equal(rows[i], ref.reshape(-1))
    # a gradient strategy combines them in the parameters' dtype: float32 coefficients, float64 update
    comb = build_strategy("mgda", 2).backward(losses, shared_parameters=[w])
    assert comb.grad_scale.dtype == torch.float32 and w.grad.dtype == D
    assert torch.allclose(w.grad.reshape(-1), comb.grad_scale.double() @ rows, rtol=1e-12)

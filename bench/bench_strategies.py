"""Training-step cost of every task-balancing strategy on bench-v1 (``shared/docs/bench_v1.md``).

In ONE process, interleaved (A B C ... A B C ...): the bare reference MMoE's plain step, the
project's own equal-weight step (``bench_v1.project_step``: the project MMoE + its default
optimizer), and one step of the project MMoE with each strategy through
:func:`mtl.strategies.model_backward` (per-task gradients over the dense shared experts only,
coefficients from the ``K x K`` Gram matrix, one backward with ``task_grad_scale``). Gradient
strategies run exact (coefficients every step) and with ``refresh_every=4``.

Usage::

    python bench/bench_strategies.py                         # everything, 5 warm-up + 40 steps
    python bench/bench_strategies.py --strategies pcgrad mgda --steps 20
    python bench/bench_strategies.py --plain --proto      # K-1 passes + batched per-task backward

Prints, per set-up, the median step time (and the mean, which for ``refresh=4`` includes the
refresh steps), samples/s and the ratios of the median to both baselines' medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_v1 import (  # noqa: E402
    BATCH_SIZE,
    LR,
    ReferenceMMoE,
    build_project,
    make_batches,
    make_bench_data,
    project_step,
    reference_step,
    time_interleaved,
)

from mtl.strategies import GRADIENT_STRATEGIES, build_strategy, model_backward, task_gradients  # noqa: E402

LOSS_ONLY = ("uncertainty", "dwa", "famo")
GRADIENT_LOSS = ("gradnorm", "dbmtl")
DEFAULT = (*GRADIENT_STRATEGIES, *GRADIENT_LOSS, *LOSS_ONLY)


class FusedMMoETaskGradients:
    """PROTOTYPE of a model-side ``shared_task_gradients(losses, tasks)`` for the fused MMoE
    (2 expert layers), to measure what a batched per-task backward saves. It belongs in
    ``mtl/models/mmoe.py``; here it reads the fused node's saved tensors.

    Per task ``t``: the towers' backward gives ``dL_t/dmixed_t`` (one batched pass for all
    tasks), the gates route it to the experts (``gates[:, t, e] * dmixed_t``), and the experts'
    backward for all requested tasks runs as three batched GEMMs; no input gradient, gate or
    tower gradient is formed.
    """

    def __init__(self, model) -> None:
        self.model = model
        self.logits = None
        inner = model.forward_representation

        def forward_representation(x, task_grad_scale=None):
            self.logits = inner(x, task_grad_scale)
            return self.logits

        model.forward_representation = forward_representation  # type: ignore[method-assign]

    def __call__(self, losses, tasks):
        node = self.logits.grad_fn
        le, lt = node.le, node.lt
        if le != 2:
            raise ValueError("prototype handles 2 expert layers")
        saved = list(node.saved_tensors)
        x, z, gates = saved[0], saved[1], saved[2]
        hs1 = saved[4]
        ts = saved[5 : 5 + lt]
        ew1 = saved[5 + lt]
        tw = saved[6 + lt : 6 + 2 * lt]
        (dlogits,) = torch.autograd.grad(losses.sum(), self.logits, retain_graph=True)  # column t = dL_t
        with torch.no_grad():
            return self._expert_grads(dlogits, tasks, x, z, gates, hs1, ts, ew1, tw)

    @staticmethod
    def _expert_grads(dlogits, tasks, x, z, gates, hs1, ts, ew1, tw):
        b, k, e = gates.shape
        h1 = ew1.shape[1]
        lt = len(tw)
        hs0 = z[:, : e * h1].view(b, e, h1).transpose(0, 1)  # [E, B, H1] (post-ReLU)
        dt = dlogits.t().unsqueeze(-1)
        for layer in reversed(range(lt)):
            dt = torch.bmm(dt, tw[layer].transpose(1, 2))
            if layer > 0:
                dt = dt * (ts[layer] > 0)
        idx = torch.tensor(list(tasks), dtype=torch.long)
        nt, h = len(tasks), dt.shape[2]
        dt_bt = dt.index_select(0, idx).transpose(0, 1).contiguous()  # [B, T, H]
        g_ebt = gates.index_select(1, idx).permute(2, 0, 1)  # [E, B, T]
        # d_h[e, b, t] = gates[b, t, e] * dL_t/dmixed_t[b] * relu'(expert e's output at b)
        d_h = torch.mul(g_ebt.unsqueeze(-1), dt_bt.unsqueeze(0), out=dt_bt.new_empty(e, b, nt, h))  # [E, B, T, H]
        d_h.mul_((hs1 > 0).unsqueeze(2))
        # Per expert: three GEMMs on contiguous (or leading-dimension-strided) operands, no copies.
        d_ew1 = x.new_empty(e, h1, nt * h)
        d1 = x.new_empty(e, b, nt, h1)
        d_ew0 = x.new_empty(e, x.shape[1], nt * h1)
        hs0_relu = hs0 > 0
        for j in range(e):
            dh_j = d_h[j].view(b, nt * h)
            torch.mm(hs0[j].t(), dh_j, out=d_ew1[j])
            torch.mm(d_h[j].view(b * nt, h), ew1[j].t(), out=d1[j].view(b * nt, h1))
            d1[j].mul_(hs0_relu[j].unsqueeze(1))
            torch.mm(x.t(), d1[j].view(b, nt * h1), out=d_ew0[j])
        d_ew1 = d_ew1.view(e, h1, nt, h)
        d_ew0 = d_ew0.view(e, -1, nt, h1)
        d_eb1 = d_h.sum(1)  # [E, T, H]
        d_eb0 = d1.sum(1)  # [E, T, H1]
        return torch.cat(
            [
                d_ew0.permute(2, 0, 1, 3).reshape(nt, -1),
                d_ew1.permute(2, 0, 1, 3).reshape(nt, -1),
                d_eb0.transpose(0, 1).reshape(nt, -1),
                d_eb1.transpose(0, 1).reshape(nt, -1),
            ],
            dim=1,
        )


def strategy_setup(
    name: str,
    refresh_every: int,
    seed: int,
    direct: bool,
    batches: list,
    embedding_grad: str = "combined",
    proto: bool = False,
) -> Callable[[], None]:
    """A no-argument step callable: project MMoE + default optimizer + the strategy."""
    model, opt = build_project(seed)
    if proto:
        model.shared_task_gradients = FusedMMoETaskGradients(model)
    kw: dict = {"refresh_every": refresh_every}
    if embedding_grad != "combined":
        kw["embedding_grad"] = embedding_grad
    if name == "dwa":
        kw["period_steps"] = 1
    strategy = build_strategy(name, model.num_tasks, **kw)
    extra = list(strategy.parameters())
    extra_opt = torch.optim.Adam(extra, lr=LR) if extra else None
    shared = None
    if name == "gradnorm":  # the paper's choice: the last shared layer
        shared = [model.experts.weights[-1], model.experts.biases[-1]]
    rep = {}
    if name == "mgda_ub":
        # the fused MMoE body does not call model.experts; use the per-module path
        model.forward_representation = model.forward_modules  # type: ignore[method-assign]
        rep = {"representation_module": model.experts}
    state = {"i": 0}

    def step() -> None:
        b, y = batches[state["i"] % len(batches)]
        state["i"] += 1
        opt.zero_grad(set_to_none=True)
        if extra_opt is not None:
            extra_opt.zero_grad(set_to_none=True)
        model_backward(strategy, model, b, y, shared_parameters=shared, direct=direct, **rep)
        opt.step()
        if extra_opt is not None:
            extra_opt.step()

    return step


def check_prototype(batch_and_labels) -> None:
    """The prototype's per-task gradients equal the generic ``torch.autograd.grad`` ones."""
    from mtl.strategies import per_task_bce

    b, y = batch_and_labels
    model, _ = build_project(0)
    proto = FusedMMoETaskGradients(model)
    losses = per_task_bce(model(b), y)
    fast = proto(losses, [0, 2, 3])
    ref = task_gradients(losses, model.shared_parameters(), [0, 2, 3])
    err = float((fast - ref).abs().max().detach() / ref.abs().max())
    if not err < 1e-4:
        raise AssertionError(f"prototype per-task gradients differ: max rel err {err:.2e}")
    print(f"prototype per-task gradients == autograd's (max rel err {err:.1e})", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=262144)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--strategies", nargs="*", default=list(DEFAULT))
    p.add_argument("--refresh", type=int, default=4, help="refresh period of the cheap variant (0: skip)")
    p.add_argument("--direct", action="store_true", help="also time pcgrad with direct=True")
    p.add_argument("--plain", action="store_true",
                   help="Gram strategies with embedding_grad='plain' (K-1 per-task passes)")
    p.add_argument("--proto", action="store_true",
                   help="per-task gradients from the bench's prototype batched backward of the fused MMoE")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    batch, labels = make_bench_data(args.rows, args.seed)
    batches = make_batches(batch, labels, args.warmup + args.steps, seed=args.seed + 1)
    print(f"data: {args.rows} rows, {len(batches)} batches of {BATCH_SIZE} in {time.perf_counter() - t0:.1f}s", flush=True)

    torch.manual_seed(args.seed)
    ref = ReferenceMMoE()
    ref_opt = torch.optim.Adam(ref.parameters(), lr=LR)
    proj, proj_opt = build_project(args.seed)
    fns: dict[str, Callable[[], object]] = {}

    def cycle(step, model, opt):
        st = {"i": 0}

        def fn():
            b, y = batches[st["i"] % len(batches)]
            st["i"] += 1
            return step(model, opt, b, y)

        return fn

    fns["reference"] = cycle(reference_step, ref, ref_opt)
    fns["equal (project)"] = cycle(project_step, proj, proj_opt)
    if args.proto:
        check_prototype(batches[0])
    for name in args.strategies:
        emb = "plain" if args.plain and build_strategy(name, 2).gram_only else "combined"
        proto = args.proto and name != "mgda_ub"
        fns[name] = strategy_setup(name, 1, args.seed, False, batches, emb, proto)
        if args.refresh > 1 and (name in GRADIENT_STRATEGIES or name in GRADIENT_LOSS):
            fns[f"{name} refresh={args.refresh}"] = strategy_setup(name, args.refresh, args.seed, False, batches, emb, proto)
    if args.direct:
        fns["pcgrad direct"] = strategy_setup("pcgrad", 1, args.seed, True, batches)


    t0 = time.perf_counter()
    times = time_interleaved(fns, warmup=args.warmup, steps=args.steps)
    print(f"options: embedding_grad={'plain' if args.plain else 'combined'} (Gram strategies), "
          f"per-task gradients: {'prototype batched backward' if args.proto else 'torch.autograd.grad per task'}")
    print(f"timed {len(fns)} set-ups x {args.steps} steps (interleaved) in {time.perf_counter() - t0:.0f}s")
    med = {k: statistics.median(v) for k, v in times.items()}
    mean = {k: statistics.fmean(v) for k, v in times.items()}
    ref_m, eq_m = med["reference"], med["equal (project)"]
    print(f"{'set-up':<26}{'median ms':>10}{'mean ms':>9}{'samples/s':>11}{'/ reference':>13}{'/ equal':>9}")
    for k in fns:
        print(f"{k:<26}{med[k] * 1e3:>10.1f}{mean[k] * 1e3:>9.1f}{BATCH_SIZE / med[k]:>11.0f}"
              f"{med[k] / ref_m:>13.3f}{med[k] / eq_m:>9.3f}")
    if "pcgrad" in med:
        pc = med["pcgrad"]
        print("gradient methods / pcgrad (medians, exact): " + ", ".join(
            f"{k}={med[k] / pc:.3f}" for k in args.strategies if k in GRADIENT_STRATEGIES or k in GRADIENT_LOSS))
    for r in [k for k in fns if k.endswith(f"refresh={args.refresh}")]:
        print(f"{r}: mean / equal-mean = {mean[r] / mean['equal (project)']:.3f}, median / equal-median = {med[r] / eq_m:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

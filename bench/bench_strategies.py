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
    python bench/bench_strategies.py --plain              # Gram strategies: K-1 per-task passes
    python bench/bench_strategies.py --autograd           # per-task torch.autograd.grad calls instead
    python bench/bench_strategies.py --compare            # + pcgrad rows through the generic path

Per-task gradients come from the model's batched ``MMoE.shared_task_gradients`` (one backward
for all tasks over the experts) unless ``--autograd``; with it the final backward is restricted
to the non-shared parameters (``direct``), so the fused body skips the experts' weight gradients.

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
    add_workload_arguments,
    body_dtype,
    build_project,
    cycling_step,
    make_batches,
    make_bench_data,
    project_step,
    reference_step,
    time_interleaved,
)

from mtl.precision import DEFAULT_PRECISION  # noqa: E402
from mtl.strategies import GRADIENT_STRATEGIES, build_strategy, model_backward, task_gradients  # noqa: E402

LOSS_ONLY = ("uncertainty", "dwa", "famo")
GRADIENT_LOSS = ("gradnorm", "dbmtl")
DEFAULT = (*GRADIENT_STRATEGIES, *GRADIENT_LOSS, *LOSS_ONLY)


def strategy_setup(
    name: str,
    refresh_every: int,
    seed: int,
    direct: bool | None,
    batches: list,
    embedding_grad: str = "combined",
    model_task_gradients: bool = True,
    precision: str | None = None,
) -> Callable[[], None]:
    """A no-argument step callable: project MMoE + default optimizer + the strategy
    (``direct=None``: the driver's default; ``model_task_gradients=False``: per-task
    ``torch.autograd.grad`` calls instead of the model's batched method)."""
    model, opt = build_project(seed, precision)
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
        model_backward(
            strategy, model, b, y, shared_parameters=shared, direct=direct,
            model_task_gradients=model_task_gradients, **rep,
        )
        opt.step()
        if extra_opt is not None:
            extra_opt.step()

    return step


def check_task_gradients(batch_and_labels) -> float:
    """The model's batched per-task gradients equal the generic ``torch.autograd.grad`` ones
    on a bench batch (float32); returns the max relative error."""
    from mtl.strategies import per_task_bce

    b, y = batch_and_labels
    model, _ = build_project(0, precision="float32")  # exact arithmetic for an equality check
    losses = per_task_bce(model(b), y)
    tasks = list(range(model.num_tasks))
    ref = task_gradients(losses, model.shared_parameters(), tasks)
    err = 0.0
    for separable in (False, True):  # the driver takes the separable path for per-task BCE
        fast = model.shared_task_gradients(losses, tasks, separable=separable)
        err = max(err, float((fast - ref).abs().max() / ref.abs().max()))
    if not err < 1e-4:
        raise AssertionError(f"MMoE.shared_task_gradients differs from autograd: max rel err {err:.2e}")
    print(f"MMoE.shared_task_gradients == per-task autograd.grad (max rel err {err:.1e})", flush=True)
    return err


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_arguments(p, "body precision of every project set-up")
    p.add_argument("--strategies", nargs="*", default=list(DEFAULT))
    p.add_argument("--refresh", type=int, default=4, help="refresh period of the cheap variant (0: skip)")
    p.add_argument("--direct", action="store_true",
                   help="also time pcgrad with direct=False (final backward through all parameters)")
    p.add_argument("--plain", action="store_true",
                   help="Gram strategies with embedding_grad='plain' (K-1 per-task passes)")
    p.add_argument("--autograd", action="store_true",
                   help="per-task gradients from torch.autograd.grad calls, not MMoE.shared_task_gradients")
    p.add_argument("--compare", action="store_true",
                   help="also time exact pcgrad through the generic torch.autograd.grad path")
    p.add_argument("--proto", action="store_true",
                   help="(kept for old command lines) the batched per-task backward, now the default")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    batch, labels = make_bench_data(args.rows, args.seed)
    batches = make_batches(batch, labels, args.warmup + args.steps, seed=args.seed + 1)
    print(f"data: {args.rows} rows, {len(batches)} batches of {BATCH_SIZE} in {time.perf_counter() - t0:.1f}s", flush=True)

    torch.manual_seed(args.seed)
    ref = ReferenceMMoE()
    ref_opt = torch.optim.Adam(ref.parameters(), lr=LR)
    proj, proj_opt = build_project(args.seed, args.precision)
    print(f"body precision: {args.precision or DEFAULT_PRECISION!r} -> {body_dtype(args.precision)}")
    fns: dict[str, Callable[[], object]] = {
        "reference": cycling_step(reference_step, ref, ref_opt, batches),
        "equal (project)": cycling_step(project_step, proj, proj_opt, batches),
    }
    if args.autograd and args.proto:
        p.error("--autograd and --proto contradict each other")
    use_model = not args.autograd
    check_task_gradients(batches[0])
    for name in args.strategies:
        emb = "plain" if args.plain and build_strategy(name, 2).gram_only else "combined"
        fns[name] = strategy_setup(name, 1, args.seed, None, batches, emb, use_model, args.precision)
        if args.refresh > 1 and (name in GRADIENT_STRATEGIES or name in GRADIENT_LOSS):
            fns[f"{name} refresh={args.refresh}"] = strategy_setup(name, args.refresh, args.seed, None, batches, emb, use_model, args.precision)
    if args.direct:
        fns["pcgrad direct=False"] = strategy_setup("pcgrad", 1, args.seed, False, batches, "combined", use_model, args.precision)
    if args.compare:
        emb = "plain" if args.plain else "combined"
        fns["pcgrad autograd"] = strategy_setup("pcgrad", 1, args.seed, None, batches, emb, False, args.precision)


    t0 = time.perf_counter()
    times = time_interleaved(fns, warmup=args.warmup, steps=args.steps)
    print(f"options: embedding_grad={'plain' if args.plain else 'combined'} (Gram strategies), "
          f"per-task gradients: {'torch.autograd.grad per task' if args.autograd else 'MMoE.shared_task_gradients'}")
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
        # robust average step: every run of `refresh` consecutive steps holds one refresh step;
        # the median over those cycles of their total, per step
        n = args.refresh
        cycles = [sum(times[r][i : i + n]) / n for i in range(0, len(times[r]) - n + 1, n)]
        print(f"{r}: mean / equal-mean = {mean[r] / mean['equal (project)']:.3f}, "
              f"median of {n}-step cycles / equal-median = {statistics.median(cycles) / eq_m:.3f}, "
              f"median / equal-median = {med[r] / eq_m:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

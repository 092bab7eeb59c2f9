"""bench-v1: the fixed MMoE training-speed workload (see ``shared/docs/bench_v1.md``).

Compares, in one process and interleaved (A B A B ...), the training step of a bare PyTorch
reference MMoE with the project's MMoE (``mtl.models.build_model("mmoe")`` + the default
optimizer set-up of :mod:`mtl.optim`), and optionally the held-out AUC of both after the same
number of steps.

Usage::

    python bench/bench_v1.py                      # timing: 5 warm-up + 40 measured steps
    python bench/bench_v1.py --auc-steps 300      # timing, then 300 training steps each + AUC

Reusable pieces (imported by other benches): :func:`make_bench_data`, :func:`bench_feature_spec`,
:class:`ReferenceMMoE`, :func:`reference_step`, :func:`time_interleaved`.

Data (``n`` rows, ``numpy.random.default_rng(seed)``), drawn in this order:

1. six sparse ids ``(rng.zipf(1.2, n) - 1) % vocab`` with vocab sizes
   ``[20000, 100000, 20000, 25000, 18000, 2]`` (features ``f0`` .. ``f5``);
2. one dense feature ``log1p(rng.exponential(size=n))`` (float32, ``d0``);
3. a logistic label model: per feature a latent effect per id shared by all tasks
   (``rng.normal(0, 0.6, vocab)``) plus a per-task effect (``rng.normal(0, 0.4, (vocab, 4))``),
   a per-task dense coefficient ``rng.normal(0, 0.5, 4)``; the intercept of each task is solved
   (bisection) so that the mean predicted probability equals the target positive rate
   ``[0.035, 0.026, 0.0075, 0.0038]``;
4. labels ``rng.random((n, 4)) < p``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtl.features import DenseFeature, FeatureSpec, SparseFeature  # noqa: E402
from mtl.precision import DEFAULT_PRECISION, PRECISIONS, resolve_compute_dtype  # noqa: E402

VOCAB_SIZES = [20000, 100000, 20000, 25000, 18000, 2]
SPARSE_NAMES = [f"f{i}" for i in range(len(VOCAB_SIZES))]
DENSE_NAME = "d0"
TASKS = ["t0", "t1", "t2", "t3"]
POSITIVE_RATES = [0.035, 0.026, 0.0075, 0.0038]
EMBEDDING_DIM = 16
NUM_EXPERTS = 4
EXPERT_HIDDEN = [128, 64]
TOWER_HIDDEN = [32]
BATCH_SIZE = 4096
LR = 1e-3


# ----------------------------------------------------------------------------- data


def _solve_intercept(logit: np.ndarray, rate: float) -> float:
    """The intercept ``b`` with ``mean(sigmoid(logit + b)) == rate`` (bisection)."""
    lo, hi = -30.0, 30.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        mean = float(np.mean(1.0 / (1.0 + np.exp(-(logit + mid)))))
        if mean < rate:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def make_bench_data(n: int = 262144, seed: int = 0) -> tuple[dict[str, Tensor], Tensor]:
    """Generate the bench-v1 data.

    Args:
        n: number of rows.
        seed: seed of ``numpy.random.default_rng``.

    Returns:
        ``(batch, labels)``: ``batch`` maps ``f0..f5`` to int64 ``[n]`` ids and ``d0`` to float32
        ``[n]``; ``labels`` is float32 ``[n, 4]`` (0/1).
    """
    rng = np.random.default_rng(seed)
    ids = [(rng.zipf(1.2, n) - 1) % vocab for vocab in VOCAB_SIZES]
    dense = np.log1p(rng.exponential(size=n)).astype(np.float32)
    k = len(TASKS)
    logit = np.zeros((n, k))
    for col, vocab in zip(ids, VOCAB_SIZES):
        shared = rng.normal(0.0, 0.6, vocab)
        per_task = rng.normal(0.0, 0.4, (vocab, k))
        logit += shared[col][:, None] + per_task[col]
    dense_coef = rng.normal(0.0, 0.5, k)
    logit += (dense - dense.mean())[:, None] * dense_coef[None, :]
    for t, rate in enumerate(POSITIVE_RATES):
        logit[:, t] += _solve_intercept(logit[:, t], rate)
    prob = 1.0 / (1.0 + np.exp(-logit))
    labels = (rng.random((n, k)) < prob).astype(np.float32)
    batch: dict[str, Tensor] = {name: torch.from_numpy(col.astype(np.int64)) for name, col in zip(SPARSE_NAMES, ids)}
    batch[DENSE_NAME] = torch.from_numpy(dense)
    return batch, torch.from_numpy(labels)


def bench_feature_spec() -> FeatureSpec:
    """The bench-v1 inputs as a :class:`~mtl.features.FeatureSpec` (input dim 97, 4 tasks)."""
    return FeatureSpec(
        sparse=[SparseFeature(name, vocab, EMBEDDING_DIM) for name, vocab in zip(SPARSE_NAMES, VOCAB_SIZES)],
        dense=[DenseFeature(DENSE_NAME)],
        tasks=list(TASKS),
    )


def slice_batch(batch: dict[str, Tensor], labels: Tensor, index: Tensor | slice) -> tuple[dict[str, Tensor], Tensor]:
    """Rows ``index`` of every column (contiguous copies)."""
    return {k: v[index].contiguous() for k, v in batch.items()}, labels[index].contiguous()


def make_batches(
    batch: dict[str, Tensor], labels: Tensor, count: int, batch_size: int = BATCH_SIZE, seed: int = 1
) -> list[tuple[dict[str, Tensor], Tensor]]:
    """``count`` training batches: consecutive slices of a seeded permutation, wrapping around."""
    n = labels.shape[0]
    gen = torch.Generator().manual_seed(seed)
    out: list[tuple[dict[str, Tensor], Tensor]] = []
    perm = torch.randperm(n, generator=gen)
    pos = 0
    for _ in range(count):
        if pos + batch_size > n:
            perm = torch.randperm(n, generator=gen)
            pos = 0
        out.append(slice_batch(batch, labels, perm[pos : pos + batch_size]))
        pos += batch_size
    return out


# ----------------------------------------------------------------------------- reference


class ReferenceMMoE(nn.Module):
    """The bare PyTorch reference: ``nn.Embedding`` per feature, a loop over expert, gate and
    tower modules, broadcast multiply-and-sum mixing. Returns ``[B, 4]`` logits."""

    def __init__(
        self,
        vocab_sizes: list[int] = VOCAB_SIZES,
        embedding_dim: int = EMBEDDING_DIM,
        dense_dim: int = 1,
        num_tasks: int = len(TASKS),
        num_experts: int = NUM_EXPERTS,
        expert_hidden: list[int] = EXPERT_HIDDEN,
        tower_hidden: list[int] = TOWER_HIDDEN,
    ) -> None:
        super().__init__()
        self.sparse_names = list(SPARSE_NAMES[: len(vocab_sizes)])
        self.embeddings = nn.ModuleList(nn.Embedding(v, embedding_dim) for v in vocab_sizes)
        d = embedding_dim * len(vocab_sizes) + dense_dim

        def mlp(widths: list[int], last_relu: bool) -> nn.Sequential:
            layers: list[nn.Module] = []
            for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
                layers.append(nn.Linear(a, b))
                if last_relu or i < len(widths) - 2:
                    layers.append(nn.ReLU())
            return nn.Sequential(*layers)

        self.experts = nn.ModuleList(mlp([d, *expert_hidden], last_relu=True) for _ in range(num_experts))
        self.gates = nn.ModuleList(nn.Linear(d, num_experts) for _ in range(num_tasks))
        self.towers = nn.ModuleList(
            mlp([expert_hidden[-1], *tower_hidden, 1], last_relu=False) for _ in range(num_tasks)
        )

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        embs = [emb(batch[name]) for name, emb in zip(self.sparse_names, self.embeddings)]
        x = torch.cat([*embs, batch[DENSE_NAME].unsqueeze(1)], dim=1)
        experts = torch.stack([e(x) for e in self.experts], dim=1)  # [B, E, H]
        logits = []
        for gate, tower in zip(self.gates, self.towers):
            g = torch.softmax(gate(x), dim=-1)  # [B, E]
            mixed = (g.unsqueeze(-1) * experts).sum(dim=1)  # [B, H]
            logits.append(tower(mixed))
        return torch.cat(logits, dim=1)


def reference_step(model: nn.Module, opt: torch.optim.Optimizer, batch: dict[str, Tensor], labels: Tensor) -> float:
    """One bare training step: per-task BCE-with-logits (mean over the batch), summed over
    tasks, ``loss.backward()``, ``opt.step()``. Returns the loss."""
    opt.zero_grad()
    logits = model(batch)
    loss = sum(
        F.binary_cross_entropy_with_logits(logits[:, k], labels[:, k]) for k in range(labels.shape[1])
    )
    loss.backward()
    opt.step()
    return float(loss.detach())


# ----------------------------------------------------------------------------- project


def build_project(seed: int = 0, precision: str | None = None) -> tuple[nn.Module, object]:
    """The project's MMoE for bench-v1 with its default set-up: row-sparse embeddings, the
    default optimizer of :mod:`mtl.optim` and the training entry point's default body precision
    (:data:`mtl.precision.DEFAULT_PRECISION`, ``"auto"``) unless ``precision`` is given
    (``"float32"``: exact float32)."""
    from mtl.models import build_model

    torch.manual_seed(seed)
    model = build_model(
        "mmoe",
        bench_feature_spec(),
        num_experts=NUM_EXPERTS,
        expert_hidden=list(EXPERT_HIDDEN),
        tower_hidden=list(TOWER_HIDDEN),
        sparse_gradients=True,
        compute_dtype=DEFAULT_PRECISION if precision is None else precision,
    )
    from mtl.optim import build_optimizer

    return model, build_optimizer(model, lr=LR)


def project_step(model: nn.Module, opt, batch: dict[str, Tensor], labels: Tensor) -> float:
    """One project training step: BCE over ``[B, K]`` in one call (sum over tasks of the
    per-task mean), backward, optimizer step. Same loss value as :func:`reference_step`."""
    opt.zero_grad(set_to_none=True)
    logits = model(batch)
    loss = F.binary_cross_entropy_with_logits(logits, labels, reduction="sum") / labels.shape[0]
    loss.backward()
    opt.step()
    return float(loss.detach())


# ----------------------------------------------------------------------------- timing


def time_interleaved(
    step_fns: dict[str, Callable[[], object]], warmup: int = 5, steps: int = 40
) -> dict[str, list[float]]:
    """Time training steps of several set-ups interleaved (A B A B ...) in this process.

    Args:
        step_fns: name -> a callable without arguments that runs one training step (it keeps
            its own batch iterator).
        warmup: un-timed rounds first.
        steps: timed rounds.

    Returns:
        name -> the ``steps`` measured step times in seconds.
    """
    for _ in range(warmup):
        for fn in step_fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in step_fns}
    for _ in range(steps):
        for name, fn in step_fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def cycling_step(
    step: Callable[[nn.Module, object, dict[str, Tensor], Tensor], float],
    model: nn.Module,
    opt: object,
    batches: list[tuple[dict[str, Tensor], Tensor]],
) -> Callable[[], float]:
    """A no-argument step callable that walks through ``batches`` in order (wrapping)."""
    state = {"i": 0}

    def fn() -> float:
        b, y = batches[state["i"] % len(batches)]
        state["i"] += 1
        return step(model, opt, b, y)

    return fn


# ----------------------------------------------------------------------------- AUC


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted half); NaN if one class is absent."""
    from scipy.stats import rankdata

    labels = labels.astype(bool)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@torch.no_grad()
def predict(model: nn.Module, batch: dict[str, Tensor], chunk: int = 16384) -> np.ndarray:
    n = next(iter(batch.values())).shape[0]
    out = []
    model.eval()
    for s in range(0, n, chunk):
        out.append(model({k: v[s : s + chunk] for k, v in batch.items()}))
    model.train()
    return torch.cat(out).numpy()


def run_auc(
    args: argparse.Namespace, batch: dict[str, Tensor], labels: Tensor
) -> dict[str, list[list[float]]]:
    """Train every set-up ``args.auc_steps`` steps on the training split (same batches for all)
    and return name -> per-seed lists of held-out AUC per task. Seed ``s`` sets the models'
    initialisation (``args.seed + s``) and the batch order; the split is fixed."""
    n = labels.shape[0]
    gen = torch.Generator().manual_seed(123)
    perm = torch.randperm(n, generator=gen)
    n_val = int(n * args.val_fraction)
    val_b, val_y = slice_batch(batch, labels, perm[:n_val])
    tr_b, tr_y = slice_batch(batch, labels, perm[n_val:])
    print(f"[auc] split: {n - n_val} train rows, {n_val} held-out rows; held-out positives per task "
          + ", ".join(str(int(v)) for v in val_y.sum(0).tolist()))
    result: dict[str, list[list[float]]] = {}
    for s in range(args.auc_seeds):
        seed = args.seed + s
        train_batches = make_batches(tr_b, tr_y, args.auc_steps, seed=seed + 2)
        for name, (model, opt, step) in _setups(seed, not args.no_fp32).items():
            t0 = time.perf_counter()
            for b, y in train_batches:
                step(model, opt, b, y)
            scores = predict(model, val_b)
            aucs = [roc_auc(scores[:, k], val_y[:, k].numpy()) for k in range(len(TASKS))]
            result.setdefault(name, []).append(aucs)
            print(f"[auc] seed {seed} {name:>9}: " + ", ".join(f"{t}={v:.4f}" for t, v in zip(TASKS, aucs))
                  + f"  ({args.auc_steps} steps in {time.perf_counter() - t0:.1f}s)", flush=True)
    return result


def _setups(seed: int, fp32: bool = True) -> dict[str, tuple[nn.Module, object, Callable]]:
    """``reference``, ``mtl`` (the project's default set-up) and, unless the default already is
    float32 here, ``mtl_fp32`` (the same with exact float32 arithmetic)."""
    torch.manual_seed(seed)
    ref = ReferenceMMoE()
    ref_opt = torch.optim.Adam(ref.parameters(), lr=LR)
    model, opt = build_project(seed)
    setups = {"reference": (ref, ref_opt, reference_step), "mtl": (model, opt, project_step)}
    if fp32 and body_dtype() != torch.float32:
        model32, opt32 = build_project(seed, precision="float32")
        setups["mtl_fp32"] = (model32, opt32, project_step)
    return setups


def body_dtype(precision: str | None = None) -> torch.dtype:
    """What ``precision`` (default: the project's) resolves to on this machine's CPU for
    float32 inputs."""
    return resolve_compute_dtype(precision or DEFAULT_PRECISION, torch.device("cpu"), torch.float32)


def add_workload_arguments(p: argparse.ArgumentParser, precision_help: str) -> None:
    """The options every bench-v1 script shares: data size, seed, timing and threads, and the
    body precision of the project set-ups."""
    p.add_argument("--rows", type=int, default=262144)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help=f"{precision_help} (default: the project's, {DEFAULT_PRECISION!r})")


def profile_steps(
    batches: list[tuple[dict[str, Tensor], Tensor]], steps: int, seed: int, precision: str | None = None
) -> None:
    """Print where the project's step spends its time (torch.profiler, ops by self CPU time)."""
    from torch.profiler import ProfilerActivity, profile

    model, opt = build_project(seed, precision)
    fn = cycling_step(project_step, model, opt, batches)
    for _ in range(3):
        fn()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            fn()
    events = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events) / steps / 1e3
    print(f"[profile] mtl step, {steps} steps, self CPU time {total:.2f} ms/step (profiler overhead included)")
    for e in events[:60]:
        shapes = str(e.input_shapes)[:90]
        print(f"[profile] {e.self_cpu_time_total / steps / 1e3:7.3f} ms/step  {e.key[:36]:36s} {shapes}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_arguments(p, "body precision of --profile")
    p.add_argument("--repeats", type=int, default=1, help="independent timing runs (fresh models)")
    p.add_argument("--auc-steps", type=int, default=0, help="also train both this many steps and report AUC")
    p.add_argument("--auc-seeds", type=int, default=1, help="repeat the AUC comparison over this many seeds")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--profile", type=int, default=0, help="profile this many project steps")
    p.add_argument("--no-fp32", action="store_true",
                   help="skip the exact-float32 variant (mtl_fp32) when the default precision is bfloat16 here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    batch, labels = make_bench_data(args.rows, args.seed)
    rates = labels.mean(0).tolist()
    print(f"project default precision {DEFAULT_PRECISION!r} -> body computes in {body_dtype()} on this CPU")
    print(f"data: {args.rows} rows in {time.perf_counter() - t0:.1f}s; positive rates "
          + ", ".join(f"{r:.4f}" for r in rates) + f" (target {POSITIVE_RATES})")

    batches = make_batches(batch, labels, args.warmup + args.steps, seed=args.seed + 1)
    for rep in range(args.repeats):
        setups = _setups(args.seed, not args.no_fp32)
        fns = {name: cycling_step(step, m, o, batches) for name, (m, o, step) in setups.items()}
        times = time_interleaved(fns, warmup=args.warmup, steps=args.steps)
        med = {name: statistics.median(ts) for name, ts in times.items()}
        for name, m in med.items():
            print(f"[time {rep}] {name:>9}: median step {m * 1e3:7.2f} ms, {BATCH_SIZE / m:9.0f} samples/s")
        for name in med:
            if name != "reference":
                print(f"[time {rep}] ratio {name} / reference = {med[name] / med['reference']:.3f}", flush=True)

    if args.profile > 0:
        profile_steps(batches, args.profile, args.seed, args.precision)

    if args.auc_steps > 0:
        aucs = run_auc(args, batch, labels)
        means = {name: np.mean(np.array(v), axis=0) for name, v in aucs.items()}
        for name, m in means.items():
            print(f"[auc] mean over {args.auc_seeds} seed(s) {name:>9}: "
                  + ", ".join(f"{t}={v:.4f}" for t, v in zip(TASKS, m)))
        for name in means:
            if name != "reference":
                diff = means[name] - means["reference"]
                print(f"[auc] mean {name} - reference: " + ", ".join(f"{t}={d:+.4f}" for t, d in zip(TASKS, diff)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Ranking quality: LightGBM and the project's models on the same preprocessed split.

LightGBM (an optional bench dependency: ``pip install -e .[bench]``) trains one binary model per
task on the preprocessed columns (ids as categorical features, numbers and vectors as numeric;
id lists are left out), tuned on the validation split (a small grid, early stopping on valid
AUC). Each train config (a ``python -m pipeline train`` YAML; its ``train:`` section) is trained
locally (:func:`pipeline.train.local.train_local`, its early stopping on the validation score)
for every seed. Both are scored on the same rows of ``--split``: per-task AUC, and with users
per-task uAUC and the weighted score; with ``--raw`` (a generator folder) the oracle's as well.

``--holdout FRACTION`` gives an honest selection on the validation split: every config trains
with ``train.valid_holdout`` (early stopping on the users whose hash is not held out), LightGBM
early-stops on the same selection rows, and with ``--split valid`` every set-up (the oracle
too) is scored on the held-out users' rows only (:mod:`pipeline.train.holdout`).

``--baseline NAME`` compares every other config with that one (e.g. single-task) per task:
paired bootstrap of the metric's difference (over users when the data has users, else over
rows) of the seed-averaged predictions; the verdicts are classified into the seed's outcome
classes (:mod:`pipeline.report.outcome`).

Example:
    python bench/bench_quality.py --data /tmp/q14/adult \
        --config single=configs/train/adult_single.yaml --config mmoe=configs/train/adult_mmoe.yaml \
        --seeds 0 1 2 --baseline single
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtl.features import FeatureSpec  # noqa: E402
from mtl.metrics import auc  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data import load_spec, read_split  # noqa: E402
from pipeline.report.outcome import BETTER, EQUAL, WORSE, classify, paired_bootstrap_uauc  # noqa: E402
from pipeline.train.config import TrainJobConfig, ValidHoldoutConfig  # noqa: E402
from pipeline.data import iter_local_batches  # noqa: E402
from pipeline.train.evaluate import mean_routing, oracle_probabilities, predict, score_predictions  # noqa: E402
from pipeline.train.holdout import report_mask  # noqa: E402
from pipeline.train.local import train_local  # noqa: E402

#: LightGBM grid searched on the validation split (per task)
LGBM_GRID = {"num_leaves": [15, 31, 63], "learning_rate": [0.02, 0.05], "min_child_samples": [20, 50]}
#: ``--lgbm-fixed``: LightGBM's defaults at lr 0.05, at most 400 trees (chosen on valid)
#: threads of LightGBM and of each model's training (``--threads``)
THREADS = 2
LGBM_FIXED = {"num_leaves": [31], "learning_rate": [0.05], "min_child_samples": [20], "n_estimators": [400]}


def lgbm_matrix(data_dir: Path, split: str, spec: FeatureSpec,
                rows: np.ndarray | None = None) -> tuple[Any, np.ndarray | None, list[str]]:
    """The split's features as a pandas frame (ids categorical), its labels ``[N, K]``; only
    the rows where ``rows`` (a mask over the split) is True when given."""
    import pandas as pd

    table = read_split(data_dir, split)
    if rows is not None:
        table = table.filter(rows)
    cols: dict[str, np.ndarray] = {}
    for f in spec.sparse:
        cols[f.name] = table[f.name].to_numpy()
    for f in [*spec.dense, *spec.vectors]:
        col = table[f.name].combine_chunks()
        if f.dim == 1:
            cols[f.name] = col.to_numpy()
        else:
            flat = np.asarray(col.flatten(), dtype=np.float32).reshape(table.num_rows, f.dim)
            for j in range(f.dim):
                cols[f"{f.name}_{j}"] = flat[:, j]
    frame = pd.DataFrame(cols)
    cats = [f.name for f in spec.sparse]
    for c in cats:
        frame[c] = frame[c].astype("category")
    labels = np.stack([table[t].to_numpy() for t in spec.tasks], 1) if spec.tasks[0] in table.column_names else None
    return frame, labels, cats


def lightgbm_task(train: tuple, valid: tuple, test_x: Any, k: int, seeds: list[int],
                  grid: dict[str, list[Any]]) -> tuple[np.ndarray, dict[str, Any]]:
    """Tune on valid (grid x early stopping), then the chosen set-up per seed; mean test
    probabilities over seeds and the chosen parameters."""
    import lightgbm as lgb

    (xt, yt), (xv, yv) = train, valid
    best: tuple[float, dict[str, Any], int] = (-1.0, {}, 0)
    for values in itertools.product(*grid.values()):
        params = dict(zip(grid, values))
        max_trees = params.pop("n_estimators", 2000)
        model = lgb.LGBMClassifier(n_estimators=max_trees, subsample=0.8, subsample_freq=1, colsample_bytree=0.8,
                                   random_state=0, verbose=-1, n_jobs=THREADS, **params)
        model.fit(xt, yt[:, k], eval_set=[(xv, yv[:, k])], eval_metric="auc",
                  callbacks=[lgb.early_stopping(100, verbose=False)])
        score = auc(yv[:, k], model.predict_proba(xv)[:, 1])
        if score > best[0]:
            best = (score, params, int(model.best_iteration_ or max_trees))
    _, params, trees = best
    probs = []
    for seed in seeds:
        model = lgb.LGBMClassifier(n_estimators=trees, subsample=0.8, subsample_freq=1, colsample_bytree=0.8,
                                   random_state=seed, verbose=-1, n_jobs=THREADS, **params)
        model.fit(xt, yt[:, k])
        probs.append(model.predict_proba(test_x)[:, 1])
    return np.mean(probs, 0), {**params, "n_estimators": trees, "valid_auc": best[0]}


def run_lightgbm(data_dir: Path, spec: FeatureSpec, split: str, seeds: list[int], grid: dict[str, list[Any]],
                 holdout: ValidHoldoutConfig | None = None) -> tuple[list[np.ndarray], dict[str, Any]]:
    """Per seed test probabilities ``[N, K]`` (LightGBM's seeds: row and column subsampling);
    with ``holdout`` tuned on the validation split's selection rows and scored on ``split``'s
    report rows when ``split`` is ``valid``."""
    xt, yt, _ = lgbm_matrix(data_dir, "train", spec)
    xv, yv, _ = lgbm_matrix(data_dir, "valid", spec, None if holdout is None else ~split_report_mask(data_dir, "valid", holdout))
    xs, _, _ = lgbm_matrix(data_dir, split, spec, split_report_mask(data_dir, split, holdout))
    per_task, chosen = [], {}
    for k, task in enumerate(spec.tasks):
        probs, chosen[task] = lightgbm_task((xt, yt), (xv, yv), xs, k, seeds, grid)
        per_task.append(probs)
    return [np.stack(per_task, 1)], chosen


def split_report_mask(data_dir: Path, split: str, holdout: ValidHoldoutConfig | None) -> np.ndarray | None:
    """The report rows of ``split`` (a mask) when a holdout is set and ``split`` is ``valid``."""
    if holdout is None or split != "valid":
        return None
    return report_mask(read_split(data_dir, split, columns=[holdout.key])[holdout.key].to_numpy(), holdout)


def paired_bootstrap_auc(labels: np.ndarray, probs: np.ndarray, base: np.ndarray, n_boot: int = 1000,
                         seed: int = 0) -> tuple[float, float, float]:
    """AUC(probs) - AUC(base) on the same rows and its 95% percentile interval, rows resampled."""
    rng = np.random.default_rng(seed)
    diffs = []
    n = len(labels)
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        diffs.append(auc(labels[idx], probs[idx]) - auc(labels[idx], base[idx]))
    return auc(labels, probs) - auc(labels, base), float(np.quantile(diffs, 0.025)), float(np.quantile(diffs, 0.975))


def verdict(low: float, high: float) -> str:
    return BETTER if low > 0 else WORSE if high < 0 else EQUAL


def summarize(name: str, runs: list[np.ndarray], labels: np.ndarray, meta: dict[str, np.ndarray],
              spec: FeatureSpec, split: str) -> dict[str, Any]:
    """Metrics of each seed's predictions and their mean and std over seeds."""
    per_seed = [score_predictions(p, labels, meta.get("_user"), spec.tasks, split) for p in runs]
    keys = sorted(per_seed[0])
    mean = {k: float(np.mean([m[k] for m in per_seed])) for k in keys}
    std = {k: float(np.std([m[k] for m in per_seed])) for k in keys}
    return {"name": name, "mean": mean, "std": std, "per_seed": per_seed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, type=Path, help="preprocessed folder")
    ap.add_argument("--config", action="append", default=[], help="NAME=train YAML (repeatable)")
    ap.add_argument("--set", action="append", default=[], help="NAME:key=value override for one config")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--split", default="test")
    ap.add_argument("--raw", type=Path, help="generator folder: the oracle's scores too")
    ap.add_argument("--baseline", help="config name the others are compared with (outcome classes)")
    ap.add_argument("--no-lightgbm", action="store_true")
    ap.add_argument("--lgbm-fixed", action="store_true", help="no grid: LGBM_FIXED (large data)")
    ap.add_argument("--json", type=Path, help="write all results here")
    ap.add_argument("--holdout", type=float, help="report_fraction of train.valid_holdout: select on the other "
                    "users' validation rows, report (--split valid) on these")
    ap.add_argument("--holdout-salt", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2,
                    help="LightGBM and torch threads (1 on a heavily shared machine: 2-thread regions stall)")
    args = ap.parse_args()
    global THREADS
    THREADS = args.threads

    spec = load_spec(args.data)
    holdout = None if args.holdout is None else ValidHoldoutConfig(report_fraction=args.holdout, salt=args.holdout_salt)
    report_rows = split_report_mask(args.data, args.split, holdout)
    started = time.time()
    print(f"# bench_quality {args.data} split={args.split} seeds={args.seeds} load={os.getloadavg()}"
          + (f" report rows {int(report_rows.sum())} of {len(report_rows)}" if report_rows is not None else ""), flush=True)
    results: dict[str, dict[str, Any]] = {}
    preds: dict[str, np.ndarray] = {}
    labels: np.ndarray | None = None
    meta: dict[str, np.ndarray] = {}
    for item in args.config:
        name, path = item.split("=", 1)
        overrides = [s.split(":", 1)[1] for s in args.set if s.split(":", 1)[0] == name]
        job = load_config(TrainJobConfig, path, overrides)
        runs = []
        for seed in args.seeds:
            update = {"seed": seed, "torch_threads": args.threads} | ({"valid_holdout": holdout} if holdout else {})
            cfg = job.train.model_copy(update=update)
            t0 = time.time()
            res = train_local(cfg, args.data)
            probs, labels, meta = take_report_rows(*predict(res.model, args.data, args.split, res.spec), holdout, args.split)
            runs.append(probs)
            gates = mean_routing(res.model, iter_local_batches(args.data, args.split, 8192, spec=res.spec)).get("gate")
            if gates is not None:  # per task: the largest share on one expert; per expert: its least use
                print(f"{name} seed {seed}: gate max share per task {np.round(gates.max(1), 3).tolist()}, "
                      f"expert use (mean over tasks) {np.round(gates.mean(0), 3).tolist()}", flush=True)
            chosen_on = cfg.early_stopping.metric  # the selection metric and every task's AUC at the chosen step
            valid = {k: round(v, 5) for k, v in res.metrics.items() if k == chosen_on or k.startswith("valid/auc_")}
            print(f"{name} seed {seed}: {time.time() - t0:.0f}s, steps {res.metrics.get('train/steps')}, valid {valid}", flush=True)
        assert labels is not None
        results[name] = summarize(name, runs, labels, meta, spec, args.split) | {"config": path, "overrides": overrides}
        preds[name] = np.mean(runs, 0)
    if labels is None:
        _, labels, meta = take_report_rows(*predict_first_split(args.data, args.split, spec), holdout, args.split)
    if not args.no_lightgbm:
        t0 = time.time()
        runs, chosen = run_lightgbm(args.data, spec, args.split, args.seeds, LGBM_FIXED if args.lgbm_fixed else LGBM_GRID,
                                    holdout)
        results["lightgbm"] = summarize("lightgbm", runs, labels, meta, spec, args.split) | {"params": chosen}
        preds["lightgbm"] = runs[0]
        print(f"lightgbm: {time.time() - t0:.0f}s, chosen {chosen}", flush=True)
    if args.raw is not None:
        oracle = oracle_probabilities(args.raw, meta, spec.tasks)
        if oracle is not None:
            results["oracle"] = summarize("oracle", [oracle], labels, meta, spec, args.split)
    print_table(results, spec, args.split)
    if args.baseline:
        results["outcomes"] = outcomes(preds, args.baseline, labels, meta, spec)
    results["load_average_end"] = list(os.getloadavg())
    results["wall_s"] = time.time() - started
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float))


def take_report_rows(probs: np.ndarray | None, labels: np.ndarray, meta: dict[str, np.ndarray],
                     holdout: ValidHoldoutConfig | None,
                     split: str) -> tuple[np.ndarray | None, np.ndarray, dict[str, np.ndarray]]:
    """Predictions, labels and meta of ``split``'s report rows (all rows without a holdout or
    off the validation split)."""
    if holdout is None or split != "valid":
        return probs, labels, meta
    rows = report_mask(meta[holdout.key], holdout)
    return None if probs is None else probs[rows], labels[rows], {k: v[rows] for k, v in meta.items()}


def predict_first_split(data_dir: Path, split: str, spec: FeatureSpec) -> tuple[None, np.ndarray, dict[str, np.ndarray]]:
    table = read_split(data_dir, split)
    labels = np.stack([table[t].to_numpy() for t in spec.tasks], 1)
    meta = {c: table[c].to_numpy() for c in ("_row", "_user") if c in table.column_names}
    return None, labels, meta


def print_table(results: dict[str, dict[str, Any]], spec: FeatureSpec, split: str) -> None:
    metric = "uauc" if any(f"{split}/uauc_{spec.tasks[0]}" in r["mean"] for r in results.values()) else "auc"
    cols = [f"{split}/{metric}_{t}" for t in spec.tasks] + ([f"{split}/score"] if metric == "uauc" else [])
    print("\n| set-up | " + " | ".join(c.split("/", 1)[1] for c in cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name, r in results.items():
        cells = [f"{r['mean'].get(c, float('nan')):.4f} ± {r['std'].get(c, 0.0):.4f}" for c in cols]
        print(f"| {name} | " + " | ".join(cells) + " |")


def outcomes(preds: dict[str, np.ndarray], baseline: str, labels: np.ndarray, meta: dict[str, np.ndarray],
             spec: FeatureSpec) -> dict[str, Any]:
    """Each set-up's seed-averaged predictions against the baseline's, task by task."""
    users = meta.get("_user")
    out: dict[str, Any] = {}
    for name, probs in preds.items():
        if name == baseline:
            continue
        verdicts, detail = {}, {}
        for k, task in enumerate(spec.tasks):
            if users is not None:
                d = paired_bootstrap_uauc(labels[:, k], probs[:, k], preds[baseline][:, k], users, n_boot=1000, seed=0)
                diff, low, high, verdicts[task] = d.diff, d.low, d.high, d.verdict
            else:
                diff, low, high = paired_bootstrap_auc(labels[:, k], probs[:, k], preds[baseline][:, k])
                verdicts[task] = verdict(low, high)
            detail[task] = {"diff": diff, "low": low, "high": high, "verdict": verdicts[task]}
        out[name] = {"tasks": detail, "outcome": classify(verdicts)}
        print(f"{name} vs {baseline}: {classify(verdicts)}  " + ", ".join(
            f"{t} {v['diff']:+.4f} [{v['low']:+.4f}, {v['high']:+.4f}] {v['verdict']}" for t, v in detail.items()))
    return out


if __name__ == "__main__":
    main()

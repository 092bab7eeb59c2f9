"""Preprocessing speed and memory: ``python -m pipeline preprocess`` with the distributed
builder (``--engine distributed``, the default), the single-process reference builder
(``--engine reference``) and a plain single-process pandas script, in one run.

    python bench/bench_preprocess.py --scale full --data /tmp/full_raw --order distributed,reference,distributed,reference
    python bench/bench_preprocess.py --data /tmp/x4_raw --order distributed --label x4 --object-store-gb 3

1. generates ``--scale`` WeChat-format data into ``--data`` with ``pipeline.generate`` unless it
   is already there (not timed; larger data: ``python -m pipeline generate --set multiplier=4``);
2. times each run of ``--order`` as a fresh process (Ray start-up included; Ray's workers at the
   bench's own niceness, ``RAY_worker_niceness=0`` unless set: Ray's default +15 would hand a
   shared machine's CPUs to other jobs before the engine that does more work in workers) under
   ``/usr/bin/time -v`` (the driver's peak RSS) while sampling the summed PSS of the driver's
   process tree (driver, Ray's GCS, raylet, workers, object store pages counted once);
3. checks the distributed and reference outputs are equal (spec, rows per split, the whole
   validation split to 1e-6), and the pandas output against the distributed one on the
   validation split (same rows, same ids, same history values, same PCA up to sign);
4. prints and writes a JSON summary (``WORK/bench_preprocess_<label>.json``).

The pandas baseline reads with ``pd.read_csv``, de-duplicates with ``drop_duplicates``, builds
vocabularies/encodings with ``pd.Categorical``, parses lists with ``str.split``/``explode``,
computes history windows with ``groupby`` + shifted ``merge`` per lag, and writes Parquet with
``to_parquet``; it implements the config of ``configs/datasets/wechat.yaml`` (history columns
flattened to one float column each instead of one fixed-width list per key group).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import load_config  # noqa: E402
from pipeline.datasets import DatasetConfig  # noqa: E402

WECHAT = ROOT / "configs" / "datasets" / "wechat.yaml"


# --------------------------------------------------------------------------------------------
# the plain pandas implementation


def _encode(values: pd.Series, train_values: pd.Series) -> tuple[np.ndarray, int]:
    vocab = np.sort(train_values.dropna().unique())
    codes = pd.Index(vocab).get_indexer(values).astype(np.int64)  # -1: unseen or missing
    return np.where(codes < 0, len(vocab), codes), len(vocab)


def pandas_preprocess(raw: Path, out: Path, cfg: DatasetConfig) -> dict:
    t0 = time.perf_counter()
    labels = [lab.name for lab in cfg.labels]
    acts = pd.read_csv(raw / "user_action.csv", usecols=list(cfg.main.columns))
    acts["_row"] = np.arange(1, len(acts) + 1)
    acts = acts.drop_duplicates(["userid", "feedid"], keep="last")
    test = pd.read_csv(raw / "test_a.csv")
    test["_row"] = np.arange(1, len(test) + 1)
    test["date_"] = 15
    rows = pd.concat([acts, test], ignore_index=True)
    labelled = rows[labels[0]].notna().to_numpy()
    feed_cols = list(cfg.side_tables[0].columns)
    feeds = pd.read_csv(raw / "feed_info.csv", usecols=feed_cols)
    emb = pd.read_csv(raw / "feed_embeddings.csv")
    sp = cfg.split
    day = rows["date_"].to_numpy()
    split = np.full(len(rows), -1)
    for code, rng in enumerate((sp.train_days, sp.valid_days, sp.test_days)):
        if rng is not None:
            split[(day >= rng[0]) & (day <= rng[1]) & (split < 0)] = code
    train = split == 0
    train_feeds = pd.Index(rows.loc[train, "feedid"].unique())
    ftrain = feeds.feedid.isin(train_feeds).to_numpy()

    # feed-level features
    ff = pd.DataFrame({"feedid": feeds.feedid})
    for f in cfg.sparse:
        if f.column in feeds.columns and f.column != "feedid":
            ff[f.name], _ = _encode(feeds[f.column], feeds.loc[ftrain, f.column])
    ff["videoplayseconds_log"] = np.log1p(feeds.videoplayseconds.astype(float)).astype(np.float32)
    for f in cfg.lists:
        s = feeds[f.column].fillna("").str.split(f.sep)
        s = s.map(lambda xs: [x for x in xs if x][: f.max_len])
        if f.weighted:
            pairs = s.map(lambda xs: [x.split(f.pair_sep) for x in xs])
            ids = pairs.map(lambda ps: [int(p[0]) for p in ps])
            ff[f.name + "__weight"] = pairs.map(lambda ps: np.array([float(p[1]) for p in ps], dtype=np.float32))
        else:
            ids = s.map(lambda xs: [int(x) for x in xs])
        exploded = ids.explode()
        train_ids = exploded[np.repeat(ftrain, ids.map(len).clip(lower=1).to_numpy())].dropna()
        codes, _ = _encode(exploded, train_ids.astype(np.int64))
        codes = pd.Series(codes, index=exploded.index)[exploded.notna()]
        grouped = codes.groupby(level=0).apply(lambda c: c.to_numpy(np.int64))
        ff[f.name] = [grouped.get(i, np.zeros(0, np.int64)) for i in range(len(feeds))]
    vec = cfg.vectors[0]
    # parsed in chunks: one Python str per float for all 512-d strings at once needs > 5 GB
    x = np.concatenate([
        np.array(emb.feed_embedding.iloc[i : i + 10_000].str.split().tolist(), dtype=np.float32)
        for i in range(0, len(emb), 10_000)
    ])
    xtrain = x[emb.feedid.isin(train_feeds).to_numpy()].astype(np.float64)
    mean = xtrain.mean(axis=0)
    xc = xtrain - mean
    evals, evecs = np.linalg.eigh(xc.T @ xc / (len(xc) - 1))
    comps = evecs[:, np.argsort(evals)[::-1][: vec.pca_dim]]
    signs = np.sign(comps[np.abs(comps).argmax(axis=0), np.arange(comps.shape[1])])
    comps = comps * np.where(signs == 0, 1, signs)
    pca = ((x - mean) @ comps).astype(np.float32)
    ef = pd.DataFrame({"feedid": emb.feedid, vec.name: list(pca)})

    # row-level: ids, joins
    rows = rows.merge(ff.rename(columns={"feedid": "_fid"}), left_on="feedid", right_on="_fid", how="left")
    rows = rows.merge(ef.rename(columns={"feedid": "_fid2"}), left_on="feedid", right_on="_fid2", how="left")
    rows = rows.merge(feeds[["feedid", "authorid"]].rename(columns={"feedid": "_fid3", "authorid": "_author"}),
                      left_on="feedid", right_on="_fid3", how="left")
    out_cols = {"_row": rows["_row"], "_user": rows["userid"], "_item": rows["feedid"], "_day": rows["date_"]}
    for f in cfg.sparse:
        if f.column in ("userid", "feedid", "device"):
            out_cols[f.name], _ = _encode(rows[f.column], rows.loc[train, f.column])
        else:
            out_cols[f.name] = rows[f.name].to_numpy()

    # history: daily sums per key group, window sums by shifted merges
    hist = cfg.history
    acts_h = rows.loc[labelled, ["userid", "_author", "feedid", "date_", *hist.actions]].copy()
    acts_h["_n"] = 1
    keymap = {"userid": "userid", "feedid": "feedid", "authorid": "_author"}
    hist_cols: dict[str, np.ndarray] = {}
    for keys in hist.keys:
        ks = [keymap[k] for k in keys]
        daily = acts_h.groupby([*ks, "date_"], sort=False)[["_n", *hist.actions]].sum().reset_index()
        name = "hist_" + "_".join(keys)
        for w in hist.windows:
            shifted = pd.concat([daily.assign(date_=daily.date_ + lag) for lag in range(1, w + 1)])
            win = shifted.groupby([*ks, "date_"], sort=False)[["_n", *hist.actions]].sum().reset_index()
            m = rows[[*ks, "date_"]].merge(win, on=[*ks, "date_"], how="left").fillna(0)
            n = m["_n"].to_numpy(np.float64)
            hist_cols[f"{name}_{w}d_n"] = np.log1p(n).astype(np.float32)
            for stat in hist.stats:
                for a in hist.actions:
                    c = m[a].to_numpy(np.float64)
                    v = np.log1p(c) if stat == "count" else np.divide(c, n, out=np.zeros_like(c), where=n > 0)
                    hist_cols[f"{name}_{w}d_{a}_{stat}"] = v.astype(np.float32)
    for f in cfg.lists:
        out_cols[f.name] = rows[f.name].to_numpy()
        if f.weighted:
            out_cols[f.name + "__weight"] = rows[f.name + "__weight"].to_numpy()
    out_cols["videoplayseconds_log"] = rows["videoplayseconds_log"].to_numpy()
    out_cols.update(hist_cols)
    out_cols[vec.name] = rows[vec.name].to_numpy()
    for a in labels:
        out_cols[a] = rows[a].to_numpy(np.float32)
    out_cols = {k: np.asarray(v) for k, v in out_cols.items()}
    del rows
    counts = {}
    for code, name in enumerate(("train", "valid", "test")):
        idx = np.flatnonzero(split == code)
        (out / name).mkdir(parents=True, exist_ok=True)
        for k, start in enumerate(range(0, len(idx), 1_000_000)):  # bounded memory: 1M-row files
            sub = idx[start : start + 1_000_000]
            part = pd.DataFrame({c: v[sub] for c, v in out_cols.items() if not (name == "test" and c in labels)})
            part.to_parquet(out / name / f"part-{k:03d}.parquet", index=False)
        counts[name] = len(idx)
    return {"splits": counts, "seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------------------------
# cross-check and driver


def cross_check(ray_out: Path, pandas_out: Path, cfg: DatasetConfig, n: int = 2000) -> dict:
    """Both outputs on the validation split: same rows, ids, history and |PCA|."""
    import pyarrow.parquet as pq

    from pipeline.data import read_split
    from pipeline.preprocess import history_feature_names

    r = read_split(ray_out, "valid").to_pandas().sort_values("_row").reset_index(drop=True)
    p = pq.read_table(pandas_out / "valid").to_pandas().sort_values("_row").reset_index(drop=True)
    assert len(r) == len(p) and np.array_equal(r._row, p._row), "different validation rows"
    idx = np.random.default_rng(0).choice(len(r), size=min(n, len(r)), replace=False)
    r, p = r.iloc[idx], p.iloc[idx]
    for f in cfg.sparse:
        assert np.array_equal(r[f.name].to_numpy(), p[f.name].to_numpy()), f.name
    for f in cfg.lists:
        assert all(np.array_equal(a, b) for a, b in zip(r[f.name], p[f.name])), f.name
    hmax = 0.0
    for keys in cfg.history.keys:
        name = "hist_" + "_".join(keys)
        names = history_feature_names(name, cfg.history.windows, cfg.history.actions, cfg.history.stats)
        got = np.stack(r[name].to_numpy())
        want = p[names].to_numpy()
        hmax = max(hmax, float(np.abs(got - want).max()))
    assert hmax < 1e-5, f"history differs by {hmax}"
    pr = np.abs(np.stack(r[cfg.vectors[0].name].to_numpy()))
    pp = np.abs(np.stack(p[cfg.vectors[0].name].to_numpy()))
    pmax = float(np.abs(pr - pp).max())
    assert pmax < 1e-3, f"PCA differs by {pmax}"
    return {"rows_compared": len(idx), "history_max_abs_diff": hmax, "pca_max_abs_diff": pmax}


def _tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (a local Ray's GCS, raylet and workers are the driver's)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _pss_mb(pids: list[int]) -> float:
    """Summed proportional set size (shared pages, e.g. the object store, split between the
    processes mapping them, so counted once) of the processes, MB."""
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def _timed(cmd: list[str]) -> tuple[float, str, dict]:
    """Run ``cmd`` under ``/usr/bin/time -v``; wall seconds, stdout, and memory: the driver's
    peak RSS (time -v) and the peak summed PSS of its process tree (sampled every 0.5 s)."""
    import threading

    t0 = time.perf_counter()
    proc = subprocess.Popen(["/usr/bin/time", "-v", *cmd], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={"RAY_worker_niceness": "0", **os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    peak = {"tree_pss_mb": 0.0}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.5):
            peak["tree_pss_mb"] = max(peak["tree_pss_mb"], _pss_mb(_tree(proc.pid)))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    done.set()
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{stderr[-3000:]}")
    rss = [int(line.split()[-1]) for line in stderr.splitlines() if "Maximum resident set size" in line]
    return dt, stdout, {"driver_peak_rss_mb": round(rss[-1] / 1024, 1) if rss else None,
                        "tree_peak_pss_mb": round(peak["tree_pss_mb"], 1)}


def compare_outputs(a: Path, b: Path) -> dict:
    """Two preprocess outputs: same spec, same rows per split, the validation split equal
    (every column; floats to 1e-6)."""
    from pipeline.data import read_split

    assert (a / "feature_spec.json").read_text() == (b / "feature_spec.json").read_text(), "feature_spec.json differs"
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (a, b))
    assert ra["splits"] == rb["splits"], (ra["splits"], rb["splits"])
    x, y = read_split(a, "valid"), read_split(b, "valid")
    assert x.column_names == y.column_names and x.num_rows == y.num_rows
    worst = 0.0
    for c in x.column_names:
        if not x[c].equals(y[c]):
            u = np.asarray(x[c].to_pylist(), dtype=float)
            v = np.asarray(y[c].to_pylist(), dtype=float)
            worst = max(worst, float(np.nanmax(np.abs(u - v))))
    assert worst <= 1e-6, f"validation split differs by {worst}"
    return {"valid_rows_compared": x.num_rows, "max_abs_diff": worst}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", default="full", choices=["tiny", "small", "full"])
    ap.add_argument("--data", type=Path, default=None, help="raw data dir (generated if missing)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_preprocess"))
    ap.add_argument("--order", default="distributed,reference",
                    help="runs in this order, repeats allowed: distributed, reference (the single-process "
                         "builder), pandas (e.g. distributed,reference,distributed,reference)")
    ap.add_argument("--object-store-gb", type=float, default=None, help="passed to preprocess")
    ap.add_argument("--label", default=None, help="name of the JSON summary (default: the scale)")
    ap.add_argument("--pandas-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    cfg = load_config(DatasetConfig, WECHAT)
    if args.pandas_only:
        print(json.dumps(pandas_preprocess(args.data, args.out, cfg)))
        return 0
    data = args.data or args.work / f"raw_{args.scale}"
    if not (data / "_GENERATED.json").exists():
        from pipeline.generate import generate

        t0 = time.perf_counter()
        generate(data, scale=args.scale, seed=0)
        print(f"generated {args.scale} data in {time.perf_counter() - t0:.1f}s -> {data}", flush=True)
    args.work.mkdir(parents=True, exist_ok=True)
    outs = {w: args.work / f"{w}_out" for w in ("distributed", "reference", "pandas")}
    result: dict = {"data": str(data), "rows": json.loads((data / "_GENERATED.json").read_text())["rows"],
                    "cpus": os.cpu_count(), "load_before": os.getloadavg(), "runs": []}
    for which in args.order.split(","):
        if which in ("distributed", "reference"):
            cmd = [sys.executable, "-m", "pipeline", "preprocess", "--raw", str(data), "--out", str(outs[which]),
                   "--engine", which]
            if args.object_store_gb:
                cmd += ["--object-store-gb", str(args.object_store_gb)]
            dt, _, mem = _timed(cmd)
            rep = json.loads((outs[which] / "report.json").read_text())
            run = {"engine": which, "seconds": round(dt, 1), **mem, "splits": rep["splits"], "stages_s": rep["timings_s"]}
        else:
            import shutil

            shutil.rmtree(outs["pandas"], ignore_errors=True)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--pandas-only", "--data", str(data), "--out",
                   str(outs["pandas"])]
            dt, stdout, mem = _timed(cmd)
            run = {"engine": "pandas", "seconds": round(dt, 1), **mem,
                   "splits": json.loads(stdout.strip().splitlines()[-1])["splits"]}
        run["load_after"] = os.getloadavg()
        result["runs"].append(run)
        print(json.dumps(run), flush=True)
    result["load_after"] = os.getloadavg()
    ran = {r["engine"] for r in result["runs"]}
    by = {e: [r["seconds"] for r in result["runs"] if r["engine"] == e] for e in ran}
    result["median_seconds"] = {e: float(np.median(v)) for e, v in by.items()}
    if {"distributed", "reference"} <= ran:
        result["equal_outputs"] = compare_outputs(outs["reference"], outs["distributed"])
        result["ratio_distributed_over_reference"] = round(result["median_seconds"]["distributed"]
                                                           / result["median_seconds"]["reference"], 3)
    if {"distributed", "pandas"} <= ran:
        result["cross_check_pandas"] = cross_check(outs["distributed"], outs["pandas"], cfg)
    path = args.work / f"bench_preprocess_{args.label or args.scale}.json"
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

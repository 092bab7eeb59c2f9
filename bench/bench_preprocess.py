"""Preprocessing speed: ``python -m pipeline preprocess`` (Ray Data) against a plain
single-process pandas script computing the same features, in one run.

    python bench/bench_preprocess.py --scale full --data data/gen_full --work /tmp/bench_pp

1. generates ``--scale`` WeChat-format data into ``--data`` with ``pipeline.generate`` unless it
   is already there (not timed);
2. times ``python -m pipeline preprocess --raw DATA --out WORK/ray`` (a fresh process, Ray
   start-up included) and ``python bench/bench_preprocess.py --pandas-only ...`` (a fresh
   process), in the order given by ``--order``;
3. cross-checks the two outputs on the validation split (same rows, same ids, same history
   values, same PCA up to sign) so the comparison is of the same work;
4. prints and writes a JSON summary (``WORK/bench_preprocess_<scale>.json``).

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


def _timed(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return dt, proc.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", default="full", choices=["tiny", "small", "full"])
    ap.add_argument("--data", type=Path, default=None, help="raw data dir (generated if missing)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_preprocess"))
    ap.add_argument("--order", default="ray,pandas")
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
    ray_out, pandas_out = args.work / "ray_out", args.work / "pandas_out"
    result: dict = {"scale": args.scale, "data": str(data), "cpus": os.cpu_count(), "load_before": os.getloadavg()}
    for which in args.order.split(","):
        if which == "ray":
            cmd = [sys.executable, "-m", "pipeline", "preprocess", "--raw", str(data), "--out", str(ray_out)]
            dt, _ = _timed(cmd)
            rep = json.loads((ray_out / "report.json").read_text())
            result["ray"] = {"seconds": round(dt, 1), "command": " ".join(cmd[1:]), "splits": rep["splits"], "stages_s": rep["timings_s"]}
        else:
            import shutil

            shutil.rmtree(pandas_out, ignore_errors=True)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--pandas-only", "--data", str(data), "--out", str(pandas_out)]
            dt, stdout = _timed(cmd)
            result["pandas"] = {"seconds": round(dt, 1), "splits": json.loads(stdout.strip().splitlines()[-1])["splits"]}
        print(f"{which}: {dt:.1f}s", flush=True)
    result["load_after"] = os.getloadavg()
    result["cross_check"] = cross_check(ray_out, pandas_out, cfg)
    assert result["ray"]["splits"] == result["pandas"]["splits"], (result["ray"]["splits"], result["pandas"]["splits"])
    result["speedup_pandas_over_ray"] = round(result["pandas"]["seconds"] / result["ray"]["seconds"], 2)
    path = args.work / f"bench_preprocess_{args.scale}.json"
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

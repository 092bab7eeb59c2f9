"""The WeChat-format generator: file formats read back like the real files, planted-model
properties (rates, oracle, history signal, task relatedness), determinism and atomic writes."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline import cli
from pipeline import generate as gen
from pipeline.config import load_config

FILES = ("user_action.csv", "feed_info.csv", "feed_embeddings.csv", "test_a.csv",
         "oracle/oracle_train.parquet", "oracle/oracle_test_a.parquet", "_GENERATED.json")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return gen.generate(tmp_path_factory.mktemp("tiny") / "wechat_algo_data1", scale="tiny", seed=0)


@pytest.fixture(scope="module")
def frames(tiny: Path) -> dict[str, pd.DataFrame]:
    # exactly how competition code reads the real files: plain pd.read_csv
    return {name: pd.read_csv(tiny / f"{name}.csv")
            for name in ("user_action", "feed_info", "feed_embeddings", "test_a")}


def _logit(p: np.ndarray) -> np.ndarray:
    p = p.astype(np.float64)
    return np.log(p / (1 - p))


# ----------------------------------------------------------------------------- formats

def test_columns_in_order_and_plain_csv(tiny: Path, frames: dict[str, pd.DataFrame]) -> None:
    expected = {"user_action": gen.USER_ACTION_COLUMNS, "feed_info": gen.FEED_INFO_COLUMNS,
                "feed_embeddings": gen.FEED_EMBEDDING_COLUMNS, "test_a": gen.TEST_COLUMNS}
    assert expected["user_action"][:4] == ("userid", "feedid", "date_", "device")
    assert len(expected["user_action"]) == 13 and len(expected["feed_info"]) == 15
    for name, cols in expected.items():
        raw = (tiny / f"{name}.csv").read_bytes()
        assert raw.split(b"\n", 1)[0] == ",".join(cols).encode()  # unquoted header, "\n" endings
        assert b'"' not in raw and b"\r" not in raw
        assert raw.endswith(b"\n")
        assert tuple(frames[name].columns) == cols
        with open(tiny / f"{name}.csv", newline="") as fh:
            widths = {len(row) for row in csv.reader(fh)}
        assert widths == {len(cols)}, f"{name}: ragged rows {widths}"


def test_user_action_dtypes_and_values(frames: dict[str, pd.DataFrame], tiny: Path) -> None:
    ua = frames["user_action"]
    assert len(ua) == gen.SCALES["tiny"][2]
    assert all(pd.api.types.is_integer_dtype(ua[c]) for c in ua.columns), ua.dtypes
    for a in gen.ACTIONS:
        assert set(ua[a].unique()) <= {0, 1}
    assert set(ua["device"].unique()) == {1, 2}
    assert (ua["play"] >= 0).all() and (ua["stay"] >= ua["play"]).all()
    vps = ua["feedid"].map(frames["feed_info"].set_index("feedid")["videoplayseconds"])
    assert vps.notna().all()
    assert (ua["play"] <= 6 * 1000 * vps + 1).all()
    assert (ua["play"] > 1000 * vps).any()  # replays exist
    assert ua.groupby("userid").size().max() <= 980


def test_feed_info_fields(frames: dict[str, pd.DataFrame]) -> None:
    fi = frames["feed_info"]
    assert fi["feedid"].is_unique and pd.api.types.is_integer_dtype(fi["feedid"])
    assert pd.api.types.is_integer_dtype(fi["authorid"])
    assert pd.api.types.is_integer_dtype(fi["videoplayseconds"]) and (fi["videoplayseconds"] > 0).all()
    # empty fields exist where the real data has them
    for col in ("description", "ocr", "asr", "bgm_song_id", "bgm_singer_id", "manual_keyword_list",
                "machine_keyword_list", "description_char", "ocr_char", "asr_char"):
        assert fi[col].isna().any(), col
        assert fi[col].notna().any(), col
    assert fi["bgm_song_id"].isna().equals(fi["bgm_singer_id"].isna())
    for word, char in (("description", "description_char"), ("ocr", "ocr_char"), ("asr", "asr_char")):
        assert fi[word].isna().equals(fi[char].isna())
        toks = fi[word].dropna().str.split(" ")
        assert toks.map(lambda t: all(x.isdigit() for x in t)).all()
    for col in ("manual_keyword_list", "machine_keyword_list", "manual_tag_list"):
        lists = fi[col].dropna().astype(str).str.split(";")
        assert lists.map(lambda t: all(x.isdigit() for x in t) and len(set(t)) == len(t)).all(), col
        assert (lists.map(len) > 1).any(), col
    pairs = fi["machine_tag_list"].dropna().str.split(";").explode().str.split(" ")
    assert pairs.map(len).eq(2).all()
    tag = pairs.map(lambda p: int(p[0]))
    prob = pairs.map(lambda p: float(p[1]))
    assert (tag >= 0).all() and prob.between(0, 1).all()
    assert pairs.map(lambda p: len(p[1].split(".")[1]) == 4).all()


def test_embeddings_512_floats(frames: dict[str, pd.DataFrame]) -> None:
    emb = frames["feed_embeddings"]
    fi = frames["feed_info"]
    assert set(emb["feedid"]) == set(fi["feedid"]) and emb["feedid"].is_unique
    vecs = emb["feed_embedding"].str.split(" ")
    assert vecs.map(len).eq(gen.EMBEDDING_DIM).all()
    x = np.array(vecs.tolist(), dtype=np.float64)
    assert np.isfinite(x).all() and x.std() > 0
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-3)  # rows written unit-norm
    first = emb["feed_embedding"].iloc[0].split(" ")
    assert all(len(v.split(".")[1]) == 6 and "e" not in v for v in first)


def test_test_a_and_cold_start(frames: dict[str, pd.DataFrame], tiny: Path) -> None:
    ua, te, fi = frames["user_action"], frames["test_a"], frames["feed_info"]
    assert len(te) == gen.SCALES["tiny"][3]
    assert all(pd.api.types.is_integer_dtype(te[c]) for c in te.columns)
    assert set(te["feedid"]) <= set(fi["feedid"]) and set(ua["feedid"]) <= set(fi["feedid"])
    assert set(te["userid"]) <= set(ua["userid"])
    test_feeds = set(te["feedid"])
    cold = len(test_feeds - set(ua["feedid"])) / len(test_feeds)
    assert 0.14 <= cold <= 0.20, cold
    manifest = json.loads((tiny / gen.MANIFEST).read_text())
    assert manifest["test_cold_share"] == pytest.approx(cold)


def test_days_order_duplicates_and_skew(frames: dict[str, pd.DataFrame]) -> None:
    ua = frames["user_action"]
    assert sorted(ua["date_"].unique()) == list(range(1, 15))
    # a user's rows are contiguous and in day order
    starts = ua["userid"].ne(ua["userid"].shift())
    assert starts.sum() == ua["userid"].nunique()
    same_user = ~starts
    assert (ua["date_"].diff()[same_user] >= 0).all()
    assert ua.duplicated(["userid", "feedid"]).sum() > 0
    pop = ua["feedid"].value_counts().to_numpy()
    top = pop[: len(pop) // 10].sum() / pop.sum()
    assert top > 0.3, f"top 10% of feeds get only {top:.3f} of impressions"
    assert pop.max() > 10 * np.median(pop)


def test_max_actions_per_user_cap(tmp_path: Path) -> None:
    out = gen.generate(tmp_path / "d", n_users=40, n_feeds=400, n_actions=4000, n_test=200,
                       max_actions_per_user=120)
    per_user = pd.read_csv(out / "user_action.csv").groupby("userid").size()
    assert per_user.sum() == 4000 and per_user.max() == 120 and per_user.min() >= 1


# ----------------------------------------------------------------------------- oracle

def test_oracle_separate_and_aligned(tiny: Path, frames: dict[str, pd.DataFrame]) -> None:
    for name, df in frames.items():
        assert not any(c.startswith("p_") for c in df.columns), name
    ua, te = frames["user_action"], frames["test_a"]
    otr = pq.read_table(tiny / "oracle" / "oracle_train.parquet").to_pandas()
    ote = pq.read_table(tiny / "oracle" / "oracle_test_a.parquet").to_pandas()
    assert list(otr.columns) == ["row", "userid", "feedid", "date_", "device"] + [f"p_{a}" for a in gen.ACTIONS]
    assert (otr["row"].to_numpy() == np.arange(len(ua))).all()
    for c in ("userid", "feedid", "date_", "device"):
        assert (otr[c].to_numpy() == ua[c].to_numpy()).all(), c
    for c in ("userid", "feedid", "device"):
        assert (ote[c].to_numpy() == te[c].to_numpy()).all(), c
    assert (ote["date_"] == 15).all()
    for a in gen.ACTIONS:
        p = otr[f"p_{a}"].to_numpy(np.float64)
        assert ((p > 0) & (p < 1)).all()
        # per-day intercepts make the mean true probability equal the target rate
        assert p.mean() == pytest.approx(gen.REAL_RATES[a], rel=1e-4)
        assert ote[f"p_{a}"].mean() == pytest.approx(gen.REAL_RATES[a], rel=1e-4)
        assert set(ote[a].unique()) <= {0, 1}
    # realised labels were drawn from the oracle row by row: positives have a far higher true
    # probability (5x for read_comment; 1.5x when the oracle is shifted by one row), and every
    # action's labels are likelier under the aligned oracle than under one shifted by a row
    # either way (the rows of a user are alike, so a weak check passes a shift)
    pos = otr["p_read_comment"][ua["read_comment"] == 1].mean()
    neg = otr["p_read_comment"][ua["read_comment"] == 0].mean()
    assert pos > 4 * neg
    for a in gen.ACTIONS:
        y = ua[a].to_numpy()
        p = otr[f"p_{a}"].to_numpy(np.float64)

        def loglik(q: np.ndarray) -> float:
            return float(np.mean(y * np.log(q) + (1 - y) * np.log(1 - q)))

        aligned = loglik(p)
        for shift in (1, -1):
            assert aligned > loglik(np.roll(p, shift)) + 0.1 * abs(aligned), (a, shift)


def test_history_with_author_has_signal(tiny: Path, frames: dict[str, pd.DataFrame]) -> None:
    ua = frames["user_action"].copy()
    ua["authorid"] = ua["feedid"].map(frames["feed_info"].set_index("feedid")["authorid"])
    otr = pq.read_table(tiny / "oracle" / "oracle_train.parquet").to_pandas()
    ua["acted"] = ua[list(gen.ACTIONS)].any(axis=1)
    # did the user act on this author on a strictly earlier day?
    first_act = ua[ua["acted"]].groupby(["userid", "authorid"])["date_"].min().rename("first_act_day")
    ua = ua.join(first_act, on=["userid", "authorid"])
    had = (ua["first_act_day"] < ua["date_"]).to_numpy()
    assert had.sum() > 50
    lo = _logit(otr["p_like"].to_numpy())
    day = ua["date_"].to_numpy()
    # compare within days (intercepts differ by day)
    gaps = [lo[(day == t) & had].mean() - lo[(day == t) & ~had].mean()
            for t in range(2, 15) if ((day == t) & had).sum() > 5]
    assert np.mean(gaps) > 0.5


def test_embedding_carries_signal(tiny: Path, frames: dict[str, pd.DataFrame]) -> None:
    """A 16-dim PCA of feed_embedding predicts (held out) a feed's mean true logit; shuffled
    embeddings do not."""
    otr = pq.read_table(tiny / "oracle" / "oracle_train.parquet").to_pandas()
    otr["lo"] = _logit(otr["p_read_comment"].to_numpy())
    otr["lo"] -= otr.groupby("date_")["lo"].transform("mean")  # drop the per-day intercepts
    target = otr.groupby("feedid")["lo"].mean()
    emb = frames["feed_embeddings"].set_index("feedid")["feed_embedding"]
    x = np.array(emb.loc[target.index].str.split(" ").tolist(), dtype=np.float64)
    x -= x.mean(axis=0)
    pcs = x @ np.linalg.svd(x, full_matrices=False)[2][:16].T
    y = target.to_numpy() - target.mean()

    def held_out_r2(feats: np.ndarray) -> float:
        half = len(y) // 2
        a = np.column_stack([feats, np.ones(len(y))])
        coef = np.linalg.lstsq(a[:half], y[:half], rcond=None)[0]
        resid = y[half:] - a[half:] @ coef
        return 1 - resid.var() / y[half:].var()

    r2 = held_out_r2(pcs)
    r2_shuffled = held_out_r2(pcs[np.random.default_rng(0).permutation(len(y))])
    assert r2 > 0.05 and r2 > r2_shuffled + 0.05, (r2, r2_shuffled)


def test_solve_intercept_matches_rate() -> None:
    z = np.random.default_rng(0).normal(0, 2, 10_000)
    for rate in (0.0004, 0.035, 0.3):
        b = gen.solve_intercept(z, rate)
        assert (1 / (1 + np.exp(-(b + z)))).mean() == pytest.approx(rate, rel=1e-8)


@pytest.mark.parametrize("r", [0.0, 0.3, 1.0])
def test_task_direction_cosines(r: float) -> None:
    c = 0.2
    w = gen.task_directions(np.random.default_rng(1), 16, r, c)
    s = np.array(gen.CONFLICT_SIGNS, dtype=float)
    expected = r + (1 - r) * c * np.outer(s, s)
    np.fill_diagonal(expected, 1.0)
    np.testing.assert_allclose(w.T @ w, expected, atol=1e-12)


def test_relatedness_knob_raises_task_correlation(tmp_path: Path) -> None:
    def mean_corr(r: float) -> float:
        out = gen.generate(tmp_path / f"r{r}", seed=3, task_relatedness=r, n_actions=8000, n_test=100)
        o = pq.read_table(out / "oracle" / "oracle_train.parquet").to_pandas()
        o = o[o["date_"] == 1]  # one day: one intercept per task, no history yet
        lo = np.column_stack([_logit(o[f"p_{a}"].to_numpy()) for a in gen.ACTIONS])
        cc = np.corrcoef(lo.T)
        return float(cc[np.triu_indices(len(gen.ACTIONS), 1)].mean())

    low, mid, high = mean_corr(0.0), mean_corr(0.5), mean_corr(1.0)
    assert low < mid < high
    assert high > 0.95 and low < 0.3


# ----------------------------------------------------------------------------- rates

def test_small_positive_rates(tmp_path: Path) -> None:
    out = gen.generate(tmp_path / "small", scale="small", seed=1)
    ua = pd.read_csv(out / "user_action.csv", usecols=list(gen.ACTIONS))
    p = pd.read_parquet(out / "oracle" / "oracle_train.parquet", columns=[f"p_{a}" for a in gen.ACTIONS])
    n = len(ua)
    assert n == gen.SCALES["small"][2]
    for a, target in gen.REAL_RATES.items():
        se = np.sqrt(target * (1 - target) / n)
        assert abs(ua[a].mean() - target) < 4 * se, (a, ua[a].mean(), target)
        assert abs(ua[a].mean() - p[f"p_{a}"].mean()) < 4 * se
    m = json.loads((out / gen.MANIFEST).read_text())
    assert 0.15 <= m["test_cold_share"] <= 0.19


# ----------------------------------------------------------------------------- reproducibility, CLI

def test_deterministic_by_seed(tmp_path: Path, tiny: Path) -> None:
    again = gen.generate(tmp_path / "again", scale="tiny", seed=0)
    for rel in FILES:
        assert (again / rel).read_bytes() == (tiny / rel).read_bytes(), rel
    other = gen.generate(tmp_path / "other", scale="tiny", seed=1)
    for rel in ("user_action.csv", "feed_info.csv", "feed_embeddings.csv", "test_a.csv"):
        assert (other / rel).read_bytes() != (tiny / rel).read_bytes(), rel


def test_atomic_write_leaves_nothing_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_args, **_kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(gen, "_write_embeddings", boom)
    out = tmp_path / "d"
    with pytest.raises(RuntimeError, match="interrupted"):
        gen.generate(out, scale="tiny", seed=0)
    assert not out.exists() and list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())


def test_manifest(tiny: Path, frames: dict[str, pd.DataFrame]) -> None:
    m = json.loads((tiny / gen.MANIFEST).read_text())
    assert m["seed"] == 0 and m["scale"] == "tiny"
    assert m["rows"] == {k: len(v) for k, v in frames.items()}
    for a in gen.ACTIONS:
        assert m["rates_train"][a] == pytest.approx(frames["user_action"][a].mean())
        assert len(m["intercepts_by_day"][a]) == 15
    assert m["duplicate_rows"] == int(frames["user_action"].duplicated(["userid", "feedid"]).sum())
    # every file's size and SHA-256, so a reader can tell this dataset's files from another's
    assert set(m["files"]) == set(FILES[:-1])
    for rel, info in m["files"].items():
        data = (tiny / rel).read_bytes()
        assert info == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, rel


def test_yaml_defaults_match_model() -> None:
    from_yaml = load_config(gen.GenerateConfig, gen.DEFAULT_CONFIG_PATH)
    assert from_yaml == gen.GenerateConfig()
    raw = yaml.safe_load(gen.DEFAULT_CONFIG_PATH.read_text())
    assert set(raw) == set(gen.GenerateConfig.model_fields)


def test_bad_config_is_named() -> None:
    with pytest.raises(ValueError, match="target_rates"):
        gen.build_config(overrides=["target_rates={like: 0.1}"])
    with pytest.raises(ValueError, match="task_relatedness"):
        gen.build_config(overrides=["task_relatedness=1.5"])
    with pytest.raises(ValueError, match="n_actions"):
        gen.GenerateConfig(n_users=10, n_actions=20_000, max_actions_per_user=100)


def test_cli_generate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    rc = cli.main(["generate", "--out", str(out), "--scale", "tiny", "--seed", "5", "--quiet",
                   "--set", "task_relatedness=0.9", "--set", "n_test=300"])
    assert rc == 0
    m = json.loads((out / gen.MANIFEST).read_text())
    assert m["seed"] == 5 and m["config"]["task_relatedness"] == 0.9 and m["rows"]["test_a"] == 300
    printed = json.loads(capsys.readouterr().out)
    assert printed["rows"] == m["rows"]


def test_toy_sizes_with_empty_days(tmp_path: Path) -> None:
    out = gen.generate(tmp_path / "toy", n_users=2, n_feeds=20, n_actions=10, n_test=10)
    ua = pd.read_csv(out / "user_action.csv")
    m = json.loads((out / gen.MANIFEST).read_text())
    assert len(ua) == 10 and ua["date_"].nunique() < 14
    empty_days = set(range(1, 15)) - set(ua["date_"])
    assert all(m["intercepts_by_day"]["like"][d - 1] is None for d in empty_days)
    assert len(pd.read_csv(out / "test_a.csv")) == 10


# ----------------------------------------------------------------------------- publishing --out

TOY = {"n_users": 2, "n_feeds": 20, "n_actions": 10, "n_test": 10}


def test_a_failed_publish_keeps_the_previous_dataset_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = gen.generate(tmp_path / "d", seed=0, **TOY)
    before = {rel: (out / rel).read_bytes() for rel in FILES}
    moves = {"n": 0}

    def second_move_fails(real):
        def move(*args, **kwargs):
            moves["n"] += 1
            if moves["n"] == 2:  # the process dies between two moves of the publish
                raise OSError("killed while publishing")
            return real(*args, **kwargs)
        return move

    monkeypatch.setattr(os, "replace", second_move_fails(os.replace))
    monkeypatch.setattr(Path, "rename", second_move_fails(Path.rename))
    with pytest.raises(OSError, match="killed while publishing"):
        gen.generate(out, seed=1, **TOY)
    monkeypatch.undo()
    assert {rel: (out / rel).read_bytes() for rel in FILES} == before  # all of the old dataset, no mix
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_out_must_be_this_generators_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    toy = [f"--set={k}={v}" for k, v in TOY.items()]
    spark = tmp_path / "spark"
    spark.mkdir()
    (spark / "_SUCCESS").write_text("")
    (spark / "part-00000.parquet").write_text("someone else's data")
    assert cli.main(["generate", "--out", str(spark), "--quiet", *toy]) == 2
    assert "was not written by pipeline generate" in capsys.readouterr().err
    assert sorted(p.name for p in spark.iterdir()) == ["_SUCCESS", "part-00000.parquet"]
    (tmp_path / "file").write_text("x")
    assert cli.main(["generate", "--out", str(tmp_path / "file"), "--quiet", *toy]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err


def test_killed_runs_leftovers_are_removed_and_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = gen.generate(tmp_path / "d", seed=0, **TOY)
    dead = 999_999_999  # no such pid
    legacy = out / f".tmp-generate-{dead}"  # where older versions built, inside --out
    leftovers = [tmp_path / f".d.tmp-{dead}-0badc0de", tmp_path / f".d.old-{dead}-0badc0de", legacy]
    live = tmp_path / f".d.tmp-{os.getppid()}-cafef00d"  # a live process's work: kept
    for d in [*leftovers, live]:
        d.mkdir()
        (d / "user_action.csv").write_text("partial")
    capsys.readouterr()
    gen.generate(out, seed=0, **TOY)
    assert not any(d.exists() for d in leftovers) and live.exists()
    assert "generate: removed 2 unfinished build folder(s) of killed runs" in capsys.readouterr().err
    # a first run of an older version, killed, left only its build folder: replaced, not refused
    shutil.rmtree(out)
    legacy.mkdir(parents=True)
    assert (gen.generate(out, seed=0, **TOY) / gen.MANIFEST).exists() and not legacy.exists()


def test_multiplier_appends_user_shards_one_at_a_time(tiny: Path, tmp_path: Path) -> None:
    """``multiplier=3``: shard 0 is the plain dataset, byte for byte; shards 1-2 add their own
    users (ids disjoint) on the same feeds; the oracle rows stay aligned with the CSV rows."""
    out = gen.generate(tmp_path / "x3", scale="tiny", seed=0, multiplier=3)
    one = (tiny / "user_action.csv").read_bytes()
    three = (out / "user_action.csv").read_bytes()
    assert three.startswith(one) and len(three) > 2.5 * len(one)
    for name in ("feed_info.csv", "feed_embeddings.csv"):
        assert (out / name).read_bytes() == (tiny / name).read_bytes()
    ua = pd.read_csv(out / "user_action.csv")
    m = json.loads((out / gen.MANIFEST).read_text())
    base = json.loads((tiny / gen.MANIFEST).read_text())
    assert m["rows"]["user_action"] == len(ua) == 3 * base["rows"]["user_action"]
    assert m["rows"]["test_a"] == len(pd.read_csv(out / "test_a.csv")) == 3 * base["rows"]["test_a"]
    n = base["rows"]["user_action"]
    users = [set(ua.userid[k * n:(k + 1) * n]) for k in range(3)]
    assert not (users[0] & users[1]) and not (users[1] & users[2]) and m["users"] == sum(map(len, users))
    oracle = pq.read_table(out / gen.ORACLE_DIR / "oracle_train.parquet").to_pandas()
    assert oracle.row.tolist() == list(range(len(ua))) and (oracle.userid.to_numpy() == ua.userid.to_numpy()).all()
    te = pq.read_table(out / gen.ORACLE_DIR / "oracle_test_a.parquet").to_pandas()
    assert te.row.tolist() == list(range(len(te))) and len(m["shards"]) == 3
    for a in ("like", "read_comment"):  # each shard's intercepts hit the target rate on its own rows
        assert abs(m["rates_train"][a] - m["target_rates"][a]) < 0.25 * m["target_rates"][a]

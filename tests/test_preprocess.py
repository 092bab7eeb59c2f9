"""pipeline.preprocess: schema vs feature spec, training-only fitting, history without leaks,
splits/sampling, bad input (file, column and row named), atomic output, the Adult config."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mtl.features import WEIGHT_SUFFIX, FeatureSpec
from mtl.inputs import InputModule
from pipeline.config import load_config
from pipeline.data import load_spec, read_split
from pipeline.datasets import DatasetConfig
from pipeline.errors import OutputError
from pipeline.preprocess import (
    DEFAULT_CONFIG,
    SUCCESS,
    DataError,
    HistoryGroup,
    build_history_group,
    fit_pca,
    history_features,
    preprocess,
)

# every test here may reach the row reads, which run in Ray tasks: the session's two-node
# cluster, never a private Ray started inside a test (it would shadow the cluster)
pytestmark = pytest.mark.usefixtures("ray_session")

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "datasets"
# the shared data sit next to the repository: <repo>/../shared/data/adult
ADULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "adult"
ACTIONS = ["read_comment", "like", "click_avatar", "forward", "favorite", "comment", "follow"]


def wechat_cfg(*overrides: str) -> DatasetConfig:
    return load_config(DatasetConfig, DEFAULT_CONFIG, list(overrides))


@pytest.fixture(scope="session")
def small_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A very small generated raw dir (trailing spaces in embeddings, like some real dumps).

    Every action at a 10 % rate: at the real rates 600 rows hold no positive of some tasks,
    which preprocess rejects (a task with nothing to learn)."""
    from pipeline.generate import ACTIONS as ALL_ACTIONS
    from pipeline.generate import generate

    return Path(
        generate(
            tmp_path_factory.mktemp("raw_small") / "d", seed=3, n_users=20, n_feeds=80, n_actions=600,
            n_test=40, embedding_trailing_space=True, target_rates={a: 0.1 for a in ALL_ACTIONS},
        )
    )


@pytest.fixture()
def raw_copy(small_raw: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "raw"
    # without the manifest: these tests edit the files, which preprocess would reject as not the generated ones
    shutil.copytree(small_raw, dst, ignore=shutil.ignore_patterns("oracle", "_GENERATED.json"))
    return dst


def edit_line(path: Path, data_row: int, fn) -> str:
    """Replace data row ``data_row`` (1-based; line ``data_row + 1``) by ``fn(line)``."""
    lines = path.read_text().split("\n")
    old = lines[data_row]
    lines[data_row] = fn(old)
    path.write_text("\n".join(lines))
    return old


def set_field(path: Path, data_row: int, column: str, value: str) -> None:
    header = path.read_text().split("\n", 1)[0].split(",")
    i = header.index(column)

    def fn(line: str) -> str:
        parts = line.split(",")
        parts[i] = value
        return ",".join(parts)

    edit_line(path, data_row, fn)


def expect_error(raw: Path, tmp_path: Path, pattern: str, cfg: DatasetConfig | None = None) -> str:
    out = tmp_path / "out"
    with pytest.raises(DataError) as info:
        preprocess(cfg or wechat_cfg(), raw, out)
    msg = str(info.value)
    assert re.search(pattern, msg), msg
    assert not out.exists(), "a failed run must not leave output"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")], "temp dir left behind"
    return msg


# --------------------------------------------------------------------------------------------
# output schema and spec


def test_parquet_schema_matches_feature_spec(tiny_processed: Path, tiny_raw: Path) -> None:
    spec = load_spec(tiny_processed)
    report = json.loads((tiny_processed / "report.json").read_text())
    assert spec.tasks == ACTIONS and spec.user_column == "_user"
    InputModule(spec)  # the spec is directly usable
    for split in ("train", "valid", "test"):
        table = read_split(tiny_processed, split)
        assert table.num_rows == report["splits"][split]
        schema = table.schema
        for f in spec.sparse:
            assert schema.field(f.name).type == pa.int64()
            ids = table[f.name].to_numpy()
            assert ids.min() >= 0 and ids.max() <= f.vocab_size, f.name
        for f in spec.lists:
            assert schema.field(f.name).type == pa.list_(pa.int64())
            lengths = pa.compute.list_value_length(table[f.name]).to_numpy()
            assert lengths.max() <= f.max_len
            flat = pa.compute.list_flatten(table[f.name]).to_numpy()
            assert flat.min() >= 0 and flat.max() <= f.vocab_size
            if f.weighted:
                w = table[f.name + WEIGHT_SUFFIX]
                assert schema.field(f.name + WEIGHT_SUFFIX).type == pa.list_(pa.float32())
                assert np.array_equal(pa.compute.list_value_length(w).to_numpy(), lengths)
                wf = pa.compute.list_flatten(w).to_numpy()
                assert (wf >= 0).all() and (wf <= 1).all()  # machine-tag probabilities
        for f in spec.dense:
            t = schema.field(f.name).type
            assert t == pa.float32() if f.dim == 1 else t == pa.list_(pa.float32(), f.dim)
        for f in spec.vectors:
            assert schema.field(f.name).type == pa.list_(pa.float32(), f.dim)
        if split == "test":
            assert not set(spec.tasks) & set(schema.names)
            assert set(table["_day"].to_numpy()) == {15}
        else:
            for t in spec.tasks:
                assert schema.field(t).type == pa.float32()
                assert set(np.unique(table[t].to_numpy())) <= {0.0, 1.0}
            days = set(table["_day"].to_numpy())
            assert days <= set(range(1, 14)) if split == "train" else days == {14}
    assert (tiny_processed / SUCCESS).exists()
    # videoplayseconds is log-scaled: compare against the raw file for a few rows
    feeds = pd.read_csv(tiny_raw / "feed_info.csv", usecols=["feedid", "videoplayseconds"]).set_index("feedid")
    valid = read_split(tiny_processed, "valid").to_pandas()
    expected = np.log1p(feeds.loc[valid["_item"], "videoplayseconds"].to_numpy())
    np.testing.assert_allclose(valid["videoplayseconds_log"], expected, rtol=1e-6)


def test_labels_and_dedup_follow_the_source(tiny_processed: Path, tiny_raw: Path) -> None:
    acts = pd.read_csv(tiny_raw / "user_action.csv")
    acts["_row"] = np.arange(1, len(acts) + 1)
    kept = acts.drop_duplicates(["userid", "feedid"], keep="last")
    report = json.loads((tiny_processed / "report.json").read_text())
    assert report["dedup"]["duplicates"] == len(acts) - len(kept) > 0
    out = pd.concat([read_split(tiny_processed, s).to_pandas() for s in ("train", "valid")])
    assert len(out) == len(kept)
    merged = out.merge(kept, on="_row", suffixes=("", "_raw"))
    assert len(merged) == len(out)  # every written row is the last of its (user, feed) pair
    for a in ACTIONS:
        assert np.array_equal(merged[a].to_numpy(), merged[a + "_raw"].to_numpy().astype(np.float32))
    assert np.array_equal(merged["_user"], merged["userid_raw"]) and np.array_equal(merged["_day"], merged["date_"])


def test_dedup_keep_first_and_all(raw_copy: Path, tmp_path: Path, ray_session) -> None:
    acts = pd.read_csv(raw_copy / "user_action.csv")
    n_dup = int(acts.duplicated(["userid", "feedid"]).sum())
    assert n_dup > 0
    first = acts.assign(_row=np.arange(1, len(acts) + 1)).drop_duplicates(["userid", "feedid"], keep="first")
    rep = preprocess(wechat_cfg("dedup.keep=first"), raw_copy, tmp_path / "first")
    rows = np.concatenate([read_split(tmp_path / "first", s)["_row"].to_numpy() for s in ("train", "valid")])
    assert np.array_equal(np.sort(rows), np.sort(first["_row"].to_numpy()))
    assert rep["dedup"] == {"keys": ["userid", "feedid"], "keep": "first", "duplicates": n_dup, "dropped": n_dup}
    rep = preprocess(wechat_cfg("dedup.keep=all"), raw_copy, tmp_path / "all")
    assert rep["dedup"]["dropped"] == 0 and rep["splits"]["train"] + rep["splits"]["valid"] == len(acts)


# --------------------------------------------------------------------------------------------
# fitted on training days only


def test_vocab_and_pca_see_training_days_only(raw_copy: Path, tmp_path: Path, ray_session) -> None:
    acts_path = raw_copy / "user_action.csv"
    acts = pd.read_csv(acts_path)
    feeds = pd.read_csv(raw_copy / "feed_info.csv")
    known_user, known_feed = int(acts.userid.iloc[0]), int(acts.feedid.iloc[0])
    # plant a new user and a new feed (new author, new tag, extreme embedding) on day 14 only
    new_user, new_feed, new_author = 10**7 + 1, 10**7 + 2, 10**7 + 3
    with acts_path.open("a") as fh:
        fh.write(f"{new_user},{known_feed},14,1,0,0,0,100,100,0,0,0,0\n")
        fh.write(f"{known_user},{new_feed},14,1,0,0,1,100,100,0,0,0,0\n")
    row = feeds.iloc[0].copy()
    row["feedid"], row["authorid"], row["manual_tag_list"] = new_feed, new_author, "987654"
    pd.concat([feeds, row.to_frame().T]).to_csv(raw_copy / "feed_info.csv", index=False)
    with (raw_copy / "feed_embeddings.csv").open("a") as fh:
        fh.write(f"{new_feed}," + " ".join(["1000.0"] * 512) + "\n")

    out = tmp_path / "out"
    report = preprocess(wechat_cfg(), raw_copy, out)
    spec = load_spec(out)
    sizes = {f.name: f.vocab_size for f in [*spec.sparse, *spec.lists]}
    valid = read_split(out, "valid").to_pandas()
    planted_u = valid[valid._user == new_user]
    planted_f = valid[valid._item == new_feed]
    assert len(planted_u) == 1 and len(planted_f) == 1
    assert planted_u.userid.iloc[0] == sizes["userid"]  # OOV row
    assert planted_f.feedid.iloc[0] == sizes["feedid"] and planted_f.authorid.iloc[0] == sizes["authorid"]
    assert list(planted_f.manual_tag_list.iloc[0]) == [sizes["manual_tag_list"]]
    vocab_users = pq.read_table(out / "artifacts" / "vocab_userid.parquet")["value"].to_numpy()
    assert new_user not in vocab_users

    # independent recomputation: vocab = training-day ids after keep-last dedup; OOV counts
    acts = pd.read_csv(acts_path).drop_duplicates(["userid", "feedid"], keep="last")
    train = acts[acts.date_ <= 13]
    assert np.array_equal(vocab_users, np.sort(train.userid.unique()))
    test = pd.read_csv(raw_copy / "test_a.csv")
    for split, rows in (("valid", acts[acts.date_ == 14]), ("test", test)):
        assert report["oov"]["userid"][split] == int((~rows.userid.isin(train.userid)).sum())
        assert report["oov"]["feedid"][split] == int((~rows.feedid.isin(train.feedid)).sum())
    assert report["oov"]["userid"]["train"] == 0

    # PCA: fitted on the embeddings of training feeds only (the 1000.0 vector would dominate)
    emb = pd.read_csv(raw_copy / "feed_embeddings.csv").set_index("feedid")
    train_feeds = np.sort(train.feedid.unique())
    x = np.array([np.array(s.split(), dtype=np.float64) for s in emb.loc[train_feeds, "feed_embedding"]])
    art = np.load(out / "artifacts" / "pca_feed_embedding_pca.npz")
    np.testing.assert_allclose(art["mean"], x.mean(axis=0), atol=1e-6)
    mean, comps, _ = fit_pca(x, 32)
    np.testing.assert_allclose(np.abs(art["components"]), np.abs(comps), atol=1e-5)
    assert report["pca"]["feed_embedding_pca"]["fit_rows"] == len(train_feeds)
    # projections written = (x - mean) @ components for a training feed
    tr = read_split(out, "train").to_pandas()
    r = tr.iloc[0]
    e = np.array(emb.loc[r._item, "feed_embedding"].split(), dtype=np.float64)
    np.testing.assert_allclose(r.feed_embedding_pca, (e - art["mean"]) @ art["components"], atol=1e-4)


def test_pca_matches_svd() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 10)) @ rng.normal(size=(10, 10))
    mean, comps, ratio = fit_pca(x, 4)
    _, s, vt = np.linalg.svd(x - x.mean(axis=0), full_matrices=False)
    np.testing.assert_allclose(np.abs(comps), np.abs(vt[:4].T), atol=1e-8)
    np.testing.assert_allclose(ratio, (s**2 / (s**2).sum())[:4], atol=1e-10)


# --------------------------------------------------------------------------------------------
# history features: strictly earlier days


def brute_force_history(acts: pd.DataFrame, rows: pd.DataFrame, keys: list[str], windows: list[int],
                        actions: list[str], stats: list[str]) -> np.ndarray:
    """Loop over rows: impressions/actions of the same key on days d-w .. d-1 (labelled rows)."""
    out = []
    for _, r in rows.iterrows():
        same = np.ones(len(acts), dtype=bool)
        for k in keys:
            same &= acts[k].to_numpy() == r[k]
        feats = []
        for w in windows:
            sel = acts[same & (acts.date_.to_numpy() >= r.date_ - w) & (acts.date_.to_numpy() <= r.date_ - 1)]
            n = len(sel)
            feats.append(np.log1p(n))
            for stat in stats:
                for a in actions:
                    c = sel[a].sum()
                    feats.append(np.log1p(c) if stat == "count" else (c / n if n else 0.0))
        out.append(feats)
    return np.array(out)


def _dedup_actions(raw: Path) -> pd.DataFrame:
    acts = pd.read_csv(raw / "user_action.csv").drop_duplicates(["userid", "feedid"], keep="last")
    authors = pd.read_csv(raw / "feed_info.csv", usecols=["feedid", "authorid"])
    return acts.merge(authors, on="feedid")


class _LeakyGroup(HistoryGroup):
    """A deliberately wrong implementation: the window includes the row's own day."""

    def upper(self, codes, days):
        return super().upper(codes, days + 1)


def test_history_equals_brute_force_and_catches_a_leak(tiny_processed: Path, tiny_raw: Path) -> None:
    cfg = wechat_cfg()
    hist = cfg.history
    acts = _dedup_actions(tiny_raw)
    authors = pd.read_csv(tiny_raw / "feed_info.csv", usecols=["feedid", "authorid"]).set_index("feedid")
    checked = 0
    for split in ("train", "valid", "test"):
        t = read_split(tiny_processed, split).to_pandas()
        sample = t.sample(12, random_state=0)
        rows = pd.DataFrame({"userid": sample._user, "feedid": sample._item, "date_": sample._day,
                             "authorid": authors.loc[sample._item, "authorid"].to_numpy()})
        for keys in hist.keys:
            name = "hist_" + "_".join(keys)
            got = np.stack(sample[name].to_numpy())
            want = brute_force_history(acts, rows, keys, hist.windows, hist.actions, hist.stats)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"{split} {name}")
            checked += 1
    assert checked == 12

    # the same check on a leaking implementation fails (same-day impressions counted)
    t = read_split(tiny_processed, "valid").to_pandas().sample(12, random_state=1)
    rows = pd.DataFrame({"userid": t._user, "date_": t._day})
    group = build_history_group("hist_userid", ["userid"], [acts.userid.to_numpy()], acts.date_.to_numpy(),
                                acts[hist.actions].to_numpy(np.float64), 17)
    want = brute_force_history(acts, rows, ["userid"], hist.windows, hist.actions, hist.stats)
    codes = group.row_codes([rows.userid.to_numpy()])
    honest = history_features(group, codes, rows.date_.to_numpy(), hist.windows, hist.stats)
    np.testing.assert_allclose(honest, want, rtol=1e-5, atol=1e-6)
    leaky = history_features(_LeakyGroup(**vars(group)), codes, rows.date_.to_numpy(), hist.windows, hist.stats)
    assert np.abs(leaky - want).max() > 0.1


# --------------------------------------------------------------------------------------------
# split protocols and negative sampling


def test_organisers_protocol_with_negative_sampling(tiny_raw: Path, tmp_path: Path, ray_session) -> None:
    cfg = load_config(DatasetConfig, CONFIGS / "wechat_organisers.yaml")
    out = tmp_path / "org"
    report = preprocess(cfg, tiny_raw, out)
    acts = pd.read_csv(tiny_raw / "user_action.csv").drop_duplicates(["userid", "feedid"], keep="last")
    n_test = len(pd.read_csv(tiny_raw / "test_a.csv"))
    train_days = acts[(acts.date_ >= 8) & (acts.date_ <= 12)]
    assert report["splits"]["valid"] == int((acts.date_ == 13).sum())
    assert report["rows_outside_splits"] == int(((acts.date_ < 8) | (acts.date_ > 13)).sum()) + n_test
    assert report["splits"]["test"] == 0
    tr = read_split(out, "train").to_pandas()
    assert set(tr._day) <= set(range(8, 13))
    masks = tr[[f"_mask__{a}" for a in ACTIONS]].to_numpy()
    labels = tr[ACTIONS].to_numpy()
    assert (masks[labels == 1] == 1).all()  # positives are never dropped
    assert (masks.max(axis=1) == 1).all()  # a written row counts for at least one task
    for j, a in enumerate(ACTIONS):
        rate = cfg.negative_sampling.rates[a]
        pa_ = report["negative_sampling"]["per_action"][a]
        n_neg = int((train_days[a] == 0).sum())
        assert pa_["train_negatives"] == n_neg
        kept = int(((labels[:, j] == 0) & (masks[:, j] == 1)).sum())
        assert pa_["kept_negatives"] == kept
        assert abs(kept - rate * n_neg) < 5 * np.sqrt(n_neg * rate * (1 - rate)) + 1
    # valid keeps every row, without masks
    va = read_split(out, "valid")
    assert not [c for c in va.column_names if c.startswith("_mask__")]


# --------------------------------------------------------------------------------------------
# bad input: each class names file, column and row


def test_missing_file(raw_copy: Path, tmp_path: Path) -> None:
    (raw_copy / "test_a.csv").unlink()
    expect_error(raw_copy, tmp_path, r"test_a\.csv: file not found")


def test_missing_column(raw_copy: Path, tmp_path: Path) -> None:
    df = pd.read_csv(raw_copy / "user_action.csv").drop(columns=["like"])
    df.to_csv(raw_copy / "user_action.csv", index=False)
    expect_error(raw_copy, tmp_path, r"user_action\.csv: missing column\(s\) \['like'\]")


def test_wrong_type_names_row(raw_copy: Path, tmp_path: Path) -> None:
    set_field(raw_copy / "user_action.csv", 5, "userid", "u17")
    expect_error(raw_copy, tmp_path, r"user_action\.csv: column 'userid', row 5 \(line 6\): not an integer \(value 'u17'\)")


def test_label_outside_01(raw_copy: Path, tmp_path: Path) -> None:
    set_field(raw_copy / "user_action.csv", 7, "like", "2")
    expect_error(raw_copy, tmp_path, r"user_action\.csv: column 'like', row 7 \(line 8\): label must be 0 or 1 \(value 2\)")


def test_empty_label_and_nan(raw_copy: Path, tmp_path: Path) -> None:
    set_field(raw_copy / "user_action.csv", 9, "forward", "")
    expect_error(raw_copy, tmp_path, r"user_action\.csv: column 'forward', row 9 \(line 10\): empty value")
    set_field(raw_copy / "user_action.csv", 9, "forward", "0")
    set_field(raw_copy / "feed_info.csv", 4, "videoplayseconds", "nan")
    expect_error(raw_copy, tmp_path, r"feed_info\.csv: column 'videoplayseconds', row 4 \(line 5\): NaN")


def test_malformed_lists(raw_copy: Path, tmp_path: Path) -> None:
    path = raw_copy / "feed_info.csv"
    set_field(path, 3, "manual_tag_list", "12;x7;9")
    expect_error(raw_copy, tmp_path, r"feed_info\.csv: column 'manual_tag_list', row 3 \(line 4\): malformed list entry 'x7'")
    set_field(path, 3, "manual_tag_list", "12;9")
    set_field(path, 6, "machine_tag_list", "12 0.5;13")
    expect_error(raw_copy, tmp_path, r"column 'machine_tag_list', row 6 \(line 7\): malformed list entry '13'")
    set_field(path, 6, "machine_tag_list", "12 0.5;13 abc")
    expect_error(raw_copy, tmp_path, r"row 6 .*weight is not a number")


def test_malformed_embedding_and_width(raw_copy: Path, tmp_path: Path) -> None:
    path = raw_copy / "feed_embeddings.csv"
    original = path.read_text().split("\n")[2]
    fid, emb = original.split(",", 1)
    vals = emb.split()
    assert len(vals) == 512
    edit_line(path, 2, lambda _: fid + "," + " ".join(vals + ["0.5"]))
    expect_error(raw_copy, tmp_path, r"feed_embeddings\.csv: column 'feed_embedding', row 2 \(line 3\): vector has 513 values, expected 512")
    edit_line(path, 2, lambda _: fid + "," + " ".join(vals[:-1]))
    expect_error(raw_copy, tmp_path, r"feed_embeddings\.csv: column 'feed_embedding', row 2 \(line 3\): vector has 511 values")
    edit_line(path, 2, lambda _: fid + "," + " ".join(["0.1abc", *vals[1:]]))
    expect_error(raw_copy, tmp_path, r"feed_embeddings\.csv: column 'feed_embedding', row 2 \(line 3\): malformed vector entry '0\.1abc'")
    edit_line(path, 2, lambda _: fid + "," + " ".join(["nan", *vals[1:]]))
    expect_error(raw_copy, tmp_path, r"feed_embeddings\.csv: column 'feed_embedding', row 2 \(line 3\): vector has NaN/inf")


def test_empty_files(raw_copy: Path, tmp_path: Path) -> None:
    (raw_copy / "test_a.csv").write_text("")
    expect_error(raw_copy, tmp_path, r"test_a\.csv: empty file")
    (raw_copy / "test_a.csv").write_text("userid,feedid,device\n")
    expect_error(raw_copy, tmp_path, r"test_a\.csv: no data rows")


def test_ragged_row(raw_copy: Path, tmp_path: Path) -> None:
    edit_line(raw_copy / "user_action.csv", 11, lambda line: line.rsplit(",", 1)[0])
    expect_error(raw_copy, tmp_path, r"user_action\.csv: row 11 \(line 12\): 12 fields, header has 13")


def test_unknown_feed_and_duplicate_key(raw_copy: Path, tmp_path: Path) -> None:
    set_field(raw_copy / "test_a.csv", 4, "feedid", "99999999")
    expect_error(raw_copy, tmp_path, r"test_a\.csv: column 'feedid', row 4 \(line 5\): value 99999999 has no row in .*feed_info\.csv")
    set_field(raw_copy / "test_a.csv", 4, "feedid", pd.read_csv(raw_copy / "feed_info.csv").feedid.iloc[0].astype(str))
    lines = (raw_copy / "feed_embeddings.csv").read_text().split("\n")
    lines.insert(3, lines[1])
    (raw_copy / "feed_embeddings.csv").write_text("\n".join(lines))
    expect_error(raw_copy, tmp_path, r"feed_embeddings\.csv: column 'feedid', row 3 \(line 4\): duplicate key")


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="in drop but used as features"):
        wechat_cfg("drop=[feedid]")
    with pytest.raises(ValueError, match="not listed in any file"):
        wechat_cfg("dense=[{name: x, column: nope}]")
    with pytest.raises(ValueError, match="pca_dim"):
        wechat_cfg("vectors=[{name: v, column: feed_embedding, width: 512, pca_dim: 600}]")


# --------------------------------------------------------------------------------------------
# atomic output and the CLI


def test_failed_run_keeps_previous_output_and_cli_reports(raw_copy: Path, tmp_path: Path, ray_session, capsys) -> None:
    from pipeline.cli import main

    out = tmp_path / "out"
    args = ["preprocess", "--raw", str(raw_copy), "--out", str(out), "--set", "history.windows=[1,2]"]
    assert main(args) == 0
    spec_before = (out / "feature_spec.json").read_text()
    assert (out / SUCCESS).exists()
    set_field(raw_copy / "user_action.csv", 3, "date_", "x")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "user_action.csv: column 'date_', row 3 (line 4): not an integer" in err
    assert (out / "feature_spec.json").read_text() == spec_before and (out / SUCCESS).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "raw"]  # no temp dirs left
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("user data")
    with pytest.raises(OutputError, match="was not written by pipeline preprocess"):
        preprocess(wechat_cfg(), raw_copy, foreign)
    assert (foreign / "keep.txt").exists()


# --------------------------------------------------------------------------------------------
# another table: UCI Adult


def test_adult_end_to_end(tmp_path: Path, ray_session) -> None:
    cfg = load_config(DatasetConfig, CONFIGS / "adult.yaml")
    out = tmp_path / "adult"
    report = preprocess(cfg, ADULT, out)
    raw = pd.read_parquet(ADULT / "adult.parquet")
    spec = FeatureSpec.load(out / "feature_spec.json")
    assert spec.tasks == ["income", "never_married"] and spec.user_column is None
    names = {f.name for f in spec.all_features()}
    assert not names & {"marital_status", "marital-status", "relationship"}
    assert "CC BY 4.0" in report["attribution"]
    parts = {s: read_split(out, s).to_pandas() for s in ("train", "valid", "test")}
    assert sum(len(p) for p in parts.values()) == len(raw)
    rows = np.concatenate([p._row.to_numpy() for p in parts.values()])
    assert np.array_equal(np.sort(rows), np.arange(1, len(raw) + 1))
    for s, frac in (("valid", 0.1), ("test", 0.1)):
        assert abs(len(parts[s]) / len(raw) - frac) < 0.01
    allp = pd.concat(parts.values()).sort_values("_row")
    src = raw.iloc[allp._row.to_numpy() - 1]
    assert np.array_equal(allp.income.to_numpy(), (src.income == ">50K").to_numpy(np.float32))
    assert np.array_equal(allp.never_married.to_numpy(), (src["marital-status"] == "Never-married").to_numpy(np.float32))
    # standardised with training statistics only
    tr = parts["train"]
    assert abs(tr.age.mean()) < 1e-4 and abs(tr.age.std(ddof=0) - 1) < 1e-3
    # unseen categories in valid/test -> OOV, counted
    train_src = raw.iloc[tr._row.to_numpy() - 1]
    for s in ("valid", "test"):
        unseen = ~raw.iloc[parts[s]._row.to_numpy() - 1]["native-country"].isin(train_src["native-country"])
        assert report["oov"]["native_country"][s] == int(unseen.sum())
    # numeric_bins: quantile edges of the training rows' written values, saved and in the spec
    check_bins_fitted_on_train(out, spec, cfg.numeric_bins)
    ages = np.concatenate([p.age.to_numpy() for p in parts.values()])
    assert spec.dense[0].name == "age"
    assert spec.dense[0].boundaries[0] != np.quantile(ages.astype(np.float64), np.linspace(0, 1, cfg.numeric_bins + 1)).tolist()
    again = preprocess(cfg, ADULT, tmp_path / "adult2")
    assert again["splits"] == report["splits"]
    assert read_split(tmp_path / "adult2", "valid").equals(read_split(out, "valid"))


def check_bins_fitted_on_train(out: Path, spec: FeatureSpec, bins: int) -> None:
    """Every dense feature (history ones included) has ``bins + 1`` edges per component equal to
    the tie-aware quantiles of its training split values, saved as a fitted transform that loads back."""
    from pipeline.transforms.buckets import QuantileBoundaries, tie_aware_quantiles

    train = read_split(out, "train")
    assert spec.dense
    for f in spec.dense:
        col = train[f.name].combine_chunks()
        values = np.asarray(col.flatten() if f.dim > 1 else col, dtype=np.float64).reshape(train.num_rows, f.dim)
        expected = np.stack([tie_aware_quantiles(values[:, j], bins) for j in range(f.dim)])
        assert np.array_equal(np.asarray(f.boundaries), expected), f.name
        assert QuantileBoundaries.load(out / "artifacts" / f"bins_{f.name}.json").to_list() == f.boundaries


def test_numeric_bins_cover_history_features(tiny_processed: Path) -> None:
    spec = load_spec(tiny_processed)
    assert any(f.name.startswith("hist_") and f.dim > 1 for f in spec.dense)
    from pipeline.preprocess import DEFAULT_CONFIG

    check_bins_fitted_on_train(tiny_processed, spec, load_config(DatasetConfig, DEFAULT_CONFIG).numeric_bins)


def test_read_source_types(tmp_path: Path) -> None:
    from pipeline.datasets import FileConfig
    from pipeline.preprocess import read_source

    (tmp_path / "t.csv").write_text("a,b,c\n1,2.0,x\n3,,y\n")
    fc = FileConfig(path="t.csv", columns={"a": "int", "b": "int", "c": "str"}, nullable=["b"])
    t = read_source(tmp_path, fc)  # "2.0" (an integer written by a float writer) is accepted
    assert t["b"].to_pylist() == [2, None] and t["_row"].to_pylist() == [1, 2]
    (tmp_path / "t.csv").write_text("a,b,c\n1,2.5,x\n3,4,y\n")
    with pytest.raises(DataError, match=r"t\.csv: column 'b', row 1 \(line 2\): not an integer \(value '2\.5'\)"):
        read_source(tmp_path, fc)
    fc_strict = FileConfig(path="t.csv", columns={"a": "int", "b": "int", "c": "str"})
    (tmp_path / "t.csv").write_text("a,b,c\n1,2,x\n3,,y\n")
    with pytest.raises(DataError, match=r"column 'b', row 2 \(line 3\): empty value"):
        read_source(tmp_path, fc_strict)


def test_parquet_source_wrong_type(tmp_path: Path) -> None:
    from pipeline.datasets import FileConfig
    from pipeline.preprocess import read_source

    pq.write_table(pa.table({"age": ["39", "x", "50"], "w": [1.5, float("nan"), 2.0]}), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"t\.parquet: column 'age', row 2: not an integer \(value 'x'\)"):
        read_source(tmp_path, FileConfig(path="t.parquet", columns={"age": "int"}))
    with pytest.raises(DataError, match=r"t\.parquet: column 'w', row 2: NaN"):
        read_source(tmp_path, FileConfig(path="t.parquet", columns={"w": "float"}))
    t = read_source(tmp_path, FileConfig(path="t.parquet", columns={"w": "float"}, nullable=["w"]))
    assert t["w"].null_count == 1  # NaN in a nullable float column = missing


def test_side_rows_missing_are_a_counted_repair(raw_copy: Path, tmp_path: Path, ray_session) -> None:
    acts = pd.read_csv(raw_copy / "user_action.csv")
    test = pd.read_csv(raw_copy / "test_a.csv")
    cold = test.feedid[~test.feedid.isin(acts.feedid)].iloc[0]  # a feed seen only in test_a
    feeds = pd.read_csv(raw_copy / "feed_info.csv", dtype=str, keep_default_na=False)
    feeds[feeds.feedid != str(cold)].to_csv(raw_copy / "feed_info.csv", index=False)
    expect_error(raw_copy, tmp_path, rf"test_a\.csv: column 'feedid', row \d+ \(line \d+\): value {cold} has no row in")
    cfg = wechat_cfg()
    cfg.side_tables[0].on_missing = "null"
    out = tmp_path / "repaired"
    report = preprocess(cfg, raw_copy, out)
    n = int((test.feedid == cold).sum())
    assert report["repairs"] == {"feed_info.csv: rows without a feedid match (side features missing -> OOV/0/empty)": n}
    assert report["missing_to_oov"]["authorid"]["test"] >= n
    spec = load_spec(out)
    sizes = {f.name: f.vocab_size for f in spec.sparse}
    t = read_split(out, "test").to_pandas()
    rows = t[t._item == cold]
    assert len(rows) == n and (rows.authorid == sizes["authorid"]).all()
    assert (rows.videoplayseconds_log == 0).all() and all(len(x) == 0 for x in rows.manual_tag_list)


def test_killed_runs_build_folders_are_removed_and_reported(tiny_raw: Path, tmp_path: Path, ray_session, capsys) -> None:
    out = tmp_path / "processed"
    dead = tmp_path / ".processed.tmp-999999999-deadbeef"  # no such pid
    live = tmp_path / f".processed.tmp-{os.getppid()}-cafef00d"  # a live process's work
    other = tmp_path / ".processed.tmp-notapid"
    for d in (dead, live, other):
        d.mkdir()
        (d / "part-00000.parquet").write_text("partial")
    report = preprocess(load_config(DatasetConfig, DEFAULT_CONFIG), tiny_raw, out)
    assert not dead.exists() and live.exists() and other.exists()
    assert report["stale_tmp_removed"] == [dead.name]
    assert json.loads((out / "report.json").read_text())["stale_tmp_removed"] == [dead.name]
    assert "removed 1 unfinished build folder" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# reading: header, bytes, numbers, blank lines, permissions


def read_bytes_as(tmp_path: Path, data: bytes, columns: dict[str, str], name: str = "t.csv") -> pa.Table:
    from pipeline.datasets import FileConfig
    from pipeline.preprocess import read_source

    (tmp_path / name).write_bytes(data)
    return read_source(tmp_path, FileConfig(path=name, columns=columns))


def test_header_naming_a_column_twice(raw_copy: Path, tmp_path: Path) -> None:
    from pipeline.preprocess import read_source

    # the case: an all-zero `like` column before the real one silently became the labels
    ua = raw_copy / "user_action.csv"
    lines = ua.read_text().split("\n")
    ua.write_text("\n".join(["like," + lines[0]] + ["0," + line if line else line for line in lines[1:]]))
    with pytest.raises(DataError, match=r"user_action\.csv: column 'like' appears 2 times in the header \(fields 1, 8\)"):
        read_source(raw_copy, wechat_cfg().main)
    pq.write_table(pa.Table.from_arrays([pa.array([0, 0]), pa.array([1, 0])], names=["y", "y"]), tmp_path / "t.parquet")
    from pipeline.datasets import FileConfig

    with pytest.raises(DataError, match=r"t\.parquet: column 'y' appears 2 times in the schema"):
        read_source(tmp_path, FileConfig(path="t.parquet", columns={"y": "int"}))


def test_plus_sign_and_int64_range(tmp_path: Path) -> None:
    t = read_bytes_as(tmp_path, b"a,b\n+5,1\n-6,+1\n", {"a": "int", "b": "int"})
    assert t["a"].to_pylist() == [5, -6] and t["b"].to_pylist() == [1, 1]
    for big in ("99999999999999999999", "-9223372036854775809"):
        with pytest.raises(DataError, match=rf"t\.csv: column 'a', row 2 \(line 3\): integer out of the int64 range \(value '{big}'\)"):
            read_bytes_as(tmp_path, f"a,b\n5,1\n{big},1\n".encode(), {"a": "int", "b": "int"})


def test_bytes_that_are_not_utf8(tmp_path: Path) -> None:
    data = b"a,b,c\n5,1,x\n6,1\xff,y\xfe\n"
    # an unused column is never decoded, so its bytes do not matter
    assert read_bytes_as(tmp_path, b"a,b,c\n5,1,x\n6,1,\xffy\n", {"a": "int", "b": "int"}).num_rows == 2
    with pytest.raises(DataError, match=r"t\.csv: column 'c', row 2 \(line 3\): not valid UTF-8"):
        read_bytes_as(tmp_path, data, {"a": "int", "c": "str"})
    with pytest.raises(DataError, match=r"t\.csv: column 'b', row 2 \(line 3\): not valid UTF-8"):
        read_bytes_as(tmp_path, data, {"a": "int", "b": "int"})
    with pytest.raises(DataError, match=r"t\.csv: line 1 \(header\): not valid UTF-8"):
        read_bytes_as(tmp_path, b"a,b,\xff\n5,1,x\n", {"a": "int"})
    pq.write_table(pa.table({"s": pa.array([b"ok", b"\xff"], pa.binary())}), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"t\.parquet: column 's', row 2: not valid UTF-8"):
        read_bytes_as(tmp_path, (tmp_path / "t.parquet").read_bytes(), {"s": "str"}, name="t.parquet")


def test_blank_lines_keep_rows_and_lines_right(tmp_path: Path) -> None:
    t = read_bytes_as(tmp_path, b"a,b\n5,1\n\n6,2\n", {"a": "int", "b": "int"})
    assert t["a"].to_pylist() == [5, 6] and t["_row"].to_pylist() == [1, 2]
    with pytest.raises(DataError, match=r"column 'b', row 2 \(line 4\): not an integer \(value 'x'\)"):
        read_bytes_as(tmp_path, b"a,b\n5,1\n\n6,x\n", {"a": "int", "b": "int"})
    # the ragged row is named, not the harmless blank line before it
    with pytest.raises(DataError, match=r"t\.csv: row 2 \(line 4\): 3 fields, header has 2"):
        read_bytes_as(tmp_path, b"a,b\n5,1\n\n6,1,3\n", {"a": "int", "b": "int"})


def test_unreadable_file_is_one_message(raw_copy: Path, tmp_path: Path) -> None:
    ua = raw_copy / "user_action.csv"
    ua.chmod(0)
    cmd = [sys.executable, "-m", "pipeline", "preprocess", "--raw", str(raw_copy), "--out", str(tmp_path / "out")]
    if os.geteuid() == 0:  # root reads any file: run without the capabilities that let it
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: cannot make a file unreadable")
        cmd = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", *cmd]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert f"{ua}: cannot read file: Permission denied" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# labels, splits and config values that used to pass silently


def test_positive_labels_need_their_negative_values(tmp_path: Path, ray_session) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    rows = ["id,x,income"] + [f"{i},{i % 7},{'>50K' if i % 3 == 0 else '<=50K'}" for i in range(1, 81)]
    rows[11] = "11,4,>50K."  # data row 11 (line 12): how UCI's test file writes a positive
    (raw / "t.csv").write_text("\n".join(rows) + "\n")
    base = {"name": "t", "main": {"path": "t.csv", "columns": {"id": "int", "x": "int", "income": "str"}},
            "labels": [{"name": "income", "positive": [">50K"]}], "sparse": [{"name": "x"}],
            "split": {"kind": "random", "valid_fraction": 0.25, "test_fraction": 0.0}}
    with pytest.raises(ValueError, match="list the negative values too"):
        DatasetConfig.model_validate(base)
    base["labels"][0]["negative"] = ["<=50K"]
    with pytest.raises(DataError, match=r"t\.csv: column 'income', row 11 \(line 12\): label value is neither "
                                        r"positive \['>50K'\] nor negative \['<=50K'\] \(value '>50K\.'\); 1 such row"):
        preprocess(DatasetConfig.model_validate(base), raw, tmp_path / "out")
    base["labels"][0]["unlisted"] = "negative"  # the user asks for the repair: counted
    report = preprocess(DatasetConfig.model_validate(base), raw, tmp_path / "out")
    key = "t.csv: income values neither positive nor negative -> 0 (label income, unlisted: negative)"
    assert report["repairs"] == {key: 1}
    out = pd.concat([read_split(tmp_path / "out", s).to_pandas() for s in ("train", "valid")]).set_index("_row")
    assert out.loc[11, "income"] == 0 and out.loc[12, "income"] == 1 and out.loc[13, "income"] == 0


def test_a_task_without_positives(raw_copy: Path, tmp_path: Path, ray_session, capsys) -> None:
    path = raw_copy / "user_action.csv"
    acts = pd.read_csv(path)
    acts.assign(like=np.where(acts.date_ <= 13, 0, acts.like)).to_csv(path, index=False)
    expect_error(raw_copy, tmp_path, r"user_action\.csv: column 'like': label 'like' has no positive in the train "
                                     r"split \(\d+ rows\); the task has nothing to learn")
    acts.assign(like=np.where(acts.date_ == 14, 0, acts.like)).to_csv(path, index=False)
    report = preprocess(wechat_cfg(), raw_copy, tmp_path / "out")  # valid without positives: a warning
    msg = f"{path}: column 'like': label 'like' has no positive in the valid split"
    assert [w for w in report["warnings"] if w.startswith(msg)]
    assert f"preprocess: warning: {msg}" in capsys.readouterr().err


def test_an_empty_validation_split_is_an_error(raw_copy: Path, tmp_path: Path) -> None:
    expect_error(raw_copy, tmp_path, r"user_action\.csv: the valid split is empty", wechat_cfg("split.valid_days=[20, 21]"))


@pytest.mark.parametrize("windows", ["[-1]", "[0]", "[]", "[3, 3]"])
def test_history_windows_are_validated(windows: str) -> None:
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"--set history\.windows={re.escape(windows)}: history\.windows"):
        wechat_cfg(f"history.windows={windows}")


def test_rows_per_block_must_be_positive() -> None:
    with pytest.raises(ValueError, match=r"--set rows_per_block=0: rows_per_block: Input should be greater than or equal to 1"):
        wechat_cfg("rows_per_block=0")


# --------------------------------------------------------------------------------------------
# replacing --out, the lock, the generator's manifest


def test_out_is_replaced_only_when_this_tool_wrote_it(raw_copy: Path, tmp_path: Path, capsys) -> None:
    from pipeline.cli import main

    spark = tmp_path / "spark"  # another tool's output: its _SUCCESS is not ours
    spark.mkdir()
    (spark / SUCCESS).write_text("")
    (spark / "part-00000.parquet").write_text("someone else's data")
    with pytest.raises(OutputError, match="was not written by pipeline preprocess"):
        preprocess(wechat_cfg(), raw_copy, spark)
    assert sorted(p.name for p in spark.iterdir()) == [SUCCESS, "part-00000.parquet"]
    (tmp_path / "file").write_text("x")
    assert main(["preprocess", "--raw", str(raw_copy), "--out", str(tmp_path / "file")]) == 2
    assert f"{tmp_path / 'file'}: exists and is not a folder" in capsys.readouterr().err


def test_a_second_run_into_the_same_out_fails_at_once(raw_copy: Path, tmp_path: Path) -> None:
    import fcntl

    with open(tmp_path / ".out.lock", "w") as held:  # what a run in progress holds
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242\n")
        held.flush()
        with pytest.raises(OutputError, match=r"out: another run \(pid 4242\) is writing this folder"):
            preprocess(wechat_cfg(), raw_copy, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_swap_cut_short_gives_the_old_output_back(raw_copy: Path, tmp_path: Path) -> None:
    old = tmp_path / ".out.old-999999999-0badc0de"  # killed between its two renames: out is missing
    old.mkdir()
    for name in ("feature_spec.json", "report.json", SUCCESS):  # an output of this tool
        (old / name).write_text("{}")
    (old / "stale.txt").write_text("the previous output")
    set_field(raw_copy / "user_action.csv", 3, "date_", "x")
    with pytest.raises(DataError, match="not an integer"):
        preprocess(wechat_cfg(), raw_copy, tmp_path / "out")
    assert (tmp_path / "out" / "stale.txt").read_text() == "the previous output" and not old.exists()


def test_a_folder_mixing_two_generated_datasets_is_rejected(small_raw: Path, tmp_path: Path) -> None:
    from pipeline.generate import generate

    raw = tmp_path / "raw"
    shutil.copytree(small_raw, raw)
    # the same world (seed, sizes) with other labels: every other check passes such a mix
    other = generate(tmp_path / "other", seed=3, n_users=20, n_feeds=80, n_actions=600, n_test=40,
                     embedding_trailing_space=True, target_rates={a: 0.1 for a in ACTIONS}, task_relatedness=0.9)
    shutil.copy(other / "user_action.csv", raw / "user_action.csv")  # what a killed file-by-file publish left
    expect_error(raw, tmp_path, rf"{raw / 'user_action.csv'}: (bytes|sha256) .* differs from .* in .*_GENERATED\.json")
    from pipeline.preprocess import check_generated_manifest

    shutil.copy(small_raw / "user_action.csv", raw / "user_action.csv")
    check_generated_manifest(raw, wechat_cfg())  # the files as generated pass

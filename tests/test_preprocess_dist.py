"""The distributed preprocessing builder (:mod:`pipeline.preprocess_dist`) against the
single-process reference (:func:`pipeline.preprocess.build_reference`): same rows, same values,
same ``feature_spec.json`` and fitted artifacts, on the session's simulated two-node cluster
with files cut into many small ranges; and the pieces it is built from (row counting of byte
ranges, ordered splits from counts, combined moments, history tables from partial sums)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

import pipeline.preprocess_dist as dist
from pipeline.config import load_config
from pipeline.data import read_split
from pipeline.datasets import DatasetConfig
from pipeline.errors import DataError
from pipeline.preprocess import ordered_split, ordered_split_counts, preprocess
from pipeline.transforms import HistoryGroup, RowTransformer, build_history_group
from pipeline.transforms.dense import combine_moments, moments
from pipeline.transforms.history import history_group_from_sums
from synthetic_movielens import write_synthetic_movielens

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "datasets"


def _assert_same_output(ref: Path, new: Path) -> None:
    """Same spec, same rows in the same order, same values (floats to 1e-6) in every split."""
    assert (ref / "feature_spec.json").read_text() == (new / "feature_spec.json").read_text()
    for split in ("train", "valid", "test"):
        files = [sorted((d / split).glob("*.parquet")) for d in (ref, new)]
        assert bool(files[0]) == bool(files[1]), split
        if not files[0]:
            continue
        a, b = read_split(ref, split), read_split(new, split)
        assert a.column_names == b.column_names and a.num_rows == b.num_rows, split
        for c in a.column_names:
            x, y = a[c], b[c]
            assert x.type == y.type, (split, c)
            if x.equals(y):
                continue
            xs, ys = np.asarray(x.to_pylist(), dtype=float), np.asarray(y.to_pylist(), dtype=float)
            assert np.allclose(xs, ys, rtol=0, atol=1e-6, equal_nan=True), (split, c, np.nanmax(np.abs(xs - ys)))


def _assert_same_report(ra: dict, rb: dict) -> None:
    for key in ("inputs", "dedup", "splits", "rows", "rows_outside_splits", "vocab_sizes", "oov", "missing_to_oov",
                "repairs", "lists", "labelled_splits", "history_columns", "negative_sampling", "warnings",
                "split_boundaries"):
        assert json.dumps(ra.get(key), sort_keys=True) == json.dumps(rb.get(key), sort_keys=True), key
    for split, rates in ra["label_rates"].items():  # float32 means (reference) against float64 sums
        assert rates == pytest.approx(rb["label_rates"][split], rel=1e-5)
    for name, pca in ra["pca"].items():
        assert pca["fit_rows"] == rb["pca"][name]["fit_rows"]
        assert pca["explained_variance"] == pytest.approx(rb["pca"][name]["explained_variance"], rel=1e-9)


def _editable_copy(tiny_raw: Path, tmp_path: Path) -> Path:
    """A copy of the generated files to edit (without the generator's marker, which vouches for them)."""
    raw = tmp_path / "raw"
    shutil.copytree(tiny_raw, raw)
    (raw / "_GENERATED.json").unlink()
    return raw


def _run_both(cfg: DatasetConfig, raw: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[dict, dict]:
    monkeypatch.setattr(dist, "PIECE_BYTES", 20_000)  # many ranges per file, rows cut at every boundary
    ra = preprocess(cfg, raw, tmp_path / "ref", engine="reference")
    rb = preprocess(cfg, raw, tmp_path / "new")
    assert rb["engine"] == "distributed"
    return ra, rb


def test_distributed_equals_reference_on_two_nodes(tiny_raw: Path, tmp_path: Path, ray_session,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """WeChat config (day split, extra rows, two side tables, lists, PCA, history, dedup)."""
    import ray

    assert len([n for n in ray.nodes() if n["Alive"]]) >= 2, "the session cluster has two nodes"
    cfg = load_config(DatasetConfig, CONFIGS / "wechat.yaml")
    ra, rb = _run_both(cfg, tiny_raw, tmp_path, monkeypatch)
    assert len(dist.plan_pieces(cfg, tiny_raw, dist.PIECE_BYTES)) > 10
    _assert_same_output(tmp_path / "ref", tmp_path / "new")
    _assert_same_report(ra, rb)
    art_a, art_b = tmp_path / "ref" / "artifacts", tmp_path / "new" / "artifacts"
    assert sorted(p.name for p in art_a.iterdir()) == sorted(p.name for p in art_b.iterdir())
    for name in ("hist_userid_authorid", "hist_feedid"):
        ga, gb = HistoryGroup.load(art_a / f"history_{name}.npz"), HistoryGroup.load(art_b / f"history_{name}.npz")
        assert np.array_equal(ga.comb, gb.comb) and np.array_equal(ga.prefix, gb.prefix)
        assert all(np.array_equal(u, v) for u, v in zip(ga.uniques, gb.uniques))
    # serving's transformer (artifacts written by the tasks) gives the rows preprocess wrote
    valid = read_split(tmp_path / "new", "valid")
    raw_rows = pd.read_csv(tiny_raw / "user_action.csv").iloc[valid["_row"].to_numpy()[:300] - 1]
    got = RowTransformer.load(art_b).transform(pa.Table.from_pandas(raw_rows[["userid", "feedid", "date_", "device"]],
                                                                    preserve_index=False))
    for c in got.column_names:
        want = valid[c].slice(0, 300)
        assert got[c].combine_chunks().equals(want.combine_chunks()) or np.allclose(
            np.asarray(got[c].to_pylist(), dtype=float), np.asarray(want.to_pylist(), dtype=float), atol=1e-6), c


def test_distributed_equals_reference_with_sampling_and_rows_outside(tiny_raw: Path, tmp_path: Path, ray_session,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Organisers' protocol: negative sampling, test_a rows outside every split, train_only
    history; and a feed missing from feed_info.csv (``on_missing: null``), so some blocks hold
    missing side rows (OOV ids, float history keys)."""
    raw = _editable_copy(tiny_raw, tmp_path)
    acts, test = pd.read_csv(raw / "user_action.csv"), pd.read_csv(raw / "test_a.csv")
    cold = test.feedid[~test.feedid.isin(acts.feedid)].iloc[0]
    feeds = pd.read_csv(raw / "feed_info.csv", dtype=str, keep_default_na=False)
    feeds[feeds.feedid != str(cold)].to_csv(raw / "feed_info.csv", index=False)
    cfg = load_config(DatasetConfig, CONFIGS / "wechat_organisers.yaml")
    cfg.side_tables[0].on_missing = "null"
    ra, rb = _run_both(cfg, raw, tmp_path, monkeypatch)
    assert rb["repairs"] and rb["missing_to_oov"]["authorid"]["test"] == 0  # test_a is outside every split here
    _assert_same_output(tmp_path / "ref", tmp_path / "new")
    _assert_same_report(ra, rb)


def test_distributed_equals_reference_ordered_split_and_string_lists(tmp_path: Path, ray_session,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """MovieLens config: ordered split from per-time counts, seconds, string-token lists, keep-last dedup."""
    raw = write_synthetic_movielens(tmp_path / "ml", users=60, movies=90, per_user=30, seed=3)
    ratings = (raw / "ratings.csv").read_text().splitlines(keepends=True)
    # repeated (user, movie) pairs far apart in the file: keep-last crosses ranges
    (raw / "ratings.csv").write_text("".join([*ratings, *ratings[1:200:7]]))
    cfg = load_config(DatasetConfig, CONFIGS / "movielens.yaml")
    ra, rb = _run_both(cfg, raw, tmp_path, monkeypatch)
    assert rb["dedup"]["dropped"] > 0
    _assert_same_output(tmp_path / "ref", tmp_path / "new")
    _assert_same_report(ra, rb)


def test_blank_lines_across_ranges_keep_row_numbers(tiny_raw: Path, tmp_path: Path, ray_session,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Empty lines (LF and CRLF) at range boundaries: ``_row`` stays the source's data row; a
    bad value after them is reported with the reference's row, line and count."""
    raw = _editable_copy(tiny_raw, tmp_path)
    lines = (raw / "user_action.csv").read_bytes().split(b"\n")
    out = [lines[0]]
    for i, line in enumerate(lines[1:], start=1):
        out.append(line)
        if i % 97 == 0:
            out += [b"", b"\r"]  # an empty LF line and an empty CRLF line
    (raw / "user_action.csv").write_bytes(b"\n".join(out))
    cfg = load_config(DatasetConfig, CONFIGS / "wechat.yaml")
    _run_both(cfg, raw, tmp_path, monkeypatch)
    _assert_same_output(tmp_path / "ref", tmp_path / "new")
    rows = np.sort(np.concatenate([read_split(tmp_path / "new", s)["_row"].to_numpy() for s in ("train", "valid")]))
    assert rows.max() <= len(lines) - 2 and len(np.unique(rows)) == len(rows)
    text = (raw / "user_action.csv").read_text().split("\n")
    text[5000] = text[5000].replace(",", ",x", 1)
    (raw / "user_action.csv").write_text("\n".join(text))
    with pytest.raises(DataError) as new:
        preprocess(cfg, raw, tmp_path / "bad")
    with pytest.raises(DataError) as ref:
        preprocess(cfg, raw, tmp_path / "bad", engine="reference")
    assert str(new.value) == str(ref.value) and "such row(s)" in str(new.value)


@pytest.mark.parametrize("edits, expected", [
    # converting: 'userid' (the first column) fails in two pieces, 'feedid' in an earlier row:
    # the reference converts userid first, so userid's first row and count over the file
    ({9000: (0, "y"), 5000: (0, "x"), 50: (1, "1.5"), 100: (3, "")}, r"column 'userid', row 5000 .*'x'\); 2 such"),
    # no conversion error: the value checks, an empty 'device' in three pieces
    ({12000: (3, ""), 100: (3, ""), 700: (3, "")}, r"column 'device', row 100 .*empty value; 3 such"),
])
def test_a_read_check_is_worded_over_the_whole_file_without_the_reference(
        tiny_raw: Path, tmp_path: Path, ray_session, monkeypatch: pytest.MonkeyPatch,
        edits: dict[int, tuple[int, str]], expected: str) -> None:
    """Bad values in several ranges of a file: the distributed builder's error equals the
    reference builder's (first failing row, line, value, count over the file) and comes from the
    pieces' failures: the reference builder is not run."""
    raw = _editable_copy(tiny_raw, tmp_path)
    lines = (raw / "user_action.csv").read_text().split("\n")
    for row, (col, value) in edits.items():
        fields = lines[row].split(",")
        fields[col] = value
        lines[row] = ",".join(fields)
    (raw / "user_action.csv").write_text("\n".join(lines))
    _assert_worded_without_reference(raw, tmp_path, monkeypatch, expected, [])


@pytest.mark.parametrize("sets", [[], ["history=null"]])
def test_a_key_without_its_side_row_is_worded_over_the_whole_input_without_the_reference(
        tiny_raw: Path, tmp_path: Path, ray_session, monkeypatch: pytest.MonkeyPatch, sets: list[str]) -> None:
    """Feeds missing from feed_info.csv, used in many ranges of user_action.csv and in test_a.csv:
    the first such row in file order, its value and the count over all rows, as the reference."""
    raw = _editable_copy(tiny_raw, tmp_path)
    actions = pd.read_csv(raw / "user_action.csv", usecols=["feedid"])["feedid"]
    gone = {int(actions.iloc[i]) for i in (100, 5000, 12000)}
    feeds = (raw / "feed_info.csv").read_text().split("\n")
    (raw / "feed_info.csv").write_text("\n".join([feeds[0], *(f for f in feeds[1:] if int(f.split(",")[0] or -1) not in gone)]))
    first = int(np.flatnonzero(actions.isin(gone))[0]) + 1
    _assert_worded_without_reference(raw, tmp_path, monkeypatch, rf"user_action.csv: column 'feedid', row {first} "
                                     rf"\(line {first + 1}\): value {int(actions.iloc[first - 1])} has no row in .*feed_info.csv; \d+ such",
                                     sets)


def _assert_worded_without_reference(raw: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, expected: str,
                                     sets: list[str]) -> None:
    """The reference builder's error matches ``expected``; the distributed builder raises the same
    text without running the reference builder (wechat.yaml with ``sets``)."""
    cfg = load_config(DatasetConfig, CONFIGS / "wechat.yaml", sets)
    with pytest.raises(DataError) as ref:
        preprocess(cfg, raw, tmp_path / "ref", engine="reference")
    assert len(re.findall(expected, str(ref.value))) == 1, str(ref.value)

    def no_reference(*args: object, **kwargs: object) -> None:
        raise AssertionError("the reference builder ran")

    monkeypatch.setattr(dist, "PIECE_BYTES", 20_000)  # ~50 ranges: the bad rows in different ones
    monkeypatch.setattr(dist.pp, "build_reference", no_reference)
    with pytest.raises(DataError) as new:
        preprocess(cfg, raw, tmp_path / "new")
    assert str(new.value) == str(ref.value)


def test_pieces_count_their_rows_and_blank_ranges_are_empty(tiny_raw: Path, tmp_path: Path) -> None:
    """A read task numbers and counts the rows the CSV reader reads (LF and CRLF blank lines
    skipped); from the counts, the pieces' rows are the file's rows 1..N in order; a range of
    blank lines only is an empty piece, not an error."""
    raw = _editable_copy(tiny_raw, tmp_path)
    lines = (raw / "user_action.csv").read_bytes().split(b"\n")
    body = [line for line in lines[1:300] if line]
    (raw / "user_action.csv").write_bytes(b"\n".join([lines[0], *body[:100], *[b""] * 60, *[b"\r"] * 30, *body[100:], b""]))
    cfg = load_config(DatasetConfig, CONFIGS / "wechat.yaml")
    pieces = [p for p in dist.plan_pieces(cfg, raw, 40) if p.source == 0]
    outs = [dist.read_piece(p, raw, cfg, dist.main_types(cfg, raw)) for p in pieces]
    counts = [n for _, n in outs]
    want = pacsv.read_csv(raw / "user_action.csv")
    assert sum(counts) == want.num_rows == len(body) and 0 in counts
    offsets = np.cumsum([0, *counts[:-1]])
    rows = np.concatenate([block["_row"].to_numpy() + off for (block, n), off in zip(outs, offsets) if n])
    assert rows.tolist() == list(range(1, want.num_rows + 1))
    users = np.concatenate([block["userid"].to_numpy() for block, n in outs if n])
    assert users.tolist() == want["userid"].to_pylist()


def _ordered_split_by_sorting(times: np.ndarray, valid_fraction: float, test_fraction: float) -> np.ndarray:
    """The row-array implementation ordered_split had before it was computed from counts."""
    n = len(times)
    ordered = np.sort(times, kind="stable")
    codes = np.zeros(n, dtype=np.int8)

    def start(rows_before: int, wanted: int) -> int:
        cut = max(rows_before - wanted, 0)
        if wanted == 0 or cut >= rows_before:
            return rows_before
        t = ordered[cut]
        lo = int(np.searchsorted(ordered, t, side="left"))
        hi = int(np.searchsorted(ordered[:rows_before], t, side="right"))
        if hi == rows_before:
            return lo
        return lo if cut - lo <= hi - cut else hi

    test_at = start(n, int(round(test_fraction * n)))
    valid_at = start(test_at, int(round(valid_fraction * n)))
    order = np.argsort(times, kind="stable")
    codes[order[valid_at:test_at]] = 1
    codes[order[test_at:]] = 2
    return codes


@pytest.mark.parametrize("seed", range(40))
def test_ordered_split_from_counts_equals_sorting(seed: int) -> None:
    rng = np.random.default_rng(seed)
    times = rng.integers(0, rng.integers(1, 30), size=rng.integers(1, 200))
    vf, tf = rng.choice([0.0, 0.1, 0.2, 0.33]), rng.choice([0.0, 0.1, 0.25])
    assert ordered_split(times, vf, tf)[0].tolist() == _ordered_split_by_sorting(times, vf, tf).tolist()
    uniq, counts = np.unique(times, return_counts=True)
    codes, _ = ordered_split_counts(uniq, counts, vf, tf)
    assert codes[np.searchsorted(uniq, times)].tolist() == ordered_split(times, vf, tf)[0].tolist()


def test_combined_moments_equal_the_whole() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(1000, 5))
    parts = [moments(x[a:b]) for a, b in ((0, 10), (10, 10), (10, 700), (700, 1000))]
    n, mean, m2 = combine_moments(parts)
    assert n == 1000 and np.allclose(mean, x.mean(axis=0), atol=1e-12)
    assert np.allclose(m2 / (n - 1), np.cov(x, rowvar=False), atol=1e-10)
    n1, mean1, m21 = combine_moments([moments(x[:400, 0]), moments(x[400:, 0])])
    assert np.isclose(mean1, x[:, 0].mean()) and np.isclose(np.sqrt(m21 / n1), x[:, 0].std())


def test_history_table_from_partial_sums_equals_the_one_from_rows() -> None:
    rng = np.random.default_rng(1)
    n = 3000
    u, a = rng.integers(0, 40, n), rng.integers(100, 130, n)
    days = rng.integers(1, 15, n)
    acts = (rng.random((n, 2)) < 0.2).astype(np.float32)
    whole = build_history_group("h", ["u", "a"], [u, a], days, acts, 17)
    parts = []
    for lo, hi in ((0, 1000), (1000, 1001), (1001, n)):  # per block: sums per (u, a, day)
        df = pd.DataFrame({"u": u[lo:hi], "a": a[lo:hi], "d": days[lo:hi], "n": 1.0, "x": acts[lo:hi, 0], "y": acts[lo:hi, 1]})
        parts.append(df.groupby(["u", "a", "d"]).sum().reset_index())
    s = pd.concat(parts)
    got = history_group_from_sums("h", ["u", "a"], [s.u.to_numpy(), s.a.to_numpy()], s.d.to_numpy(),
                                  s[["n", "x", "y"]].to_numpy(), 17)
    assert np.array_equal(got.comb, whole.comb) and np.array_equal(got.prefix, whole.prefix)
    assert all(np.array_equal(x, y) for x, y in zip(got.uniques, whole.uniques))

"""pipeline.transforms: the fitted objects preprocess saves are applicable again — raw rows
through the loaded objects give exactly the rows preprocess wrote, unseen ids get the OOV
bucket, and each kind round-trips through save/load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from pipeline.data import load_spec, read_split
from pipeline.transforms import PCA, DenseScaler, HistoryGroup, ListEncoder, RowTransformer, Vocabulary


@pytest.mark.parametrize("split", ["valid", "test"])
def test_transform_of_raw_rows_equals_preprocess_output(tiny_processed: Path, tiny_raw: Path, split: str) -> None:
    t = RowTransformer.load(tiny_processed / "artifacts")
    out = read_split(tiny_processed, split)
    if split == "test":  # test_a.csv rows: no day column, the transformer's serving day (15)
        raw = pd.read_csv(tiny_raw / "test_a.csv")
        assert t.serve_day == 15
    else:
        raw = pd.read_csv(tiny_raw / "user_action.csv", usecols=["userid", "feedid", "device", "date_"])
    rows = raw.iloc[out["_row"].to_numpy() - 1].reset_index(drop=True)
    got = t.transform(pa.Table.from_pandas(rows, preserve_index=False))
    assert got.num_rows == out.num_rows
    for name in got.column_names:
        assert got[name].combine_chunks().equals(out[name].combine_chunks()), f"{split}: column {name} differs"
    if split == "test":  # the served copy (history trimmed to the days day 15 reads) gives the same rows
        served = t.for_serving().transform(pa.Table.from_pandas(rows, preserve_index=False))
        assert served.column_names == [c for c in got.column_names if c != "_day"]
        assert all(served[c].equals(got[c]) for c in served.column_names)
        assert all(len(a.comb) < len(b.comb) for a, b in zip(t.for_serving().history, t.history))
    spec = load_spec(tiny_processed)
    feature_names = {f.name for f in [*spec.sparse, *spec.lists, *spec.dense, *spec.vectors]}
    assert feature_names <= set(got.column_names)


def test_unseen_ids_take_the_oov_bucket(tiny_processed: Path) -> None:
    t = RowTransformer.load(tiny_processed / "artifacts")
    spec = load_spec(tiny_processed)
    got = t.transform(pa.table({"userid": [10**9], "feedid": [10**9], "device": [7]})).to_pylist()[0]
    for f in spec.sparse:
        assert got[f.name] == f.vocab_size, f.name  # userid/feedid/device and the feed's side ids
    for f in spec.lists:
        assert got[f.name] == []
    for f in spec.vectors:
        assert got[f.name] == [0.0] * f.dim
    assert got["videoplayseconds_log"] == 0.0
    for g in t.history:
        assert not any(got[g.name]), g.name
    with pytest.raises(KeyError, match="device"):
        t.transform(pa.table({"userid": [1], "feedid": [2]}))


def test_each_kind_round_trips(tmp_path: Path) -> None:
    v = Vocabulary().fit(pa.array([5, 3, None, 5]))
    v.save(tmp_path / "v.parquet")
    assert Vocabulary.load(tmp_path / "v.parquet").transform(pa.array([3, 5, 4, None])).tolist() == [0, 1, 2, 2]
    s = DenseScaler("log1p_standard").fit(np.array([0.0, 1.0, 3.0, np.nan]))
    s.save(tmp_path / "s.json")
    x = np.array([2.0, np.nan])
    np.testing.assert_array_equal(DenseScaler.load(tmp_path / "s.json").transform(x), s.transform(x))
    with pytest.raises(ValueError, match="log1p needs values >= 0"):
        s.transform(np.array([-1.0]))
    e = ListEncoder(2).fit(pa.array([[7, 8, 9]]))  # 9 is cut before fitting: not in the vocabulary
    e.save(tmp_path / "l.parquet")
    ids, w = ListEncoder.load(tmp_path / "l.parquet").transform(pa.array([[9, 8, 7]]), pa.array([[0.1, 0.2, 0.3]]))
    assert ids.to_pylist() == [[2, 1]] and w.to_pylist() == [[0.1, 0.2]]
    x = np.random.default_rng(0).normal(size=(40, 6))
    p = PCA(3).fit(x)
    p.save(tmp_path / "p.npz")
    np.testing.assert_array_equal(PCA.load(tmp_path / "p.npz").transform(x), p.transform(x))
    g = HistoryGroup.fit("h", ["u"], [np.array([1, 1, 2])], np.array([1, 2, 2]), np.array([[1.0], [0.0], [1.0]]),
                         day_base=5, windows=[1, 2], stats=["rate"])
    g.save(tmp_path / "h.npz")
    q = [np.array([1, 2, 3])], np.array([3, 3, 3])
    np.testing.assert_array_equal(HistoryGroup.load(tmp_path / "h.npz").transform(*q), g.transform(*q))
    # user 1 on day 3, window 2: impressions on days 1 and 2, one action -> rate 0.5
    assert g.transform(*q)[0].tolist() == pytest.approx([np.log1p(1), 0.0, np.log1p(2), 0.5])

"""Bring your own log (issue 12): string-token lists, the ordered split by fractions of time,
history windows in the time column's units, the history protocol, the steps warning. The
MovieLens-format files here are SYNTHETIC (tests/synthetic_movielens.py), never real data."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from pipeline.config import load_config
from pipeline.data import read_split
from pipeline.datasets import DatasetConfig, ListConfig
from pipeline.errors import ConfigError, DataError
from pipeline.preprocess import _parse_list, history_rows, ordered_split, preprocess
from pipeline.train.config import TrainConfig, planned_steps, steps_warning
from pipeline.transforms import ListEncoder, Vocabulary, history_feature_names
from synthetic_movielens import write_synthetic_movielens

MOVIELENS = Path(__file__).resolve().parents[1] / "configs" / "datasets" / "movielens.yaml"


# --------------------------------------------------------------------------------------------
# string-token lists


def test_string_tokens_parse_and_encode_with_the_fitted_vocabulary(tmp_path: Path) -> None:
    f = ListConfig(name="genres", sep="|", tokens="str", max_len=2)
    ids, w = _parse_list(pa.array(["Comedy|Romance", "", " Drama |Comedy|War", None]), f, tmp_path / "m.csv",
                         np.arange(1, 5), True)
    assert w is None and ids.to_pylist() == [["Comedy", "Romance"], [], ["Drama", "Comedy", "War"], []]
    enc = ListEncoder(2).fit(ids.slice(0, 2))  # training rows: Comedy, Romance
    got, _ = enc.transform(ids)
    assert got.to_pylist() == [[0, 1], [], [2, 0], []]  # Drama unseen -> OOV (2); War cut by max_len
    enc.save(tmp_path / "l.parquet")
    again = ListEncoder.load(tmp_path / "l.parquet")
    assert again.size == 2 and again.transform(pa.array([["Romance", "Sci-Fi"]]))[0].to_pylist() == [[1, 2]]


def test_malformed_string_and_int_lists_name_file_column_row(tmp_path: Path) -> None:
    f = ListConfig(name="genres", sep="|", tokens="str")
    with pytest.raises(DataError, match=r"m\.csv: column 'genres', row 2\b.*empty entry.*'Comedy\|\|War'; 1 such row"):
        _parse_list(pa.array(["Comedy", "Comedy||War"]), f, tmp_path / "m.csv", np.arange(1, 3), True)
    ints = ListConfig(name="genres", sep="|")  # tokens: int (the default) rejects names, and says why
    with pytest.raises(DataError, match=r"row 1\b.*malformed list entry 'Comedy'.*set tokens: str"):
        _parse_list(pa.array(["Comedy"]), ints, tmp_path / "m.csv", np.arange(1, 2), True)


def test_a_vocabulary_of_ids_rejects_string_tokens_clearly() -> None:
    v = Vocabulary().fit(pa.array([3, 5]))
    with pytest.raises(ValueError, match="do not fit a vocabulary of int64"):
        v.transform(pa.array(["Comedy"]))


# --------------------------------------------------------------------------------------------
# ordered split, history protocol, units


def test_ordered_split_takes_the_last_fractions_by_time_and_keeps_ties_together() -> None:
    rng = np.random.default_rng(1)
    times = rng.integers(0, 400, 5000)  # ~12 rows per time: many ties
    codes, bounds = ordered_split(times, 0.15, 0.1)
    for code in (0, 1):  # every split lies wholly before the next: no time on two sides
        assert times[codes == code].max() < times[codes == code + 1].min()
    assert bounds["valid_from"] == times[codes == 1].min() and bounds["test_from"] == times[codes == 2].min()
    assert abs((codes == 2).mean() - 0.1) < 0.01 and abs((codes == 1).mean() - 0.15) < 0.01
    assert bounds["fractions"] == {s: round(float((codes == k).mean()), 6) for k, s in enumerate(("train", "valid", "test"))}
    # a boundary time's rows go to the side nearer the asked fraction
    def test_part(times: list[int], fraction: float) -> list[int]:
        return ordered_split(np.array(times), 0.0, fraction)[0].tolist()

    assert test_part([1, 2, 3, 4, 5, 6, 6, 6, 6, 7], 0.2) == [0] * 9 + [2]  # 1 row (1 off) beats 5 rows (3 off)
    assert test_part([1, 2, 3, 4, 5, 5, 5, 5, 6, 7], 0.5) == [0] * 4 + [2] * 6  # 6 rows (1 off) beat 2 (3 off)
    assert test_part([1, 2, 3, 3, 4, 5], 0.5) == [0, 0, 2, 2, 2, 2]  # 4 or 2 rows, both 1 off: the later side
    assert test_part([1, 2, 3, 3, 3, 3, 3, 3, 3, 3], 0.3) == [0, 0] + [2] * 8  # not 0 rows, though nearer
    assert ordered_split(np.arange(10), 0.0, 0.0)[0].tolist() == [0] * 10


def test_history_protocol_rows() -> None:
    labelled = np.array([True, True, True, True, False])
    split = np.array([-1, 0, 1, 2, 2], dtype=np.int8)
    assert history_rows("online", labelled, split).tolist() == [True, True, True, True, False]
    assert history_rows("train_only", labelled, split).tolist() == [True, True, False, False, False]


def test_history_names_carry_the_time_unit() -> None:
    assert history_feature_names("hist_u", [3600], ["like"], ["rate"], "s") == ["hist_u_3600s_n", "hist_u_3600s_like_rate"]
    assert history_feature_names("hist_u", [7], ["like"], ["count"]) == ["hist_u_7d_n", "hist_u_7d_like_count"]


def test_config_rules_for_the_new_fields() -> None:
    cfg = load_config(DatasetConfig, MOVIELENS)
    assert (cfg.time_unit, cfg.split.kind, cfg.lists[0].tokens, cfg.history.protocol) == ("seconds", "ordered", "str", "online")
    with pytest.raises(ConfigError, match="split.kind=ordered needs the time column"):
        load_config(DatasetConfig, MOVIELENS, ["time=null", "history=null"])
    with pytest.raises(ConfigError, match=r"--set split.test_fraction=0.95: split: .*sum below 1"):
        load_config(DatasetConfig, MOVIELENS, ["split.test_fraction=0.95"])
    with pytest.raises(ConfigError, match=r"--set history.protocol=all: history.protocol: Input should be 'online' or 'train_only'"):
        load_config(DatasetConfig, MOVIELENS, ["history.protocol=all"])
    with pytest.raises(ConfigError, match=r"time_unit: Input should be 'days' or 'seconds'"):
        load_config(DatasetConfig, MOVIELENS, ["time_unit=hours"])


# --------------------------------------------------------------------------------------------
# steps warning


def test_steps_warning_gives_the_computed_steps() -> None:
    cfg = TrainConfig(batch_size=2048, epochs=2)
    assert planned_steps(cfg, [40_000, 40_300]) == (20, 40)
    msg = steps_warning(cfg, [40_000, 40_300])
    assert msg is not None and "takes 40 optimiser steps, fewer than 300" in msg
    assert "80300 training rows on 2 worker(s), batch_size 2048 per worker = 20 steps per epoch x 2 epoch(s)" in msg
    assert "train.epochs=15" in msg
    assert steps_warning(TrainConfig(batch_size=256, epochs=2), [80_300]) is None  # 314 x 2 steps
    capped = steps_warning(TrainConfig(batch_size=256, epochs=2, max_steps=50), [80_300])
    assert capped is not None and "takes 50 optimiser steps" in capped and "raise train.max_steps" in capped


# --------------------------------------------------------------------------------------------
# the MovieLens config on a synthetic log: what preprocess writes


@pytest.fixture(scope="module")
def synthetic_ml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_movielens(tmp_path_factory.mktemp("ml") / "ml-latest-small-format-SYNTHETIC",
                                     users=80, movies=120, per_user=40, seed=5)


def _brute_history(fed: pd.DataFrame, rows: pd.DataFrame, key: str, window: int) -> np.ndarray:
    """[n, 2]: impressions and liked count of ``fed`` rows with the row's key in [t - window, t)."""
    out = np.zeros((len(rows), 2))
    by_key = {k: g for k, g in fed.groupby(key)}
    for i, (k, t) in enumerate(zip(rows[key].to_numpy(), rows.timestamp.to_numpy())):
        g = by_key.get(k)
        if g is not None:
            sel = (g.timestamp.to_numpy() >= t - window) & (g.timestamp.to_numpy() < t)
            out[i] = sel.sum(), (g.rating.to_numpy()[sel] >= 4).sum()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["online", "train_only"])
def test_movielens_config_on_a_synthetic_log(synthetic_ml: Path, tmp_path: Path, ray_session, protocol: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    cfg = load_config(DatasetConfig, MOVIELENS, [f"history.protocol={protocol}"])
    report = preprocess(cfg, synthetic_ml, tmp_path / "out")
    ratings = pd.read_csv(synthetic_ml / "ratings.csv")
    movies = pd.read_csv(synthetic_ml / "movies.csv").set_index("movieId")
    parts = {s: read_split(tmp_path / "out", s).to_pandas() for s in ("train", "valid", "test")}
    n = len(ratings)
    assert {s: len(p) for s, p in parts.items()} == report["splits"] and sum(report["splits"].values()) == n
    times = {s: ratings.timestamp.to_numpy()[p._row.to_numpy() - 1] for s, p in parts.items()}
    assert times["train"].max() < times["valid"].min() <= times["valid"].max() < times["test"].min()
    assert report["split_boundaries"]["test_from"] == times["test"].min()
    assert abs(report["splits"]["test"] / n - 0.1) < 0.02 and abs(report["splits"]["valid"] / n - 0.1) < 0.02
    # labels from the rating; _day holds the raw seconds
    for p in parts.values():
        src = ratings.iloc[p._row.to_numpy() - 1]
        assert np.array_equal(p.liked.to_numpy(), (src.rating >= 4).to_numpy(np.float32))
        assert np.array_equal(p.rated_5.to_numpy(), (src.rating == 5).to_numpy(np.float32))
        assert np.array_equal(p._day.to_numpy(), src.timestamp.to_numpy())
    # genres: string tokens through the fitted vocabulary (train movies' genres), OOV = V
    vocab = ListEncoder.load(tmp_path / "out" / "artifacts" / "vocab_genres.parquet").vocab
    known = vocab.values.to_pylist()
    v = report["vocab_sizes"]["genres"]
    assert known == sorted(known) and v == len(known)
    for s, p in parts.items():
        raw = movies.genres.loc[p._item.to_numpy()].str.split("|")
        want = [[known.index(g) if g in known else v for g in gs] for gs in raw]
        assert p.genres.map(list).tolist() == want, s
    # history in seconds, fed by the rows the protocol allows, strictly earlier
    hist = report["history"]
    assert hist["protocol"] == protocol and hist["time_unit"] == "seconds"
    fed_splits = ("train", "valid", "test") if protocol == "online" else ("train",)
    assert hist["rows_fed_by_split"] == {s: (report["splits"][s] if s in fed_splits else 0) for s in ("train", "valid", "test")} | {"outside_splits": 0}
    assert report["history_columns"]["hist_userId"][:2] == ["hist_userId_3600s_n", "hist_userId_3600s_liked_count"]
    fed = pd.concat([ratings.iloc[parts[s]._row.to_numpy() - 1] for s in fed_splits])
    names = report["history_columns"]["hist_movieId"]
    for s in ("train", "test"):
        rows = ratings.iloc[parts[s]._row.to_numpy() - 1]
        got = np.stack(parts[s].hist_movieId.to_numpy())
        want = _brute_history(fed, rows, "movieId", 2_592_000)
        np.testing.assert_allclose(got[:, names.index("hist_movieId_2592000s_n")], np.log1p(want[:, 0]), rtol=1e-6)
        np.testing.assert_allclose(got[:, names.index("hist_movieId_2592000s_liked_count")], np.log1p(want[:, 1]), rtol=1e-6)
    assert re.search(r"MovieLens", report["attribution"])
    if protocol == "online":  # the train stage's check: the computed steps, per rank as the workers split rows
        from pipeline.train.config import TrainJobConfig
        from pipeline.train.ray_train import check_job

        capsys.readouterr()
        check_job(TrainJobConfig(train={"batch_size": 256, "epochs": 3}, scaling={"num_workers": 2}), tmp_path / "out")
        per_rank = np.bincount(parts["train"]._row.to_numpy() % 2, minlength=2)
        steps = -(-per_rank.max() // 256) * 3
        assert f"train: warning: this run takes {steps} optimiser steps, fewer than 300" in capsys.readouterr().err

"""Numeric features as embeddings (mtl/numeric.py, pipeline/transforms/buckets.py): the
encodings equal Gorishniy et al. 2022's definitions, the fitted edges round-trip through
save/load, and the spec carries them."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mtl.features import DenseFeature, FeatureSpec, NumericEncoding, SparseFeature
from mtl.inputs import InputModule
from mtl.numeric import NumericEmbedding, piecewise_linear_encoding
from pipeline.train.config import TrainConfig
from pipeline.transforms.buckets import QuantileBoundaries, tie_aware_quantiles


def test_piecewise_linear_encoding_follows_the_paper() -> None:
    edges = torch.tensor([[0.0, 1.0, 3.0, 3.0, 4.0]])  # bins [0,1) [1,3) [3,3) (zero width) [3,4)
    x = torch.tensor([[-1.0], [0.5], [2.0], [3.0], [5.0]])
    got = piecewise_linear_encoding(x, edges)[:, 0]

    def expected(v: float) -> list[float]:
        out = []
        lo_hi = list(zip(edges[0, :-1].tolist(), edges[0, 1:].tolist()))
        for t, (lo, hi) in enumerate(lo_hi):
            if hi == lo:
                out.append(float(v >= hi))
            elif v < lo and t > 0:
                out.append(0.0)
            elif v >= hi and t < len(lo_hi) - 1:
                out.append(1.0)
            else:
                out.append((v - lo) / (hi - lo))
        return out

    torch.testing.assert_close(got, torch.tensor([expected(float(v)) for v in x[:, 0]]))
    assert got[0, 0] == -1.0 and got[4, 3] == 2.0  # first and last bins extrapolate


def test_bucket_rows_and_periodic_formula() -> None:
    f = DenseFeature("x", 2, boundaries=[[0.0, 1.0, 2.0], [10.0, 20.0, 30.0]], encoding=NumericEncoding("bucket", dim=3))
    emb = NumericEmbedding(f)
    x = torch.tensor([[-5.0, 25.0], [1.5, 10.0]])
    rows = QuantileBoundaries(2, np.asarray(f.boundaries)).transform(x.numpy())  # the fitted transform's ids
    assert rows.tolist() == [[0, 2], [2, 0]]
    expected = torch.cat([emb.table[0, rows[:, 0]], emb.table[1, rows[:, 1]]], dim=1)
    torch.testing.assert_close(emb(x), expected)

    p = NumericEmbedding(DenseFeature("y", 1, encoding=NumericEncoding("periodic", dim=4, frequencies=3)))
    v = torch.tensor([0.7, -1.2])
    c = p.frequencies[0]
    feats = torch.cat([torch.sin(2 * math.pi * c * v[:, None]), torch.cos(2 * math.pi * c * v[:, None])], dim=1)
    torch.testing.assert_close(p(v), torch.relu(feats @ p.weight[0] + p.bias[0]))


def test_quantile_boundaries_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    train = rng.exponential(size=(500, 3))
    q = QuantileBoundaries(7).fit(train)
    assert q.edges.shape == (3, 8)
    np.testing.assert_array_equal(q.edges[1], np.quantile(train[:, 1], np.linspace(0, 1, 8)))
    q.save(tmp_path / "b.json")
    back = QuantileBoundaries.load(tmp_path / "b.json")
    assert back.bins == 7 and np.array_equal(back.edges, q.edges)
    other = rng.normal(size=(50, 3))
    assert np.array_equal(back.transform(other), q.transform(other))
    with pytest.raises(ValueError, match="non-finite"):
        QuantileBoundaries(3).fit(np.array([1.0, np.nan]))


def test_tie_aware_quantiles_spend_the_bins_of_a_mass_point_on_the_other_values() -> None:
    rng = np.random.default_rng(1)
    # Adult's capital gain: 92% zeros; plain quantiles leave 2 of 32 bins to the non-zero values
    gains = np.where(rng.random(5000) < 0.92, 0.0, rng.lognormal(8, 1, 5000))
    edges = tie_aware_quantiles(gains, 32)
    assert edges.shape == (33,) and np.all(np.diff(edges) >= 0)
    assert edges[0] == 0.0 and edges[-1] == gains.max()
    nonzero = gains[gains > 0]
    # the non-zero values get (nearly) all the bins, no bin holding more than 2/31 of them
    assert len(np.unique(edges[edges > 0])) >= 30
    inner = np.searchsorted(np.sort(nonzero), edges[1:-1]) / len(nonzero)
    assert np.diff(inner).max() < 2 / 31 and inner[0] < 2 / 31 and inner[-1] > 1 - 2 / 31
    # without repeated quantiles: exactly the plain quantiles
    normal = rng.normal(size=1000)
    np.testing.assert_array_equal(tie_aware_quantiles(normal, 16), np.quantile(normal, np.linspace(0, 1, 17)))
    # few distinct values: every one of them is an edge (so each gets its own bucket)
    few = tie_aware_quantiles(np.array([3.0, 1.0, 1.0, 2.0, 1.0]), 5)
    assert few.shape == (6,) and np.all(np.diff(few) >= 0) and {1.0, 2.0, 3.0} <= set(few.tolist())


def test_piecewise_linear_over_tie_aware_bins_resolves_a_mostly_zero_feature() -> None:
    """The defect of issue 14: two gains on either side of a decisive threshold got the same
    encoding with plain quantile edges; with tie-aware edges they differ."""
    rng = np.random.default_rng(2)
    gains = np.where(rng.random(5000) < 0.92, 0.0, rng.lognormal(8, 1, 5000))
    a, b = np.quantile(gains[gains > 0], [0.3, 0.4])  # two typical non-zero gains
    fitted = QuantileBoundaries(32).fit(gains[:, None])
    enc = piecewise_linear_encoding(torch.tensor([[a], [b]]), torch.tensor(fitted.edges))
    assert (enc[0] != enc[1]).sum() >= 2  # at least a bin between them
    ids = fitted.transform(np.array([[a], [b]]))[:, 0]
    assert ids[1] - ids[0] >= 2  # and for the bucket encoding: different rows


def test_spec_round_trip_and_train_config_encodings() -> None:
    spec = FeatureSpec(
        sparse=[SparseFeature("u", 5, 2)],
        dense=[DenseFeature("a", 1, boundaries=[[0.0, 1.0, 2.0]]), DenseFeature("h", 2)],
        tasks=["t"],
    )
    cfg = TrainConfig(numeric={"a": {"kind": "piecewise_linear", "dim": 3}, "*": {"kind": "periodic", "dim": 2}})
    enc = cfg.model_spec(spec)
    assert [f.output_dim for f in enc.dense] == [3, 4] and enc.input_dim == 2 + 3 + 4
    assert FeatureSpec.from_dict(enc.to_dict()) == enc
    out = InputModule(enc)({"u": torch.tensor([1, 2]), "a": torch.tensor([0.5, 3.0]), "h": torch.randn(2, 2)})
    assert out.shape == (2, 9)
    with pytest.raises(ValueError, match="needs quantile boundaries"):
        TrainConfig(numeric={"h": {"kind": "bucket"}}).model_spec(spec)
    with pytest.raises(ValueError, match="no such dense feature"):
        TrainConfig(numeric={"zz": {"kind": "bucket"}}).model_spec(spec)
    assert TrainConfig(numeric={"*": {"kind": "raw"}}).model_spec(spec).input_dim == 2 + 1 + 2


def test_build_uses_and_keeps_the_encoded_spec() -> None:
    """The train step's model reads the run's encodings, ``state.spec`` (what is saved with the
    model for serving) carries them, and the optimizer's embedding group holds the numeric
    embeddings with the embedding learning rate and weight decay."""
    from pipeline.train.step import build

    spec = FeatureSpec(sparse=[SparseFeature("u", 5, 2)], dense=[DenseFeature("a", 1, boundaries=[[0.0, 1.0, 2.0]])],
                       tasks=["t", "s"])
    cfg = TrainConfig(numeric={"a": {"kind": "bucket", "dim": 3}}, model={"name": "shared_bottom"},
                      optimizer={"lr": 0.01, "embedding_lr": 0.001, "embedding_weight_decay": 0.5})
    state = build(cfg, spec)
    assert state.spec.dense[0].encoding == NumericEncoding("bucket", dim=3)
    emb_group = state.optimizers[0].param_groups[0]
    numeric = list(state.model.inputs.numeric.parameters())
    assert numeric and {id(p) for p in numeric} <= {id(p) for p in emb_group["params"]}
    assert emb_group["lr"] == 0.001 and emb_group["weight_decay"] == 0.5


@pytest.mark.parametrize("seed", range(12))
def test_edges_from_parts_equal_the_whole(seed: int) -> None:
    """The distributed fit (bucket counts per part, then rounds of the asked buckets' values per
    part, as ``preprocess_dist._fit_bins`` runs them) gives bit-identical edges to
    ``QuantileBoundaries.fit`` on all rows: float32 and float64, -0.0 beside 0.0, mass points (log counts, mostly
    zeros, small-count rates), tiny parts and empty parts."""
    from pipeline.transforms.buckets import bucket_counts, bucket_values, edges_from_parts, first_wanted, merge_collected

    rng = np.random.default_rng(seed)
    n, dim, bins = int(rng.integers(1, 2500)), int(rng.integers(1, 4)), int(rng.integers(1, 33))
    x = [rng.normal(size=(n, dim)).astype(np.float32),
         np.log1p(rng.integers(0, 5, size=(n, dim))).astype(np.float32),
         (rng.integers(0, 7, size=(n, dim)) / rng.integers(1, 9, size=(n, dim))).astype(np.float32),
         np.where(rng.random(n) < 0.9, 0.0, rng.exponential(1e4, size=n)),
         np.where(rng.random((n, dim)) < 0.5, rng.choice([-0.0, 0.0], size=(n, dim)), rng.normal(size=(n, dim))).astype(np.float32),
         ][seed % 5]
    parts = np.split(x, np.sort(rng.integers(0, n + 1, size=rng.integers(0, 5))))
    counts = sum(bucket_counts(p) for p in parts)
    d = counts.shape[0]
    collected = [(np.zeros(0), np.zeros(0, np.int64), np.zeros(0, np.int64))] * d
    wanted, rounds = first_wanted(counts, bins), 0
    while True:
        rounds += 1
        got = [bucket_values(p, wanted) for p in parts]
        collected = [merge_collected([collected[j], *[g[j] for g in got]]) for j in range(d)]
        edges, wanted = edges_from_parts(counts, collected, bins)
        if edges is not None:
            break
        assert rounds < 10
    want = QuantileBoundaries(bins).fit(x)
    assert np.array_equal(edges, want.edges)
    with pytest.raises(ValueError, match="non-finite"):
        bucket_counts(np.array([1.0, np.nan]))


def test_tie_aware_quantiles_equal_their_definition() -> None:
    """The oracle form of the tie-aware edges equals the definition written with ``np.quantile``
    on the values that are not yet edges, bit for bit (random data with and without mass points)."""
    from pipeline.transforms.buckets import tie_aware_quantiles

    def by_definition(x: np.ndarray, bins: int) -> np.ndarray:
        edges = np.unique(np.quantile(x, np.linspace(0.0, 1.0, bins + 1)))
        while len(edges) < bins + 1:
            rest = x[~np.isin(x, edges)]
            if rest.size == 0:
                break
            grown = np.unique(np.concatenate([edges, np.quantile(rest, np.linspace(0.0, 1.0, bins + 1 - len(edges) + 2)[1:-1])]))
            if len(grown) == len(edges):
                break
            edges = grown
        return np.concatenate([edges, np.full(bins + 1 - len(edges), edges[-1])])

    rng = np.random.default_rng(0)
    for t in range(400):
        n = int(rng.integers(1, 300))
        x = [rng.normal(size=n), np.where(rng.random(n) < rng.random(), 0.0, rng.exponential(size=n)),
             rng.integers(0, rng.integers(1, 6), n).astype(float),
             np.where(rng.random(n) < 0.5, rng.choice([0.0, 1.0, 2.5], n), rng.normal(size=n))][t % 4]
        bins = int(rng.integers(1, 40))
        assert np.array_equal(tie_aware_quantiles(x, bins), by_definition(x, bins)), (t, n, bins)

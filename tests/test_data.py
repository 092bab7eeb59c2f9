"""pipeline.data: Arrow -> mtl batch convention, identical for local and Ray Data reading;
batches are accepted by InputModule and an mtl model (forward and backward)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from mtl.features import PAD_ID, WEIGHT_SUFFIX, FeatureSpec, ListFeature, SparseFeature
from mtl.inputs import InputModule
from mtl.models import build_model
from pipeline.data import (
    arrow_to_batch,
    check_complete,
    iter_local_batches,
    iter_ray_batches,
    load_spec,
    pad_lists,
    ray_dataset,
    read_split,
)


def test_pad_lists_matches_a_loop() -> None:
    rng = np.random.default_rng(0)
    lists = [list(rng.integers(0, 50, size=rng.integers(0, 9))) for _ in range(40)]
    arr = pa.array(lists, type=pa.list_(pa.int64())).slice(3, 30)  # a slice: non-zero offsets
    got = pad_lists(arr, 5, PAD_ID, np.int64)
    want = np.full((30, 5), PAD_ID)
    for i, row in enumerate(lists[3:33]):
        want[i, : min(5, len(row))] = row[:5]
    assert np.array_equal(got, want)


def test_batch_follows_the_spec(tiny_processed: Path) -> None:
    spec = load_spec(tiny_processed)
    table = read_split(tiny_processed, "train").slice(0, 257)
    b = arrow_to_batch(table, spec)
    assert len(b) == 257
    for f in spec.sparse:
        assert b.features[f.name].dtype == torch.int64 and b.features[f.name].shape == (257,)
    for f in spec.lists:
        ids = b.features[f.name]
        assert ids.dtype == torch.int64 and ids.shape == (257, f.max_len)
        lengths = pa.compute.list_value_length(table[f.name]).to_numpy()
        assert np.array_equal((ids != PAD_ID).sum(1).numpy(), lengths)
        first = np.array(table[f.name][int(lengths.argmax())].as_py())
        assert np.array_equal(ids[int(lengths.argmax()), : len(first)].numpy(), first)
        if f.weighted:
            w = b.features[f.name + WEIGHT_SUFFIX]
            assert w.dtype == torch.float32 and w.shape == ids.shape
            assert (w[ids == PAD_ID] == 0).all() and (w[ids != PAD_ID] > 0).all()
    for f in spec.dense:
        x = b.features[f.name]
        assert x.dtype == torch.float32 and x.shape == ((257,) if f.dim == 1 else (257, f.dim))
    for f in spec.vectors:
        assert b.features[f.name].shape == (257, f.dim)
    assert b.labels.shape == (257, spec.num_tasks) and b.labels.dtype == torch.float32
    for k, t in enumerate(spec.tasks):
        assert np.array_equal(b.labels[:, k].numpy(), table[t].to_numpy())
    assert b.mask is None
    assert np.array_equal(b.meta["_user"].numpy(), table["_user"].to_numpy())
    # test split: no labels
    tb = arrow_to_batch(read_split(tiny_processed, "test").slice(0, 10), spec)
    assert tb.labels is None and len(tb) == 10


def test_model_accepts_batches_and_trains(tiny_processed: Path) -> None:
    torch.manual_seed(0)
    spec = load_spec(tiny_processed)
    model = build_model("mmoe", spec, num_experts=2, expert_hidden=[16], tower_hidden=[8])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    table = read_split(tiny_processed, "train")
    losses = []
    for epoch in range(2):
        for b in iter_local_batches(tiny_processed, "train", 2048, shuffle=True, seed=epoch, table=table):
            logits = model(b.features)
            assert logits.shape == (len(b), spec.num_tasks)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, b.labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert np.isfinite(losses).all() and np.mean(losses[-3:]) < losses[0]
    assert InputModule(spec)(b.features).shape == (len(b), spec.input_dim)


def test_local_shuffle_is_a_seeded_permutation(tiny_processed: Path) -> None:
    table = read_split(tiny_processed, "valid")
    rows = lambda seed: torch.cat([b.meta["_row"] for b in iter_local_batches(tiny_processed, "valid", 100, shuffle=True, seed=seed, table=table)])  # noqa: E731
    a, b, c = rows(1), rows(1), rows(2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert np.array_equal(np.sort(a.numpy()), np.sort(table["_row"].to_numpy()))
    n = sum(len(x) for x in iter_local_batches(tiny_processed, "valid", 100, drop_last=True, table=table))
    assert n == table.num_rows - table.num_rows % 100


def test_ray_and_local_batches_are_identical(tiny_processed: Path, ray_session) -> None:
    spec = load_spec(tiny_processed)
    ds = ray_dataset(tiny_processed, "valid")
    ray_batches = list(iter_ray_batches(ds, spec, 256))
    local_batches = list(iter_local_batches(tiny_processed, "valid", 256))
    assert len(ray_batches) == len(local_batches)
    for rb, lb in zip(ray_batches, local_batches):
        assert rb.features.keys() == lb.features.keys()
        for k in lb.features:
            assert torch.equal(rb.features[k], lb.features[k]), k
        assert torch.equal(rb.labels, lb.labels) and torch.equal(rb.meta["_row"], lb.meta["_row"])
    # map_batches route (e.g. inside a Ray job): the same conversion
    sizes = ds.map_batches(lambda t: pa.table({"n": [arrow_to_batch(t, spec).labels.shape[0]]}), batch_format="pyarrow", batch_size=300).take_all()
    assert sum(r["n"] for r in sizes) == ds.count()


def test_masks_and_incomplete_output(tmp_path: Path) -> None:
    spec = FeatureSpec(sparse=[SparseFeature("u", 3)], lists=[ListFeature("l", 4, 2, weighted=True)], tasks=["a", "b"])
    t = pa.table({
        "u": pa.array([0, 5], pa.int64()),
        "l": pa.array([[1, 2, 3], []], pa.list_(pa.int64())),
        "l" + WEIGHT_SUFFIX: pa.array([[0.5, 0.25, 1.0], []], pa.list_(pa.float32())),
        "a": pa.array([1.0, 0.0], pa.float32()), "b": pa.array([0.0, 0.0], pa.float32()),
        "_mask__a": pa.array([1.0, 1.0], pa.float32()), "_mask__b": pa.array([1.0, 0.0], pa.float32()),
    })
    b = arrow_to_batch(t, spec)
    assert b.features["l"].tolist() == [[1, 2], [PAD_ID, PAD_ID]]
    assert b.features["l" + WEIGHT_SUFFIX].tolist() == [[0.5, 0.25], [0.0, 0.0]]
    assert b.mask.tolist() == [[1.0, 1.0], [1.0, 0.0]]
    module = InputModule(spec)
    out = module(b.features).detach()
    u_table, l_table = module.tables["u"].weight.detach(), module.tables["l"].weight.detach()
    du = u_table.shape[1]
    assert torch.equal(out[0, :du], u_table[0])
    assert torch.equal(out[1, :du], u_table[3])  # OOV id 5 (vocabulary 3) -> the OOV row
    pooled = 0.5 * l_table[1] + 0.25 * l_table[2]  # ids [1, 2] (3 cut at max_len 2), weighted
    if spec.lists[0].pooling == "mean":
        pooled = pooled / 0.75
    assert torch.allclose(out[0, du:], pooled, atol=1e-7)
    assert torch.equal(out[1, du:], torch.zeros_like(pooled))  # an empty list pools to zeros
    (tmp_path / "feature_spec.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="_SUCCESS"):
        check_complete(tmp_path)
    with pytest.raises(KeyError, match="no column 'u'"):
        arrow_to_batch(t.drop_columns(["u"]), spec)

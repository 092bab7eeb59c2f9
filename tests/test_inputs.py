"""Input module and feature spec tests (issue 2): pooling, OOV handling, sparse gradients,
spec round trip and errors."""

from __future__ import annotations

import json

import pytest
import torch
from torch import Tensor

from mtl.features import (
    PAD_ID,
    WEIGHT_SUFFIX,
    DenseFeature,
    FeatureSpec,
    ListFeature,
    SparseFeature,
    VectorFeature,
)
from mtl.inputs import InputModule, to_table_ids

V_U, V_I, V_TAG, V_KW = 9, 6, 7, 5


def make_spec(pooling: str = "mean") -> FeatureSpec:
    return FeatureSpec(
        sparse=[SparseFeature("u", V_U, 4), SparseFeature("i", V_I, 3), SparseFeature("a", 4, 4)],
        lists=[
            ListFeature("tags", V_TAG, max_len=4, embedding_dim=3, pooling=pooling),  # type: ignore[arg-type]
            ListFeature("kw", V_KW, max_len=3, embedding_dim=2, weighted=True),
        ],
        dense=[DenseFeature("d1"), DenseFeature("d2", dim=2)],
        vectors=[VectorFeature("vec", dim=3)],
        tasks=["like", "follow"],
        user_column="u",
    )


def make_batch() -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "u": torch.tensor([0, 3, V_U - 1, 2]),
        "i": torch.tensor([1, 0, 5, 2]),
        "a": torch.tensor([0, 1, 2, 3]),
        "tags": torch.tensor([[1, 2, PAD_ID, PAD_ID], [3, PAD_ID, PAD_ID, PAD_ID], [0, 6, 5, 4], [2, 2, 1, PAD_ID]]),
        "kw": torch.tensor([[0, 1, PAD_ID], [4, PAD_ID, PAD_ID], [2, 3, 1], [1, PAD_ID, PAD_ID]]),
        "kw" + WEIGHT_SUFFIX: torch.tensor([[0.2, 0.8, 0.0], [0.5, 0.0, 0.0], [0.1, 0.3, 0.6], [0.9, 0.0, 0.0]]),
        "d1": torch.randn(4, generator=g),
        "d2": torch.randn(4, 2, generator=g),
        "vec": torch.randn(4, 3, generator=g),
    }


def build(spec: FeatureSpec, sparse_gradients: bool = False, seed: int = 0) -> InputModule:
    torch.manual_seed(seed)
    return InputModule(spec, sparse_gradients=sparse_gradients)


def slices(spec: FeatureSpec) -> dict[str, slice]:
    out, start = {}, 0
    widths = [(f.name, f.embedding_dim) for f in [*spec.sparse, *spec.lists]]
    widths += [(f.name, f.dim) for f in [*spec.dense, *spec.vectors]]
    for name, width in widths:
        out[name] = slice(start, start + width)
        start += width
    return out


@pytest.mark.parametrize("sparse_gradients", [False, True])
def test_output_layout(sparse_gradients: bool) -> None:
    spec = make_spec()
    module = build(spec, sparse_gradients)
    batch = make_batch()
    out = module(batch)
    assert out.shape == (4, spec.input_dim) and module.output_dim == spec.input_dim
    s = slices(spec)
    for f in spec.sparse:
        torch.testing.assert_close(out[:, s[f.name]], module.tables[f.name].weight[batch[f.name]])
    torch.testing.assert_close(out[:, s["d1"]], batch["d1"].unsqueeze(1))
    torch.testing.assert_close(out[:, s["d2"]], batch["d2"])
    torch.testing.assert_close(out[:, s["vec"]], batch["vec"])


@pytest.mark.parametrize("sparse_gradients", [False, True])
def test_unseen_ids_land_in_oov_row(sparse_gradients: bool) -> None:
    spec = make_spec()
    module = build(spec, sparse_gradients)
    batch = make_batch()
    batch["u"] = torch.tensor([V_U, V_U + 17, -5, 4])  # unseen, unseen, negative, in vocabulary
    out = module(batch)
    table = module.tables["u"].weight
    s = slices(spec)["u"]
    for row in range(3):
        torch.testing.assert_close(out[row, s], table[V_U])
    torch.testing.assert_close(out[3, s], table[4])
    assert not torch.allclose(table[V_U], table[4])
    # In lists: an unseen id and a negative non-padding id are real entries looked up in the OOV row.
    batch["tags"] = torch.tensor([[V_TAG + 3, PAD_ID, PAD_ID, PAD_ID], [-7, PAD_ID, PAD_ID, PAD_ID],
                                  [1, V_TAG, PAD_ID, PAD_ID], [2, PAD_ID, PAD_ID, PAD_ID]])
    out = module(batch)
    tags = module.tables["tags"].weight
    s = slices(spec)["tags"]
    torch.testing.assert_close(out[0, s], tags[V_TAG])
    torch.testing.assert_close(out[1, s], tags[V_TAG])
    torch.testing.assert_close(out[2, s], (tags[1] + tags[V_TAG]) / 2)


def test_mean_pooling_is_mean_of_real_entries() -> None:
    spec = make_spec("mean")
    module = build(spec)
    batch = make_batch()
    out = module(batch)
    tags = module.tables["tags"].weight
    s = slices(spec)["tags"]
    for row, ids in enumerate(batch["tags"]):
        real = ids[ids != PAD_ID]
        torch.testing.assert_close(out[row, s], tags[real].mean(0))


def test_sum_pooling_is_sum_of_real_entries() -> None:
    spec = make_spec("sum")
    module = build(spec)
    batch = make_batch()
    out = module(batch)
    tags = module.tables["tags"].weight
    s = slices(spec)["tags"]
    for row, ids in enumerate(batch["tags"]):
        real = ids[ids != PAD_ID]
        torch.testing.assert_close(out[row, s], tags[real].sum(0))
    # Repeated ids count once per occurrence (row 3 has id 2 twice).
    torch.testing.assert_close(out[3, s], 2 * tags[2] + tags[1])


def test_weighted_mean_pooling_uses_weights_and_ignores_padding_weights() -> None:
    spec = make_spec()
    module = build(spec)
    batch = make_batch()
    out = module(batch)
    kw = module.tables["kw"].weight
    s = slices(spec)["kw"]
    weights = batch["kw" + WEIGHT_SUFFIX]
    for row, ids in enumerate(batch["kw"]):
        real = ids != PAD_ID
        w = weights[row][real]
        torch.testing.assert_close(out[row, s], (w.unsqueeze(1) * kw[ids[real]]).sum(0) / w.sum())
    # Non-zero weights at padding positions are ignored.
    noisy = dict(batch)
    noisy["kw" + WEIGHT_SUFFIX] = torch.where(batch["kw"] == PAD_ID, torch.full_like(weights, 5.0), weights)
    torch.testing.assert_close(module(noisy), out)


@pytest.mark.parametrize("pooling", ["mean", "sum"])
@pytest.mark.parametrize("sparse_gradients", [False, True])
def test_pooling_ignores_appended_padding(pooling: str, sparse_gradients: bool) -> None:
    spec = make_spec(pooling)
    module = build(spec, sparse_gradients)
    batch = make_batch()
    out = module(batch)
    padded = dict(batch)
    pad = torch.full((4, 5), PAD_ID)
    padded["tags"] = torch.cat([batch["tags"], pad], dim=1)
    padded["kw"] = torch.cat([batch["kw"], pad], dim=1)
    padded["kw" + WEIGHT_SUFFIX] = torch.cat([batch["kw" + WEIGHT_SUFFIX], torch.rand(4, 5)], dim=1)
    torch.testing.assert_close(module(padded), out, rtol=1e-6, atol=1e-7)


def test_sparse_gradients_are_sparse_and_equal_dense_ones() -> None:
    spec = make_spec()
    dense_mod = build(spec, sparse_gradients=False)
    sparse_mod = build(spec, sparse_gradients=True)
    sparse_mod.load_state_dict(dense_mod.state_dict())
    batch = make_batch()
    proj = torch.randn(spec.input_dim, generator=torch.Generator().manual_seed(3))
    for module in (dense_mod, sparse_mod):
        (module(batch) @ proj).pow(2).sum().backward()
    assert len(sparse_mod.embedding_parameters()) == len(spec.sparse) + len(spec.lists)
    for name in [f.name for f in [*spec.sparse, *spec.lists]]:
        g_sparse = sparse_mod.tables[name].weight.grad
        g_dense = dense_mod.tables[name].weight.grad
        assert g_sparse is not None and g_sparse.is_sparse, name
        assert g_dense is not None and not g_dense.is_sparse, name
        torch.testing.assert_close(g_sparse.to_dense(), g_dense, msg=name)
        # Only rows the batch looked up are stored (padding looks up the OOV row with weight 0).
        stored = set(g_sparse.coalesce().indices()[0].tolist())
        looked_up = set(to_table_ids(batch[name], sparse_mod.tables[name].num_embeddings - 1).flatten().tolist())
        nonzero = set(torch.nonzero(g_dense.abs().sum(1)).flatten().tolist())
        assert nonzero <= stored <= looked_up, name
        if name == "u":  # the batch touches 4 of the 10 rows: the check above is not vacuous
            assert len(stored) == 4 < sparse_mod.tables[name].num_embeddings


def test_missing_column_is_named() -> None:
    module = build(make_spec())
    batch = make_batch()
    del batch["i"]
    with pytest.raises(KeyError, match="'i'"):
        module(batch)


# ---------------------------------------------------------------- feature spec


def test_feature_spec_json_round_trip(tmp_path) -> None:
    spec = make_spec("sum")
    path = tmp_path / "spec.json"
    spec.save(path)
    assert FeatureSpec.load(path) == spec
    assert FeatureSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert spec.num_tasks == 2
    assert spec.input_dim == 4 + 3 + 4 + 3 + 2 + 1 + 2 + 3


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: SparseFeature("userid", vocab_size=0), r"'userid'.*vocab_size"),
        (lambda: SparseFeature("userid", vocab_size=10, embedding_dim=-2), r"'userid'.*embedding_dim"),
        (lambda: SparseFeature("userid", vocab_size="10"), r"'userid'.*vocab_size"),  # type: ignore[arg-type]
        (lambda: ListFeature("tags", vocab_size=5, max_len=0), r"'tags'.*max_len"),
        (lambda: ListFeature("tags", vocab_size=5, max_len=3, pooling="max"), r"'tags'.*pooling"),  # type: ignore[arg-type]
        (lambda: DenseFeature("x", dim=0), r"'x'.*dim"),
        (lambda: VectorFeature("emb", dim=-1), r"'emb'.*dim"),
        (lambda: FeatureSpec(sparse=[SparseFeature("a", 3)], dense=[DenseFeature("a")]), r"duplicate feature.*'a'"),
        (lambda: FeatureSpec(tasks=["like", "like"]), r"duplicate task"),
        (lambda: FeatureSpec.from_dict({"sparse": [], "labels": ["x"]}), r"unknown keys.*labels"),
    ],
)
def test_bad_specs_raise_clear_errors(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_spec_file_errors_name_the_file(tmp_path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json.*not valid JSON"):
        FeatureSpec.load(broken)
    bad_field = tmp_path / "bad_field.json"
    data = make_spec().to_dict()
    data["sparse"][1]["vocab_size"] = -4
    bad_field.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"bad_field.json.*'i'.*vocab_size"):
        FeatureSpec.load(bad_field)
    unknown_field = tmp_path / "unknown_field.json"
    data = make_spec().to_dict()
    data["lists"][0]["bogus"] = 1
    unknown_field.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"unknown_field.json.*bogus"):
        FeatureSpec.load(unknown_field)

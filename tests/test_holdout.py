"""train.valid_holdout: selection on a hashed part of the validation rows, the rest held out
for the report (pipeline/train/holdout.py, issue 14)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data import Batch
from pipeline.train.config import TrainConfig, ValidHoldoutConfig
from pipeline.train.evaluate import predict, score_predictions
from pipeline.train.holdout import batch_part, key_fraction, report_mask, selection_batches


def test_report_mask_keeps_every_user_on_one_side_at_the_fraction() -> None:
    rng = np.random.default_rng(0)
    users = rng.integers(0, 20000, 100000) * 7919  # any integer ids
    cfg = ValidHoldoutConfig(report_fraction=0.3)
    held = report_mask(users, cfg)
    # a user's rows are all held out or all kept
    per_user = {}
    for u, h in zip(users[:5000].tolist(), held[:5000].tolist()):
        assert per_user.setdefault(u, h) == h
    share = held[np.unique(users, return_index=True)[1]].mean()
    assert abs(share - 0.3) < 0.015
    # independent of row order and of the process; another salt draws another split
    perm = rng.permutation(len(users))
    assert np.array_equal(report_mask(users[perm], cfg), held[perm])
    other = report_mask(users, ValidHoldoutConfig(report_fraction=0.3, salt=1))
    assert 0.3 < (other != held).mean() < 0.55
    f = key_fraction(np.arange(50000))
    assert f.min() >= 0 and f.max() < 1 and abs(np.mean(f < 0.5) - 0.5) < 0.01


def _batch(users: list[int]) -> Batch:
    n = len(users)
    return Batch({"x": torch.arange(n, dtype=torch.float32)}, torch.zeros(n, 1), None,
                 {"_user": torch.tensor(users), "_row": torch.arange(n) + 100})


def test_selection_and_report_rows_partition_the_batch() -> None:
    users = list(range(40)) * 3
    cfg = ValidHoldoutConfig()
    batch = _batch(users)
    sel, rep = batch_part(batch, cfg, "select"), batch_part(batch, cfg, "report")
    assert len(sel) + len(rep) == len(batch) and len(sel) > 0 and len(rep) > 0
    assert not set(sel.meta["_user"].tolist()) & set(rep.meta["_user"].tolist())
    held = report_mask(np.asarray(users), cfg)
    assert sel.features["x"].tolist() == np.flatnonzero(~held).tolist()  # rows in order, features with them
    assert selection_batches([batch], None) == [batch]
    only_held = [u for u, h in zip(users, held) if h][:3]
    assert [len(b) for b in selection_batches([batch, _batch(only_held)], cfg)] == [len(sel)]  # emptied: dropped
    with pytest.raises(ValueError, match="no such column"):
        batch_part(Batch({"x": torch.zeros(2)}, None, None, {"_row": torch.arange(2)}), cfg, "select")
    with pytest.raises(ValueError, match="no validation row left"):
        selection_batches([_batch(only_held)], cfg)


def test_train_local_evaluates_on_the_selection_rows_only(tiny_processed: Path, one_torch_thread) -> None:
    from pipeline.train.local import train_local

    holdout = ValidHoldoutConfig(report_fraction=0.5)
    cfg = TrainConfig(epochs=1, batch_size=1024, torch_threads=1, log_every=1000, valid_holdout=holdout)
    seen: list[dict[str, float]] = []
    result = train_local(cfg, tiny_processed, on_eval=lambda step, m: seen.append(m))
    probs, labels, meta = predict(result.model, tiny_processed, "valid", result.spec)
    sel = ~report_mask(meta["_user"], holdout)
    assert 0 < sel.sum() < len(sel)
    on_sel = score_predictions(probs[sel], labels[sel], meta["_user"][sel], result.spec.tasks, "valid")
    on_all = score_predictions(probs, labels, meta["_user"], result.spec.tasks, "valid")
    assert seen[-1]["valid/score"] == pytest.approx(on_sel["valid/score"], abs=1e-9)
    assert seen[-1]["valid/score"] != pytest.approx(on_all["valid/score"], abs=1e-6)

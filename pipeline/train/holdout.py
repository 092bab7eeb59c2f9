"""An honest model selection: split the validation rows by a hash of a key (the user by
default) into *selection* rows, on which training evaluates (early stopping, the best weights
restored), and *report* rows, held out from every choice and only scored at the end.

Without it a run that early-stops on the validation split reports the score of the same rows it
selected its step on, which is optimistic (issue 14: WeChat's only labelled held-out day is day
14). Hashing the user keeps every user's rows on one side, so the per-user AUC of both parts is
defined as on the whole split; the hash (splitmix64 of the key, mixed with ``salt``) does not
depend on row order, on the number of workers or on the process.

Example:
    >>> cfg = ValidHoldoutConfig(report_fraction=0.5)
    >>> report_mask(np.arange(8), cfg).tolist()
    [False, False, False, True, True, True, False, True]
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from pipeline.data import Batch, take_rows
from pipeline.train.config import ValidHoldoutConfig

_MASK64 = (1 << 64) - 1


def key_fraction(keys: np.ndarray, salt: int = 0) -> np.ndarray:
    """A uniform number in ``[0, 1)`` per key: splitmix64 of ``key + salt * golden``, top 53 bits.

    Args:
        keys: integer keys ``[N]``.
        salt: mixed into every key.
    """
    z = (np.asarray(keys).astype(np.int64).astype(np.uint64)
         + np.uint64((salt * 0x9E3779B97F4A7C15) & _MASK64) + np.uint64(0x9E3779B97F4A7C15))
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def report_mask(keys: np.ndarray, cfg: ValidHoldoutConfig) -> np.ndarray:
    """True for the rows held out for the report, False for the selection rows."""
    return key_fraction(keys, cfg.salt) < cfg.report_fraction


def batch_part(batch: Batch, cfg: ValidHoldoutConfig, part: Literal["select", "report"]) -> Batch:
    """The rows of ``batch`` in ``part``.

    Raises:
        ValueError: when the batch lacks the key column.
    """
    if cfg.key not in batch.meta:
        raise ValueError(f"train.valid_holdout.key {cfg.key!r}: the validation split has no such column "
                         f"(it has {sorted(batch.meta)})")
    held = report_mask(batch.meta[cfg.key].cpu().numpy(), cfg)
    keep = held if part == "report" else ~held
    return take_rows(batch, torch.from_numpy(np.flatnonzero(keep)).to(batch.meta[cfg.key].device))


def selection_batches(batches: list[Batch], cfg: ValidHoldoutConfig | None) -> list[Batch]:
    """The validation batches training evaluates on: all of them without a holdout, else their
    selection rows (empty batches dropped).

    Raises:
        ValueError: when no validation row is left to select on.
    """
    if cfg is None:
        return batches
    kept = [b for b in (batch_part(b, cfg, "select") for b in batches) if len(b)]
    if batches and not kept:
        raise ValueError(f"train.valid_holdout: no validation row left to select on "
                         f"(report_fraction {cfg.report_fraction} of the {cfg.key} keys held out)")
    return kept

"""History tables: per key group, impressions and action counts per time value (a day, or a
second: the time column's unit) as prefix sums, so the features of a row at time ``d`` read only
times ``d-w .. d-1`` (never the row's own time). "Day" below means one value of the time column.

Example:
    >>> import numpy as np
    >>> g = HistoryGroup.fit("hist_u", ["u"], [np.array([1, 1])], np.array([1, 2]), np.array([[1.0], [0.0]]),
    ...                      day_base=5, windows=[1], stats=["count"])
    >>> g.transform([np.array([1])], np.array([2])).round(3).tolist()
    [[0.693, 0.693]]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import DataError


@dataclass
class HistoryGroup:
    """Daily sums of one key group, as sorted combined keys plus prefix sums.

    ``comb = key_code * day_base + day`` sorted; ``prefix[i]`` = sums of entries ``< i``;
    columns of ``prefix``: impressions, then each action's positive count. ``windows`` and
    ``stats`` say which features :meth:`transform` computes.
    """

    name: str
    keys: list[str]
    uniques: list[np.ndarray]
    day_base: int
    comb: np.ndarray
    prefix: np.ndarray
    windows: list[int] = field(default_factory=list)
    stats: list[str] = field(default_factory=list)
    _lookups: list[pd.Index] | None = field(default=None, repr=False, compare=False)  # hash tables, built once

    @classmethod
    def fit(cls, name: str, keys: list[str], values: list[np.ndarray], days: np.ndarray, actions: np.ndarray,
            day_base: int, windows: list[int] | None = None, stats: list[str] | None = None) -> "HistoryGroup":
        """Build the table from labelled rows.

        Args:
            name: the feature name (``hist_<keys>``).
            keys: key column names; ``values``: their per-row values.
            days: per-row day; ``actions``: ``[n, A]`` 0/1 labels.
            day_base: a number above every day (the combined-key radix).
            windows, stats: the features :meth:`transform` computes.
        """
        g = build_history_group(name, keys, values, days, actions, day_base)
        g.windows, g.stats = list(windows or []), list(stats or [])
        return g

    def row_codes(self, values: list[np.ndarray]) -> np.ndarray:
        """Combined key code per row; -1 when any key value never occurs in labelled rows."""
        code = np.zeros(len(values[0]), dtype=np.int64)
        ok = np.ones(len(values[0]), dtype=bool)
        if self._lookups is None:
            self._lookups = [pd.Index(u) for u in self.uniques]
        for uniq, index, v in zip(self.uniques, self._lookups, values):
            pos = index.get_indexer(v)  # hash lookup; -1 when absent
            ok &= pos >= 0
            code = code * len(uniq) + np.maximum(pos, 0)
        return np.where(ok, code, -1)

    def window_sums(self, codes: np.ndarray, days: np.ndarray, w: int, hi: np.ndarray | None = None) -> np.ndarray:
        """Sums over days ``[day - w, day - 1]`` per row, ``[n, 1 + A]`` (zeros for code -1).

        ``hi`` (optional) is :meth:`upper` for these rows, shared by all windows."""
        base = np.where(codes >= 0, codes, 0) * self.day_base
        lo = np.searchsorted(self.comb, base + np.maximum(days - w, 0), side="left")
        if hi is None:
            hi = self.upper(codes, days)
        out = self.prefix[hi] - self.prefix[lo]
        out[codes < 0] = 0
        return out

    def upper(self, codes: np.ndarray, days: np.ndarray) -> np.ndarray:
        """Index of the first entry of (key, day) — everything before it is strictly earlier."""
        base = np.where(codes >= 0, codes, 0) * self.day_base
        return np.searchsorted(self.comb, base + np.maximum(days, 0), side="left")

    def since(self, first_day: int) -> "HistoryGroup":
        """The same table without the days before ``first_day`` (what rows on later days need:
        a window of ``w`` days on day ``d`` reads from ``d - w``); counts stay exact.

        Args:
            first_day: the earliest day kept.
        """
        keep = self.comb % self.day_base >= first_day
        sums = np.diff(self.prefix, axis=0)[keep]
        prefix = np.zeros((len(sums) + 1, self.prefix.shape[1]), dtype=np.float64)
        np.cumsum(sums, axis=0, out=prefix[1:])
        return HistoryGroup(self.name, self.keys, self.uniques, self.day_base, self.comb[keep], prefix,
                            list(self.windows), list(self.stats))

    def features_of_codes(self, codes: np.ndarray, days: np.ndarray) -> np.ndarray:
        """:func:`history_features` with this table's windows and stats.

        Args:
            codes: :meth:`row_codes`; days: per-row day.
        """
        return history_features(self, codes, days, self.windows, self.stats)

    def transform(self, values: list[np.ndarray], days: np.ndarray) -> np.ndarray:
        """``[n, F]`` float32 history features of rows with these key values on these days.

        Args:
            values: per key, the rows' raw values (unknown or missing -> all-zero features).
            days: per-row day.
        """
        return self.features_of_codes(self.row_codes(values), days)

    def save(self, path: str | Path) -> None:
        """An ``.npz`` of the table (uniques stored as plain numbers or strings).

        Args:
            path: the file.
        """
        arrays = {f"uniques_{i}": (u.astype(str) if u.dtype == object else u) for i, u in enumerate(self.uniques)}
        np.savez(path, comb=self.comb, prefix=self.prefix, day_base=np.int64(self.day_base),
                 name=np.str_(self.name), keys=np.array(self.keys, dtype=str), windows=np.array(self.windows, np.int64),
                 stats=np.array(self.stats, dtype=str), **arrays)

    @classmethod
    def load(cls, path: str | Path) -> "HistoryGroup":
        """Read what :meth:`save` wrote.

        Args:
            path: the file.
        """
        with np.load(path, allow_pickle=False) as z:
            keys = [str(k) for k in z["keys"]]
            return cls(str(z["name"]), keys, [z[f"uniques_{i}"] for i in range(len(keys))], int(z["day_base"]),
                       z["comb"], z["prefix"], [int(w) for w in z["windows"]], [str(s) for s in z["stats"]])


def _encode_keys(name: str, values: list[np.ndarray], days: np.ndarray, day_base: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Per key its sorted distinct values, and each row's ``(key combination, day)`` code."""
    uniques, code = [], np.zeros(len(days), dtype=np.int64)
    total = 1
    for v in values:
        inv, uniq = pd.factorize(v, sort=True)  # hash-based; sorts only the uniques
        uniq = np.asarray(uniq)
        uniques.append(uniq)
        total *= max(len(uniq), 1)
        code = code * len(uniq) + inv.astype(np.int64)
    if total * day_base >= 2**62:
        raise DataError(f"history group {name}: too many key combinations ({total}) to encode")
    return uniques, code * day_base + np.asarray(days, dtype=np.int64)


def _group(name: str, keys: list[str], uniques: list[np.ndarray], day_base: int, uc: np.ndarray,
           sums: np.ndarray) -> HistoryGroup:
    prefix = np.zeros((len(uc) + 1, sums.shape[1]), dtype=np.float64)
    np.cumsum(sums, axis=0, out=prefix[1:])
    return HistoryGroup(name, keys, uniques, day_base, uc, prefix)


def build_history_group(name: str, keys: list[str], values: list[np.ndarray], days: np.ndarray, actions: np.ndarray, day_base: int) -> HistoryGroup:
    """The daily sums of ``actions`` per key group (see :class:`HistoryGroup`)."""
    uniques, comb = _encode_keys(name, values, days, day_base)
    inv, uc = pd.factorize(comb, sort=True)
    uc = np.asarray(uc)
    sums = np.zeros((len(uc), 1 + actions.shape[1]), dtype=np.float64)
    sums[:, 0] = np.bincount(inv, minlength=len(uc))
    for a in range(actions.shape[1]):
        sums[:, 1 + a] = np.bincount(inv, weights=actions[:, a], minlength=len(uc))
    return _group(name, keys, uniques, day_base, uc, sums)


def history_group_from_sums(name: str, keys: list[str], values: list[np.ndarray], days: np.ndarray,
                            sums: np.ndarray, day_base: int) -> HistoryGroup:
    """:func:`build_history_group` from per-(key values, day) sums (impressions, then each
    action's positives), e.g. combined from per-block partial sums; the same table.

    Args:
        name, keys: as in :meth:`HistoryGroup.fit`; values: per key, the key values of each
        sums row; days: its day; sums: ``[m, 1 + A]``; day_base: a number above every day.
    """
    uniques, comb = _encode_keys(name, values, days, day_base)
    inv, uc = pd.factorize(comb, sort=True)  # (key, day) pairs may repeat across partial sums
    uc = np.asarray(uc)
    merged = np.zeros((len(uc), sums.shape[1]), dtype=np.float64)
    for j in range(sums.shape[1]):
        merged[:, j] = np.bincount(inv, weights=sums[:, j], minlength=len(uc))
    return _group(name, keys, uniques, day_base, uc, merged)


def history_feature_names(group: str, windows: list[int], actions: list[str], stats: list[str], unit: str = "d") -> list[str]:
    """Column names of a group's features, in :func:`history_features` order; ``unit`` is the
    time unit's suffix after a window (``d``: ``hist_u_7d_n``; ``s``: ``hist_u_86400s_n``)."""
    names = []
    for w in windows:
        names.append(f"{group}_{w}{unit}_n")
        for stat in stats:
            names += [f"{group}_{w}{unit}_{a}_{stat}" for a in actions]
    return names


def history_features(group: HistoryGroup, codes: np.ndarray, days: np.ndarray, windows: list[int], stats: list[str]) -> np.ndarray:
    """``[n, len(names)]`` float32: per window log1p(impressions), then log1p(action count)
    and/or rate = count / impressions (0 when no impressions), in :func:`history_feature_names` order."""
    # queries in key order: searchsorted and the prefix gathers are ~4x faster on sorted keys
    known = codes >= 0
    base = np.where(known, codes, 0) * group.day_base
    order = np.argsort(base + np.maximum(days, 0), kind="stable")
    base, days = base[order], days[order]
    hi = group.prefix[group.upper(codes[order], days)]  # shared by the windows
    n_actions = group.prefix.shape[1] - 1
    width = 1 + n_actions * len(stats)
    # float64 as before, written in place (zeros: rates of keys without impressions); one cast at the end
    res = np.zeros((len(order), width * len(windows)), dtype=np.float64)
    for i, w in enumerate(windows):
        s = hi - group.prefix[np.searchsorted(group.comb, base + np.maximum(days - w, 0), side="left")]
        n = s[:, :1]
        at = i * width
        np.log1p(n, out=res[:, at:at + 1])
        at += 1
        for stat in stats:
            if stat == "count":
                np.log1p(s[:, 1:], out=res[:, at:at + n_actions])
            else:
                np.divide(s[:, 1:], n, out=res[:, at:at + n_actions], where=n > 0)
            at += n_actions
    out = np.empty(res.shape, dtype=np.float32)
    out[order] = res
    out[~known] = 0  # keys never seen in labelled rows: no history
    return out

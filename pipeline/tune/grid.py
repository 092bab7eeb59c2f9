"""A grid searcher for Tune: given trial configs, once each, in order.

Tune's own variant generator reads the dotted names of a trial config (``model.mmoe.num_experts``)
as nested keys of a parameter space, so the grid is a :class:`~ray.tune.search.Searcher` of its
own. Its position is saved with the experiment, so a restored search does not repeat points.

Example:
    >>> searcher = GridSearcher([{"model": "mmoe"}, {"model": "ple"}], "valid/score", "max")
    >>> searcher.suggest("t1")
    {'model': 'mmoe'}
"""

from __future__ import annotations

import pickle
from typing import Any

from ray.tune.search import Searcher


class GridSearcher(Searcher):
    """Suggests ``points`` one by one, then :data:`Searcher.FINISHED`.

    Args:
        points: the flat trial configs; metric, mode: what Tune reports on (unused by a grid).
    """

    def __init__(self, points: list[dict[str, Any]], metric: str | None = None, mode: str | None = None) -> None:
        super().__init__(metric=metric, mode=mode)
        self.points, self.next = [dict(p) for p in points], 0

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if self.next >= len(self.points):
            return Searcher.FINISHED
        self.next += 1
        return dict(self.points[self.next - 1])

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        pass  # a grid does not learn from results

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as fh:
            pickle.dump({"points": self.points, "next": self.next}, fh)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as fh:
            state = pickle.load(fh)
        self.points, self.next = state["points"], state["next"]

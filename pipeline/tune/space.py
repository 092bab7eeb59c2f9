"""Search spaces in the config system and the searchers that sample them.

A space entry is either a constant (any YAML value) or a *domain*, a mapping with a ``type``:

- ``{type: float, low: 1e-4, high: 1e-2, log: true}``
- ``{type: int, low: 1, high: 8}`` (``log`` allowed)
- ``{type: choice, values: [512, 1024, [64, 32]]}`` (any YAML values, lists included)

:class:`SpaceSampler` turns a space into Optuna's define-by-run form, so a conditional space
(an architecture's expert counts only when that architecture is drawn) works with Tune's
:class:`~ray.tune.search.optuna.OptunaSearch` under both samplers: TPE (model-based, mixed
continuous/integer/categorical spaces) and random search.

Example:
    >>> Domain(type="float", low=1e-4, high=1e-2, log=True).corners()
    [0.0001, 0.01]
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SCALARS = (type(None), bool, int, float, str)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Domain(Strict):
    """One searched parameter: a float or int range (optionally log-scaled) or a choice."""

    type: Literal["float", "int", "choice"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    values: list[Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> "Domain":
        if self.type == "choice":
            if not self.values or self.low is not None or self.high is not None or self.log:
                raise ValueError("a choice takes a non-empty 'values' list and no low/high/log")
            return self
        if self.values is not None or self.low is None or self.high is None:
            raise ValueError(f"a {self.type} range takes 'low' and 'high' (no 'values')")
        if self.type == "int" and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError(f"an int range needs whole bounds, got [{self.low}, {self.high}]")
        if not self.low < self.high:
            raise ValueError(f"need low < high, got [{self.low}, {self.high}]")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got {self.low}")
        return self

    def corners(self) -> list[Any]:
        """The values a config check builds with: both ends of a range, every choice."""
        if self.type == "choice":
            return list(self.values or [])
        cast = int if self.type == "int" else float
        return [cast(self.low), cast(self.high)]

    def suggest(self, trial: Any, name: str) -> Any:
        """Draw the value from an Optuna trial (non-scalar choices travel as JSON strings)."""
        if self.type == "float":
            return trial.suggest_float(name, self.low, self.high, log=self.log)
        if self.type == "int":
            return trial.suggest_int(name, int(self.low), int(self.high), log=self.log)
        if self._scalar_choice():
            return trial.suggest_categorical(name, self.values)
        return self.decode(trial.suggest_categorical(name, [json.dumps(v) for v in self.values or []]))

    def decode(self, drawn: Any) -> Any:
        """The configured value of a drawn one (Optuna records non-scalar choices as JSON;
        a configured value passes unchanged)."""
        if self.type != "choice" or self._scalar_choice() or not isinstance(drawn, str):
            return drawn
        try:
            return json.loads(drawn)
        except json.JSONDecodeError:
            return drawn

    def _scalar_choice(self) -> bool:
        return all(isinstance(v, SCALARS) for v in self.values or [])


def as_domain(value: Any) -> Domain | Any:
    """A mapping with a ``type`` key is a :class:`Domain` (checked strictly); anything else is a constant."""
    if isinstance(value, Domain):
        return value
    if isinstance(value, dict) and "type" in value:
        return Domain.model_validate(value)
    return value


def parse_entries(entries: dict[str, Any]) -> dict[str, Any]:
    """``name -> constant or Domain`` with every domain checked."""
    return {k: as_domain(v) for k, v in entries.items()}


def corner_values(entries: dict[str, Any]) -> list[dict[str, Any]]:
    """Settings covering every domain's corners: all low (first), all high (last), and each
    choice value with the others at their first corner."""
    firsts = {k: (v.corners()[0] if isinstance(v, Domain) else v) for k, v in entries.items()}
    lasts = {k: (v.corners()[-1] if isinstance(v, Domain) else v) for k, v in entries.items()}
    out = [firsts, lasts]
    for k, v in entries.items():
        if isinstance(v, Domain) and v.type == "choice":
            out += [{**firsts, k: c} for c in v.corners()[1:-1]]
    return out


class SearchSection(Strict):
    """How the space is searched: the searcher, how many trials, how many at once."""

    #: "optuna": Optuna's TPE (model-based, mixed spaces); "random": random search; "grid":
    #: every combination of the architectures, strategies and choices, once each, in order
    #: (ranges are not allowed; num_samples is ignored)
    algorithm: Literal["optuna", "random", "grid"] = "optuna"
    num_samples: int = Field(12, ge=1)
    #: trials running at once (each needs its own workers' CPUs)
    max_concurrent: int = Field(1, ge=1)
    #: the searcher's seed: the same seed and config draw the same trials
    seed: int = 0
    #: grid only: combinations left out, each a partial trial config (``{model: single_task,
    #: strategy: pcgrad}`` drops every point with both values)
    exclude: list[dict[str, Any]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _grid_only(self) -> "SearchSection":
        if self.exclude and self.algorithm != "grid":
            raise ValueError("search.exclude is for algorithm: grid")
        return self


class SpaceSampler:
    """A define-by-run function for :class:`~ray.tune.search.optuna.OptunaSearch`: draws every
    entry of ``flat`` (``name -> constant or Domain``) and the branch of each ``conditional``
    group (``group -> {branch -> entries}``: ``group`` is drawn among the branches, then only
    that branch's entries, named ``group.branch.entry``). Returns the constants (Optuna records
    the drawn values), so a trial's config is the flat dict of both."""

    def __init__(self, flat: dict[str, Any], conditional: dict[str, dict[str, dict[str, Any]]]) -> None:
        self.flat = flat
        self.conditional = conditional

    def __call__(self, trial: Any) -> dict[str, Any]:
        constants: dict[str, Any] = {}

        def draw(name: str, value: Any) -> None:
            if isinstance(value, Domain):
                value.suggest(trial, name)
            else:
                constants[name] = value

        for name, value in self.flat.items():
            draw(name, value)
        for group, branches in self.conditional.items():
            if not branches:
                continue
            names = list(branches)
            branch = trial.suggest_categorical(group, names) if len(names) > 1 else names[0]
            if len(names) == 1:
                constants[group] = branch
            for name, value in branches[branch].items():
                draw(f"{group}.{branch}.{name}", value)
        return constants


def grid_points(flat: dict[str, Any], conditional: dict[str, dict[str, dict[str, Any]]],
                exclude: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Every combination of a space's branches and choices, as flat trial configs (the names
    :class:`SpaceSampler` gives them), in the order written: the first group varies slowest.

    Args:
        flat, conditional: the space, as :class:`SpaceSampler` holds it.
        exclude: partial configs; a point matching every key of one of them is left out.

    Raises:
        ValueError: the space has a float or int range (a grid needs listed values), or an
            ``exclude`` entry matches no point (a typo would silently exclude nothing).

    Example:
        >>> grid_points({}, {"model": {"mmoe": {}, "ple": {}}, "strategy": {"equal": {}, "pcgrad": {}}})[:2]
        [{'model': 'mmoe', 'strategy': 'equal'}, {'model': 'mmoe', 'strategy': 'pcgrad'}]
    """
    def expand(points: list[dict[str, Any]], name: str, value: Any) -> list[dict[str, Any]]:
        if not isinstance(value, Domain):
            return [{**p, name: value} for p in points]
        if value.type != "choice":
            raise ValueError(f"a grid search takes constants and choices, not the {value.type} range of {name!r}")
        return [{**p, name: v} for p in points for v in value.corners()]

    points: list[dict[str, Any]] = [{}]
    for name, value in flat.items():
        points = expand(points, name, value)
    for group, branches in conditional.items():
        if not branches:
            continue
        grown: list[dict[str, Any]] = []
        for point in points:  # earlier groups vary slowest
            for branch, entries in branches.items():
                mine = [{**point, group: branch}]
                for name, value in entries.items():
                    mine = expand(mine, f"{group}.{branch}.{name}", value)
                grown += mine
        points = grown
    for rule in exclude or []:
        kept = [p for p in points if any(p.get(k, _MISSING) != v for k, v in rule.items())]
        if len(kept) == len(points):
            raise ValueError(f"exclude entry {rule} matches no grid point")
        points = kept
    if not points:
        raise ValueError("every grid point is excluded")
    return points


_MISSING = object()


def make_searcher(sampler: SpaceSampler, section: SearchSection, metric: str, mode: str,
                  points_to_evaluate: list[dict[str, Any]] | None = None) -> Any:
    """Tune's searcher over ``sampler``'s space: Optuna's TPE or random sampling (seeded), or,
    for ``grid``, Tune's variant generator over :func:`grid_points`."""
    if section.algorithm == "grid":
        from pipeline.tune.grid import GridSearcher

        points = grid_points(sampler.flat, sampler.conditional, section.exclude)
        return GridSearcher([*(points_to_evaluate or []), *points], metric, mode)
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if section.algorithm == "optuna":
        algo = optuna.samplers.TPESampler(seed=section.seed)
    else:
        algo = optuna.samplers.RandomSampler(seed=section.seed)
    return OptunaSearch(space=sampler, metric=metric, mode=mode, sampler=algo, points_to_evaluate=points_to_evaluate)

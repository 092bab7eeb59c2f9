"""The search config (``configs/tune/*.yaml``): the train job every trial starts from
(``base``), the space over it, the searcher, ASHA, the trials' resources, MLflow and an
optional fusion step. Checked whole before any trial starts: the YAML here, and against the
data by :func:`check_search` (every architecture and strategy of the space builds at the
corners of its ranges).

Space (constants or domains, see :mod:`pipeline.tune.space`)::

    space:
      model:            # architecture -> its parameters (drawn first, then its parameters)
        mmoe: {num_experts: {type: int, low: 2, high: 8}, expert_hidden: [64, 32]}
        ple:  {num_levels: {type: int, low: 1, high: 2}, num_shared_experts: {type: int, low: 1, high: 4}}
      strategy:         # balancing strategy -> its parameters
        equal: {}
        dwa: {temperature: {type: float, low: 0.5, high: 5.0}}
      params:           # any key of the train job, dotted as with --set
        train.optimizer.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
        train.batch_size: {type: choice, values: [512, 1024, 2048]}

A trial's flat config names the drawn values ``model``, ``model.<arch>.<param>``,
``strategy``, ``strategy.<name>.<param>`` and the dotted job keys.
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from mtl.models import MODELS
from mtl.strategies import STRATEGIES
from pipeline.config import apply_overrides
from pipeline.errors import ConfigError
from pipeline.fuse import FuseConfig
from pipeline.train.config import ModelConfig, StrategyConfig, TrainJobConfig
from pipeline.tune.space import Domain, SearchSection, SpaceSampler, Strict, corner_values, grid_points, parse_entries

GROUPS = {"model": (MODELS, ModelConfig), "strategy": (STRATEGIES, StrategyConfig)}


class SpaceSection(Strict):
    """What a trial varies (empty sections: the base job's value)."""

    model: dict[str, dict[str, Any]] = Field(default_factory=dict)
    strategy: dict[str, dict[str, Any]] = Field(default_factory=dict)
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("params", mode="before")
    @classmethod
    def _dotted(cls, value: Any) -> Any:
        """Nested sections (``--set space.params.train.optimizer.lr=...`` makes them) as dotted keys."""
        if not isinstance(value, dict):
            return value
        flat: dict[str, Any] = {}
        for key, entry in value.items():
            if isinstance(entry, dict) and entry and "type" not in entry:
                flat.update({f"{key}.{k}": v for k, v in cls._dotted(entry).items()})
            else:
                flat[key] = entry
        return flat

    @model_validator(mode="after")
    def _check(self) -> "SpaceSection":
        for group, (registry, section_cls) in GROUPS.items():
            for name, entries in getattr(self, group).items():
                if name not in registry:
                    raise ValueError(f"space.{group}: {name!r} unknown; registered: {sorted(registry)}")
                parsed = _parse(entries or {}, f"space.{group}.{name}")
                for corner in corner_values(parsed):  # unknown parameters fail with the accepted names
                    section_cls(name=name, params=corner)
        _parse(self.params, "space.params")
        return self

    def sampler(self) -> SpaceSampler:
        """The define-by-run sampler of this space."""
        conditional = {g: {n: parse_entries(e or {}) for n, e in getattr(self, g).items()} for g in GROUPS}
        return SpaceSampler(parse_entries(self.params), conditional)

    def corner_trials(self) -> list[dict[str, Any]]:
        """Flat trial configs that cover every branch and every domain's corners (what the
        config check builds)."""
        firsts = {k: v.corners()[0] if isinstance(v, Domain) else v for k, v in parse_entries(self.params).items()}
        branch_firsts: dict[str, dict[str, Any]] = {}
        for group in GROUPS:
            for name, entries in getattr(self, group).items():
                branch_firsts.setdefault(group, {group: name, **_prefixed(group, name, corner_values(parse_entries(entries or {}))[0])})
        base = {**firsts, **{k: v for b in branch_firsts.values() for k, v in b.items()}}
        out = [{**base, **c} for c in corner_values(parse_entries(self.params))]
        for group in GROUPS:
            for name, entries in getattr(self, group).items():
                drop = {k for k in base if k == group or k.startswith(f"{group}.")}
                kept = {k: v for k, v in base.items() if k not in drop}
                out += [{**kept, group: name, **_prefixed(group, name, c)} for c in corner_values(parse_entries(entries or {}))]
        return out


def _prefixed(group: str, name: str, values: dict[str, Any]) -> dict[str, Any]:
    return {f"{group}.{name}.{k}": v for k, v in values.items()}


def _parse(entries: dict[str, Any], where: str) -> dict[str, Any]:
    try:
        return parse_entries(entries)
    except ValidationError as exc:
        raise ValueError(f"{where}: {exc.errors()[0]['msg'].removeprefix('Value error, ')}") from None


class SchedulerSection(Strict):
    """Early stopping of poor trials on the validation score (ASHA, one rung per evaluation epoch)."""

    name: Literal["asha", "none"] = "asha"
    #: epochs every trial gets before ASHA may stop it
    grace_period: int = Field(1, ge=1)
    #: ASHA keeps the best 1/reduction_factor of the trials at each rung
    reduction_factor: float = Field(2.0, gt=1)


class TrialSection(Strict):
    #: CPUs of a trial's own process (it only waits on its TorchTrainer, whose workers get
    #: base.scaling's CPUs). 0 (the default) reserves none: a CPU fraction held by the trial
    #: process on one node and the workers' on another can leave no node a whole CPU for Ray
    #: Data's file listing, and every trial then waits for its data forever
    cpus: float = Field(0.0, ge=0)
    #: Tune's restarts of a failed trial (a lost worker is the Train run's business:
    #: base.failure.max_failures)
    max_failures: int = Field(0, ge=0)


class TuneMlflow(Strict):
    #: default: sqlite:///<out>/mlflow.db
    tracking_uri: str | None = None
    experiment: str = "mtlrank-tune"
    run_name: str | None = None


class TuneConfig(Strict):
    """``python -m pipeline tune``: a Ray Tune search over train jobs (logged whole with the search)."""

    base: TrainJobConfig = Field(default_factory=TrainJobConfig)
    space: SpaceSection = Field(default_factory=SpaceSection)
    search: SearchSection = Field(default_factory=SearchSection)
    scheduler: SchedulerSection = Field(default_factory=SchedulerSection)
    trial: TrialSection = Field(default_factory=TrialSection)
    mlflow: TuneMlflow = Field(default_factory=TuneMlflow)
    #: tune the fusion weights on the best trial's validation predictions after the search
    fuse: FuseConfig | None = None
    #: the Tune experiment's name (its folder under <out>/tune)
    name: str = "search"
    #: testing aid: interrupt the search (as Ctrl-C would) once this many trials have ended,
    #: once per output folder; None in real searches
    interrupt_after_trials: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "TuneConfig":
        if self.base.failure.kill_rank_at_step is not None or self.base.failure.nan_label_at is not None:
            raise ValueError("base.failure's testing aids are for single runs, not searches")
        if self.search.algorithm == "grid":
            try:
                self.grid()
            except ValueError as exc:
                raise ValueError(f"search.algorithm grid: {exc}") from None
        for trial in self.checked_trials():  # every corner (grid point) is a valid train job
            trial_job(self, trial)
        return self

    @property
    def metric(self) -> str:
        """What the search maximises: the validation weighted score."""
        return f"{self.base.data.valid_split}/score"

    def max_epochs(self) -> int:
        return max(trial_job(self, t).train.epochs for t in self.space.corner_trials())

    def grid(self) -> list[dict[str, Any]]:
        """The flat trial configs of a grid search (``search.algorithm: grid``), in order."""
        sampler = self.space.sampler()
        return grid_points(sampler.flat, sampler.conditional, self.search.exclude)

    def trial_count(self) -> int:
        """Trials the search runs: the grid's size for a grid, else ``search.num_samples``."""
        return len(self.grid()) if self.search.algorithm == "grid" else self.search.num_samples

    def checked_trials(self) -> list[dict[str, Any]]:
        """What the config check builds: every grid point, else the space's corners."""
        return self.grid() if self.search.algorithm == "grid" else self.space.corner_trials()


def trial_job(cfg: TuneConfig, flat: dict[str, Any]) -> TrainJobConfig:
    """The train job of a trial's flat config: the base job with the drawn architecture,
    strategy (each with its drawn parameters) and dotted keys."""
    data = cfg.base.model_dump(mode="json")
    for group in GROUPS:
        branches = getattr(cfg.space, group)
        if not branches:
            continue
        name = flat[group]
        entries = parse_entries(branches[name] or {})
        params = {p: (v.decode(flat[f"{group}.{name}.{p}"]) if isinstance(v, Domain) else v) for p, v in entries.items()}
        data["train"][group] = {"name": name, "params": params}
    entries = parse_entries(cfg.space.params)
    overrides = [f"{k}={json.dumps(v.decode(flat[k]) if isinstance(v, Domain) else v)}" for k, v in entries.items()]
    try:
        return TrainJobConfig.model_validate(apply_overrides(data, overrides))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors())
        raise ConfigError(f"space: the trial {_short(flat)} is not a valid train job: {problems}") from None


def _short(flat: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{k}: {v:.4g}" if isinstance(v, float) and math.isfinite(v) else f"{k}: {v}" for k, v in flat.items()) + "}"

"""The demo's config (``configs/demo.yaml``): the data, the model comparison, the search, the
fusion, the registry and the report, every section in the format of its own stage, checked whole
before anything runs.

Example:
    >>> # cfg = load_config(DemoConfig, "configs/demo.yaml", ["scale=tiny"])
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.fuse import FuseConfig
from pipeline.report.build import ReportConfig
from pipeline.tune.config import TuneConfig


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RegistrySection(Strict):
    #: the registered model's name (``models:/NAME@champion``)
    name: str = "mtlrank"
    #: the experiment of the registration run
    experiment: str = "mtlrank-registry"


class DemoMlflow(Strict):
    #: default: sqlite:///<out>/mlflow.db (artifacts in <out>/.../mlartifacts)
    tracking_uri: str | None = None
    #: the experiment of the comparison, the search and the report
    experiment: str = "mtlrank-demo"


class DemoConfig(Strict):
    """``python -m pipeline demo``: every stage of the product on generated data."""

    #: the generated data's size: tiny (seconds), small (the README's demo), full (the challenge's)
    scale: Literal["tiny", "small", "full"] = "small"
    #: the generator's seed (the training seeds are in compare/search ``base.train.seed``)
    seed: int = 0
    #: a folder of raw logs to use instead of generated ones, e.g. the real
    #: ``wechat_algo_data1/`` (then ``scale`` and ``seed`` are unused, and there is no oracle)
    raw: str | None = None
    dataset_config: str = "configs/datasets/wechat.yaml"
    dataset_overrides: list[str] = Field(default_factory=list)
    #: the model comparison: a grid search (single-task baselines and multi-task models x
    #: strategies), each trial a Ray Train run
    compare: TuneConfig
    #: a short search (None: skipped); the best trial of both competes for the registry
    search: TuneConfig | None = None
    #: the fusion weights of the registered model's score
    fuse: FuseConfig = Field(default_factory=FuseConfig)
    registry: RegistrySection = Field(default_factory=RegistrySection)
    #: the bootstrap behind the report's outcome classes
    report: ReportConfig = Field(default_factory=ReportConfig)
    mlflow: DemoMlflow = Field(default_factory=DemoMlflow)
    #: CPUs of the local Ray (default: all)
    num_cpus: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "DemoConfig":
        if self.compare.search.algorithm != "grid":
            raise ValueError("compare.search.algorithm must be grid (every model of the comparison runs once)")
        if not any(p.get("model") == "single_task" for p in self.compare.grid()):
            raise ValueError("compare: the report needs a single_task baseline among compare.space.model")
        if self.compare.fuse is not None or (self.search is not None and self.search.fuse is not None):
            raise ValueError("compare.fuse / search.fuse: the demo fuses the best model once, in its fuse section")
        return self

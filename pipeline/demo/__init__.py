"""``python -m pipeline demo --out runs/demo``: the whole product on generated data, one command.

generate -> preprocess (Ray Data) -> compare single-task baselines with Shared-Bottom, MMoE and
PLE under equal weights and PCGrad (a Tune grid, each trial a Ray Train run) -> a short Tune
search -> the fusion weights of the best model -> register it in MLflow (alias ``champion``)
-> batch-score the test day into a submission -> the multi-task report. One line per stage and
per trial evaluation in the terminal; Ray's and MLflow's own output goes to ``<out>/demo.log``.

Everything is written under ``--out``: the data, the MLflow store (``mlflow.db``) and its
artifacts, Tune's and Train's storage, the submission, the report and ``results.json``. Run
the same command again to continue an interrupted demo (finished stages are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from pipeline.demo.config import DemoConfig
from pipeline.demo.flow import Paths
from pipeline.errors import OutputError

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
STATE_FILE = "demo_state.json"
STAGES = ["generate", "preprocess", "compare", "search", "fuse", "register", "predict", "report"]


class Ledger:
    """``<out>/demo_state.json``: the config and each finished stage's result, so that running
    the same command again continues where an interrupted demo stopped."""

    def __init__(self, out: Path, cfg: DemoConfig) -> None:
        self.path = out / STATE_FILE
        self.config = cfg.model_dump(mode="json")
        self.stages: dict[str, Any] = {}
        if self.path.is_file():
            state = json.loads(self.path.read_text())
            if state.get("config") != self.config:
                raise OutputError(f"{out} holds a demo run with another config ({self.path}); give another --out "
                                  "or --fresh to replace it")
            self.stages = state.get("stages", {})
        elif out.is_dir() and any(out.iterdir()):
            raise OutputError(f"--out {out}: a non-empty folder that no demo wrote; give an empty or new folder")

    def done(self, name: str, result: dict[str, Any]) -> dict[str, Any]:
        from pipeline.demo.flow import as_json

        self.stages[name] = as_json(result)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"config": self.config, "stages": self.stages}, indent=1))
        tmp.replace(self.path)
        return self.stages[name]


def run_demo(cfg: DemoConfig, out: str | Path, address: str | None = None, verbose: bool = False) -> dict[str, Any]:
    """Run (or continue) every stage into ``out``; returns each stage's result by name."""
    from pipeline.demo import flow
    from pipeline.demo.console import Console, say

    paths = Paths(Path(out).resolve(), Path(cfg.raw).resolve() if cfg.raw else None)
    ledger = Ledger(paths.out, cfg)
    paths.out.mkdir(parents=True, exist_ok=True)
    (paths.out / "config.yaml").write_text(_dump(cfg))
    data = f"the logs in {paths.raw}" if cfg.raw else f"{cfg.scale} generated data"
    say(f"mtlrank demo: {data} -> {paths.out}  (Ray/MLflow output: {paths.log})")
    started = time.perf_counter()
    with Console(paths.log, len(STAGES), capture=not verbose) as console:
        wanted = [s for s in STAGES if s != "search" or cfg.search is not None]
        if any(s not in ledger.stages for s in wanted):
            _start_ray(cfg, address)

        def stage(name: str, what: str, body: Callable[[], dict[str, Any]]) -> dict[str, Any]:
            if name in ledger.stages:
                console.index += 1
                say(f"[{console.index}/{len(STAGES)}] {name:<10} kept from the earlier run: {ledger.stages[name].get('summary', '')}")
                return ledger.stages[name]
            with console.stage(name, what) as line:
                result = body()
                line["summary"] = result.get("summary", "")
            return ledger.done(name, result)

        r: dict[str, Any] = {}
        r["generate"] = stage("generate", "your logs" if cfg.raw else "WeChat-format logs with a planted oracle",
                              lambda: flow.generate_data(cfg, paths))
        r["preprocess"] = stage("preprocess", "raw logs -> model-ready Parquet on Ray Data", lambda: flow.preprocess_data(cfg, paths))
        n = len(cfg.compare.grid())
        r["compare"] = stage("compare", f"{n} models on Ray Train ({cfg.compare.base.scaling.num_workers} workers each)",
                             lambda: flow.search_stage(cfg.compare, cfg, paths, "compare"))
        searches = {cfg.compare.name: cfg.compare}
        if cfg.search is not None:
            searches[cfg.search.name] = cfg.search
            r["search"] = stage("search", f"Tune: {cfg.search.search.num_samples} trials, {cfg.search.search.algorithm}, ASHA",
                                lambda: flow.search_stage(cfg.search, cfg, paths, "search"))
        else:
            console.index += 1
        best = flow.best_trial(*(r[s] for s in ("compare", "search") if s in r))
        r["fuse"] = stage("fuse", f"fusion weights of {best['label']} ({cfg.fuse.search.num_samples} Tune trials)",
                          lambda: flow.fuse_stage(cfg, paths, best, searches))
        r["register"] = stage("register", f"MLflow pyfunc '{cfg.registry.name}', alias champion by the promotion rule",
                              lambda: flow.register_stage(cfg, paths, best, r["fuse"]))
        tasks = list(r["fuse"]["weights"])
        r["predict"] = stage("predict", "batch-score the test day on Ray Data",
                             lambda: flow.predict_stage(cfg, paths, r["register"], tasks))
        r["report"] = stage("report", "the multi-task report from the MLflow runs",
                            lambda: flow.report_stage(cfg, paths, r["compare"], best))
    trials = [t for s in ("compare", "search") if s in r for t in r[s]["trials"]]
    table = flow.results_table(trials, r["report"]["outcomes"], best, r["report"]["oracle_score"], tasks)
    wall = time.perf_counter() - started
    (paths.out / "results.json").write_text(json.dumps({**flow.as_json(r), "wall_s": round(wall, 1)}, indent=1))
    _summary(paths, cfg, r, table, wall)
    return r


def _start_ray(cfg: DemoConfig, address: str | None) -> None:
    from pipeline.ray_runtime import ensure_ray

    # with the State API: Ray Train's placement-group cleaner needs it when Tune stops a trial
    ensure_ray(num_cpus=cfg.num_cpus, address=address, state_api=True)


def _summary(paths: Paths, cfg: DemoConfig, r: dict[str, Any], table: list[str], wall: float) -> None:
    from pipeline.demo.console import say

    fuse, reg = r["fuse"], r["register"]
    uri = cfg.mlflow.tracking_uri or paths.tracking_uri
    lines = ["", *table, "",
             f"fusion ({cfg.fuse.method}): business objective {fuse['best_objective']:.4f} with the tuned weights, "
             f"{fuse['equal_objective']:.4f} with equal weights",
             f"registry: {reg['model_uri']} -> version {reg['champion_version']} ({reg['decision']})",
             "", f"wrote ({wall:.0f} s):",
             f"  submission   {paths.submission}",
             f"  report       {paths.report}",
             f"  results      {paths.out / 'results.json'}",
             f"  data         {paths.raw}, {paths.processed}",
             f"  MLflow       {uri}   (mlflow ui --backend-store-uri {uri})",
             f"  log          {paths.log}",
             f"serve it:      MLFLOW_TRACKING_URI={uri} mlflow models serve -m {reg['model_uri']} --env-manager local -h 127.0.0.1 -p 5001"]
    say("\n".join(lines))


def _dump(cfg: DemoConfig) -> str:
    from pipeline.config import dump_config

    return dump_config(cfg)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output folder, everything goes under it (default: %(default)s)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="demo config YAML (default: %(default)s)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, repeatable (e.g. --set scale=tiny)")
    parser.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else a new local Ray)")
    parser.add_argument("--fresh", action="store_true", help="replace an earlier demo run in --out instead of continuing it")
    parser.add_argument("--verbose", action="store_true", help="show Ray's and MLflow's output instead of logging it")


def run(args: argparse.Namespace) -> int:
    from pipeline.config import load_config, resolve_config_path

    cfg = load_config(DemoConfig, resolve_config_path(args.config), args.set)
    out = Path(args.out).resolve()
    if args.fresh and (out / STATE_FILE).is_file():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    # work from --out, as the train stage does: MLflow resolves paths against the working
    # directory, and a Ray job's working copy is temporary
    os.chdir(out)
    run_demo(cfg, out, address=args.address, verbose=args.verbose)
    return 0


__all__ = ["DEFAULT_CONFIG", "DemoConfig", "run_demo"]

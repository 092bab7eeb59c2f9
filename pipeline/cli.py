"""One command-line entry for every stage: ``python -m pipeline <stage> [options]``.

Each stage is a module exposing ``add_arguments(parser)`` and ``run(args) -> int``; it is
imported only when chosen, so ``--help`` stays fast and a stage's heavy imports (Ray, MLflow)
cost nothing to the others. Works unchanged under ``ray job submit -- python -m pipeline ...``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pipeline.errors import UserError

# stage name -> (module, one-line help)
STAGES: dict[str, tuple[str, str]] = {
    "generate": ("pipeline.generate", "write WeChat-format synthetic logs with a known oracle"),
    "preprocess": ("pipeline.preprocess", "raw logs -> model-ready Parquet + feature spec (Ray Data)"),
    "train": ("pipeline.train.stage", "data-parallel training on Ray Train with gradient surgery, logged to MLflow"),
    "register": ("pipeline.serve.registry", "register a trained model as an MLflow pyfunc; promote it to @champion if it scores better"),
    "predict": ("pipeline.predict", "batch scoring of a request file with a registered model on Ray Data -> submission CSV"),
    "report": ("pipeline.report.stage", "the multi-task report (scores, outcome against single-task baselines, gradient and gate plots) from MLflow runs"),
    "tune": ("pipeline.tune.stage", "Ray Tune search over architectures, experts, lr, batch size and strategies (ASHA, Optuna)"),
    "fuse": ("pipeline.fuse", "tune the fusion weights of the ranking score on saved validation predictions"),
    "demo": ("pipeline.demo", "the whole pipeline on generated (or your) logs: generate, preprocess, compare models, search, fuse, register, batch-score, report"),
}


def add_run_arguments(parser: argparse.ArgumentParser, config: str, out: str, what: str) -> None:
    """The options every Ray stage shares: its config with ``--set`` overrides, the run folder
    ``--out`` (``what`` it holds), and where Ray comes from."""
    parser.add_argument("--config", default=config, help="config YAML (default: %(default)s)")
    parser.add_argument("--out", default=out, help=f"run folder: {what} (default: %(default)s)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    parser.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else a new local Ray)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a new local Ray (default: all)")


def build_parser(stage: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    debug_help = "on an error in the input, config or output, show the traceback too"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, (module_name, help_text) in STAGES.items():
        stage_parser = sub.add_parser(name, help=help_text, description=help_text)
        # also accepted after the stage name; SUPPRESS keeps a --debug given before it
        stage_parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
        if name == stage:  # import only the chosen stage
            importlib.import_module(module_name).add_arguments(stage_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    stage = next((a for a in argv if not a.startswith("-")), None)
    if stage not in STAGES:
        stage = None
    args = build_parser(stage).parse_args(argv)
    module = importlib.import_module(STAGES[args.stage][0])
    try:
        return int(module.run(args) or 0)
    except UserError as exc:
        # bad data, config or output: one readable message; anything else is a bug and keeps
        # its traceback
        if args.debug:
            raise
        print(f"python -m pipeline {args.stage}: error: {exc}", file=sys.stderr)
        return 2

"""Registration: a trained model (a training run's ``model/`` artifacts, or such a folder) plus
the fitted transforms of its preprocessed data -> an MLflow pyfunc (signature, input example,
its own code) registered under a name, and the ``champion`` alias moved to the new version only
if it beats the current champion on the validation score (the decision is logged).

``python -m pipeline register --source RUN_ID|DIR --data PROCESSED --name NAME [--tracking-uri URI]``

Example:
    >>> # v = register_model(run_id, "data/wechat", "mtlrank", "sqlite:///runs/mlflow.db")
    >>> # v.version, v.promoted
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.errors import ConfigError, DataError, UserError

ALIAS = "champion"
SCORE_TAG = "valid_score"
EXPERIMENT = "mtlrank-registry"
_REQUIREMENTS = ("mlflow", "torch", "pandas", "numpy", "pyarrow", "pydantic", "pyyaml", "threadpoolctl", "ray")


@dataclass
class Registered:
    """The outcome of :func:`register_model`."""

    name: str
    version: int
    valid_score: float
    promoted: bool
    champion_version: int
    decision: str
    run_id: str
    model_uri: str


def promotion_rule(score: float, champion_score: float | None) -> tuple[bool, str]:
    """The rule: promote when there is no champion or the new score is strictly higher.

    Args:
        score: the new version's validation score; champion_score: the champion's (None: none).
    """
    if champion_score is None:
        return True, f"no champion yet: promoted (valid score {score:.6f})"
    if score > champion_score:
        return True, f"valid score {score:.6f} > champion's {champion_score:.6f}: promoted"
    return False, f"valid score {score:.6f} <= champion's {champion_score:.6f}: champion kept"


def _model_dir(source: str | Path, uri: str, into: Path) -> tuple[Path, str | None]:
    """A local ``model/`` folder: ``source`` itself, or a run's ``model`` artifacts downloaded."""
    if Path(source).is_dir():
        return Path(source), None
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        mlflow.MlflowClient(uri).get_run(str(source))
        path = mlflow.artifacts.download_artifacts(run_id=str(source), artifact_path="model", dst_path=str(into), tracking_uri=uri)
    except MlflowException as exc:
        raise ConfigError(f"--source {source!r}: neither a folder nor a run with model/ artifacts in {uri}: {exc.message}") from None
    return Path(path), str(source)


def _example(scorer: Any, n: int = 3) -> pd.DataFrame:
    """Request rows made of known ids (each input column's vocabulary where it has one)."""
    cols = {}
    for c in scorer.request_columns:
        vocab = next((v for col, v in scorer.transformer.sparse.values() if col == c), None)
        vals = vocab.values.to_numpy(zero_copy_only=False)[:n] if vocab is not None else np.zeros(n, np.int64)
        cols[c] = np.resize(vals, n).astype(np.int64)
    return pd.DataFrame(cols)


def validation_score(scorer: Any, processed_dir: str | Path, split: str = "valid") -> float:
    """The weighted score (:func:`pipeline.train.evaluate.score_predictions`) of the scorer's
    model on a preprocessed labelled split.

    Args:
        scorer: a :class:`~pipeline.serve.scorer.Scorer`; processed_dir: preprocess output; split: its name.
    """
    from pipeline.data import read_split
    from pipeline.train.evaluate import score_predictions

    table = read_split(processed_dir, split)
    tasks = scorer.spec.tasks
    if not all(t in table.column_names for t in tasks):
        raise DataError(f"{processed_dir}/{split}: no labels to score the model on")
    probs = scorer.predict_features(table)
    labels = np.stack([table[t].to_numpy() for t in tasks], axis=1)
    users = table["_user"].to_numpy() if "_user" in table.column_names else None
    return float(score_predictions(probs, labels, users, tasks, split)[f"{split}/score"])


def register_model(source: str | Path, processed_dir: str | Path, name: str, tracking_uri: str,
                   fusion_weights: list[float] | None = None, fusion_method: str = "weighted_product",
                   experiment: str = EXPERIMENT, artifact_root: str | Path | None = None) -> Registered:
    """Log the model as a pyfunc, register a new version of ``name``, apply the promotion rule.

    Args:
        source: a training run id (its ``model/`` artifacts) or a folder with ``state.pt``,
            ``feature_spec.json`` and ``config.yaml``.
        processed_dir: the preprocess output the model was trained on (transforms, feed table,
            history, the ``valid`` split the promotion rule scores on).
        name: the registered model name; tracking_uri: the MLflow store (also the registry).
        fusion_weights: one per task (default: the challenge's weights); fusion_method: see :mod:`mtl.fusion`.
        experiment: where the registration run goes; artifact_root: its artifact location when new
            (default for a sqlite store: ``mlartifacts/`` beside the database file).
    """
    import mlflow

    import mtl
    import pipeline
    from pipeline.serve.pyfunc import BUNDLE, MtlRankModel
    from pipeline.serve.scorer import Scorer
    from pipeline.tracking import RunLogger, tracked_run

    client = mlflow.MlflowClient(tracking_uri)
    if artifact_root is None and tracking_uri.startswith("sqlite:///"):
        # beside the store, as pipeline.tracking does (MLflow's default is ./mlruns of the cwd)
        artifact_root = Path(tracking_uri[len("sqlite:///"):]).resolve().parent / "mlartifacts"
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, run_source = _model_dir(source, tracking_uri, Path(tmp))
        try:
            scorer = Scorer.from_checkpoint(model_dir, processed_dir, fusion_weights, fusion_method)
        except (FileNotFoundError, ValueError) as exc:
            raise ConfigError(str(exc)) from None
        score = validation_score(scorer, processed_dir)
        bundle = scorer.save(Path(tmp) / BUNDLE)
        example = _example(scorer)
        signature = mlflow.models.infer_signature(example, scorer.predict(example))
        previous = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(tracking_uri)  # the fluent log_model below needs it
        try:
            with tracked_run(tracking_uri, experiment, run_name=f"register-{name}", artifact_root=artifact_root) as run_id:
                with mlflow.start_run(run_id=run_id):
                    info = mlflow.pyfunc.log_model(
                        name="model", python_model=MtlRankModel(), artifacts={BUNDLE: str(bundle)},
                        code_paths=[str(Path(pipeline.__file__).parent), str(Path(mtl.__file__).parent)],
                        signature=signature, input_example=example, registered_model_name=name,
                        pip_requirements=[f"{p}=={metadata.version(p)}" for p in _REQUIREMENTS],
                    )
                version = int(info.registered_model_version)
                champion = _champion(client, name)
                champ_score = float(champion.tags[SCORE_TAG]) if champion is not None and SCORE_TAG in champion.tags else None
                promoted, decision = promotion_rule(score, champ_score)
                client.set_model_version_tag(name, str(version), SCORE_TAG, f"{score:.6f}")
                client.set_model_version_tag(name, str(version), "valid_data", str(Path(processed_dir).resolve()))
                client.set_model_version_tag(name, str(version), "promotion", decision)
                if run_source:
                    client.set_model_version_tag(name, str(version), "source_run", run_source)
                    trained_on = client.get_run(run_source).data.params.get("data")
                    if trained_on:
                        client.set_model_version_tag(name, str(version), "train_data", trained_on)
                    if trained_on and Path(trained_on).resolve() != Path(processed_dir).resolve():
                        print(f"register: warning: run {run_source} trained on {trained_on}, the transforms come from "
                              f"{Path(processed_dir).resolve()} (same feature spec; vocabularies are not compared)",
                              file=sys.stderr)
                if promoted:
                    client.set_registered_model_alias(name, ALIAS, str(version))
                champ_version = version if promoted else int(champion.version)
                record = {"name": name, "version": version, "valid_score": score, "champion_before":
                          None if champion is None else {"version": int(champion.version), "valid_score": champ_score},
                          "promoted": promoted, "decision": decision, "rule": "promote iff valid score > champion's",
                          "source": str(source), "processed": str(Path(processed_dir).resolve()),
                          "fusion_weights": scorer.fusion_weights, "fusion_method": scorer.fusion_method}
                log = RunLogger(tracking_uri, run_id)
                log.dict(record, "promotion.json")
                log.metrics({"valid/score": score}, step=0)
                log.params({"registered_model": name, "version": version, "promoted": promoted, "source": str(source)})
        finally:
            mlflow.set_tracking_uri(previous)
    return Registered(name, version, score, promoted, champ_version, decision, run_id, f"models:/{name}/{version}")


def _champion(client: Any, name: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, ALIAS)
    except MlflowException:
        return None


# --------------------------------------------------------------------------------------------
# CLI


def parse_weights(text: str | None) -> list[float] | None:
    """``"4,3,2,1"`` -> floats (None stays None)."""
    if text is None:
        return None
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated numbers") from None


def tracking_uri_arg(parser: argparse.ArgumentParser) -> None:
    """``--tracking-uri`` (default: ``MLFLOW_TRACKING_URI``)."""
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                        help="MLflow tracking/registry URI (default: $MLFLOW_TRACKING_URI)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True, help="a training run id (its model/ artifacts) or a model/ folder")
    parser.add_argument("--data", required=True, help="the preprocess output the model was trained on")
    parser.add_argument("--name", required=True, help="registered model name")
    tracking_uri_arg(parser)
    parser.add_argument("--fusion-weights", type=parse_weights, default=None, help="one weight per task, comma-separated")
    parser.add_argument("--fusion-method", default="weighted_product", help="weighted_sum, weighted_product or weighted_rank")
    parser.add_argument("--experiment", default=EXPERIMENT, help="experiment of the registration run")


def run(args: argparse.Namespace) -> int:
    if not args.tracking_uri:
        raise UserError("no MLflow store: pass --tracking-uri or set MLFLOW_TRACKING_URI")
    result = register_model(args.source, args.data, args.name, args.tracking_uri, args.fusion_weights,
                            args.fusion_method, args.experiment)
    print(json.dumps(asdict(result), indent=2))
    return 0

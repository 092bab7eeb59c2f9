"""A trained model with everything it needs to score raw request rows: the fitted
:class:`~pipeline.transforms.RowTransformer` (vocabularies, feed table, history as of the end of
the data), the feature spec, the model and its fusion weights. No MLflow here: the pyfunc
(:mod:`pipeline.serve.pyfunc`) and batch scoring wrap it.

Example:
    >>> # scorer = Scorer.load("bundle/")
    >>> # scorer.predict(pd.DataFrame({"userid": [1], "feedid": [2], "device": [1]}))
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from mtl.checkpoint import STATE_FILE, load_checkpoint, save_checkpoint
from mtl.features import FeatureSpec
from mtl.fusion import FUSIONS, fuse
from mtl.metrics import WECHAT_ACTION_WEIGHTS
from mtl.models import MultiTaskModel, build_model
from pipeline.data import arrow_to_batch
from pipeline.train.evaluate import predict_batches
from pipeline.transforms import RowTransformer

SCORE = "score"  # the fused score's output column
MODEL_FILE = "model.json"
SPEC_FILE = "feature_spec.json"
TRANSFORMER_DIR = "transformer"
_INT_KINDS = {"int"}


class RequestError(ValueError):
    """A malformed request; the message names the field (column) and row."""


def default_fusion_weights(tasks: list[str]) -> list[float]:
    """The challenge's weights when every task is a WeChat action, else equal weights.

    Args:
        tasks: task names in output order.
    """
    if all(t in WECHAT_ACTION_WEIGHTS for t in tasks):
        return [WECHAT_ACTION_WEIGHTS[t] for t in tasks]
    return [1.0] * len(tasks)


class Scorer:
    """Raw rows -> one probability per task plus the fused score.

    Args:
        transformer: the fitted row pipeline; spec: the model's feature spec.
        model: the trained model (moved to CPU, eval mode).
        model_info: ``{"name", "params", "precision"}`` to rebuild the model.
        fusion_weights: one per task (default :func:`default_fusion_weights`); fusion_method:
            a :data:`mtl.fusion.FUSIONS` name.
        batch_size: rows per forward pass.
    """

    def __init__(self, transformer: RowTransformer, spec: FeatureSpec, model: MultiTaskModel, model_info: dict[str, Any],
                 fusion_weights: list[float] | None = None, fusion_method: str = "weighted_product",
                 batch_size: int = 65536) -> None:
        if fusion_method not in FUSIONS:
            raise ValueError(f"unknown fusion method {fusion_method!r}; choose from {sorted(FUSIONS)}")
        weights = list(fusion_weights) if fusion_weights is not None else default_fusion_weights(spec.tasks)
        if len(weights) != len(spec.tasks):
            raise ValueError(f"{len(weights)} fusion weights for {len(spec.tasks)} tasks {spec.tasks}")
        fuse(np.zeros((1, len(weights))), weights, fusion_method)  # checks the weights
        self.transformer, self.spec, self.model, self.model_info = transformer, spec, model.cpu().eval(), model_info
        self.fusion_weights, self.fusion_method, self.batch_size = [float(w) for w in weights], fusion_method, batch_size

    @property
    def request_columns(self) -> dict[str, str]:
        """The raw columns a request must have and their kinds."""
        return dict(self.transformer.inputs)

    @property
    def output_columns(self) -> list[str]:
        return [*self.spec.tasks, SCORE]

    def check_request(self, rows: Any) -> pa.Table:
        """A request frame as an Arrow table of the request columns, or a :class:`RequestError`.

        Args:
            rows: a pandas DataFrame with every :attr:`request_columns` column.
        """
        if not isinstance(rows, pd.DataFrame):
            raise RequestError(f"a request is a table of rows with columns {list(self.request_columns)}, got {type(rows).__name__}")
        if len(rows) == 0:
            raise RequestError(f"empty request: no rows (columns {list(self.request_columns)} expected)")
        missing = [c for c in self.request_columns if c not in rows.columns]
        if missing:
            raise RequestError(f"request lacks column(s) {missing}; expected {list(self.request_columns)}, got {list(rows.columns)}")
        cols = {}
        for c, kind in self.request_columns.items():
            s = rows[c]
            if kind in _INT_KINDS:
                if not pd.api.types.is_integer_dtype(s.dtype):
                    num = pd.to_numeric(s, errors="coerce")
                    bad = num.isna().to_numpy() | (num.to_numpy(dtype=float, na_value=np.nan) % 1 != 0)
                    if bad.any():
                        i = int(np.flatnonzero(bad)[0])
                        raise RequestError(f"request column {c!r}, row {i}: {s.iloc[i]!r} is not an integer; "
                                           f"{int(bad.sum())} such row(s)")
                    s = num.astype(np.int64)
                cols[c] = pa.array(s.to_numpy(dtype=np.int64))
            else:
                cols[c] = pa.array(s)
        return pa.table(cols)

    @torch.no_grad()
    def predict_table(self, table: pa.Table) -> np.ndarray:
        """``[N, K]`` probabilities of checked raw rows.

        Args:
            table: :meth:`check_request` output (or any table with the request columns).
        """
        feats = self.transformer.transform(table)
        return self.predict_features(feats)

    def predict_features(self, feats: pa.Table) -> np.ndarray:
        """``[N, K]`` probabilities of model-ready rows (e.g. a preprocessed split).

        Args:
            feats: columns as :mod:`pipeline.preprocess` writes them.
        """
        batches = (arrow_to_batch(feats.slice(s, self.batch_size), self.spec) for s in range(0, feats.num_rows, self.batch_size))
        probs, _, _ = predict_batches(self.model, batches, device="cpu")
        return probs

    def predict(self, rows: Any) -> pd.DataFrame:
        """One probability column per task (``spec.tasks`` order) and ``score`` (the fused score).

        Args:
            rows: a pandas DataFrame of raw request rows.

        Raises:
            RequestError: a malformed request (missing column, wrong type, no rows).
        """
        probs = self.predict_table(self.check_request(rows))
        out = pd.DataFrame(probs, columns=self.spec.tasks)
        out[SCORE] = fuse(probs, self.fusion_weights, self.fusion_method)
        return out

    def save(self, folder: str | Path) -> Path:
        """Write the bundle: model state, model/fusion info, spec, transformer.

        Args:
            folder: a new or empty directory.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_checkpoint(folder / STATE_FILE, self.model)
        info = {**self.model_info, "fusion_weights": self.fusion_weights, "fusion_method": self.fusion_method,
                "tasks": self.spec.tasks}
        (folder / MODEL_FILE).write_text(json.dumps(info, indent=2))
        self.spec.save(folder / SPEC_FILE)
        self.transformer.save(folder / TRANSFORMER_DIR)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "Scorer":
        """Read what :meth:`save` wrote.

        Args:
            folder: the bundle directory.
        """
        folder = Path(folder)
        info = json.loads((folder / MODEL_FILE).read_text())
        spec = FeatureSpec.load(folder / SPEC_FILE)
        model = build_model(info["name"], spec, sparse_gradients=False, compute_dtype=info.get("precision"), **info["params"])
        load_checkpoint(folder / STATE_FILE, model, restore_rng=False)
        model_info = {k: info[k] for k in ("name", "params", "precision") if k in info}
        return cls(RowTransformer.load(folder / TRANSFORMER_DIR), spec, model, model_info,
                   info["fusion_weights"], info["fusion_method"])

    @classmethod
    def from_checkpoint(cls, model_dir: str | Path, processed_dir: str | Path, fusion_weights: list[float] | None = None,
                        fusion_method: str = "weighted_product") -> "Scorer":
        """A scorer from a training run's ``model/`` folder (``state.pt``, ``feature_spec.json``,
        ``config.yaml``) and the preprocessed data it was trained on (its fitted transforms).

        Args:
            model_dir: the folder; processed_dir: the preprocess output.

        Raises:
            ValueError: the model's feature spec is not the data's.
        """
        import yaml

        from pipeline.data import load_spec
        from pipeline.train.config import TrainJobConfig

        model_dir, processed_dir = Path(model_dir), Path(processed_dir)
        for name in (STATE_FILE, SPEC_FILE, "config.yaml"):
            if not (model_dir / name).is_file():
                raise FileNotFoundError(f"{model_dir}: no {name} (expected a training run's model/ folder)")
        spec = FeatureSpec.load(model_dir / SPEC_FILE)
        job = TrainJobConfig.model_validate(yaml.safe_load((model_dir / "config.yaml").read_text()))
        # the model's spec is the data's with the run's numeric encodings (train.numeric)
        data_spec = job.train.model_spec(load_spec(processed_dir))
        if spec.to_dict() != data_spec.to_dict():
            raise ValueError(f"{model_dir}/{SPEC_FILE} differs from {processed_dir}/feature_spec.json: "
                             "the model was not trained on this preprocessed data")
        info = {"name": job.train.model.name, "params": dict(job.train.model.params), "precision": job.train.precision}
        model = build_model(info["name"], spec, sparse_gradients=False, compute_dtype=info["precision"], **info["params"])
        load_checkpoint(model_dir / STATE_FILE, model, restore_rng=False)
        transformer = RowTransformer.load(processed_dir / "artifacts").for_serving()
        return cls(transformer, spec, model, info, fusion_weights, fusion_method)


def write_model_dir(folder: str | Path, model: MultiTaskModel, spec: FeatureSpec, job: Any) -> Path:
    """A ``model/`` folder as a training run logs it (for an in-process model, e.g. ``train_local``).

    Args:
        folder: the directory; model, spec: the trained model and its spec;
        job: a :class:`~pipeline.train.config.TrainJobConfig` (or a ``TrainConfig``, wrapped).
    """
    from pipeline.config import dump_config
    from pipeline.train.config import TrainConfig, TrainJobConfig

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    job = TrainJobConfig(train=job) if isinstance(job, TrainConfig) else job
    save_checkpoint(folder / STATE_FILE, model)
    spec.save(folder / SPEC_FILE)
    (folder / "config.yaml").write_text(dump_config(job))
    return folder


"""The MLflow pyfunc around a :class:`~pipeline.serve.scorer.Scorer`: input raw request rows
(``userid, feedid, device``), output one probability column per task plus ``score``. A
malformed request is an ``MlflowException`` with ``INVALID_PARAMETER_VALUE``: the scoring
server answers 400 with the message.

Example:
    >>> # m = mlflow.pyfunc.load_model("models:/mtlrank@champion")
    >>> # m.predict(pd.DataFrame({"userid": [1], "feedid": [2], "device": [1]}))
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from pipeline.serve import BUNDLE


class MtlRankModel(mlflow.pyfunc.PythonModel):
    """Loads the bundle once (:meth:`load_context`), scores request frames (:meth:`predict`)."""

    def load_context(self, context: Any) -> None:
        """Load the scorer from the logged bundle.

        Args:
            context: MLflow's context (``artifacts[BUNDLE]`` is the bundle folder).
        """
        from pipeline.serve.scorer import Scorer

        self.scorer = Scorer.load(context.artifacts[BUNDLE])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Probabilities per task and the fused ``score``, one row per request row.

        Args:
            context: unused; model_input: the request rows; params: unused.
        """
        from pipeline.serve.scorer import RequestError

        try:
            return self.scorer.predict(model_input)
        except (RequestError, KeyError) as exc:
            raise MlflowException(f"malformed request: {exc}", error_code=INVALID_PARAMETER_VALUE) from None

"""Training: config (:mod:`.config`), the one step (:mod:`.step`), the one loop (:mod:`.loop`),
evaluation (:mod:`.evaluate`), the in-process run (:mod:`.local`) and the Ray Train run
(:mod:`.ray_train`, imported on demand: it imports Ray)."""

from pipeline.train.config import ModelConfig, OptimizerConfig, StrategyConfig, TrainConfig, TrainJobConfig
from pipeline.train.evaluate import evaluate, oracle_metrics, predict, predict_batches, score_predictions
from pipeline.train.local import TrainResult, train_local
from pipeline.train.step import TrainState, build, masked_bce, train_step

__all__ = [
    "ModelConfig", "OptimizerConfig", "StrategyConfig", "TrainConfig", "TrainJobConfig", "TrainResult", "TrainState",
    "build", "evaluate", "masked_bce", "oracle_metrics", "predict", "predict_batches", "score_predictions",
    "train_local", "train_step",
]

"""Fitted transforms, one file per kind, each with ``fit`` / ``transform`` / ``save`` / ``load``:
vocabularies (:mod:`.vocab`), dense scaling (:mod:`.dense`), id lists (:mod:`.lists`), PCA
(:mod:`.pca`), history tables (:mod:`.history`), side tables (:mod:`.side`) and the whole row
pipeline (:mod:`.rows`). Preprocessing fits and applies them; serving loads and applies them."""

from pipeline.transforms.dense import DenseScaler
from pipeline.transforms.history import HistoryGroup, build_history_group, history_feature_names, history_features
from pipeline.transforms.lists import ListEncoder
from pipeline.transforms.pca import PCA, fit_pca
from pipeline.transforms.rows import RowTransformer
from pipeline.transforms.side import SideTable
from pipeline.transforms.vocab import Vocabulary

__all__ = ["DenseScaler", "HistoryGroup", "ListEncoder", "PCA", "RowTransformer", "SideTable", "Vocabulary",
           "build_history_group", "fit_pca", "history_feature_names", "history_features"]

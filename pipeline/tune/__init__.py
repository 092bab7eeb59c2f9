"""Hyperparameter search over train jobs on Ray Tune (``python -m pipeline tune``): the
config and space (:mod:`~pipeline.tune.config`, :mod:`~pipeline.tune.space`) and the search
(:mod:`~pipeline.tune.search`)."""

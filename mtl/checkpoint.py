"""One file with everything a run needs to continue exactly where it stopped: the model (its
embedding tables included), the strategy (its buffers, parameters and RNG), every optimizer,
the running weight average (:class:`mtl.averaging.WeightAverage`, when the run keeps one), the
torch RNG, and the caller's position (epoch, step, best score, ...). Used by the Ray Train
loop's checkpoints and resume, and by serving to load the model.

Example:
    >>> # save_checkpoint(path, model, strategy, optimizers, position={"epoch": 1, "step": 100})
    >>> # position = load_checkpoint(path, model, strategy, optimizers)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtl.averaging import WeightAverage

STATE_FILE = "state.pt"


def save_checkpoint(path: str | Path, model: nn.Module, strategy: nn.Module | None = None,
                    optimizers: Sequence[torch.optim.Optimizer] = (), position: dict[str, Any] | None = None,
                    average: WeightAverage | None = None) -> Path:
    """Write the state to ``path`` (a file) atomically (a temporary file, then a rename)."""
    path = Path(path)
    payload = {
        "model": model.state_dict(),
        "strategy": strategy.state_dict() if strategy is not None else None,
        "optimizers": [opt.state_dict() for opt in optimizers],
        "average": average.state_dict() if average is not None else None,
        "torch_rng": torch.get_rng_state(),
        "position": dict(position or {}),
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path, model: nn.Module, strategy: nn.Module | None = None,
                    optimizers: Sequence[torch.optim.Optimizer] = (), map_location: str | torch.device = "cpu",
                    restore_rng: bool = True, average: WeightAverage | None = None) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote into the given objects; returns the position.

    Raises:
        ValueError: the checkpoint holds a different number of optimizers than given, or
            ``average`` is given and the checkpoint holds none (a run without weight averaging).
    """
    payload = torch.load(Path(path), map_location=map_location, weights_only=False)
    model.load_state_dict(payload["model"])
    if strategy is not None and payload["strategy"] is not None:
        strategy.load_state_dict(payload["strategy"])
    saved = payload["optimizers"]
    if optimizers and len(saved) != len(optimizers):
        raise ValueError(f"{path}: checkpoint has {len(saved)} optimizer(s), the run has {len(optimizers)}")
    for opt, state in zip(optimizers, saved):
        opt.load_state_dict(state)
    if average is not None:
        if payload.get("average") is None:
            raise ValueError(f"{path}: checkpoint has no weight average to resume (saved by a run without train.weight_average)")
        average.load_state_dict(payload["average"])
    if restore_rng:
        torch.set_rng_state(payload["torch_rng"])
    return dict(payload["position"])

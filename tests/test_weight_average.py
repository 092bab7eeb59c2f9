"""Weight averaging (``train.weight_average``, :mod:`mtl.averaging`): the EMA and SWA formulas
on hand-computed sequences, the average taken after every training step, evaluation and early
stopping on the averaged weights, the averaged weights kept at the end, and a run resumed from
a checkpoint continuing the same average. Tiny synthetic specs; no Ray (the Ray workers run the
same step and loop: tests/test_train_ray.py trains and resumes with an average)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from mtl.averaging import WeightAverage
from mtl.checkpoint import save_checkpoint
from pipeline.data import MaterializedShard
from pipeline.train.config import TrainConfig
from pipeline.train.loop import LoopHooks, fit
from pipeline.train.step import build, load_state, save_state, train_step
from tests.test_train_step import _cfg, _data, _spec

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _scalar_net(value: float = 0.0) -> torch.nn.Module:
    net = torch.nn.Linear(1, 1)
    net.weight.data.fill_(value)
    net.bias.data.fill_(-value)
    return net


def _feed(avg: WeightAverage, net: torch.nn.Module, values: list[float], first_step: int = 1) -> None:
    for step, v in enumerate(values, start=first_step):
        net.weight.data.fill_(v)
        net.bias.data.fill_(-v)
        avg.update(net, step)


def test_ema_and_swa_equal_their_formulas_by_hand():
    net = _scalar_net()
    ema = WeightAverage(net, "ema", decay=0.75)
    swa = WeightAverage(net, "swa")
    for avg in (ema, swa):
        assert avg.model_or(net) is net  # no update yet: the live model
        _feed(avg, net, [4.0, 8.0, 0.0])
        assert avg.model_or(net) is avg.module and avg.updates == 3
    # ema: a1 = 4; a2 = 0.75 * 4 + 0.25 * 8 = 5; a3 = 0.75 * 5 + 0.25 * 0 = 3.75
    assert ema.module.weight.item() == pytest.approx(3.75) and ema.module.bias.item() == pytest.approx(-3.75)
    assert swa.module.weight.item() == pytest.approx(4.0)  # (4 + 8 + 0) / 3
    assert net.weight.item() == 0.0  # the live model is not touched


def test_start_step_skips_the_early_steps():
    net = _scalar_net()
    swa = WeightAverage(net, "swa", start_step=2)
    _feed(swa, net, [100.0, 100.0, 2.0, 4.0])  # steps 1..4: only steps 3 and 4 count
    assert swa.updates == 2 and swa.module.weight.item() == pytest.approx(3.0)


def test_bad_kind_or_decay_is_rejected():
    with pytest.raises(ValueError, match="unknown"):
        WeightAverage(_scalar_net(), "mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(_scalar_net(), "ema", decay=1.0)
    with pytest.raises(ValidationError):
        TrainConfig(weight_average={"kind": "ema", "decay": 1.5})


def _average_cfg(**kw) -> TrainConfig:
    return _cfg(weight_average={"kind": "ema", "decay": 0.5}, batch_size=8, **kw)


def test_train_step_updates_the_average_after_each_step():
    """After steps 1..3 with live parameters p1, p2, p3 the average is the EMA of exactly those."""
    state = build(_average_cfg(), _spec())
    batch = _data(8, seed=1)
    seen = []
    for _ in range(3):
        train_step(state, batch)
        seen.append({k: v.detach().clone() for k, v in state.model.named_parameters()})
    assert state.eval_model is state.average.module
    averaged = dict(state.average.module.named_parameters())
    for name, p3 in seen[2].items():
        expected = 0.5 * (0.5 * seen[0][name] + 0.5 * seen[1][name]) + 0.5 * p3
        assert torch.allclose(averaged[name], expected, atol=1e-7), name
    assert any(not torch.equal(averaged[name], p3) for name, p3 in seen[2].items())  # not the live weights


def _loop(epochs: int = 2, **kw):
    cfg = _average_cfg(epochs=epochs, **kw)
    state = build(cfg, _spec())
    shard = MaterializedShard(_data(20, seed=4), cfg.batch_size, seed=cfg.seed)  # 3 batches an epoch
    return state, shard


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_evaluation_reads_the_average_and_the_run_ends_with_it():
    state, shard = _loop(epochs=1, eval_every_steps=1)
    evaluated = []

    def evaluate(s):
        evaluated.append((s.step, s.eval_model is s.average.module, _params(s.eval_model)))
        return {"valid/score": 0.5}

    fit(state, shard.epoch, LoopHooks(evaluate=evaluate))
    assert [(step, is_avg) for step, is_avg, _ in evaluated] == [(1, True), (2, True), (3, True)]
    final = _params(state.model)  # no early stopping: the model ends with the averaged weights
    assert all(torch.equal(final[k], evaluated[-1][2][k]) for k in final)


def test_early_stopping_keeps_the_best_averaged_weights():
    state, shard = _loop(epochs=3, eval_every_steps=1, early_stopping={"patience": 2})
    scores = iter([0.5, 0.7, 0.6, 0.65])
    snapshots = []

    def evaluate(s):
        snapshots.append(_params(s.eval_model))
        return {"valid/score": next(scores)}

    res = fit(state, shard.epoch, LoopHooks(evaluate=evaluate))
    assert res.stopped_early and res.best["step"] == 2.0
    final = _params(state.model)
    assert all(torch.equal(final[k], snapshots[1][k]) for k in final)


def test_resume_from_a_checkpoint_continues_the_same_average(tmp_path):
    """A run checkpointed at step 4 (as the Ray workers do, with ``save_state``) and resumed in a
    freshly built state ends with the same average as an uninterrupted run."""
    whole, shard = _loop(epochs=3)
    fit(whole, shard.epoch, LoopHooks(evaluate=lambda s: {}))

    first, _ = _loop(epochs=3)
    path = tmp_path / "state.pt"

    def checkpoint(s):
        if s.step == 4:
            save_state(path, s, {"step": s.step, "epoch": s.epoch, "step_in_epoch": s.step_in_epoch})

    first.cfg = first.cfg.model_copy(update={"max_steps": 4})
    fit(first, shard.epoch, LoopHooks(evaluate=lambda s: {}, on_step=checkpoint))

    resumed, _ = _loop(epochs=3)
    position = load_state(path, resumed)
    resumed.step, resumed.epoch, resumed.step_in_epoch = position["step"], position["epoch"], position["step_in_epoch"]
    assert resumed.average.updates == 4
    fit(resumed, shard.epoch, LoopHooks(evaluate=lambda s: {}))
    assert resumed.step == whole.step == 9
    a, b = _params(whole.average.module), _params(resumed.average.module)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert all(torch.allclose(whole.model.state_dict()[k], resumed.model.state_dict()[k], atol=1e-6) for k in a)


def test_resume_with_an_average_needs_one_in_the_checkpoint(tmp_path):
    plain = build(_cfg(batch_size=8), _spec())
    save_checkpoint(tmp_path / "state.pt", plain.model, plain.strategy, plain.optimizers, {"step": 0})
    state = build(_average_cfg(), _spec())
    with pytest.raises(ValueError, match="no weight average"):
        load_state(tmp_path / "state.pt", state)


# ------------------------------------------------------------------ learning rate cut on plateau


def test_lr_plateau_cuts_every_patience_stalled_evaluations():
    """Scores 0.5, 0.7, 0.6, 0.65, 0.8, 0.7, 0.7, 0.7, NaN; patience 2, factor 0.5, min_lr 0.02,
    lr 0.05. Evaluations since the best: 0, 0, 1, 2 (cut: 0.025), 0, 1, 2 (cut: 0.0125, held at
    min_lr 0.02), 3 (no cut), and a NaN score (not counted, no cut)."""
    state, shard = _loop(epochs=3, eval_every_steps=1, lr_plateau={"factor": 0.5, "patience": 2, "min_lr": 0.02})
    scores = iter([0.5, 0.7, 0.6, 0.65, 0.8, 0.7, 0.7, 0.7, float("nan")])
    lrs = []

    def evaluate(s):
        lrs.append(s.optimizers[0].param_groups[0]["lr"])  # the rate the last step used
        return {"valid/score": next(scores)}

    fit(state, shard.epoch, LoopHooks(evaluate=evaluate))
    assert lrs == pytest.approx([0.05] * 4 + [0.025] * 3 + [0.02] * 2)
    assert state.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.02)
    assert state.extra["lr_cuts"] == 2

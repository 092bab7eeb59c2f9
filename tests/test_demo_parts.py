"""The demo's parts without Ray: the grid search it compares models with, its config checks,
the console that keeps Ray's output out of the terminal, the ledger that lets a run continue,
the results table and the submission check."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pandas as pd
import pytest

from pipeline.config import load_config
from pipeline.demo import DEFAULT_CONFIG, Ledger
from pipeline.demo.config import DemoConfig
from pipeline.demo.console import Console, say
from pipeline.demo.flow import check_submission, results_table
from pipeline.errors import ConfigError, DataError, OutputError
from pipeline.tune.config import TuneConfig, trial_job
from pipeline.tune.grid import GridSearcher
from pipeline.tune.space import grid_points, parse_entries


def test_grid_points_are_the_product_in_order_with_choices_expanded() -> None:
    flat = parse_entries({"train.batch_size": {"type": "choice", "values": [512, 1024]}})
    conditional = {"model": {"mmoe": parse_entries({"num_experts": {"type": "choice", "values": [2, 4]}, "expert_hidden": [32]}),
                             "single_task": {}},
                   "strategy": {"equal": {}, "pcgrad": {}}}
    points = grid_points(flat, conditional)
    assert len(points) == 2 * (2 + 1) * 2
    assert points[0] == {"train.batch_size": 512, "model": "mmoe", "model.mmoe.num_experts": 2,
                         "model.mmoe.expert_hidden": [32], "strategy": "equal"}
    assert points[1]["strategy"] == "pcgrad" and points[1]["model.mmoe.num_experts"] == 2  # the last group varies fastest
    assert [p["train.batch_size"] for p in points] == [512] * 6 + [1024] * 6
    assert len({repr(sorted(p.items())) for p in points}) == len(points)


def test_grid_exclude_drops_matching_points_and_rejects_a_rule_that_matches_none() -> None:
    conditional = {"model": {"single_task": {}, "mmoe": {}}, "strategy": {"equal": {}, "pcgrad": {}}}
    points = grid_points({}, conditional, [{"model": "single_task", "strategy": "pcgrad"}])
    assert [(p["model"], p["strategy"]) for p in points] == [("single_task", "equal"), ("mmoe", "equal"), ("mmoe", "pcgrad")]
    with pytest.raises(ValueError, match="matches no grid point"):
        grid_points({}, conditional, [{"model": "ple"}])
    with pytest.raises(ValueError, match="every grid point is excluded"):
        grid_points({}, conditional, [{"strategy": "equal"}, {"strategy": "pcgrad"}])
    with pytest.raises(ValueError, match="not the float range of 'lr'"):
        grid_points(parse_entries({"lr": {"type": "float", "low": 0.1, "high": 1.0}}), conditional)


def _grid_config(**search: object) -> dict:
    return {"space": {"model": {"single_task": {"hidden": [8]}, "mmoe": {"num_experts": 2}},
                      "strategy": {"equal": {}, "pcgrad": {}}},
            "search": {"algorithm": "grid", **search}, "scheduler": {"name": "none"}}


def test_a_grid_tune_config_counts_its_trials_and_builds_each_job() -> None:
    cfg = TuneConfig.model_validate(_grid_config(exclude=[{"model": "single_task", "strategy": "pcgrad"}], num_samples=99))
    assert cfg.trial_count() == 3 and cfg.checked_trials() == cfg.grid()
    jobs = [trial_job(cfg, p) for p in cfg.grid()]
    assert [(j.train.model.name, j.train.strategy.name) for j in jobs] == [("single_task", "equal"), ("mmoe", "equal"), ("mmoe", "pcgrad")]
    assert jobs[0].train.model.params == {"hidden": [8]} and jobs[1].train.model.params == {"num_experts": 2}


@pytest.mark.parametrize("change, message", [
    ({"space": {"model": {"mmoe": {"num_experts": {"type": "int", "low": 2, "high": 4}}}}}, "grid search takes constants and choices"),
    ({"search": {"algorithm": "optuna", "exclude": [{"model": "mmoe"}]}}, "search.exclude is for algorithm: grid"),
])
def test_a_grid_config_that_cannot_be_a_grid_fails_at_load(change: dict, message: str, tmp_path: Path) -> None:
    import yaml

    data = _grid_config()
    for key, value in change.items():
        data[key] = {**data[key], **value} if key == "search" else value
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=message):
        load_config(TuneConfig, path)


def test_the_grid_searcher_suggests_each_point_once_and_resumes_where_it_stopped(tmp_path: Path) -> None:
    from ray.tune.search import Searcher

    points = [{"model": "a"}, {"model": "b"}, {"model": "c"}]
    searcher = GridSearcher(points, "valid/score", "max")
    assert searcher.suggest("t1") == {"model": "a"}
    searcher.save(str(tmp_path / "state.pkl"))
    assert searcher.suggest("t2") == {"model": "b"}
    restored = GridSearcher(points, "valid/score", "max")
    restored.restore(str(tmp_path / "state.pkl"))
    assert [restored.suggest("t2"), restored.suggest("t3"), restored.suggest("t4")] == [{"model": "b"}, {"model": "c"}, Searcher.FINISHED]
    assert pickle.loads(pickle.dumps(restored)).next == 3


def test_the_shipped_demo_config_compares_every_model_under_two_strategies() -> None:
    cfg = load_config(DemoConfig, DEFAULT_CONFIG)
    pairs = {(p["model"], p["strategy"]) for p in cfg.compare.grid()}
    assert pairs == {("single_task", "equal")} | {(m, s) for m in ("shared_bottom", "mmoe", "ple") for s in ("equal", "pcgrad")}
    assert cfg.search is not None and cfg.search.search.algorithm == "optuna" and cfg.search.scheduler.name == "asha"


@pytest.mark.parametrize("overrides, message", [
    (["compare.space.model={mmoe: {}}", "compare.search.exclude=[]"], "single_task baseline"),
    (["compare.space.model={mmoe: {}}"], "exclude entry .* matches no grid point"),
    (["compare.search.algorithm=random", "compare.search.exclude=[]"], "must be grid"),
    (["search.fuse={}"], "fuses the best model once"),
])
def test_the_demo_config_is_checked_whole_at_load(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(DemoConfig, DEFAULT_CONFIG, overrides)


def test_console_sends_process_output_to_the_log_and_its_lines_to_the_terminal(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "demo.log"
    with Console(log, total=2) as console:
        os.write(1, b"ray banner on fd 1\n")
        os.write(2, b"mlflow warning on fd 2\n")
        print("a print", flush=True)
        with console.stage("first", "does a thing") as line:
            line["summary"] = "3 rows"
    out = capfd.readouterr().out
    assert "[1/2] first" in out and "done in" in out and "3 rows" in out
    assert "ray banner" not in out and "mlflow warning" not in out and "a print" not in out
    text = log.read_text()
    assert "ray banner on fd 1" in text and "mlflow warning on fd 2" in text and "a print" in text
    say("after")  # the terminal is back
    assert capfd.readouterr().out == "after\n"


def test_console_shows_the_logs_tail_when_a_stage_fails(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(RuntimeError), Console(tmp_path / "demo.log", total=1) as console:
        with console.stage("broken", "fails"):
            os.write(2, b"the worker's traceback\n")
            raise RuntimeError("boom")
    assert "the worker's traceback" in capfd.readouterr().err


def test_the_ledger_refuses_foreign_folders_and_other_configs_and_keeps_finished_stages(tmp_path: Path) -> None:
    cfg = load_config(DemoConfig, DEFAULT_CONFIG, ["scale=tiny"])
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("x")
    with pytest.raises(OutputError, match="no demo wrote"):
        Ledger(foreign, cfg)
    out = tmp_path / "demo"
    out.mkdir()
    Ledger(out, cfg).done("generate", {"summary": "ok", "n": 3})
    assert Ledger(out, cfg).stages == {"generate": {"summary": "ok", "n": 3}}
    with pytest.raises(OutputError, match="another config"):
        Ledger(out, load_config(DemoConfig, DEFAULT_CONFIG, ["scale=small"]))


def _trial(stage: str, label: str, score: float, run_id: str, status: str = "finished") -> dict:
    model, strategy = label.split("/")
    return {"stage": stage, "label": label, "model": model, "strategy": strategy, "score": score, "run_id": run_id,
            "status": status, "uauc": {"like": score - 0.01}}


def test_results_table_sorts_by_score_marks_the_champion_and_names_outcomes() -> None:
    trials = [_trial("compare", "single_task/equal", 0.70, "r1"), _trial("compare", "mmoe/equal", 0.74, "r2"),
              _trial("compare", "ple/pcgrad", 0.72, "r3"), _trial("search", "mmoe/dwa", 0.75, "r4"),
              _trial("search", "ple/equal", 0.60, "r5", status="stopped")]
    lines = results_table(trials, {"r2": "good", "r3": "seesaw"}, trials[3], 0.86, ["like", "follow"])
    rows = [line for line in lines[2:] if line.startswith(("* ", "  compare", "  search"))]
    assert [r.split()[-1 if "(" not in r else -2] for r in rows[:5]] == ["good", "seesaw", "baseline", "-", "-"]
    assert rows[0].startswith("  compare  mmoe/equal") and "0.7400" in rows[0] and "0.7300" in rows[0]
    assert rows[3].startswith("* search   mmoe/dwa") and rows[4].endswith("(stopped)")
    assert any(line.startswith("  oracle") and "0.8600" in line for line in lines)


def test_check_submission_accepts_the_format_and_names_what_is_wrong(tmp_path: Path) -> None:
    requests = tmp_path / "test_a.csv"
    pd.DataFrame({"userid": [1, 2, 3], "feedid": [10, 20, 30], "device": [1, 2, 1]}).to_csv(requests, index=False)
    good = "userid,feedid,like,follow\n1,10,0.5,0.000001\n2,20,1,0\n3,30,0.25,0.123456\n"
    path = tmp_path / "submission.csv"
    path.write_text(good)
    check_submission(path, requests, ["like", "follow"])
    for bad, message in [(good.replace("2,20", "3,30", 1).replace("3,30,0.25", "2,20,0.25"), "in order"),
                         (good.replace("0.123456", "0.1234567"), "6 decimals"),
                         (good.replace("0.5", "1.5"), "outside"),
                         (good.replace("like,follow", "follow,like"), "columns")]:
        path.write_text(bad)
        with pytest.raises(DataError, match=message):
            check_submission(path, requests, ["like", "follow"])

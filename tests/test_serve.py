"""Registry, serving and batch scoring: the registered model loaded by alias in a fresh
process gives the in-memory model's probabilities on the preprocessed rows of the same requests
(unseen users and feeds included); the champion alias moves only on a better validation score;
``mlflow models serve`` round-trips and answers a malformed request with a 4xx and a message;
the batch submission keeps the input's rows and order with 6-decimal probabilities."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.data import arrow_to_batch, read_split
from pipeline.errors import ConfigError
from pipeline.serve import SCORE, write_model_dir
from pipeline.serve.registry import ALIAS, promotion_rule, register_model
from pipeline.train import TrainConfig, predict_batches, train_local

NAME = "mtlrank-test"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def registered(tiny_processed: Path, tmp_path_factory: pytest.TempPathFactory, one_torch_thread) -> dict:
    """A tiny model trained in-process and registered twice (the second time it does not beat the champion)."""
    root = tmp_path_factory.mktemp("registry")
    cfg = TrainConfig(epochs=1, batch_size=1024, torch_threads=1, log_every=1000)
    result = train_local(cfg, tiny_processed)
    model_dir = write_model_dir(root / "model", result.model, result.spec, cfg)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    first = register_model(model_dir, tiny_processed, NAME, uri, artifact_root=root / "mlartifacts")
    second = register_model(model_dir, tiny_processed, NAME, uri, artifact_root=root / "mlartifacts")
    return {"root": root, "uri": uri, "model": result.model, "spec": result.spec, "first": first, "second": second}


def _requests(tiny_processed: Path, tiny_raw: Path) -> tuple[pd.DataFrame, object]:
    """The raw test_a rows behind the preprocessed test split, and that split."""
    test = read_split(tiny_processed, "test")
    raw = pd.read_csv(tiny_raw / "test_a.csv")
    return raw.iloc[test["_row"].to_numpy() - 1].reset_index(drop=True), test


def test_promotion_rule_and_registry(registered: dict) -> None:
    import mlflow

    first, second = registered["first"], registered["second"]
    assert (first.version, first.promoted) == (1, True)
    assert (second.version, second.promoted, second.champion_version) == (2, False, 1)  # equal score: kept
    assert "champion kept" in second.decision and second.valid_score == first.valid_score
    client = mlflow.MlflowClient(registered["uri"])
    champ = client.get_model_version_by_alias(NAME, ALIAS)
    assert str(champ.version) == "1" and float(champ.tags["valid_score"]) == pytest.approx(first.valid_score, abs=1e-6)
    assert client.get_model_version(NAME, "2").tags["promotion"] == second.decision
    assert promotion_rule(0.61, 0.60)[0] and not promotion_rule(0.60, 0.60)[0] and promotion_rule(0.5, None)[0]
    logged = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=second.run_id, artifact_path="promotion.json",
                                                              tracking_uri=registered["uri"])).read_text())
    assert logged["promoted"] is False and logged["champion_before"]["version"] == 1


def test_alias_in_a_fresh_process_equals_the_in_memory_model(registered: dict, tiny_processed: Path, tiny_raw: Path) -> None:
    requests, test = _requests(tiny_processed, tiny_raw)
    spec = registered["spec"]
    vocab = {f.name: f.vocab_size for f in spec.sparse}
    unseen = (test["userid"].to_numpy() == vocab["userid"]) | (test["feedid"].to_numpy() == vocab["feedid"])
    assert unseen.any() and not unseen.all(), "the test day should hold unseen users/feeds and known ones"
    want, _, _ = predict_batches(registered["model"], [arrow_to_batch(test, spec)])
    path = registered["root"] / "requests.parquet"
    requests.to_parquet(path)
    script = (
        "import sys, mlflow, pandas as pd\n"
        f"m = mlflow.pyfunc.load_model('models:/{NAME}@{ALIAS}')\n"
        "out = m.predict(pd.read_parquet(sys.argv[1]))\n"
        "out.to_parquet(sys.argv[2])\n"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered["uri"], "PYTHONPATH": ""}  # the model's own code
    subprocess.run([sys.executable, "-c", script, str(path), str(registered["root"] / "out.parquet")], check=True,
                   env=env, cwd=registered["root"], timeout=300)
    got = pd.read_parquet(registered["root"] / "out.parquet")
    assert list(got.columns) == [*spec.tasks, SCORE] and len(got) == len(requests)
    np.testing.assert_allclose(got[spec.tasks].to_numpy(), want, rtol=0, atol=1e-6)
    # the fused score is the challenge-weighted product of the task probabilities
    official = {"read_comment": 4, "like": 3, "click_avatar": 2, "forward": 1, "favorite": 1, "comment": 1, "follow": 1}
    weights = np.array([official[t] for t in spec.tasks], dtype=np.float64)
    np.testing.assert_allclose(got[SCORE].to_numpy(), np.prod(want.astype(np.float64) ** weights, axis=1), rtol=1e-4)


def test_malformed_requests_are_clear_errors(registered: dict) -> None:
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(registered["uri"])
    m = mlflow.pyfunc.load_model(f"models:/{NAME}@{ALIAS}")
    for bad, pattern in [
        (pd.DataFrame({"userid": [1], "feedid": [2]}), "device"),
        (pd.DataFrame({"userid": pd.Series([], dtype="int64"), "feedid": pd.Series([], dtype="int64"),
                       "device": pd.Series([], dtype="int64")}), "empty"),
        (pd.DataFrame({"userid": ["abc"], "feedid": [2], "device": [1]}), "userid"),
    ]:
        with pytest.raises(MlflowException, match=pattern):
            m.predict(bad)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, payload: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_mlflow_models_serve_round_trip(registered: dict, tiny_processed: Path, tiny_raw: Path) -> None:
    import mlflow

    requests, _ = _requests(tiny_processed, tiny_raw)
    requests = requests.head(5)
    mlflow.set_tracking_uri(registered["uri"])
    want = mlflow.pyfunc.load_model(f"models:/{NAME}@{ALIAS}").predict(requests)
    port = _free_port()
    # the venv's bin on PATH (the server execs uvicorn), as with an activated venv
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered["uri"], "PYTHONPATH": "", "PATH": path}
    log = (registered["root"] / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}@{ALIAS}",
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                            env=env, cwd=registered["root"], stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(url + "/ping", timeout=2):
                    break
            except OSError:
                assert proc.poll() is None, (registered["root"] / "serve.log").read_text()[-3000:]
                assert time.time() < deadline, "server did not start"
                time.sleep(0.5)
        status, body = _post(url + "/invocations", {"dataframe_split": requests.to_dict(orient="split", index=False)})
        assert status == 200, body
        got = pd.DataFrame(body["predictions"])
        np.testing.assert_allclose(got[list(want.columns)].to_numpy(), want.to_numpy(), atol=1e-6)
        for payload, pattern in [
            ({"dataframe_split": {"columns": ["userid", "feedid"], "data": [[1, 2]]}}, "device"),
            ({"dataframe_split": {"columns": ["userid", "feedid", "device"], "data": []}}, "empty"),
            ({"dataframe_split": {"columns": ["userid", "feedid", "device"], "data": [["x", 2, 1]]}}, "userid"),
        ]:
            status, body = _post(url + "/invocations", payload)
            assert 400 <= status < 500, (status, body)
            assert re.search(pattern, body.get("message", ""), re.I), body
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_batch_predict_submission(registered: dict, tiny_raw: Path, ray_session, tmp_path: Path) -> None:
    from pipeline.cli import main
    from pipeline.predict import predict_file

    out = tmp_path / "submission.csv"
    report = predict_file(f"models:/{NAME}@{ALIAS}", tiny_raw / "test_a.csv", out, registered["uri"], batch_size=700)
    sub_text = out.read_text().splitlines()
    sub = pd.read_csv(out)
    raw = pd.read_csv(tiny_raw / "test_a.csv")
    tasks = registered["spec"].tasks
    assert list(sub.columns) == ["userid", "feedid", *tasks] and report["rows"] == len(raw) == len(sub)
    assert report["actors"] == 2  # one per CPU of the two one-CPU nodes; the model loads on the driver's
    assert sub[["userid", "feedid"]].equals(raw[["userid", "feedid"]])  # same rows, same order
    probs = sub[tasks].to_numpy()
    assert ((probs >= 0) & (probs <= 1)).all()
    assert all(re.fullmatch(r"\d+,\d+(,[01]\.\d{6}){%d}" % len(tasks), line) for line in sub_text[1:])
    import mlflow

    want = mlflow.pyfunc.load_model(f"models:/{NAME}@{ALIAS}").predict(raw)[tasks].to_numpy()
    np.testing.assert_allclose(probs, want, atol=5e-7 + 1e-9)
    # an actor can hold at most one node's CPUs: refused at once, not left waiting
    with pytest.raises(ConfigError, match="threads-per-actor 2: no Ray node has that many CPUs"):
        predict_file(f"models:/{NAME}@{ALIAS}", tiny_raw / "test_a.csv", out, registered["uri"], threads_per_actor=2)
    # a bad request file: one message naming file, column and row; exit status 2
    bad = tmp_path / "bad.csv"
    bad.write_text("userid,feedid,device\n1,2,1\n3,x,1\n")
    assert main(["predict", "--model", f"models:/{NAME}@{ALIAS}", "--input", str(bad), "--out", str(tmp_path / "s.csv"),
                 "--tracking-uri", registered["uri"]]) == 2


def test_submission_lines_equal_pandas_six_decimals() -> None:
    """The vectorised formatter writes pandas' ``%.6f`` text, including 0, 1 and halves of 1e-6
    that are exact in binary; values that are no probability are refused."""
    from pipeline.predict import fixed_decimals, submission_lines

    rng = np.random.default_rng(0)
    probs = rng.random((5000, 3)) ** 3  # many small values: leading zeros in the decimals
    probs[:8, 0] = [0.0, 1.0, 0.5, 1e-7, 0.9999996, 0.0000015, 0.25, 0.125]
    keep = {"userid": rng.integers(0, 10**9, 5000), "feedid": np.arange(5000)}
    frame = pd.DataFrame({**keep, **{f"t{k}": probs[:, k] for k in range(3)}})
    want = frame.to_csv(index=False, header=False, float_format="%.6f")
    assert submission_lines(keep, probs) == want
    assert submission_lines(keep, probs[:0]) == ""
    for bad in (np.nan, -1e-9, 1.0 + 1e-9):
        with pytest.raises(ValueError, match="no probability"):
            fixed_decimals(np.array([0.5, bad]))

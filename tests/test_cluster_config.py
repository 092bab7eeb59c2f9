"""cluster.yaml passes Ray's own cluster-config checks (offline: defaults merged from Ray's AWS
defaults, the JSON schema, the node-type checks; no AWS call, no credentials) and
configs/train/aws.yaml is a valid train job that asks for GPUs and keeps checkpoints on S3."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def _prepared(config: dict[str, Any]) -> dict[str, Any]:
    """What ``ray up`` checks before it calls the provider (which needs AWS)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_ray_validation(cluster: dict[str, Any]) -> None:
    cfg = _prepared(cluster)
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and not head["node_config"]["InstanceType"].startswith(("g", "p"))
    gpu = [t for name, t in types.items() if name != cfg["head_node_type"] and t["resources"].get("GPU", 0) > 0]
    assert len(gpu) == 1 and gpu[0]["min_workers"] == 0 < gpu[0]["max_workers"] <= cfg["max_workers"]  # autoscaling
    assert gpu[0]["node_config"]["IamInstanceProfile"]["Arn"]  # workers write checkpoints to S3


def test_setup_installs_torch_before_the_project(cluster: dict[str, Any]) -> None:
    cfg = _prepared(cluster)
    for commands in (cfg["head_setup_commands"], cfg["worker_setup_commands"]):  # setup_commands merged in
        torch = next(i for i, c in enumerate(commands) if "torch==2.13.0" in c)
        project = next(i for i, c in enumerate(commands) if "pip install" in c and "-e ." in c)
        assert torch < project
    synced = [remote for remote, local in cfg["file_mounts"].items() if local == "."]
    assert synced and f"cd {synced[0]} &&" in cfg["setup_commands"][1]
    assert any("mlflow server" in c and "--port 5000" in c for c in cfg["head_start_ray_commands"])


def test_ray_validation_rejects_a_broken_config(cluster: dict[str, Any]) -> None:
    """The checks above can fail: a misspelt key and a head type that does not exist."""
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        _prepared({**cluster, "max_worker": 4})
    with pytest.raises(ValueError, match="head_node_type"):
        _prepared({**cluster, "head_node_type": "missing"})


def test_aws_train_config_is_a_gpu_job_with_s3_storage() -> None:
    from pipeline.config import load_config
    from pipeline.train.config import TrainJobConfig

    job = load_config(TrainJobConfig, ROOT / "configs" / "train" / "aws.yaml",
                      ["mlflow.tracking_uri=http://10.0.0.1:5000"])
    assert job.scaling.use_gpu is True  # not "auto": no GPU is visible before the autoscaler adds one
    assert job.storage_path is not None and job.storage_path.startswith("s3://")
    assert job.mlflow.tracking_uri == "http://10.0.0.1:5000"

"""Shared fixtures. Ray is started at most once per test session (``ray_session``), bound to
127.0.0.1 with 2 CPUs and no dashboard; only tests that ask for it pay the start-up."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DISABLE_IMPORT_WARNING", "1")

# Ray prints internal deprecation warnings (exclude_resources, use_polars, ...): filter them.
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray(\..*)?")
warnings.filterwarnings("ignore", category=FutureWarning, module=r"ray(\..*)?")


#: the session cluster's dashboard (its job server), set by ``ray_session``
DASHBOARD: dict[str, str] = {}


@pytest.fixture(scope="session")
def ray_job_address(ray_session) -> str:
    """The job-submission address of the session's cluster (for ``ray job submit`` tests)."""
    if "url" not in DASHBOARD:
        pytest.skip("Ray was started outside this test session (no known job server)")
    return DASHBOARD["url"]


@pytest.fixture(scope="session")
def ray_session():
    """Ray for the whole test session on a simulated two-node cluster (``ray.cluster_utils``:
    a head and a worker node, one CPU each, 127.0.0.1, the head's dashboard for the State API), so that nothing a test
    checks can depend on work happening on the driver's node; shut down at the end."""
    import ray
    from ray.cluster_utils import Cluster

    from pipeline.ray_runtime import free_port

    cluster = None
    if not ray.is_initialized():
        os.environ["RAY_NODE_IP_ADDRESS"] = "127.0.0.1"  # Cluster's own node_ip_address breaks its address
        node = {"num_cpus": 1, "include_dashboard": False}
        # the head serves Ray's State API, and the job's processes are told where (Ray Train's
        # placement-group cleaner needs it when Tune stops a trial: see pipeline.ray_runtime)
        port = free_port()
        # and its dashboard agent off Ray's default port (52365), which a head started by a CLI
        # test needs for its job agent
        head = {**node, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port,
                "dashboard_agent_listen_port": free_port()}
        cluster = Cluster(initialize_head=True, head_node_args=head)
        cluster.add_node(**node)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False,
                 runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}})
        DASHBOARD["url"] = f"http://127.0.0.1:{port}"
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # keep failure reports readable
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = True
    yield ray
    if cluster is not None:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="session")
def tiny_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated tiny WeChat-format raw directory (real file names, columns and formats)."""
    from pipeline.generate import generate

    return Path(generate(tmp_path_factory.mktemp("raw") / "tiny", scale="tiny", seed=0))


@pytest.fixture(scope="session")
def tiny_processed(tiny_raw: Path, ray_session, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_raw`` preprocessed with ``configs/datasets/wechat.yaml``."""
    from pipeline.config import load_config
    from pipeline.datasets import DatasetConfig
    from pipeline.preprocess import DEFAULT_CONFIG, preprocess

    out = tmp_path_factory.mktemp("processed") / "tiny"
    preprocess(load_config(DatasetConfig, DEFAULT_CONFIG), tiny_raw, out)
    return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: one intra-op thread (2-thread parallel regions on a loaded 2-core
    machine cost milliseconds per op)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

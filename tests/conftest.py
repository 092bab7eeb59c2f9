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


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray for the whole session (2 CPUs, 127.0.0.1, no dashboard); shut down at the end."""
    import ray

    started = False
    if not ray.is_initialized():
        ray.init(
            address="local",  # never join a head someone runs on this machine (it rejects num_cpus)
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            _node_ip_address="127.0.0.1",
        )
        started = True
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # keep failure reports readable
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = True
    yield ray
    if started:
        ray.shutdown()


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

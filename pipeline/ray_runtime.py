"""Where a stage's Ray comes from: a cluster only when told, otherwise a fresh local Ray.

``ray.init()`` with no address silently joins any head already running on the machine (and
then rejects ``num_cpus``); a stage run from a shell must not do that. So:

- ``address`` given (``--address``) or ``RAY_ADDRESS`` set (``ray job submit`` sets it for the
  job's driver): join that cluster; ``num_cpus`` is the cluster's business and is ignored;
- otherwise: start a private local Ray (``address="local"``) bound to 127.0.0.1.

Example:
    >>> # ensure_ray(num_cpus=2)        # local
    >>> # ensure_ray(address="auto")    # the running cluster
"""

from __future__ import annotations

import logging
import os
import warnings


def ensure_ray(num_cpus: int | None = None, address: str | None = None, state_api: bool = False,
               object_store_memory: int | None = None) -> None:
    """Start or join Ray unless it is already initialised in this process; quiet Ray Data.

    Args:
        num_cpus: CPUs of a local Ray (default: all); must be positive.
        address: a cluster address (``"auto"``, ``"ray://host:10001"``, ``"127.0.0.1:6379"``);
            default ``RAY_ADDRESS`` or, if unset, a new local Ray.
        state_api: a local Ray gets the dashboard (which serves Ray's State API) and every
            process of the job is told its address. Ray Train's placement-group cleaner asks the
            State API whether a controller is alive: without it, the workers' CPUs of a trial
            that Tune stops (ASHA) are never given back. Told explicitly because, with other
            Ray instances on the machine, the State API client would pick the latest one.
        object_store_memory: bytes of a local Ray's object store (default: Ray's, ~30 % of
            RAM); smaller makes large datasets spill to disk sooner instead of filling memory.
    """
    import ray

    if num_cpus is not None and num_cpus < 1:
        raise ValueError(f"num_cpus must be a positive number of CPUs, got {num_cpus}")
    if not ray.is_initialized():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray(\..*)?")
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"ray(\..*)?")
        address = address or os.environ.get("RAY_ADDRESS") or None
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            extra: dict[str, object] = {"include_dashboard": False}
            if state_api:
                port = free_port()
                extra = {"include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port,
                         "runtime_env": {"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}}}
            ray.init(address="local", num_cpus=num_cpus, log_to_driver=False, _node_ip_address="127.0.0.1",
                     object_store_memory=object_store_memory, **extra)
    quiet_ray_data()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def quiet_ray_data() -> None:
    """Ray Data settings every stage wants: order kept, no progress bars or start-up banners."""
    import ray

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False

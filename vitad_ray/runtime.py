"""Connecting to Ray: an existing cluster (address or RAY_ADDRESS) or a local one on 127.0.0.1."""

from __future__ import annotations

import os


def init_ray(address: str | None = None, num_cpus: int | None = None, quiet: bool = True):
    """Join ``address`` (or RAY_ADDRESS); otherwise start a local single-node cluster.

    A local cluster started here keeps Ray's usage statistics off and, unless the caller chose an
    auth mode, runs without token auth: it is reachable from this machine only.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import logging

    import ray

    logging.getLogger("ray.data").setLevel(logging.WARNING)

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs = {"log_to_driver": not quiet, "logging_level": "WARNING"}
    if address:
        ray.init(address=address, **kwargs)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    return ray

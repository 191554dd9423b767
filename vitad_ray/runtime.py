"""Connecting to Ray: an existing cluster (address or RAY_ADDRESS) or a local one on this machine."""

from __future__ import annotations

import contextlib
import os


def direct_ingress_env(port: int) -> dict[str, str]:
    """Environment of a cluster whose Serve ingress replicas answer HTTP themselves.

    With Serve's direct ingress each ingress replica listens on a port of its own (``port``
    upwards, bound to the app's host), so a request skips the proxy's hop and the replica's
    call back to the proxy for the body (about 20 ms of a lone frame here). Serve reads these
    in its controller and replicas: they must be set where the cluster starts.
    """
    return {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 63),
            # Serve keeps a stopping ingress replica for 30 s so that a load balancer in front
            # can notice; nothing balances a replica port of a local cluster.
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}


# A local cluster's node agent serves Prometheus metrics on every interface without a token
# (deployment names, routes, request counts, the node's address); the raylet reads this and
# starts the agent without that server.
LOCAL_CLUSTER_ENV = {"RAY_enable_metrics_collection": "0"}


@contextlib.contextmanager
def environment(values: dict[str, str]):
    """``values`` in os.environ for the block (the processes a cluster start spawns inherit
    them), then as before."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def init_ray(address: str | None = None, num_cpus: int | None = None, quiet: bool = True,
             direct_ingress_port: int | None = None):
    """Join ``address`` (or RAY_ADDRESS); otherwise start a local single-node cluster.

    A local cluster started here keeps Ray's usage statistics off and keeps Ray's token auth
    (on by default for local clusters since Ray 2.59; ``RAY_AUTH_MODE=disabled`` turns it off):
    Ray's core processes listen on every interface, not on 127.0.0.1 alone, so without the token
    anyone who reaches this machine could run code on the cluster. With ``direct_ingress_port``
    it runs Serve's direct ingress from that port up (``direct_ingress_env``); a cluster joined
    keeps the settings it was started with.
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
        env = dict(LOCAL_CLUSTER_ENV)
        if direct_ingress_port:
            env.update(direct_ingress_env(direct_ingress_port))
        with environment(env):
            start_local(num_cpus, **kwargs)
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    return ray


def start_local(num_cpus: int | None, attempts: int = 2, **kwargs) -> None:
    """A new local cluster of this process's own (``address="local"``: not one a ``ray start``
    left running, which ``ray.init()`` would join). A start that times out on a loaded machine
    (the raylet waits for its agent, then gives up) is tried again once."""
    import ray

    for attempt in range(1, attempts + 1):
        try:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **kwargs)
            return
        except Exception as exc:  # noqa: BLE001 - Ray raises plain Exceptions on a failed start
            ray.shutdown()
            if attempt == attempts:
                raise RuntimeError(f"Ray's local cluster did not start ({attempts} tries): "
                                   f"{exc}. The machine may be busy: run again, or join a "
                                   "running cluster with --address") from None
            print(f"Ray's local cluster did not start ({exc}); trying again", flush=True)

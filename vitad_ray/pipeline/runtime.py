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
# starts the agent without that server. On a loaded machine the node agent and the first workers
# can take longer to register than Ray's 30 s and 60 s, and the raylet then gives up the start.
LOCAL_CLUSTER_ENV = {"RAY_enable_metrics_collection": "0",
                     "RAY_agent_register_timeout_ms": "120000",
                     "RAY_worker_register_timeout_seconds": "180"}

# Runs in every worker process of the jobs vitad starts, Serve's proxy and replicas included.
WORKER_SETUP_HOOK = "vitad_ray.pipeline.runtime.bounded_http_headers"


def bounded_http_headers() -> None:
    """Serve's HTTP servers (uvicorn) parse requests with h11, not httptools.

    httptools reads request headers of any size before the app sees them (an unauthenticated
    32 MiB header is read whole); h11 refuses a request whose headers pass uvicorn's bound
    (tens of KiB) with a 400 as soon as it passes it. Serve builds its uvicorn servers with
    ``http="auto"``, which this points at h11.
    """
    import uvicorn.config

    uvicorn.config.HTTP_PROTOCOLS["auto"] = uvicorn.config.HTTP_PROTOCOLS["h11"]


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
             direct_ingress_port: int | None = None, temp_dir: str | None = None):
    """Join ``address`` (or RAY_ADDRESS); otherwise start a local single-node cluster.

    A local cluster started here keeps Ray's usage statistics off and keeps Ray's token auth
    (on by default for local clusters since Ray 2.59; ``RAY_AUTH_MODE=disabled`` turns it off):
    Ray's core processes listen on every interface, not on 127.0.0.1 alone, so without the token
    anyone who reaches this machine could run code on the cluster. With ``direct_ingress_port``
    it runs Serve's direct ingress from that port up (``direct_ingress_env``); a cluster joined
    keeps the settings it was started with. Either way the job's workers run
    ``bounded_http_headers``.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import logging

    import ray

    logging.getLogger("ray.data").setLevel(logging.WARNING)

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    if quiet:  # Ray's notes while it starts (token auth on, and so on) stay off the console too
        _console_errors_only()
    kwargs = {"log_to_driver": not quiet, "logging_level": "WARNING",
              "runtime_env": {"worker_process_setup_hook": WORKER_SETUP_HOOK}}
    if address:
        # The driver's core worker prints its connection retries' warnings on the console.
        with environment({"RAY_BACKEND_LOG_LEVEL": "error"} if quiet else {}):
            join(address, **kwargs)
    else:
        env = dict(LOCAL_CLUSTER_ENV)
        if direct_ingress_port:
            env.update(direct_ingress_env(direct_ingress_port))
        with environment(env):
            start_local(num_cpus, _temp_dir=temp_dir, **kwargs)
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    if quiet:
        _log_to_file()
    return ray


def join(address: str, **kwargs) -> None:
    """Connect to the cluster at ``address``. Nothing listening there is said at once (Ray
    itself retries for about half a minute); a refused connection says how token
    authentication is given, since Ray's own error names neither."""
    import ray

    gcs = _host_port(address)
    if gcs and not _listening(*gcs):
        raise RuntimeError(f"nothing answers at {address}: start the cluster there (`ray start "
                           "--head`) or give the right --address / RAY_ADDRESS")
    try:
        ray.init(address=address, **kwargs)
    except Exception as exc:  # noqa: BLE001 - Ray raises plain Exceptions on a failed connect
        ray.shutdown()
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
            hint = ("; check that RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token) "
                    "holds this cluster's token")
        else:
            hint = ("; if the cluster runs Ray's token authentication (local clusters of Ray "
                    ">= 2.59 do), set RAY_AUTH_MODE=token and its token in RAY_AUTH_TOKEN (or "
                    "RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)")
        raise RuntimeError(f"could not join the Ray cluster at {address}: {text}{hint}") from None


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a GCS address such as ``10.0.0.5:6379``; None for ``auto``, Ray Client
    (``ray://``) and anything else Ray resolves itself."""
    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _listening(host: str, port: int, timeout_s: float = 5.0) -> bool:
    import socket

    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def start_local(num_cpus: int | None, attempts: int = 2, **kwargs) -> None:
    """A new local cluster of this process's own (``address="local"``: not one a ``ray start``
    left running, which ``ray.init()`` would join). A start that times out on a loaded machine
    (the raylet waits for its agent, then gives up) is tried again once. The processes a failed
    start left behind (GCS, raylet, agents: children of this process) are killed before the
    next try and before the error."""
    import ray

    for attempt in range(1, attempts + 1):
        before = _child_pids()
        try:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **kwargs)
            return
        except Exception as exc:  # noqa: BLE001 - Ray raises plain Exceptions on a failed start
            ray.shutdown()
            _kill_children(exclude=before)
            if attempt == attempts:
                tries = f"{attempts} tries" if attempts > 1 else "1 try"
                raise RuntimeError(f"Ray's local cluster did not start ({tries}): "
                                   f"{exc}. The machine may be busy: run again, or join a "
                                   "running cluster with --address") from None
            print(f"Ray's local cluster did not start ({exc}); trying again", flush=True)


def _child_pids() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)}


def _kill_children(exclude: set[int], wait_s: float = 10.0) -> None:
    """SIGKILL this process's descendants not in ``exclude``, and reap them."""
    import psutil

    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in exclude]
    for proc in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(left, timeout=wait_s)


_LOG_FILE: list[str] = []


def ray_log_file() -> str | None:
    """Where Ray's messages to this driver go while ``init_ray(quiet=True)`` holds: a file in
    the cluster session's log folder, beside the logs of Ray's own processes."""
    return _LOG_FILE[0] if _LOG_FILE else None


def _log_to_file() -> None:
    """Ray's Python loggers write to ``ray_log_file()`` instead of the console, where a
    command's own lines and errors stay readable; errors still reach the console too."""
    import logging

    import ray

    try:
        logs = ray._private.worker.global_worker.node.get_logs_dir_path()
    except Exception:  # noqa: BLE001 - a Ray Client connection has no local session folder
        return
    path = os.path.join(logs, f"vitad-{os.getpid()}.log")
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for logger in _console_errors_only():
        if logger.name == "ray" or not logger.propagate:
            logger.addHandler(handler)
    logging.getLogger("ray").setLevel(logging.INFO)
    _LOG_FILE[:] = [path]


def _console_errors_only() -> list:
    """Ray's loggers, their console handlers raised to errors; returns the loggers."""
    import logging

    loggers = [logging.getLogger(n) for n in ("ray", "ray.data", "ray.serve", "ray.train",
                                               "ray.tune")]
    for logger in loggers:
        for h in logger.handlers:
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                h.setLevel(logging.ERROR)
    return loggers

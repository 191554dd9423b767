"""Submit a `vitad` step to a Ray cluster as a job (the Job API of its dashboard)."""

from __future__ import annotations

import os
import shlex
import time

STEPS = ("embed", "fit", "score", "evaluate", "serve-deploy")


def entry_point(step: str) -> str:
    return f"jobs/{step.replace('-', '_')}.py"
_FINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def submit_step(dashboard: str, step: str, args: list[str], working_dir: str = ".",
                env_vars: dict | None = None, wait: bool = True, timeout_s: float = 24 * 3600,
                echo=print) -> tuple[str, str, str]:
    """Submit `python jobs/<step>.py ARGS` (``serve-deploy``: jobs/serve_deploy.py) with the
    working dir shipped along.

    Returns (job id, final status, logs); with ``wait=False`` the status is the first one seen.
    """
    from ray.job_submission import JobSubmissionClient

    if step not in STEPS:
        raise ValueError(f"step must be one of {STEPS}, got {step!r}")
    if not os.path.isfile(os.path.join(working_dir, entry_point(step))):
        raise FileNotFoundError(f"{working_dir} holds no {entry_point(step)}: give the "
                                "repository root")
    env = {"RAY_USAGE_STATS_ENABLED": "0"}
    if os.environ.get("HF_HUB_OFFLINE"):
        env["HF_HUB_OFFLINE"] = os.environ["HF_HUB_OFFLINE"]
    env.update(env_vars or {})
    client = JobSubmissionClient(dashboard)
    job = client.submit_job(entrypoint=shlex.join(["python", entry_point(step), *args]),
                            runtime_env={"working_dir": working_dir, "env_vars": env})
    echo(f"submitted {job} to {dashboard}: vitad {step} {shlex.join(args)}")
    status = str(client.get_job_status(job).value)
    shown = 0
    deadline = time.time() + timeout_s
    while wait and status not in _FINAL and time.time() < deadline:
        time.sleep(0.5)  # two status and log calls to the dashboard: logs show up as written
        status = str(client.get_job_status(job).value)
        logs = client.get_job_logs(job)
        if len(logs) > shown:
            echo(logs[shown:].rstrip("\n"))
            shown = len(logs)
    logs = client.get_job_logs(job)
    if len(logs) > shown:
        echo(logs[shown:].rstrip("\n"))
    echo(f"job {job}: {status}")
    return job, status, logs

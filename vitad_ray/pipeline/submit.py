"""Submit a `vitad` step to a Ray cluster as a job (the Job API of its dashboard)."""

from __future__ import annotations

import asyncio
import os
import shlex
import time

STEPS = ("embed", "fit", "score", "evaluate", "serve-deploy")


def entry_point(step: str) -> str:
    return f"jobs/{step.replace('-', '_')}.py"
_FINAL = ("SUCCEEDED", "FAILED", "STOPPED")


async def _follow_logs(client, job: str, echo, timeout_s: float) -> str:
    """The job's log, echoed as the dashboard streams it, until the job ends (or the timeout)."""
    chunks: list[str] = []

    async def tail():
        async for chunk in client.tail_job_logs(job):
            chunks.append(chunk)
            echo(chunk.rstrip("\n"))

    try:
        await asyncio.wait_for(tail(), timeout_s)
    except TimeoutError:
        pass
    return "".join(chunks)


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
    deadline = time.time() + timeout_s
    if wait:
        logs = asyncio.run(_follow_logs(client, job, echo, timeout_s))
        status = str(client.get_job_status(job).value)
        while status not in _FINAL and time.time() < deadline:  # the log ends just before
            time.sleep(0.2)
            status = str(client.get_job_status(job).value)
    else:
        status, logs = str(client.get_job_status(job).value), client.get_job_logs(job)
    echo(f"job {job}: {status}")
    return job, status, logs

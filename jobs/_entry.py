"""Shared start of the job entry points: run one `vitad` step inside a Ray job.

`ray job submit` sets RAY_ADDRESS for the entrypoint, so the step joins the cluster it was
submitted to; the working directory shipped with the job holds this repository.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(step: str) -> None:
    from vitad_ray.cli.main import main

    sys.exit(main([step, *sys.argv[1:]]))

import os
import tempfile

# Before transformers/timm/ray are imported anywhere: no hub traffic, no Ray token auth on the
# local test clusters (they bind to this machine only), no usage reporting.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DINOV2_S = SHARED / "models" / "dinov2-small-imgfocus"


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray cluster (2 CPUs) for the whole session."""
    import ray

    from vitad_ray.runtime import init_ray

    temp = tempfile.mkdtemp(prefix="vitad-ray-")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, log_to_driver=False,
                 logging_level="WARNING")
    init_ray()  # applies the project's Ray Data settings to this session
    yield ray
    ray.shutdown()

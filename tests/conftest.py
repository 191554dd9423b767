import os
import tempfile

# Before transformers/timm/ray are imported anywhere: no hub traffic, no Ray token auth on the
# local test clusters (they bind to this machine only), no usage reporting.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import csv  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from .ports import free_port  # noqa: E402
from .tiny_scene import FRAMES, TEST_CLIPS, TRAIN_CLIPS  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DINOV2_S = SHARED / "models" / "dinov2-small-imgfocus"


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray cluster (2 CPUs) for the whole session, running Serve's direct ingress
    (the endpoint tests call both the proxy and the ingress replica), started as `vitad` starts
    one: settings for a slow start, one retry, nothing left behind by a failed try."""
    import ray

    from vitad_ray.pipeline.runtime import init_ray

    if not ray.is_initialized():
        init_ray(num_cpus=2, direct_ingress_port=free_port(),
                 temp_dir=tempfile.mkdtemp(prefix="vitad-ray-"))
    init_ray()  # applies the project's Ray Data settings to a session started elsewhere
    yield ray
    ray.shutdown()


# --- one tiny fitted model for the whole session: generated scene -> embed -> fit (2 shards) ----
# It is also the one-node reference the multi-node and killed-fit tests compare their runs with.


@pytest.fixture(scope="session")
def scene(tmp_path_factory):
    from vitad_ray.data.frames import items_from_manifest, items_from_videos
    from vitad_ray.data.synthetic import SceneConfig, generate_scene

    root = tmp_path_factory.mktemp("scene")
    paths = generate_scene(root, SceneConfig(train_clips=TRAIN_CLIPS, test_clips=TEST_CLIPS,
                                             frames_per_clip=FRAMES, seed=1))
    # One unreadable frame in the test manifest: it must be reported and skipped.
    (root / "test" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with open(paths["test_manifest"], "a", newline="") as fh:
        csv.writer(fh).writerow(["test", "01", 999, 1, "test/broken.jpg"])
    items = items_from_videos([paths["train_videos"]], "train", label=0, fps=0) + \
        items_from_manifest(paths["test_manifest"])
    return {"root": root, "items": items, "manifest": paths["test_manifest"]}


@pytest.fixture(scope="session")
def embedded(ray_local, scene, tmp_path_factory):
    from vitad_ray.pipeline.embed import BackboneChoice, run_embedding

    from vitad_ray.detect import DEFAULT

    out = tmp_path_factory.mktemp("emb")
    choices = [BackboneChoice("tiny-dinov2"), BackboneChoice("tiny-ijepa")]
    # As `vitad embed` does by default: the training frames also get the default recipe's views.
    zooms = DEFAULT.zoom_views
    result = run_embedding(scene["items"], choices, out, batch_size=16, show_progress=False,
                           zooms=zooms)
    return {"out": out, "result": result, "choices": choices, "zooms": zooms}


@pytest.fixture(scope="session")
def model(embedded, tmp_path_factory):
    from vitad_ray.pipeline.fit import FitConfig, fit_model

    model_dir = tmp_path_factory.mktemp("model")
    cfg = FitConfig(n_shards=2)
    result = fit_model(embedded["out"] / "tiny-dinov2", model_dir, cfg, show_progress=False)
    return {"dir": model_dir, "result": result, "cfg": cfg}


@pytest.fixture(scope="session")
def scored(model, embedded, tmp_path_factory):
    """`vitad score` (exact path) of the test split, as a user runs it: the table the pipeline
    test checks and the serve tests compare the endpoint's answers with."""
    from vitad_ray.cli.main import main
    from vitad_ray.pipeline.score import read_scores

    out = tmp_path_factory.mktemp("scores") / "scores.parquet"
    assert main(["score", str(model["dir"]), str(embedded["out"] / "tiny-dinov2"),
                 "--out", str(out), "--split", "test", "--index", "exact"]) == 0
    df, arrays = read_scores(out)
    return {"path": out, "df": df, "arrays": arrays}

"""`vitad update` on the session's tiny scene, through the commands: new normal clips added to a
fitted model give the model a fit on every clip gives. Its own module: the endpoint of the
recipe pipeline's tests holds the cluster's CPUs until its module ends, and a fit needs them."""

import time
from pathlib import Path

import numpy as np
import pytest

from vitad_ray.cli.main import main
from vitad_ray.pipeline.score import read_scores
from vitad_ray.storage.modeldir import read_model_json

from ...ports import free_port
from ...tiny_scene import FRAMES, TRAIN_CLIPS

pytestmark = pytest.mark.integration


class TrainClips:
    """The session's default-backbone embeddings, cut by training clip into new folders."""

    def __init__(self, embedded, tmp_path):
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        self.folder, self.tmp_path = embedded["out"] / "tiny-dinov2", tmp_path
        self.table = pq.read_table(sorted(self.folder.glob("part-*.parquet")))
        train = self.table.filter(pc.equal(self.table["split"], "train"))
        self.clips = sorted(set(train["clip"].to_pylist()))
        # Leave-one-clip-out over 2 clips, as over the 4 later.
        self.recipe = tmp_path / "two.yaml"
        self.recipe.write_text("base: default\nloo_min_clips: 2\n")

    def subset(self, name, keep):
        import shutil

        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        out = self.tmp_path / name
        out.mkdir()
        pq.write_table(self.table.filter(pc.is_in(self.table["clip"], pa.array(keep))),
                       out / "part-00000.parquet")
        shutil.copy(self.folder / "_metadata.json", out)
        return out


@pytest.fixture(scope="module")
def two_clips(embedded, ray_local, tmp_path_factory):
    """The default recipe fitted on the first 2 training clips; each test updates a copy."""
    cut = TrainClips(embedded, tmp_path_factory.mktemp("two-clips"))
    model = cut.tmp_path / "model"
    assert main(["fit", str(cut.subset("first", cut.clips[:2])), "--out", str(model),
                 "--recipe", str(cut.recipe)]) == 0
    return model


def _copy(model, tmp_path):
    import shutil

    return Path(shutil.copytree(model, tmp_path / "model"))


def test_vitad_update_adds_clips_as_a_fit_on_all_of_them(embedded, two_clips, tmp_path,
                                                         capsys):
    """`vitad update` with new normal clips gives the model a fit on every clip gives: the same
    memory, calibration, threshold and scores; model.json's version goes up."""
    cut = TrainClips(embedded, tmp_path)
    default_embeddings, clips, recipe = cut.folder, cut.clips, cut.recipe
    assert len(clips) == TRAIN_CLIPS
    model, full = _copy(two_clips, tmp_path), tmp_path / "full"
    new = cut.subset("second", clips[2:])
    assert main(["update", str(model), "--embeddings", str(new)]) == 0
    assert "to version 2" in capsys.readouterr().out
    assert main(["fit", str(default_embeddings), "--out", str(full), "--recipe", str(recipe)]) == 0
    got, want = read_model_json(model), read_model_json(full)
    assert got["version"] == 2 and got["updates"][0]["clips"] == clips[2:]
    assert got["train"]["n_frames"] == want["train"]["n_frames"] == TRAIN_CLIPS * FRAMES
    assert got["train"]["n_views"] == want["train"]["n_views"] > 0
    assert got["thresholds"]["frame"] == pytest.approx(want["thresholds"]["frame"], rel=1e-5)
    for stream in want["detector"]["streams"]:
        folder = "detector/" + stream
        np.testing.assert_array_equal(np.load(model / folder / "memory.npy"),
                                      np.load(full / folder / "memory.npy"))
        np.testing.assert_allclose(np.load(model / folder / "train_scores.npy"),
                                   np.load(full / folder / "train_scores.npy"), rtol=1e-5,
                                   atol=1e-5)
    scores = {}
    for name, folder in (("updated", model), ("full", full)):
        out = tmp_path / f"{name}.parquet"
        assert main(["score", str(folder), str(default_embeddings), "--out", str(out),
                     "--split", "test"]) == 0
        scores[name] = read_scores(out)[0]
    np.testing.assert_allclose(scores["updated"]["frame_score"], scores["full"]["frame_score"],
                               atol=1e-4)
    # The same clips again: refused, the model untouched.
    assert main(["update", str(model), "--embeddings", str(new)]) == 2
    assert "already" in capsys.readouterr().err
    assert read_model_json(model)["version"] == 2


def test_a_served_model_takes_feedback_and_its_update_without_a_restart(embedded, scene,
                                                                        two_clips, tmp_path,
                                                                        capsys):
    """Frames posted to /v1/streams/{id}/normal are queued in the model directory; `vitad update
    MODEL --feedback` embeds and adds them; the running endpoint then answers with the new
    version, as `vitad score` of the updated model does."""
    import httpx
    from ray import serve

    from vitad_ray.data.frames import items_from_manifest, sample_video
    from vitad_ray.serve.app import MODEL_CHECK_S, ServeConfig, start, wait_until_running
    from vitad_ray.serve.watch import encode_png
    from vitad_ray.storage.feedback import FEEDBACK_DIR, queued_clips

    cut = TrainClips(embedded, tmp_path)
    model = _copy(two_clips, tmp_path)  # fitted before the endpoint: a fit needs the CPUs
    test = next(it for it in items_from_manifest(scene["manifest"]) if it["frame_index"] == 3)
    frame = [("images", ("f.png", open(test["path"], "rb").read(), "image/png"))]
    video = next((scene["root"] / "train").glob(f"{cut.clips[2]}.*"))
    normal = [encode_png(rgb) for _, _, rgb in sample_video(str(video), None)][:12]
    cfg = ServeConfig(models={"cam": str(model)}, shards=1, port=free_port(), embed_threads=1,
                      embed_cpus=0.1, shard_cpus=0.1, ingress_cpus=0.1, request_timeout_s=60)
    url = start(cfg)
    try:
        assert wait_until_running(timeout_s=300) == []
        with httpx.Client(base_url=url, timeout=60) as client:
            before = client.post("/v1/detect", files=frame).json()
            assert before["version"] == 1
            files = [("images", (f"{i}.png", data, "image/png")) for i, data in enumerate(normal)]
            queued = client.post("/v1/streams/gate/normal", files=files)
            assert queued.status_code == 202, queued.text
            assert queued.json()["queued"] == len(normal)
            assert queued_clips(model) == [queued.json()["clip"]]
            broken = client.post("/v1/streams/gate/normal", files=[
                ("images", ("x.png", b"not an image", "image/png"))])
            assert broken.status_code == 422 and queued_clips(model) == [queued.json()["clip"]]
            assert main(["update", str(model), "--feedback"]) == 0
            assert "to version 2" in capsys.readouterr().out
            assert queued_clips(model) == []
            assert (model / FEEDBACK_DIR / "applied" / queued.json()["clip"]).is_dir()
            time.sleep(MODEL_CHECK_S + 0.5)
            info = client.get("/v1/model").json()
            assert info["version"] == 2 and info["updates"][0]["frames"] == len(normal)
            after = client.post("/v1/detect", files=frame).json()
            assert after["version"] == 2 and after["model_id"] != before["model_id"]
    finally:
        serve.shutdown()
    out = tmp_path / "scores.parquet"
    assert main(["score", str(model), str(cut.folder), "--out", str(out), "--split", "test"]) == 0
    df = read_scores(out)[0]
    want = df[df["frame_id"] == f"{test['clip']}/3"]["evidence_appearance"].iloc[0]
    got = after["results"][0]["evidence"]["appearance"]
    assert got == pytest.approx(float(want), abs=1e-4)
    assert got != pytest.approx(before["results"][0]["evidence"]["appearance"], abs=1e-6)


def _three_kinds_of_normal(table, seed=0):
    """The table with its vectors replaced by a scene of three kinds of normal frame (every
    scope's vectors in three tight, well-apart clusters, by frame index): a scene whose clusters
    a refit finds again, so an update must give them exactly."""
    import pyarrow as pa

    n = table.num_rows
    dim = table.schema.field("global").type.list_size
    patches = table.schema.field("local").type.list_size
    rng = np.random.default_rng(seed)
    centres = 4.0 * rng.normal(size=(3, 1 + patches, dim)).astype(np.float32)
    kind = np.asarray(table["frame_index"].to_pylist()) % 3
    vectors = centres[kind] + 0.05 * rng.normal(size=(n, 1 + patches, dim)).astype(np.float32)
    glob = pa.FixedSizeListArray.from_arrays(pa.array(vectors[:, 0].ravel()), dim)
    local = pa.FixedSizeListArray.from_arrays(
        pa.FixedSizeListArray.from_arrays(pa.array(vectors[:, 1:].ravel()), dim), patches)
    table = table.set_column(table.schema.get_field_index("global"), "global", glob)
    return table.set_column(table.schema.get_field_index("local"), "local", local)


def test_vitad_update_of_a_paper_model_equals_its_refit(embedded, ray_local, tmp_path, capsys):
    """The paper recipe on a synthetic scene of three kinds of normal frame: a fit on 2 clips
    and `vitad update` with the other 2 give every scope the clusters, loc_dens and HDBSCAN
    clusters of a fit on all 4, and the test frames the same confidences in every scope."""
    import shutil

    import pyarrow.parquet as pq

    from vitad_ray.data.embeddings import load_embeddings
    from vitad_ray.pipeline.score import ModelScorer
    from vitad_ray.storage.modeldir import shard_locations
    from vitad_ray.storage.store import ScopeStore, collection_name, scope_names

    cut = TrainClips(embedded, tmp_path)
    cut.table = _three_kinds_of_normal(cut.table)
    scene = tmp_path / "scene"
    scene.mkdir()
    pq.write_table(cut.table, scene / "part-00000.parquet")
    shutil.copy(cut.folder / "_metadata.json", scene)
    model, full = tmp_path / "model", tmp_path / "full"
    fit = ["--recipe", "paper", "--k-max", "4", "--shards", "2"]
    assert main(["fit", str(cut.subset("first", cut.clips[:2])), "--out", str(model), *fit]) == 0
    assert main(["update", str(model), "--embeddings",
                 str(cut.subset("second", cut.clips[2:]))]) == 0
    assert "to version 2" in capsys.readouterr().out
    assert main(["fit", str(scene), "--out", str(full), *fit]) == 0
    assert main(["verify", str(model)]) == 0
    got, want = read_model_json(model), read_model_json(full)
    assert got["train"]["n_frames"] == want["train"]["n_frames"] == TRAIN_CLIPS * FRAMES
    assert got["version"] == 2 and got["train"]["clips"] == want["train"]["clips"]

    def scopes(folder, doc):
        out = {}
        for loc, owned in shard_locations(folder, doc):
            store = ScopeStore(loc)
            for scope in owned:
                ids, vecs, cluster, dens = store.read_scope(collection_name(doc["backbone"],
                                                                            scope))
                order = np.argsort(ids)  # the update keeps the old rows first
                out[scope] = (np.asarray(ids)[order], vecs[order], cluster[order], dens[order])
            store.close()
        return out

    def partition(labels):
        return sorted(tuple(np.flatnonzero(labels == c)) for c in np.unique(labels))

    a, b = scopes(model, got), scopes(full, want)
    for scope in scope_names(int(got["embeddings"]["num_patches"])):
        ids, vecs, cluster, dens = a[scope]
        np.testing.assert_array_equal(ids, b[scope][0])
        np.testing.assert_array_equal(vecs, b[scope][1])
        assert got["scopes"][scope]["k"] == want["scopes"][scope]["k"] == 3
        assert partition(cluster) == partition(b[scope][2]), scope
        np.testing.assert_allclose(dens, b[scope][3], rtol=1e-5)
        assert got["scopes"][scope]["hdbscan_clusters"] == want["scopes"][scope]["hdbscan_clusters"]
    # Every scope's confidences for the test frames, as `vitad score` computes them.
    test = load_embeddings(scene, splits=["test"])
    got, want = (ModelScorer(folder).score(test.global_, test.local) for folder in (model, full))
    for key in ("kmeans", "kmeans_d", "hdbscan"):
        np.testing.assert_allclose(got[key], want[key], atol=1e-5)

"""`vitad update` on the session's tiny scene, through the commands: new normal clips added to a
fitted model give the model a fit on every clip gives. Its own module: the endpoint of the
recipe pipeline's tests holds the cluster's CPUs until its module ends, and a fit needs them."""

import numpy as np
import pytest

from vitad_ray.cli.main import main
from vitad_ray.pipeline.score import read_scores
from vitad_ray.storage.modeldir import read_model_json

from ...tiny_scene import FRAMES, TRAIN_CLIPS

pytestmark = pytest.mark.integration


def test_vitad_update_adds_clips_as_a_fit_on_all_of_them(embedded, ray_local, tmp_path,
                                                         capsys):
    """`vitad update` with new normal clips gives the model a fit on every clip gives: the same
    memory, calibration, threshold and scores; model.json's version goes up."""
    import shutil

    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    default_embeddings = embedded["out"] / "tiny-dinov2"
    table = pq.read_table(sorted(default_embeddings.glob("part-*.parquet")))
    clips = sorted(set(table.filter(pc.equal(table["split"], "train"))["clip"].to_pylist()))
    assert len(clips) == TRAIN_CLIPS

    def subset(name, keep):
        out = tmp_path / name
        out.mkdir()
        pq.write_table(table.filter(pc.is_in(table["clip"], pa.array(keep))),
                       out / "part-00000.parquet")
        shutil.copy(default_embeddings / "_metadata.json", out)
        return out

    recipe = tmp_path / "two.yaml"  # leave-one-clip-out over 2 clips, as over the 4 later
    recipe.write_text("base: default\nloo_min_clips: 2\n")
    model, full = tmp_path / "model", tmp_path / "full"
    assert main(["fit", str(subset("first", clips[:2])), "--out", str(model),
                 "--recipe", str(recipe)]) == 0
    new = subset("second", clips[2:])
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

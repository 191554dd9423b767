"""embed -> fit -> score on a generated scene, on a real local Ray cluster with real Chroma."""

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from vitad_ray.data.embeddings import load_embeddings
from vitad_ray.evaluation.metrics import auroc
from vitad_ray.normality.estimators import local_density
from vitad_ray.pipeline.embed import run_embedding
from vitad_ray.pipeline.fit import FitConfig, fit_model
from vitad_ray.pipeline.score import ModelScorer, score_embeddings
from vitad_ray.storage.modeldir import read_model_json, scope_marker
from vitad_ray.storage.store import ScopeStore, scope_names

from ...ports import free_port
from ...tiny_scene import FRAMES, TEST_CLIPS, TRAIN_CLIPS

pytestmark = pytest.mark.integration


def test_embedding_writes_every_frame_once_and_reports_the_broken_one(embedded, scene):
    res = embedded["result"]
    n_train, n_test = TRAIN_CLIPS * FRAMES, TEST_CLIPS * FRAMES
    n_views = n_train * len(embedded["zooms"])  # training frames' zoomed views: rows of their own
    assert n_views and res.written == n_train + n_views + n_test and res.views_written == n_views
    assert len(res.errors) == 1 and res.errors[0]["frame_id"] == "test/01/999"
    errors_csv = (embedded["out"] / "errors.csv").read_text()
    assert "broken.jpg" in errors_csv
    for choice in embedded["choices"]:
        folder = embedded["out"] / choice.name
        table = pq.read_table(folder)  # plain pyarrow reads the contract
        assert table.num_rows == n_train + n_views + n_test
        assert len(set(table.column("frame_id").to_pylist())) == table.num_rows
        splits = table.column("split").to_pylist()
        assert sorted(set(splits)) == ["test", "train", "train@zoom1.5"]
        assert splits.count("train@zoom1.5") == n_train
        meta = json.loads((folder / "_metadata.json").read_text())
        assert meta["backbone"] == choice.name and meta["num_patches"] == 256
        assert meta["dim"] == 32 and meta["image_size"] == 224 and meta["weights"] == "random"
        emb = load_embeddings(folder, splits=["train"])
        assert emb.local.shape == (n_train, 256, 32)
        assert len(load_embeddings(folder, with_local=False)) == n_train + n_test  # no views
        views = load_embeddings(folder, splits=["train@zoom1.5"])
        assert list(views.ids["frame_id"]) == [f + "@zoom1.5" for f in emb.ids["frame_id"]]
        assert not np.allclose(views.local, emb.local)
        assert sorted(emb.ids["clip"].unique()) == [f"walk{i:02d}" for i in range(TRAIN_CLIPS)]
        # Every training video is recorded whole (4 of them, FRAMES frames each).
        videos = json.loads((folder / "_videos.json").read_text())
        assert sorted(v["frames"] for v in videos.values()) == [FRAMES] * TRAIN_CLIPS
    # Re-running is a resume: nothing is embedded twice, and nothing is even decoded again
    # (the unreadable frame, never written, would be tried again: it is left out here).
    readable = [it for it in scene["items"] if it["frame_index"] != 999]
    again = run_embedding(readable, embedded["choices"], embedded["out"], batch_size=16,
                          show_progress=False, zooms=embedded["zooms"])
    assert again.written == 0 and again.already_present == n_train + n_test
    assert not again.decode_nodes and not again.errors
    assert pq.read_table(embedded["out"] / "tiny-dinov2").num_rows == n_train + n_views + n_test


def test_fit_writes_257_collections_with_counts_and_metadata(model, embedded):
    doc = read_model_json(model["dir"])
    scopes = scope_names(256)
    assert len(doc["scopes"]) == 257 and list(doc["scopes"]) == scopes
    n_train = TRAIN_CLIPS * FRAMES
    assert doc["params"]["k_max"] == max(2, TRAIN_CLIPS // 2)
    assert all(s["train_count"] == n_train for s in doc["scopes"].values())
    assert all(2 <= s["k"] <= doc["params"]["k_max"] for s in doc["scopes"].values())
    assert len(doc["shards"]) == 2
    assert sorted(doc["shards"][0]["scopes"] + doc["shards"][1]["scopes"]) == sorted(scopes)
    emb = load_embeddings(embedded["out"] / "tiny-dinov2", splits=["train"])
    total = 0
    for shard in doc["shards"]:
        store = ScopeStore(str(model["dir"] / shard["location"]))
        names = {c.name for c in store.client.list_collections()}
        assert names == {f"tiny-dinov2.{s}" for s in shard["scopes"]}
        for scope in shard["scopes"]:
            assert store.count(f"tiny-dinov2.{scope}") == n_train
        total += len(names)
        # Stored metadata are the estimator's: recompute loc_dens for one scope.
        scope = shard["scopes"][-1]
        ids, vecs, cluster, loc = store.read_scope(f"tiny-dinov2.{scope}")
        p = scopes.index(scope)
        expected_vecs = emb.global_ if scope == "global" else emb.local[:, p - 1]
        np.testing.assert_array_equal(vecs, expected_vecs)
        assert ids == emb.ids["frame_id"].tolist()
        np.testing.assert_allclose(loc, local_density(vecs, cluster, 5), rtol=1e-5)
        assert len(np.unique(cluster)) == doc["scopes"][scope]["k"]
        store.close()
    assert total == 257
    assert len(list((model["dir"] / "hdbscan").glob("*.npz"))) == 257
    assert not list(model["dir"].rglob("*.joblib")) and not list(model["dir"].rglob("*.pkl"))


def test_fit_resumes_without_redoing_finished_scopes(model, embedded):
    doc_before = read_model_json(model["dir"])
    lost = ["global", "patch-007", "patch-200"]
    store = ScopeStore(str(model["dir"] / doc_before["shards"][0]["location"]))
    before = store.read_scope("tiny-dinov2.global")
    store.close()
    for scope in lost[:2]:
        scope_marker(model["dir"], scope).unlink()  # as if the fit stopped before these
    res = fit_model(embedded["out"] / "tiny-dinov2", model["dir"], model["cfg"],
                    show_progress=False)
    assert res.fitted == 2 and res.skipped == 255
    store = ScopeStore(str(model["dir"] / doc_before["shards"][0]["location"]))
    after = store.read_scope("tiny-dinov2.global")
    store.close()
    np.testing.assert_array_equal(before[2], after[2])
    np.testing.assert_allclose(before[3], after[3])
    assert read_model_json(model["dir"])["scopes"] == doc_before["scopes"]
    with pytest.raises(RuntimeError, match="other embeddings or settings"):
        fit_model(embedded["out"] / "tiny-dinov2", model["dir"], FitConfig(n_shards=2, m=3),
                  show_progress=False)


@pytest.fixture(scope="module")
def exact_scorer(model):
    """The session model's in-memory scorer (exact path, k-Means and HDBSCAN), loaded once."""
    return ModelScorer(model["dir"], index="exact")


def test_chroma_and_exact_paths_agree(model, embedded, exact_scorer):
    emb = load_embeddings(embedded["out"] / "tiny-dinov2", splits=["test"])
    hnsw = ModelScorer(model["dir"], index="chroma")
    a = exact_scorer.score(emb.global_, emb.local)
    b = hnsw.score(emb.global_, emb.local)
    same_nn = np.isclose(a["kmeans_d"], b["kmeans_d"], rtol=1e-4, atol=1e-5)
    assert same_nn.mean() > 0.99
    # Equal distances to different (near-duplicate) vectors may carry different loc_dens.
    assert np.isclose(a["kmeans"], b["kmeans"], rtol=1e-4, atol=1e-5).mean() > 0.99
    np.testing.assert_allclose(a["hdbscan"], b["hdbscan"], atol=0.02)
    # Exact distances: the exact path's d equals a brute-force nearest distance.
    train = load_embeddings(embedded["out"] / "tiny-dinov2", splits=["train"])
    brute = np.linalg.norm(emb.global_[:, None].astype(np.float64) - train.global_[None], axis=-1)
    np.testing.assert_allclose(a["kmeans_d"][0], brute.min(axis=1), rtol=1e-5)


def test_projected_search_scorer_answers_as_the_full_search(model, embedded, exact_scorer):
    emb = load_embeddings(embedded["out"] / "tiny-dinov2", splits=["test"])
    pruned = ModelScorer(model["dir"], index="exact", projected=True)
    assert pruned.projected_ is not None
    for i in range(0, len(emb), max(1, len(emb) // 6)):  # lone frames: the projected path
        a = exact_scorer.score(emb.global_[i:i + 1], emb.local[i:i + 1], ("kmeans",))
        b = pruned.score(emb.global_[i:i + 1], emb.local[i:i + 1], ("kmeans",))
        for key in ("kmeans", "kmeans_d"):
            np.testing.assert_array_equal(a[key], b[key])
    assert pruned.projected_.certified_ > 0


def test_scores_table_and_anomalies_score_higher(model, embedded, scored, exact_scorer):
    df, arrays = scored["df"], scored["arrays"]
    n_test = TEST_CLIPS * FRAMES
    assert len(df) == n_test and arrays["local_kmeans"].shape == (n_test, 256)
    for col in ("global_kmeans", "global_hdbscan", "local_kmeans_anomalous",
                "local_hdbscan_n_anomalous"):
        assert col in df
    assert ((arrays["local_kmeans"] >= 0) & (arrays["local_kmeans"] <= 1)).all()
    n_anom = (arrays["local_kmeans"] >= 1.0).sum(axis=1)
    np.testing.assert_array_equal(df["local_kmeans_n_anomalous"], n_anom)
    np.testing.assert_array_equal(df["local_kmeans_anomalous"], n_anom >= 256 - n_anom)
    y = df["label"].to_numpy()
    assert 0 < y.sum() < len(y)
    # The capped confidence saturates on near-duplicate training frames (as on Ped2); the
    # distances under it must still rank anomalous frames above normal ones. (A 2-layer random
    # ViT's patch tokens are too weak a feature for the patch scopes to do so reliably.)
    d = df["global_kmeans_d"].to_numpy()
    assert d[y == 1].mean() > d[y == 0].mean()
    assert auroc(y, d) > 0.9
    assert auroc(y, df["global_kmeans_ratio"].to_numpy()) > 0.8
    # The Ray Data path equals the in-process scorer.
    emb = load_embeddings(embedded["out"] / "tiny-dinov2", splits=["test"])
    direct = exact_scorer.score(emb.global_, emb.local)
    np.testing.assert_allclose(arrays["local_kmeans"], direct["kmeans"][1:].T, atol=1e-6)


def test_score_rejects_embeddings_of_another_backbone(model, embedded, tmp_path):
    with pytest.raises(ValueError, match="embedded with tiny-ijepa"):
        score_embeddings(model["dir"], embedded["out"] / "tiny-ijepa", tmp_path / "x.parquet")


def test_incomplete_store_is_reported(model, embedded, tmp_path, capsys):
    broken = tmp_path / "model"
    shutil.copytree(model["dir"], broken)
    doc = read_model_json(broken)
    store = ScopeStore(str(broken / doc["shards"][1]["location"]))
    coll = store.client.get_collection("tiny-dinov2.patch-255")
    coll.delete(ids=coll.get(limit=3)["ids"])
    store.close()
    with pytest.raises(RuntimeError, match="incomplete"):
        ModelScorer(broken, scopes=["patch-255"])
    from vitad_ray.cli.main import main

    assert main(["verify", str(model["dir"])]) == 0
    assert main(["verify", str(broken)]) == 2
    captured = capsys.readouterr().out
    n = TRAIN_CLIPS * FRAMES
    assert f"incomplete: patch-255: {n - 3} of {n} vectors" in captured


@pytest.fixture()
def chroma_server(tmp_path):
    """A real `chroma run` server on 127.0.0.1."""
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    port = free_port()
    exe = Path(sys.executable).with_name("chroma")
    proc = subprocess.Popen([str(exe), "run", "--host", "127.0.0.1", "--port", str(port),
                             "--path", str(tmp_path / "chroma-server")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("chroma server did not start")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_fit_and_score_through_a_chroma_server(embedded, model, chroma_server, exact_scorer,
                                               tmp_path):
    cfg = FitConfig(n_shards=2, chroma_url=chroma_server, hdbscan=False)
    res = fit_model(embedded["out"] / "tiny-dinov2", tmp_path / "m", cfg, show_progress=False)
    assert res.fitted == 257
    doc = read_model_json(tmp_path / "m")
    assert all(s["location"] == chroma_server for s in doc["shards"])
    emb = load_embeddings(embedded["out"] / "tiny-dinov2", splits=["test"])
    over_http = ModelScorer(tmp_path / "m", index="chroma", hdbscan=False)
    a = over_http.score(emb.global_, emb.local, methods=("kmeans",))
    b = exact_scorer.score(emb.global_, emb.local, methods=("kmeans",))
    same = np.isclose(a["kmeans_d"], b["kmeans_d"], rtol=1e-4, atol=1e-5)
    assert same.mean() > 0.99
    # Equal distances to different (near-duplicate) vectors may carry different loc_dens.
    assert np.isclose(a["kmeans"], b["kmeans"], atol=1e-5).mean() > 0.99

"""The default recipe end to end through the `vitad` commands, on the session's tiny scene: fit
stores the detector, score writes the contract's columns, evaluate reads that file, and the
endpoint answers a stream's frames sent one per request as `vitad score` scored its clip."""

import json

import httpx
import numpy as np
import pytest

from vitad_ray.cli.main import main
from vitad_ray.data.embeddings import load_embeddings
from vitad_ray.data.frames import items_from_manifest
from vitad_ray.detect import DEFAULT, recipe_from_model
from vitad_ray.detect.detector import stream_names
from vitad_ray.detect.model import load_model
from vitad_ray.detect.offline import score_frames
from vitad_ray.evaluation.metrics import auroc
from vitad_ray.pipeline.score import read_scores
from vitad_ray.storage.modeldir import read_model_json

from ...ports import free_port
from ...tiny_scene import FRAMES, TEST_CLIPS, TRAIN_CLIPS

pytestmark = pytest.mark.integration
TOKEN = "stream-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


SIZE = DEFAULT.image_size or 224
GRID = SIZE // 14


@pytest.fixture(scope="module")
def default_embeddings(embedded, scene, tmp_path_factory):
    """The session's tiny scene at the default recipe's input size, as `vitad embed` gives it."""
    if SIZE == 224:
        return embedded["out"] / "tiny-dinov2"
    from vitad_ray.pipeline.embed import BackboneChoice, run_embedding

    out = tmp_path_factory.mktemp("emb-default")
    run_embedding(scene["items"], [BackboneChoice("tiny-dinov2", image_size=SIZE)], out,
                  batch_size=16, show_progress=False, zooms=DEFAULT.zoom_views)
    return out / "tiny-dinov2"


@pytest.fixture(scope="module")
def default_model(default_embeddings, ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("default-model")
    assert main(["fit", str(default_embeddings), "--out", str(out), "--target-fpr", "0.05"]) == 0
    return out


@pytest.fixture(scope="module")
def default_scores(default_model, default_embeddings, tmp_path_factory):
    out = tmp_path_factory.mktemp("default-scores") / "scores.parquet"
    assert main(["score", str(default_model), str(default_embeddings),
                 "--out", str(out), "--split", "test", "--batch-size", "10"]) == 0
    df, arrays = read_scores(out)
    return {"path": out, "df": df, "arrays": arrays}


def test_fit_writes_the_recipe_and_a_label_free_threshold(default_model):
    doc = read_model_json(default_model)
    recipe = recipe_from_model(doc)
    assert recipe == DEFAULT.replace(target_fpr=0.05)
    assert doc["thresholds"]["source"] == "label-free@fpr=0.05"
    assert doc["train"]["n_frames"] == TRAIN_CLIPS * FRAMES
    n_views = TRAIN_CLIPS * FRAMES * len(DEFAULT.zoom_views)  # the memory holds their views too
    assert n_views and doc["train"]["n_views"] == n_views
    assert doc["detector"]["streams"] == [n for n, _ in stream_names(DEFAULT)]
    assert doc["detector"]["streams"][0] == "appearance" and len(DEFAULT.motion_lags) >= 1
    assert doc["detector"]["train_fpr_at_threshold"] <= 0.05
    for stream in doc["detector"]["streams"]:
        memory = np.load(default_model / "detector" / stream / "memory.npy", allow_pickle=False)
        assert memory.shape == (1 + GRID * GRID, TRAIN_CLIPS * FRAMES + n_views, 32)
    # Nothing in the model directory needs pickle to load.
    assert not list(default_model.rglob("*.pkl")) and not list(default_model.rglob("*.joblib"))


def test_fit_resumes_finished_streams(default_model, default_embeddings, capsys):
    assert main(["fit", str(default_embeddings), "--out", str(default_model),
                 "--target-fpr", "0.05"]) == 0
    n = 1 + len(DEFAULT.motion_lags)
    assert f"fitted 0 streams ({n} already done)" in capsys.readouterr().out


def test_score_writes_the_contract_columns_in_clip_order(default_scores, default_model,
                                                        default_embeddings):
    df, arrays = default_scores["df"], default_scores["arrays"]
    n = TEST_CLIPS * FRAMES
    assert len(df) == n and arrays["patch_scores"].shape == (n, GRID * GRID)
    assert df["frame_score"].dtype == np.float32 and df["anomalous"].dtype == bool
    for clip, rows in df.groupby("clip"):
        assert rows["frame_index"].is_monotonic_increasing
    doc = read_model_json(default_model)
    assert (df["anomalous"] == (df["frame_score"] >= doc["thresholds"]["frame"])).all()
    assert {"evidence_appearance", "evidence_motion", "fired"} <= set(df)
    # The Ray Data actors (chunks of 10 frames and their context) score as one process does.
    test = load_embeddings(default_embeddings, splits=["test"])
    order, direct = score_frames(load_model(default_model), test.ids, test.global_, test.local)
    np.testing.assert_allclose(df["frame_score"], direct.frame_score[np.argsort(order)],
                               atol=1e-5)
    y = df["label"].to_numpy()
    assert auroc(y, df["frame_score"].to_numpy()) > 0.8


def test_evaluate_reads_what_score_wrote(default_scores, default_model):
    from vitad_ray.evaluation.evaluate import evaluate_run

    result = evaluate_run(default_scores["path"], "tiny", model_doc=read_model_json(default_model),
                          calib_fraction=0.5)
    names = [e.name for e in result["evaluations"]]
    assert names == ["tiny / default / label-free@fpr=0.05", "tiny / default / calibration-clips"]
    assert result["label_free"]["target_fpr"] == 0.05
    df = default_scores["df"]
    normal = df["label"].to_numpy() == 0
    expected = (df["frame_score"].to_numpy()[normal] >= result["label_free"]["threshold"]).mean()
    assert result["label_free"]["fpr_normal_test_frames"] == pytest.approx(expected)
    assert result["thresholds"]["source"] == "calibration-clips"
    assert result["thresholds"]["label_free"]["source"] == "label-free@fpr=0.05"


# Sixteen scene models behind the endpoint: the default model, the session's paper model and 14
# more names for the default model's directory (each loaded on its own), under a memory bound
# that holds two models' shares per shard replica.
MODELS, PER_REPLICA = 16, 2


@pytest.fixture(scope="module")
def served_default(default_model, default_scores, model, scored, ray_local, tmp_path_factory):
    from ray import serve

    from vitad_ray.serve.app import ServeConfig, model_bytes, start

    models = {"default": str(default_model), "paper": str(model["dir"])}
    aliases = tmp_path_factory.mktemp("aliases")
    for i in range(len(models), MODELS):
        (aliases / f"cam{i:02d}").symlink_to(default_model, target_is_directory=True)
        models[f"cam{i:02d}"] = str(aliases / f"cam{i:02d}")
    share_mb = max(model_bytes(d) for d in models.values()) / 2 / 2**20
    cfg = ServeConfig(models=models, streams={"mapped-cam": "cam09"},
                      model_memory_mb=(PER_REPLICA + 0.5) * share_mb, shards=2,
                      port=free_port(), token=TOKEN, shard_cpus=0.25,
                      embed_batch=8, shard_batch=16, batch_wait_ms=20, embed_threads=1,
                      max_images=4, request_timeout_s=30, max_streams=2, stream_idle_s=600)
    url = start(cfg)
    with httpx.Client(base_url=url, timeout=60) as client:
        yield client
    serve.shutdown()


def _post(client, frames, model="default", **fields):
    files = [("images", (name, data, "image/png")) for name, data in frames]
    data = {**fields, **({"model": model} if model else {})}
    return client.post("/v1/detect", files=files, data=data, headers=AUTH)


def test_a_stream_sent_frame_by_frame_scores_as_vitad_score(served_default, default_scores,
                                                            scene):
    df = default_scores["df"]
    clip = sorted(df["clip"].unique())[1]
    items = sorted((it for it in items_from_manifest(scene["manifest"])
                    if it["clip"] == clip and it["frame_index"] != 999),
                   key=lambda it: it["frame_index"])
    got = []
    for it in items:
        r = _post(served_default, [(str(it["frame_index"]), open(it["path"], "rb").read())],
                  stream="cam-1", frame_index=str(it["frame_index"]))
        assert r.status_code == 200, r.text
        got.append(r.json()["results"][0])
    want = df[df["clip"] == clip].sort_values("frame_index")
    np.testing.assert_allclose([a["frame_score"] for a in got], want["frame_score"], atol=1e-4)
    assert [a["anomalous"] for a in got] == want["anomalous"].tolist()
    assert all(a["stateful"] and a["stream"] == "cam-1" for a in got)
    assert np.asarray(got[-1]["grid"]).shape == (GRID, GRID)
    # Out of order: refused with a reason, the stream's state untouched.
    late = _post(served_default, [("x", open(items[0]["path"], "rb").read())], stream="cam-1",
                 frame_index="0")
    assert late.status_code == 409 and "not after" in late.json()["error"]
    # Without a stream: the appearance part alone, and the answer says so.
    alone = _post(served_default, [("x", open(items[5]["path"], "rb").read())]).json()
    result = alone["results"][0]
    assert not result["stateful"] and "appearance" in result["note"]
    assert result["evidence"]["appearance"] == pytest.approx(
        float(want["evidence_appearance"].iloc[5]), abs=1e-4)


def _clip_items(scene, clip):
    return sorted((it for it in items_from_manifest(scene["manifest"])
                   if it["clip"] == clip and it["frame_index"] != 999),
                  key=lambda it: it["frame_index"])


def test_vitad_watch_posts_a_clip_in_order_and_writes_the_timeline(served_default, default_scores,
                                                                   scene, tmp_path, capsys):
    """`vitad watch` on a folder of a clip's frames scores them as `vitad score` did, prints an
    alarm line per anomalous frame and writes the timeline and the report; the same clip
    rendered as a video is watched whole."""
    import shutil

    import pandas as pd
    from PIL import Image

    from vitad_ray.data.synthetic import write_video

    df = default_scores["df"]
    clip = sorted(df["clip"].unique())[0]
    items = _clip_items(scene, clip)
    assert [it["frame_index"] for it in items] == list(range(len(items)))
    folder = tmp_path / "frames"
    folder.mkdir()
    for it in items:
        shutil.copy(it["path"], folder / f"{it['frame_index']:04d}.png")
    url = str(served_default.base_url)
    common = ["--endpoint", url, "--token", TOKEN, "--batch", "3", "--model", "default"]
    assert main(["watch", str(folder), "--stream", "watch-cam", "--out",
                 str(tmp_path / "timeline.csv"), "--report", str(tmp_path / "report"),
                 *common]) == 0
    printed = capsys.readouterr().out
    # No --fps: the rate the model's training video was sampled at, as the endpoint says.
    fps = served_default.get("/v1/model", params={"model": "default"},
                             headers=AUTH).json()["fps"]
    assert fps > 0 and f"sampling at the model's {fps:g} frames/s" in printed
    got = pd.read_csv(tmp_path / "timeline.csv")
    want = df[df["clip"] == clip].sort_values("frame_index")
    assert (got["status"] == "ok").all() and got["frame_index"].tolist() == list(range(len(items)))
    np.testing.assert_allclose(got["frame_score"], want["frame_score"], atol=1e-4)
    assert got["anomalous"].tolist() == want["anomalous"].tolist()
    assert printed.count("ALARM") == int(want["anomalous"].sum()) > 0
    assert (tmp_path / "report" / "index.html").exists()
    assert len(list((tmp_path / "report").glob("alarm_*.png"))) == min(24, printed.count("ALARM"))
    # The clip rendered as a video (every frame sampled): watched whole, in order.
    frames = [np.asarray(Image.open(it["path"]).convert("RGB")) for it in items]
    write_video(tmp_path / "clip.mp4", frames, fps=10.0)
    assert main(["watch", str(tmp_path / "clip.mp4"), "--stream", "video-cam", "--fps", "0",
                 "--out", str(tmp_path / "video.csv"), *common]) == 0
    printed = capsys.readouterr().out
    video = pd.read_csv(tmp_path / "video.csv")
    assert len(video) == len(items) and (video["status"] == "ok").all()
    assert printed.count("ALARM") == int(video["anomalous"].sum())
    # Nothing answers: each request is retried, then given up, and the command says so.
    assert main(["watch", str(folder), "--stream", "gone", "--endpoint",
                 f"http://127.0.0.1:{free_port()}", "--give-up-s", "1", "--out",
                 str(tmp_path / "gone.csv")]) == 2
    assert "no frame was scored" in capsys.readouterr().err


def test_stream_state_is_bounded_and_reported(served_default, scene):
    item = next(it for it in items_from_manifest(scene["manifest"]) if it["frame_index"] == 0)
    data = open(item["path"], "rb").read()
    for name in ("a", "b", "c"):
        assert _post(served_default, [("x", data)], stream=name).status_code == 200
    info = served_default.get("/v1/model", params={"model": "default"}, headers=AUTH).json()
    state = info["stream_state"]
    assert state["streams"] == 2 and state["max_streams"] == 2 and state["evicted"] >= 1
    assert state["state_bytes"] > 0
    assert info["recipe"]["name"] == "default"
    bad = _post(served_default, [("x", data)], stream="a", method="hdbscan")
    assert bad.status_code == 422 and "recipe" in bad.json()["error"]


def test_sixteen_scene_models_behind_one_endpoint(served_default, default_scores, scored,
                                                 scene):
    """One endpoint, 16 scene models, two models' shares per shard replica: every model answers
    as `vitad score` does for it (the default model's copies as the default, the paper model as
    the paper model), the replicas hold no more than the bound, and a stream mapped to a model
    is scored by it without naming it."""
    client = served_default
    listing = client.get("/v1/models", headers=AUTH).json()
    names = [m["name"] for m in listing["models"]]
    assert len(names) == MODELS and {"default", "paper"} <= set(names)
    assert listing["models_per_replica"] == PER_REPLICA
    df, paper = default_scores["df"], scored["df"]
    clip = sorted(df["clip"].unique())[1]
    items = _clip_items(scene, clip)
    frame = [("5", open(items[5]["path"], "rb").read())]
    want = df[df["clip"] == clip].sort_values("frame_index")
    paper_row = paper.index[paper["frame_id"] == f"{clip}/5"][0]
    for name in names:
        r = _post(client, frame, model=name)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == name and body["version"] == 1
        result = body["results"][0]
        if name == "paper":
            assert result["global"]["confidence"] == pytest.approx(
                float(paper["global_kmeans"][paper_row]), abs=1e-5)
            np.testing.assert_allclose(np.ravel(result["local"]["grid"]),
                                       scored["arrays"]["local_kmeans"][paper_row], atol=1e-5)
        else:
            assert result["evidence"]["appearance"] == pytest.approx(
                float(want["evidence_appearance"].iloc[5]), abs=1e-4)
    listing = client.get("/v1/models", headers=AUTH).json()
    replicas = listing["replicas"]
    assert {r.split("/")[0] for r in replicas} == {"DetectorShard0", "DetectorShard1",
                                                   "ScopeShard0", "ScopeShard1"}
    assert all(0 < len(r["models"]) <= PER_REPLICA for r in replicas.values())
    held = {m["name"] for m in listing["models"] if m["loaded_on"]}
    assert names[-1] in held and len(held) <= 2 * PER_REPLICA < MODELS
    # The mapped stream: cam09's, frame by frame, as `vitad score` scored the clip.
    got = [_post(client, [(str(it["frame_index"]), open(it["path"], "rb").read())], model=None,
                 stream="mapped-cam").json()["results"][0] for it in items]
    np.testing.assert_allclose([a["frame_score"] for a in got], want["frame_score"], atol=1e-4)
    wrong = _post(client, frame, model="paper", stream="mapped-cam")
    assert wrong.status_code == 409 and "cam09" in wrong.json()["error"]
    unnamed = _post(client, frame, model=None)
    assert unnamed.status_code == 422 and "name a model" in unnamed.json()["error"]
    assert _post(client, frame, model="nope").status_code == 404
    assert client.get("/v1/model", headers=AUTH).status_code == 422
    assert client.get("/v1/model", params={"model": "cam09"},
                      headers=AUTH).json()["name"] == "cam09"


def test_stream_registry_forgets_idle_and_least_recent_streams():
    from vitad_ray.detect import StreamState
    from vitad_ray.serve.api import StreamRegistry

    now = [0.0]
    reg = StreamRegistry(max_streams=2, idle_s=10, clock=lambda: now[0])
    a = reg.get("a", StreamState)
    reg.get("b", StreamState)
    assert reg.get("a", StreamState) is a  # kept, and now the most recent
    reg.get("c", StreamState)  # over the bound: b, the least recently used, goes
    assert "b" not in reg and "a" in reg and "c" in reg
    now[0] = 5.0
    reg.get("c", StreamState)
    now[0] = 12.0
    assert reg.evict() == ["a"]  # idle for 12 s > 10 s; c was used at 5 s
    assert len(reg) == 1 and reg.info()["evicted"] == 2
    assert json.dumps(reg.info())
    reg.forget("c")  # a request that failed midway: the stream starts afresh
    reg.forget("never-seen")
    assert "c" not in reg and reg.info()["evicted"] == 3
    assert reg.get("c", StreamState) is not None and reg.info()["streams"] == 1


def test_report_renders_an_evaluation(default_scores, default_model, tmp_path, capsys):
    from vitad_ray.evaluation.evaluate import evaluate_run, write_evaluation_run

    result = evaluate_run(default_scores["path"], "tiny", model_doc=read_model_json(default_model),
                          calib_fraction=0.5)
    run = write_evaluation_run(tmp_path / "run" / "report" / "tiny", {"default": result},
                               {"default": default_scores["path"]})
    assert main(["report", str(tmp_path / "run")]) == 0  # the evaluate output folder
    assert (run / "report" / "index.html").exists() and (run / "report" / "roc.png").exists()
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "run_dir" in capsys.readouterr().err  # named before anything is read
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "neither a run folder" in capsys.readouterr().err


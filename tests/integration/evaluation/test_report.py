"""The report path end to end on a scene whose anomalies are known: a recipe sweep through the
Detector, metrics, the run folder, `vitad report`, and the page loaded in a real headless
Chromium."""

import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from vitad_ray.cli.main import main as vitad
from vitad_ray.data.embeddings import Embeddings
from vitad_ray.detect import DEFAULT, Detector
from vitad_ray.detect.sweep import Sweep, choose_on_calibration, recipe_grid
from vitad_ray.evaluation.evaluate import split_test_clips
from vitad_ray.evaluation.localize import pixel_auroc
from vitad_ray.evaluation.metrics import auroc, evaluate_scores
from vitad_ray.evaluation.runfolder import read_run, write_run

from ...browser import chromium_available, evaluate_in_page, serve_folder

GRID, DIM, FRAMES = 4, 8, 20
ANOMALOUS = range(8, 15)  # frames of every test clip where patches 5 and 6 change
H, W = 48, 64


def scene(tmp_path, split: str, n_clips: int, base: np.ndarray, rng) -> Embeddings:
    rows, local = [], []
    for c in range(n_clips):
        offset = rng.normal(0, 0.3, (GRID * GRID, DIM))  # each clip looks slightly different
        for f in range(FRAMES):
            x = base + offset + rng.normal(0, 0.02, (GRID * GRID, DIM))
            label = int(split == "test" and f in ANOMALOUS)
            mask = np.zeros((H, W), np.uint8)
            if label:
                x[[5, 6]] += 4.0
                mask[12:24, 16:48] = 255  # patches (1, 1) and (1, 2) of the 4 x 4 grid
            clip = f"{split[:2]}{c}"
            image = tmp_path / f"{clip}_{f:03d}.png"
            Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(image)
            mask_path = ""
            if split == "test":
                mask_path = str(tmp_path / f"{clip}_{f:03d}_mask.png")
                Image.fromarray(mask).save(mask_path)
            rows.append({"frame_id": f"{clip}/{f}", "clip": clip, "frame_index": f,
                         "timestamp_s": f / 10, "split": split, "label": label,
                         "image_path": str(image), "mask_path": mask_path})
            local.append(x)
    local = np.asarray(local, np.float32)
    return Embeddings(pd.DataFrame(rows), local.mean(axis=1), local, {"dim": DIM})


BASE = DEFAULT.replace(name="t", image_size=None, block=None, zoom_views=(), pool=1,
                       motion_pool=1, motion_lags=(2,), temporal_window=1)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quality")
    rng = np.random.default_rng(0)
    base = rng.normal(0, 1, (GRID * GRID, DIM))  # the scene every clip shows
    train, test = scene(tmp, "train", 4, base, rng), scene(tmp, "test", 3, base, rng)
    sweep = Sweep(Detector(BASE).fit(train), test.ids, test.global_, test.local)
    recipes = recipe_grid(BASE, motion_lags=[(), (2,)], top_k=[2, 8], fusion=["max", "mean"])
    split = split_test_clips(test.ids)
    y = test.ids["label"].to_numpy()
    ranked = choose_on_calibration(sweep, recipes, y, split.is_calib)
    masks = np.stack([np.asarray(Image.open(p)) > 127 for p in test.ids["mask_path"]])
    rows, scores, maps, evidence = [], {}, {}, {}
    for recipe, calib, det in ranked:
        s = det.frame_score
        ev = evaluate_scores(recipe.name, y[~split.is_calib], s[~split.is_calib],
                             y_calib=y[split.is_calib], s_calib=s[split.is_calib])
        rows.append({"option": recipe.name, "calib_auroc": calib, "auroc": ev.auroc,
                     "auroc_all": auroc(y, s), "threshold": ev.threshold, **ev.metrics,
                     "pixel_auroc": pixel_auroc(det.patch_scores, masks)})
        scores[recipe.name], maps[recipe.name] = s, det.patch_scores
        evidence[recipe.name] = dict(det.evidence, frame_score=det.frame_score)
    best = max(rows, key=lambda r: r["auroc"])["option"]
    # A calibration pick that is not the best on the evaluated clips: the page must highlight
    # the pick, not the hindsight best.
    chosen = next(r["option"] for r in sorted(rows, key=lambda r: r["auroc"]))
    assert chosen != best
    summary = {"command": "test", "calibration_clips": split.calibration_clips,
               "evaluated_clips": split.evaluated_clips, "table": rows, "chosen": chosen,
               "best": best}
    return write_run(tmp / "run", test.ids, scores, maps, summary), rows, evidence, test.ids


def test_the_detector_finds_the_known_anomalies(run_dir):
    _, rows, evidence, ids = run_dir
    by = {r["option"]: r for r in rows}
    top2 = by["t [motion_lags=none, top_k=2, fusion=max]"]
    assert top2["auroc_all"] > 0.99 and top2["balanced_accuracy"] > 0.9
    assert top2["pixel_auroc"] > 0.9
    # Motion sees the anomaly's onset and end (it is static in between).
    motion = evidence["t [motion_lags=2, top_k=2, fusion=max]"]["motion"]
    for clip in np.unique(ids["clip"]):
        sel = (ids["clip"] == clip).to_numpy()
        peak = ids["frame_index"].to_numpy()[sel][motion[sel].argmax()]
        assert peak in (8, 9, 15, 16)
    # With motion fused by max, the still anomaly's appearance evidence is kept whole: every
    # anomalous frame scores at least its appearance evidence, above every normal frame's.
    y = ids["label"].to_numpy()
    for fusion in ("max", "mean"):
        fused = evidence[f"t [motion_lags=2, top_k=2, fusion={fusion}]"]
        kept = fused["frame_score"][y == 1] >= fused["appearance"][y == 1] - 1e-9
        assert kept.all() == (fusion == "max")  # a mean with still motion halves it
    assert fused["appearance"][y == 1].min() > fused["appearance"][y == 0].max()


def test_run_folder_round_trips(run_dir):
    out, rows, _, _ = run_dir
    frames, summary, maps = read_run(out)
    assert len(frames) == 3 * FRAMES and len(summary["options"]) == len(rows)
    assert maps.shape == (len(summary["patch_map_options"]), 3 * FRAMES, GRID * GRID)
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        read_run(out / "nowhere")


PAGE_FACTS = """(() => {
  const table = document.querySelector('table#metrics');
  return {
    rows: table ? table.tBodies[0].rows.length : 0,
    headers: table ? [...table.tHead.rows[0].cells].map(c => c.textContent) : [],
    highlighted: [...document.querySelectorAll('table#metrics tr.best th')].map(
      c => c.textContent),
    heatmaps: document.querySelector('h2#heatmaps')?.textContent || null,
    intro: document.querySelector('p')?.textContent || null,
    images: [...document.images].map(i => ({src: i.getAttribute('src'),
                                            loaded: i.complete && i.naturalWidth > 0})),
  };
})()"""


def test_report_page_renders_in_headless_chromium(run_dir):
    if not chromium_available():
        if os.environ.get("VITAD_REQUIRE_BROWSER"):
            pytest.fail("chromium is required here (VITAD_REQUIRE_BROWSER) but not installed")
        pytest.skip("no chromium: apt-get install chromium")
    out, rows, _, _ = run_dir
    assert vitad(["report", str(out)]) == 0
    page_dir = out / "report"
    with serve_folder(page_dir) as base:
        facts = evaluate_in_page(f"{base}/index.html", PAGE_FACTS)
    assert facts["rows"] == len(rows)
    for header in ("configuration", "precision", "recall", "FPR", "specificity", "F1",
                   "balanced acc.", "AUROC", "PR AUC", "pixel AUROC"):
        assert header in facts["headers"]
    # The page stands behind the calibration pick: it is the highlighted row and its heatmaps
    # are drawn; the best on the evaluated clips is named as hindsight.
    summary = read_run(out)[1]
    assert facts["highlighted"] == [summary["chosen"]]
    assert facts["heatmaps"] == f"Where: patch heatmaps ({summary['chosen']})"
    assert f"picked in hindsight: {summary['best']}" in facts["intro"]
    srcs = {i["src"] for i in facts["images"]}
    assert {"roc.png", "pr.png", "timelines.png"} <= srcs
    assert sum(s.startswith("heatmap_most") for s in srcs) == 4
    assert sum(s.startswith("heatmap_least") for s in srcs) == 4
    assert all(i["loaded"] for i in facts["images"]), facts["images"]

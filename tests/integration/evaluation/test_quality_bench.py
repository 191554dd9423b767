"""bench/quality.py end to end on the session's tiny embedded scene and fitted model: a recipe
sweep through the Detector, chosen on the calibration clips, and a run folder that renders."""

import json
import runpy
import sys
from pathlib import Path

import pytest

from vitad_ray.cli.main import main as vitad

BENCH = Path(__file__).resolve().parents[3] / "bench" / "quality.py"


@pytest.mark.integration
def test_quality_bench_writes_a_reportable_run(embedded, model, scene, tmp_path, monkeypatch):
    out = tmp_path / "quality"
    emb = embedded["out"] / "tiny-dinov2"
    monkeypatch.setattr(sys, "argv", [
        str(BENCH), "--manifest", str(scene["manifest"]), "--features", f"tiny={emb}",
        "--features", f"tiny again={emb}", "--model", str(model["dir"]),
        "--sweep", "motion_lags=none;2;2+4", "--sweep", "top_k=0.02,0.1", "--sweep", "pool=1,3",
        "--calib-fraction", "0.5", "--top", "3", "--out", str(out)])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(BENCH), run_name="__main__")
    assert done.value.code == 0
    summary = json.loads((out / "summary.json").read_text())
    options = [r["option"] for r in summary["table"]]
    assert options[0].startswith("[tiny] recipe paper")  # the fitted model, its own recipe
    for name in ("tiny", "tiny again"):
        mine = [r for r in summary["table"] if r["option"].startswith(f"[{name}] default [")]
        # The top 3 by calibration AUROC, then the best appearance-only recipe if none of the
        # three is one.
        calib = [r["calib_auroc"] for r in mine[:3]]
        assert calib == sorted(calib, reverse=True) and calib[0] >= mine[-1]["calib_auroc"]
        alone = ["motion_lags=none" in r["option"] for r in mine]
        assert len(mine) == (3 if any(alone[:3]) else 4) and any(alone)
        assert all(0 <= r["label_free_fpr"] <= 1 for r in mine)
    # The same features twice: the same choice, so the first feature set's wins the tie.
    assert summary["chosen"].startswith("[tiny] default [")
    assert summary["best"] in options
    assert "Chosen on the calibration clips: " + summary["chosen"] in (out / "quality.md").read_text()
    assert vitad(["report", str(out)]) == 0
    assert (out / "report" / "index.html").exists() and (out / "report" / "roc.png").exists()

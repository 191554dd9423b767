"""bench/quality.py end to end on the session's tiny embedded scene and fitted model: every row
family is produced, the run folder renders with `vitad report`."""

import json
import runpy
import sys
from pathlib import Path

import pytest

from vitad_ray.cli import main as vitad

BENCH = Path(__file__).resolve().parents[1] / "bench" / "quality.py"


@pytest.mark.integration
def test_quality_bench_writes_a_reportable_run(embedded, model, scene, tmp_path, monkeypatch):
    out = tmp_path / "quality"
    emb = embedded["out"] / "tiny-dinov2"
    monkeypatch.setattr(sys, "argv", [
        str(BENCH), "--manifest", str(scene["manifest"]), "--features", f"tiny={emb}",
        "--features", f"tiny again={emb}", "--model", str(model["dir"]), "--k", "3",
        "--motion-lag", "2", "4", "--coreset", "0.5", "--out", str(out)])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(BENCH), run_name="__main__")
    assert done.value.code == 0
    summary = json.loads((out / "summary.json").read_text())
    options = [r["option"] for r in summary["table"]]
    assert "paper local (k-Means, majority vote)" in options
    for prefix in ("[tiny] ", "[tiny, motion lag 2] ", "[tiny coreset 0.5] ",
                   "[tiny again] "):
        assert any(o.startswith(prefix + "local top-3 zscore") for o in options), prefix
    assert any(o.startswith("[tiny] appearance+motion") for o in options)
    # Each lag, the lags together and appearance+motion, chosen on the calibration clips.
    for source in ("motion lag 2", "motion lag 4", "motion lags 2+4", "appearance+motion"):
        assert any(o.startswith(f"[tiny] {source} local top-") and
                   o.endswith("[chosen on calibration clips]") for o in options), source
    assert {r["features"] for r in summary["features"]} >= {
        "tiny", "tiny, motion lag 2", "tiny, motion lag 4", "tiny coreset 0.5"}
    assert summary["coreset"] and all(-1 <= r["delta"] <= 1 for r in summary["coreset"])
    assert summary["best"] in options
    # The report's option is chosen on the calibration clips, not on the evaluated ones.
    assert summary["chosen"] in options
    assert summary["chosen"].endswith("[chosen on calibration clips]")
    assert "Chosen on the calibration clips: " + summary["chosen"] in (out / "quality.md").read_text()
    assert (out / "quality.md").read_text().count("|") > 50
    assert vitad(["report", str(out)]) == 0
    assert (out / "report" / "index.html").exists() and (out / "report" / "roc.png").exists()

"""bench/gpu_check.py in its CPU mode, so the device check a lent GPU runs cannot rot: every
section runs on real Ray, real Serve and real HTTP, and its figures make sense."""

import json
import runpy
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[3] / "bench" / "gpu_check.py"


@pytest.mark.integration
def test_gpu_check_cpu_mode_prints_every_section(ray_local, tmp_path, monkeypatch, capsys):
    out = tmp_path / "gpu_check.json"
    monkeypatch.setattr(sys, "argv", [str(BENCH), "--cpu", "--json", str(out)])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(BENCH), run_name="__main__")
    assert done.value.code == 0
    doc = json.loads(out.read_text())
    assert doc["device"] == "CPU"
    rows = doc["rows"]
    by_check = {}
    for check, setting, figure, detail in rows:
        by_check.setdefault(check, []).append((setting, figure, detail))
    assert set(by_check) == {"backbone", "pipeline", "knn", "serve"}
    # Three backbone families, each in fp32 and bf16, with a throughput and a FLOP count.
    assert len(by_check["backbone"]) == 6
    for setting, figure, detail in by_check["backbone"]:
        assert float(figure.split()[0]) > 0 and "GFLOP/frame" in detail
    # The device search equals the CPU search exactly (here both are the CPU).
    same = [r for r in by_check["knn"] if r[1].startswith("same nearest")]
    assert len(same) == 2 and all(r[1] == "same nearest 100.00%" for r in same)
    assert all("max |d| diff 0.00e+00" in r[2] for r in same)
    # The endpoint answered every request.
    (setting, figure, detail), = by_check["serve"]
    assert "0 errors" in detail and float(figure.split()[-2]) > 0
    assert "| serve |" in capsys.readouterr().out


def test_gpu_check_refuses_without_a_device_unless_cpu(monkeypatch, capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    monkeypatch.setattr(sys, "argv", [str(BENCH)])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(BENCH), run_name="__main__")
    assert done.value.code == 2
    assert "--cpu" in capsys.readouterr().err

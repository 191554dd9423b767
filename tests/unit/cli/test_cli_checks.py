"""`vitad` checks its inputs before Ray starts or a model loads: a bad one gets one line naming
the flag, exit code 2, and nothing written."""

import subprocess
import sys

import pytest

from ...conftest import DINOV2_S


def _vitad(*argv: str, cwd) -> subprocess.CompletedProcess:
    # Ray must not even be imported (nor torch or scikit-learn, seconds to import): the check
    # runs before anything starts.
    code = ("import sys; from vitad_ray.cli.main import main; rc = main(sys.argv[1:]); "
            "heavy = [m for m in ('ray', 'torch', 'sklearn') if m in sys.modules]; "
            "assert not heavy, heavy; "
            "sys.exit(rc)")
    return subprocess.run([sys.executable, "-c", code, *argv], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("argv, flag", [
    (["embed", "--frames", "/nonexistent", "--out", "emb"], "--frames"),
    (["embed", "--videos", "missing.mp4", "--out", "emb"], "--videos"),
    (["embed", "--backbone", "no-such-net", "--frames", ".", "--out", "emb"], "--backbone"),
    (["embed", "--frames", "empty", "--out", "emb"], "--frames"),
    (["embed", "--frames", ".", "--weights", "./no-weights", "--out", "emb"], "--weights"),
    (["embed", "--frames", ".", "--layers", "40", "--out", "emb"], "--layers"),
    (["embed", "--frames", ".", "--zoom-views", "0.5", "--out", "emb"], "--zoom-views"),
    (["embed", "--frames", ".", "--zoom-views", "big", "--out", "emb"], "--zoom-views"),
    (["fit", "not-an-embeddings-dir", "--out", "model"], "embeddings"),
    (["fit", "empty", "--out", "model"], "embeddings"),
    (["serve", "missing-model"], "model"),
    (["score", "missing-model", "empty", "--out", "s.parquet"], "model"),
    (["evaluate", "--manifest", "nope.csv", "--out", "run"], "--manifest"),
    (["evaluate", "--manifest", "bad.csv", "--out", "run"], "--manifest"),
    (["report", "no-run"], "run_dir"),
])
def test_a_bad_input_fails_fast_with_one_line(argv, flag, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    before = set(p.name for p in tmp_path.iterdir())
    done = _vitad(*argv, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"vitad {argv[0]}: error: {flag}"), lines
    assert set(p.name for p in tmp_path.iterdir()) == before  # nothing left behind


def test_a_fit_recipe_that_the_embeddings_cannot_give_is_refused(tmp_path):
    emb = tmp_path / "emb"
    emb.mkdir()
    (emb / "_metadata.json").write_text('{"backbone": "dinov2-s14", "image_size": 448, '
                                        '"depth": 12, "layers": [9]}')
    done = _vitad("fit", str(emb), "--out", "model", cwd=tmp_path)
    assert done.returncode == 2
    assert "--recipe: recipe 'default' needs 224 px features" in done.stderr
    assert not (tmp_path / "model").exists()


def test_a_fit_on_embeddings_without_the_recipes_zoomed_views_is_refused(tmp_path):
    import numpy as np

    from vitad_ray.data.embeddings import EmbeddingWriter

    emb = tmp_path / "emb"
    rows = {"frame_id": ["a/0", "b/0"], "clip": ["a", "b"], "frame_index": [0, 0],
            "timestamp_s": [0.0, 0.0], "split": ["train", "train"], "label": [0, 0]}
    EmbeddingWriter(emb).write(rows, np.zeros((2, 4), np.float32), np.zeros((2, 1, 4), np.float32))
    (emb / "_metadata.json").write_text('{"backbone": "dinov2-s14", "image_size": 224, '
                                        '"depth": 12, "layers": [9]}')
    done = _vitad("fit", str(emb), "--out", "model", cwd=tmp_path)
    assert done.returncode == 2
    assert "zoomed views (train@zoom1.5)" in done.stderr and "--zoom-views 1.5" in done.stderr
    assert not (tmp_path / "model").exists()


def test_version_and_flag_help():
    done = subprocess.run([sys.executable, "-m", "vitad_ray.cli.main", "--version"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("vitad ")
    helped = subprocess.run([sys.executable, "-m", "vitad_ray.cli.main", "embed", "--help"],
                            capture_output=True, text=True, timeout=60)
    assert "--split {train,test}" in helped.stdout


@pytest.mark.skipif(not DINOV2_S.exists(), reason="shared DINOv2-S weights not present")
def test_real_weights_folder_passes_the_checks():
    from vitad_ray.cli.checks import backbones

    class Args:
        backbones, weights, image_size, layers = ["dinov2-s14"], [str(DINOV2_S)], 224, "9"

    backbones(Args())  # no error


def test_every_flag_of_every_command_has_help():
    import argparse

    from vitad_ray.cli.main import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"vitad {name} {action.option_strings or action.dest}: no help"
    assert "(default: 8000)" in sub.choices["serve"].format_help()


def _parsed(argv):
    from vitad_ray.cli.main import apply_config, build_parser

    parser = build_parser()
    apply_config(parser, argv)
    return parser.parse_args(argv)


def test_a_config_file_sets_options_and_flags_win(tmp_path):
    cfg = tmp_path / "fit.yaml"
    cfg.write_text("recipe: paper\ntarget-fpr: 0.05\nshards: 3\nno_hdbscan: true\n"
                   "out: from-config\n")
    args = _parsed(["fit", "emb", "-c", str(cfg), "--shards", "2"])
    assert (args.recipe, args.target_fpr, args.shards, args.no_hdbscan, args.out) == \
        ("paper", 0.05, 2, True, "from-config")  # --out was required: the file gave it
    cfg.write_text("backbone: dinov2-s14\nsplit: train\nfps: '2'\n")
    args = _parsed(["embed", "--config", str(cfg), "--frames", ".", "--out", "e"])
    assert (args.backbones, args.split, args.fps) == (["dinov2-s14"], "train", 2.0)


@pytest.mark.parametrize("text, message", [
    ("shardz: 2\n", "unknown option 'shardz' for `vitad fit`"),
    ("recipe: [default\n", "is not valid YAML"),
    ("- a list\n", "must hold a mapping"),
    ("embeddings: emb\n", "'embeddings' is an argument"),
    ("target-fpr: lots\n", "target-fpr"),
])
def test_a_bad_config_file_fails_fast_with_one_line(text, message, tmp_path):
    (tmp_path / "c.yaml").write_text(text)
    done = _vitad("fit", "emb", "--out", "m", "-c", "c.yaml", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vitad fit: error: --config: "), lines
    assert message in lines[0], lines


def test_the_shipped_example_configs_are_valid(tmp_path):
    from pathlib import Path

    from vitad_ray.cli.main import serve_config

    configs = Path(__file__).resolve().parents[3] / "configs"
    needs = {"embed": ["--frames", ".", "--out", "e"], "fit": ["emb", "--out", "m"],
             "serve": ["model"], "evaluate": ["--manifest", "m.csv", "--out", "r"]}
    shipped = sorted(p.stem for p in configs.glob("*.yaml"))
    assert shipped == sorted([*needs, "models"])
    for name, rest in needs.items():
        args = _parsed([name, "-c", str(configs / f"{name}.yaml"), *rest])
        assert args.config
    served = serve_config(_parsed(["serve", "model", "-c", str(configs / "serve.yaml"),
                                   "--port", "9001"]), {"model": "model"}, {})
    assert (served.port, served.shard_replicas, served.body_timeout_s) == (9001, 2, 10)
    # The models list: read as `vitad serve` reads it, once its model folders exist.
    import json
    import shutil

    from vitad_ray.cli.checks import served_models

    (tmp_path / "sub").mkdir()
    shutil.copy(configs / "models.yaml", tmp_path / "sub" / "models.yaml")
    for name in ("bay", "dock"):
        (tmp_path / "runs" / name / "model").mkdir(parents=True)
        (tmp_path / "runs" / name / "model" / "model.json").write_text(json.dumps({"format": 1}))
    models, streams = served_models([str(tmp_path / "sub" / "models.yaml")])
    assert sorted(models) == ["bay", "dock"] and streams == {"bay-cam-1": "bay",
                                                             "dock-cam-1": "dock"}


def test_serve_takes_model_folders_a_folder_of_them_and_a_yaml_list(tmp_path):
    """`vitad serve`'s models: a model directory is named after its folder, a folder of models
    gives each, a YAML file names them and maps streams; clashes and strays are refused."""
    import json

    from vitad_ray.cli.checks import UsageError, served_models

    def model(path):
        path.mkdir(parents=True)
        (path / "model.json").write_text(json.dumps({"format": 1, "backbone": "tiny-dinov2"}))
        return path

    site = tmp_path / "site"
    a, b = model(site / "gate"), model(site / "dock")
    assert served_models([str(a)]) == ({"gate": str(a)}, {})
    assert served_models([str(site)])[0] == {"dock": str(b), "gate": str(a)}
    listing = tmp_path / "models.yaml"
    listing.write_text("models:\n  - {name: cam1, dir: site/gate}\n  - {name: cam2, dir: "
                       "site/dock}\nstreams: {north: cam2}\n")
    models, streams = served_models([str(listing)])
    assert models == {"cam1": str(tmp_path / "site/gate"), "cam2": str(tmp_path / "site/dock")}
    assert streams == {"north": "cam2"}
    with pytest.raises(UsageError, match="two models named 'gate'"):
        served_models([str(a), str(a)])
    with pytest.raises(UsageError, match="holds no model"):
        served_models([str(tmp_path)])
    listing.write_text("models: {cam1: site/gate}\nstreams: {north: cam9}\n")
    with pytest.raises(UsageError, match="not served"):
        served_models([str(listing)])

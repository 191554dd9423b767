"""`vitad` checks its inputs before Ray starts or a model loads: a bad one gets one line naming
the flag, exit code 2, and nothing written."""

import subprocess
import sys

import pytest

from .conftest import DINOV2_S


def _vitad(*argv: str, cwd) -> subprocess.CompletedProcess:
    # Ray must not even be imported: the check runs before anything starts.
    code = ("import sys; from vitad_ray.cli import main; rc = main(sys.argv[1:]); "
            "assert 'ray' not in sys.modules and 'torch' not in sys.modules, 'imported'; "
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


def test_version_and_flag_help():
    done = subprocess.run([sys.executable, "-m", "vitad_ray.cli", "--version"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("vitad ")
    helped = subprocess.run([sys.executable, "-m", "vitad_ray.cli", "embed", "--help"],
                            capture_output=True, text=True, timeout=60)
    assert "--split {train,test}" in helped.stdout


def test_real_weights_folder_passes_the_checks():
    from vitad_ray.checks import backbones

    class Args:
        backbones, weights, image_size, layers = ["dinov2-s14"], [str(DINOV2_S)], 224, "9"

    backbones(Args())  # no error


def test_every_flag_of_every_command_has_help():
    import argparse

    from vitad_ray.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"vitad {name} {action.option_strings or action.dest}: no help"
    assert "(default: 8000)" in sub.choices["serve"].format_help()

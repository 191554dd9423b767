"""The ``vitad`` command: embed, fit, score, serve, evaluate, demo."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _say(msg: str) -> None:
    print(msg, flush=True)


def _add_ray(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS or a local one)")
    p.add_argument("--num-cpus", type=int, help="CPUs of a local cluster (default: all)")
    p.add_argument("--verbose", action="store_true",
                   help="Ray's own messages and its workers' output on the console (otherwise "
                        "in the log file named at start)")


def _start_ray(args, **kwargs):
    """Ray for a command: a line (a spinner on a terminal) while it starts, then where its
    messages go."""
    import os

    import ray

    from ..pipeline.progress import Waiting
    from ..pipeline.runtime import init_ray, ray_log_file

    address = args.address or os.environ.get("RAY_ADDRESS")
    what = f"joining Ray at {address}" if address else "starting a local Ray cluster"
    with Waiting(what, enabled=not ray.is_initialized()):
        init_ray(args.address, args.num_cpus, quiet=not args.verbose, **kwargs)
    if not args.verbose and ray_log_file():
        _say(f"Ray's messages: {ray_log_file()} (--verbose shows them here)")


def _add_index(p: argparse.ArgumentParser) -> None:
    from ..search import INDEXES

    p.add_argument("--index", choices=INDEXES, default=INDEXES[0],
                   help="paper recipe: in-memory exact search or the Chroma stores' HNSW")


def _add_backbone(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", action="append", dest="backbones",
                   help="registry name (repeat for several, each gets its own actor pool); "
                        "see `vitad backbones`")
    p.add_argument("--weights", action="append",
                   help="weights per backbone: a local directory, a hub id or 'random'")
    p.add_argument("--image-size", type=int,
                   help="input size, a multiple of the patch size (default: the default "
                        "recipe's, 224)")
    p.add_argument("--layers", default=None,
                   help="blocks to take tokens from, concatenated, e.g. 9,12, or 'last' "
                        "(default: the default recipe's block, 3/4 of the backbone's depth)")
    p.add_argument("--batch-size", type=int, default=32, help="frames per forward pass")
    p.add_argument("--actors", type=int, help="embedder actors per backbone")


def _add_sources(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", help="CSV with split, clip, frame_index, label, path")
    p.add_argument("--frames", action="append", default=[], help="folder of clip folders of images")
    p.add_argument("--videos", action="append", default=[], help="video file or folder of videos")
    p.add_argument("--split", default="", choices=("train", "test"),
                   help="split of --frames / --videos (default: none)")
    p.add_argument("--fps", type=float, default=None,
                   help="video sampling rate (default 4.17, the paper's; 0 = every frame)")


def _add_fit(p: argparse.ArgumentParser, several: bool = False) -> None:
    from ..detect import RECIPES

    if several:
        p.add_argument("--recipe", action="append", dest="recipes",
                       help=f"a named recipe ({', '.join(RECIPES)}) or a recipe YAML file; "
                            "repeat for several (default: default and paper)")
    else:
        p.add_argument("--recipe", default="default",
                       help=f"a named recipe ({', '.join(RECIPES)}) or a recipe YAML file "
                            "(default: default)")
    p.add_argument("--target-fpr", type=float,
                   help="false-alarm rate of the label-free threshold on the training frames "
                        "scored leave-one-clip-out (default: the recipe's, 0.01)")
    p.add_argument("--k-max", type=int, help="paper recipe: largest k (default: half the "
                                             "training clips, <= 50)")
    p.add_argument("--shards", type=int, default=1, help="Chroma stores to spread scopes over")
    p.add_argument("--chroma-url", help="a `chroma run` server (http://127.0.0.1:8000) instead "
                                        "of embedded stores")
    p.add_argument("--no-hdbscan", action="store_true", help="paper recipe: fit k-Means only")


CONFIG_HELP = {
    None: "YAML file of this command's options, keyed by flag name (flags given win); "
          "examples in configs/",
    "serve": "YAML file of this command's options and of any serve setting (ServeConfig: "
             "max_images, request_timeout_s, ...), keyed by name (flags given win); "
             "example in configs/serve.yaml",
}


def apply_config(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """``-c/--config FILE``: the file's keys become the command's defaults, so a flag given on
    the command line wins. Keys are flag names (``batch-size`` or ``batch_size``); each is
    checked as the flag would be (choices, type). `vitad serve` leaves keys that are not flags
    to its serve settings."""
    from .checks import UsageError, existing_file

    command = next((a for a in argv if not a.startswith("-")), None)
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub = commands.choices.get(command)
    path = _config_path(argv)
    if sub is None or path is None:
        return
    existing_file("--config", path, "a YAML file of the command's options")
    import yaml

    try:
        doc = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise UsageError("--config", f"{path} is not valid YAML: "
                                     f"{getattr(exc, 'problem', None) or exc}{where}") from None
    if doc is None:
        return
    if not isinstance(doc, dict):
        raise UsageError("--config", f"{path} must hold a mapping of option names to values")
    actions = {a.dest: a for a in sub._actions if a.dest not in ("help", "config")}
    defaults = {}
    for key, value in doc.items():
        dest = str(key).replace("-", "_")
        action = actions.get(dest) or next(
            (a for a in actions.values() if f"--{str(key).replace('_', '-')}" in a.option_strings),
            None)
        if action is None:
            if command == "serve":
                continue  # a serve setting without a flag: ServeConfig checks it
            known = sorted(o.lstrip("-") for a in actions.values() for o in a.option_strings
                           if o.startswith("--"))
            raise UsageError("--config", f"{path}: unknown option {key!r} for `vitad {command}`; "
                                         f"known: {', '.join(known)}")
        if not action.option_strings:
            raise UsageError("--config", f"{path}: {key!r} is an argument: give it on the "
                                         "command line")
        defaults[action.dest] = _config_value(action, key, value, path)
        action.required = False
    sub.set_defaults(**defaults)


def _config_path(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg in ("-c", "--config") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def _config_value(action: argparse.Action, key, value, path: str):
    from .checks import UsageError

    several = isinstance(action, argparse._AppendAction)
    values = value if several and isinstance(value, list) else [value]
    out = []
    for v in values:
        if action.type is not None and isinstance(v, str):
            try:
                v = action.type(v)
            except (TypeError, ValueError) as exc:
                raise UsageError("--config", f"{path}: {key}: {exc}") from None
        if action.choices is not None and v not in action.choices:
            raise UsageError("--config", f"{path}: {key} must be one of "
                                         f"{', '.join(map(str, action.choices))}, got {v!r}")
        out.append(v)
    return out if several else out[0]


class _ShowDefaults(argparse.HelpFormatter):
    """Every flag's help ends with its default, unless the help says it already or there is
    none to show."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, [], argparse.SUPPRESS) \
                or action.required:
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    from ..serve.config import serve_default

    parser = argparse.ArgumentParser(prog="vitad", description=__doc__)
    parser.add_argument("--version", action="version", version=f"vitad {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_parser = sub.add_parser

    def add_command(name, **kwargs):
        p = _add_parser(name, formatter_class=_ShowDefaults, **kwargs)
        p.add_argument("-c", "--config", help=CONFIG_HELP.get(name, CONFIG_HELP[None]))
        return p

    sub.add_parser = add_command
    _add_parser("backbones", help="list registered backbones")

    p = sub.add_parser("embed", help="embed frames with one or more backbones (Ray Data)")
    _add_sources(p)
    _add_backbone(p)
    p.add_argument("--zoom-views", default=None,
                   help="zoom factors of the views of the training split's frames that join "
                        "the detector's memory, comma-separated, or 'none' (default: the "
                        "default recipe's, 1.5)")
    _add_ray(p)
    p.add_argument("--out", required=True, help="embeddings root: one folder per backbone")

    p = sub.add_parser("fit", help="fit every scope's normality models (Ray tasks)")
    p.add_argument("embeddings", help="one backbone's embeddings folder")
    p.add_argument("--out", required=True, help="model directory")
    _add_fit(p)
    _add_ray(p)

    p = sub.add_parser("update", help="add normal video of new clips to a fitted model without "
                                      "refitting it (memory, calibration, label-free threshold)")
    p.add_argument("model", help="model directory written by `vitad fit`")
    new = p.add_mutually_exclusive_group(required=True)
    new.add_argument("--embeddings",
                     help="embeddings folder of the new normal clips (split train, as `vitad "
                          "embed --split train` writes them, with their zoomed views)")
    new.add_argument("--feedback", action="store_true",
                     help="the frames queued in MODEL/feedback/queue by the endpoint's POST "
                          "/v1/streams/{id}/normal: embedded (on Ray) and added")
    p.add_argument("--weights", help="backbone weights for --feedback (default: the ones "
                                     "model.json names)")
    _add_ray(p)

    p = sub.add_parser("score", help="score frames against a model")
    p.add_argument("model", help="model directory written by `vitad fit`")
    p.add_argument("embeddings", help="one backbone's embeddings folder")
    p.add_argument("--out", required=True, help="scores Parquet file")
    _add_index(p)
    p.add_argument("--split", action="append", choices=("train", "test"),
                   help="only this split; repeat for both (default: all)")
    p.add_argument("--batch-size", type=int, default=128, help="frames per scoring block")
    p.add_argument("--methods", default="kmeans,hdbscan",
                   help="paper recipe: kmeans and/or hdbscan, comma-separated")
    _add_ray(p)

    p = sub.add_parser("verify", help="check that every scope of a model is stored whole")
    p.add_argument("model", help="model directory written by `vitad fit`")

    p = sub.add_parser("serve", help="serve scene models over HTTP (Ray Serve): POST /v1/detect")
    p.add_argument("model", nargs="+",
                   help="model directory written by `vitad fit`, a folder of them, or a YAML "
                        "file (models: [{name, dir}], streams: {stream: model}); several serve "
                        "several scene models, each request naming its model or stream")
    p.add_argument("--model-memory-mb", type=float, default=serve_default("model_memory_mb"),
                   help="memory per shard replica for scene models: past it, the least recently "
                        "used leaves (default: every model stays)")
    p.add_argument("--models-per-replica", type=int,
                   default=serve_default("models_per_replica"),
                   help="scene models a shard replica keeps (instead of --model-memory-mb)")
    p.add_argument("--host", default=serve_default("host"), help="bind address")
    p.add_argument("--port", type=int, default=serve_default("port"), help="HTTP port")
    p.add_argument("--weights", help="backbone weights (default: the ones model.json names; "
                                     "they must hash to the fitted ones)")
    p.add_argument("--shards", type=int, help="ScopeShard deployments (default: the model's "
                                              "store shards)")
    _add_index(p)
    p.add_argument("--token", help="bearer token for every route but /v1/health "
                                   "(default: $VITAD_SERVE_TOKEN; none = open)")
    p.add_argument("--embed-batch", type=int, default=serve_default("embed_batch"),
                   help="frames per forward pass")
    p.add_argument("--shard-batch", type=int, default=serve_default("shard_batch"),
                   help="frames per shard search")
    p.add_argument("--batch-wait-ms", type=float, default=serve_default("batch_wait_ms"),
                   help="how long the ingress gathers frames of concurrent requests")
    p.add_argument("--embed-replicas", type=int, default=serve_default("embed_replicas"),
                   help="Embedder replicas")
    p.add_argument("--shard-replicas", type=int, default=serve_default("shard_replicas"),
                   help="replicas of each shard")
    p.add_argument("--thresholds", type=json.loads, default=serve_default("thresholds"),
                   help='overrides, e.g. \'{"kmeans": {"global": 0.9, "patch": 0.95}}\'')
    p.add_argument("--direct-port", type=int,
                   help="a local cluster started here runs Serve's direct ingress: the ingress "
                        "replicas also answer on this port (and up), skipping the proxy's hop. "
                        "A joined cluster needs it in the environment it was started with")
    p.add_argument("--detach", action="store_true",
                   help="deploy and return; the app keeps running on the cluster (`serve "
                        "shutdown` or `serve delete vitad` stops it)")
    _add_ray(p)

    p = sub.add_parser("report", help="render a run to HTML: `vitad evaluate`'s output "
                                      "folder or a benchmark's run folder")
    p.add_argument("run_dir", help="`vitad evaluate --out` folder, or a run folder (summary.json, "
                                   "frames.parquet, patch_maps.npy)")
    p.add_argument("--out", help="where index.html and its PNGs go (default RUN_DIR/report)")

    p = sub.add_parser("watch", help="post a video's frames to an endpoint as one camera "
                                     "stream: alarms as they happen, a timeline CSV")
    p.add_argument("source", help="video file, folder of frames, or stream URL (rtsp://, http://)")
    p.add_argument("--endpoint", default="http://127.0.0.1:8000", help="`vitad serve`'s URL")
    p.add_argument("--stream", required=True, help="the camera's id: its frames keep state")
    p.add_argument("--model", help="the scene model, where the endpoint serves several "
                                   "(default: the stream's model in the endpoint's map, or "
                                   "its only one)")
    p.add_argument("--token", help="bearer token (default: VITAD_SERVE_TOKEN)")
    p.add_argument("--fps", type=float, default=None,
                   help="video sampling rate (default: the served model's training frame rate, "
                        "else 4.17; 0 = every frame); a folder's images are its frames, timed "
                        "at this rate")
    p.add_argument("--batch", type=int, default=4, help="consecutive frames per request")
    p.add_argument("--buffer", type=int, default=32, help="frames decoded ahead")
    p.add_argument("--give-up-s", type=float, default=300.0,
                   help="seconds of retries (503, 504, no connection) before a request is given up")
    p.add_argument("--out", help="timeline CSV (default: watch-STREAM.csv)")
    p.add_argument("--report", help="folder for an HTML timeline with the alarm frames' heatmaps")

    p = sub.add_parser("submit", help="run a step as a Ray job on a cluster (Job API)")
    p.add_argument("step", choices=["embed", "fit", "score", "evaluate", "serve-deploy"],
                   help="serve-deploy deploys the endpoint on the cluster (`vitad serve "
                        "--detach`)")
    p.add_argument("--dashboard", default=None,
                   help="the cluster's dashboard URL (default: RAY_API_SERVER_ADDRESS or "
                        "http://127.0.0.1:8265)")
    p.add_argument("--working-dir", default=".", help="repository root shipped with the job")
    p.add_argument("--no-wait", action="store_true", help="return once submitted")
    p.add_argument("args", nargs="*",
                   help="the step's own arguments, after --; paths must be ones every node sees")

    for name, helptext in (("evaluate", "embed, fit, score and evaluate a labelled manifest"),
                           ("demo", "the whole pipeline on a generated scene, no download")):
        p = sub.add_parser(name, help=helptext)
        if name == "evaluate":
            p.add_argument("--manifest", required=True,
                           help="CSV with split, clip, frame_index, label, path[, mask_path]")
            p.add_argument("--out", required=True, help="run directory")
        else:
            p.add_argument("--out", default="runs/demo", help="run directory")
            p.add_argument("--frames-per-clip", type=int, default=48,
                           help="frames of each generated clip")
        _add_backbone(p)
        _add_fit(p, several=True)
        _add_ray(p)
        _add_index(p)
        p.add_argument("--threshold-mode", choices=["calibrated", "paper"], default="calibrated",
                       help="calibrated: thresholds from held-out test clips; paper: chosen on "
                            "the evaluated frames (max F2), as the paper did")
        p.add_argument("--calib-fraction", type=float, default=1 / 3,
                       help="share of the test clips that calibrate thresholds")
        p.add_argument("--seed", type=int, default=0, help="which clips calibrate")
    return parser


def _choices(args, default: str, recipes=None):
    from ..pipeline.engine import feature_choices

    return feature_choices(args.backbones or [default], args.weights, args.image_size,
                           args.layers, recipes)


def _fit_config(args, recipe):
    from ..pipeline.engine import fit_settings

    return fit_settings(recipe, args.shards, args.chroma_url)


def cmd_embed(args) -> dict:
    from .checks import DEFAULT_BACKBONE, check_embed

    items, zooms = check_embed(args)
    from ..pipeline.embed import run_embedding

    _start_ray(args)
    choices = _choices(args, DEFAULT_BACKBONE)
    _say(f"embedding {len(items)} source items with {', '.join(c.name for c in choices)}")
    res = run_embedding(items, choices, args.out, batch_size=args.batch_size,
                        actors_per_backbone=args.actors, zooms=zooms)
    for name, path in res.out_dirs.items():
        _say(f"wrote {name} embeddings to {path}")
    views = f" and {res.views_written} zoomed views" if res.views_written else ""
    _say(f"{res.written - res.views_written} frames{views} embedded, {res.already_present} "
         f"already present, "
         f"{len(res.errors)} skipped (reasons in {Path(args.out) / 'errors.csv'}), "
         f"{res.seconds:.1f}s; decoded on {len(res.decode_nodes)} node(s), embedded on "
         f"{len(res.nodes)}")
    return {"frames": res.written, "skipped": len(res.errors), "seconds": res.seconds}


def cmd_fit(args) -> dict:
    from .checks import check_fit

    (recipe,) = check_fit(args)
    from ..pipeline.engine import fit_summary
    from ..pipeline.fit import fit_recipe

    _start_ray(args)
    res = fit_recipe(args.embeddings, args.out, recipe, _fit_config(args, recipe))
    _say(fit_summary(recipe, res))
    return {"fitted": res.fitted, "skipped": res.skipped, "seconds": res.seconds}


def cmd_update(args) -> dict:
    from .checks import check_update

    check_update(args)
    if args.feedback:
        return _update_from_feedback(args)
    res = _update(args, args.embeddings)
    _say_updated(args.model, res)
    return res


def _update(args, emb_dir) -> dict:
    """The model's update for its recipe: the paper's per-scope models on Ray tasks, the
    Detector's memories in this process."""
    from ..detect.fit import update_detector_model
    from ..detect.recipe import recipe_from_model
    from ..pipeline.fit import update_paper_model
    from ..storage.modeldir import read_model_json

    if recipe_from_model(read_model_json(args.model)).kind == "paper":
        _start_ray(args)
        return update_paper_model(args.model, emb_dir)
    return update_detector_model(args.model, emb_dir)


def _say_updated(model: str, res: dict) -> None:
    kept = (" (the thresholds calibrated or set after the fit are kept; the label-free one is "
            "in model.json's updates)" if res["thresholds_kept"] else " (label-free)")
    if res["thresholds_kept"] is None:
        kept = " (the paper recipe's confidence threshold)"
    _say(f"updated {model} to version {res['version']}: {res['frames']} frames of clips "
         f"{', '.join(res['clips'])} in {res['seconds']:.1f}s; threshold "
         f"{res['threshold']:.4f}{kept}")


def _update_from_feedback(args) -> dict:
    """The queued feedback clips, embedded as `vitad embed` would for the model's recipe (its
    views too), then added; the clips leave the queue once the update is in."""
    import shutil

    from ..data.frames import items_from_frame_folder
    from ..detect.recipe import recipe_from_model
    from ..pipeline.embed import BackboneChoice, run_embedding
    from ..storage.feedback import FEEDBACK_DIR, mark_applied, queue_dir, queued_clips
    from ..storage.modeldir import read_model_json

    clips = queued_clips(args.model)
    if not clips:
        _say(f"{args.model}: no feedback queued")
        return {"frames": 0, "clips": []}
    doc = read_model_json(args.model)
    emb = doc["embeddings"]
    items = [it for it in items_from_frame_folder(queue_dir(args.model), "train", label=0)
             if it["clip"] in clips]
    _start_ray(args)
    work = Path(args.model) / FEEDBACK_DIR / ".embeddings"
    shutil.rmtree(work, ignore_errors=True)
    choice = BackboneChoice(doc["backbone"], weights=args.weights or emb["weights"],
                            image_size=int(emb["image_size"]),
                            layers=tuple(emb.get("layers") or ()))
    run_embedding(items, [choice], work, zooms=recipe_from_model(doc).zoom_views)
    res = _update(args, work / doc["backbone"])
    mark_applied(args.model, clips)
    shutil.rmtree(work, ignore_errors=True)
    _say_updated(args.model, res)
    return res


def cmd_score(args) -> dict:
    from .checks import check_score

    check_score(args)
    from ..pipeline.score import score_embeddings

    _start_ray(args)
    res = score_embeddings(args.model, args.embeddings, args.out, index=args.index,
                           batch_size=args.batch_size, splits=args.split,
                           methods=tuple(args.methods.split(",")))
    _say(f"scored {res['frames']} frames in {res['seconds']:.1f}s; wrote {res['path']}")
    return res


def cmd_verify(args) -> dict:
    """Every scope: a marker, a complete collection and (if fitted) its HDBSCAN state."""
    from ..storage.modeldir import hdbscan_path, read_model_json, scope_marker, shard_locations
    from ..storage.store import ScopeStore, collection_name, verify_store

    doc = read_model_json(args.model)
    n = int(doc["train"]["n_frames"])
    problems = []
    for location, scopes in shard_locations(args.model, doc):
        store = ScopeStore(location)
        try:
            report = verify_store(store, {collection_name(doc["backbone"], s): n for s in scopes})
        finally:
            store.close()
        for scope in scopes:
            got = report[collection_name(doc["backbone"], scope)]
            if not got["complete"]:
                problems.append(f"{scope}: {got['found']} of {n} vectors in {location}")
            if not scope_marker(args.model, scope).exists():
                problems.append(f"{scope}: no marker (its fit did not finish)")
            if doc["params"].get("hdbscan") and not hdbscan_path(args.model, scope).exists():
                problems.append(f"{scope}: no HDBSCAN state")
    n_scopes = sum(len(s) for _, s in shard_locations(args.model, doc))
    if problems:
        for p in problems:
            _say(f"incomplete: {p}")
        raise RuntimeError(f"{len(problems)} problem(s) in {args.model}; re-run `vitad fit` with "
                           "the same arguments to redo those scopes")
    _say(f"{args.model}: {n_scopes} scopes complete ({n} vectors each)")
    return {"scopes": n_scopes}


# `vitad serve`'s flags among the serve settings: their defaults are ServeConfig's.
SERVE_FLAGS = ("host", "port", "weights", "shards", "index", "token", "embed_batch",
               "shard_batch", "batch_wait_ms", "embed_replicas", "shard_replicas", "thresholds",
               "model_memory_mb", "models_per_replica")


def serve_config(args, models: dict[str, str], streams: dict[str, str]):
    """ServeConfig from the -c file's serve settings and the flags (which hold the file's
    values where the command line gave none: ``apply_config``), serving ``models``."""
    from ..serve.config import ServeConfig

    settings = {}
    if args.config:
        import yaml

        settings = {str(k).replace("-", "_"): v
                    for k, v in (yaml.safe_load(Path(args.config).read_text()) or {}).items()}
    settings.update({name: getattr(args, name) for name in SERVE_FLAGS})
    settings["models"] = models
    settings["streams"] = {**settings.get("streams", {}), **streams}
    return ServeConfig.from_args(settings)


def cmd_serve(args) -> dict:
    from .checks import check_serve

    cfg = check_serve(args)
    import signal

    from ray import serve

    _start_ray(args, direct_ingress_port=args.direct_port)
    if args.detach:
        return _deploy(args, cfg)

    def stop(signum, frame):  # SIGTERM (a service manager, `kill`) stops like Ctrl-C
        raise KeyboardInterrupt

    # After Ray's start, which installs a SIGTERM handler of its own that exits at once.
    signal.signal(signal.SIGTERM, stop)
    deployed: dict = {}  # a stop while the replicas still load returns nothing deployed
    try:
        deployed = _deploy(args, cfg)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        _say("stopping")
    finally:
        serve.shutdown()
    return deployed


def _deploy(args, cfg) -> dict:
    from ..pipeline.progress import Waiting
    from ..serve.app import direct_urls, start, wait_until_running

    url = start(cfg)
    with Waiting("loading the backbone and the model on the replicas"):
        waiting = wait_until_running(timeout_s=600)
    if waiting:
        _say(f"still starting after 600 s: {', '.join(waiting)}; /v1/health says when ready")
    direct = direct_urls(cfg)
    names = ", ".join(f"{n} ({d})" for n, d in cfg.catalog().items())
    _say(f"serving {names} at {url}/v1/detect (health: {url}/v1/health, schema: "
         f"{url}/openapi.json)" + ("" if args.detach else "; Ctrl-C stops"))
    if direct:
        _say(f"ingress replicas answering directly: {', '.join(direct)}")
    elif args.direct_port:
        _say("--direct-port: this cluster does not run Serve's direct ingress (a joined cluster "
             "needs it in the environment it was started with: vitad_ray.pipeline.runtime."
             "direct_ingress_env); serving through the proxy only")
    return {"url": url, "direct_urls": direct}


def cmd_report(args) -> dict:
    from ..evaluation.report import build_report, run_folders
    from .checks import existing_dir

    existing_dir("run_dir", args.run_dir, "a `vitad evaluate --out` folder or a run folder")

    folders = run_folders(args.run_dir)
    if args.out and len(folders) > 1:
        raise ValueError(f"{args.run_dir} holds {len(folders)} runs; --out takes one")
    pages = [build_report(folder, args.out) for folder in folders]
    for page in pages:
        _say(f"report: {page}")
    return {"pages": [str(p) for p in pages]}


def cmd_watch(args) -> dict:
    import os

    from ..data.frames import PAPER_FPS
    from ..serve.watch import Watcher, source_frames, write_timeline, write_watch_report
    from .checks import check_watch

    check_watch(args)
    out = args.out or f"watch-{args.stream}.csv"
    token = args.token or os.environ.get("VITAD_SERVE_TOKEN")
    watcher = Watcher(args.endpoint, args.stream, token, model=args.model, batch=args.batch,
                      buffer=args.buffer, give_up_s=args.give_up_s, say=_say)
    fps = args.fps
    if fps is None:  # the rate the model was trained at, as the endpoint says
        fps = watcher.model_fps()
        _say(f"[watch] sampling at the model's {fps:g} frames/s" if fps else
             f"[watch] the endpoint gives no frame rate: sampling at {PAPER_FPS:g} frames/s")
        fps = fps or PAPER_FPS
    _say(f"[watch] {args.source} -> {args.endpoint} as stream {args.stream!r}"
         + (f" of model {args.model!r}" if args.model else ""))
    res = watcher.run(source_frames(args.source, fps))
    write_timeline(out, res.rows)
    scored = sum(r["status"] == "ok" for r in res.rows)
    _say(f"[watch] {len(res.rows)} frames, {scored} scored, {len(res.alarms)} alarms, "
         f"{res.retries} retries in {res.seconds:.1f}s; timeline: {out}")
    if args.report:
        page = write_watch_report(args.report, res, watcher.alarm_frames,
                                  f"{args.source} as stream {args.stream}")
        _say(f"[watch] report: {page}")
    if not scored:
        raise RuntimeError("no frame was scored")
    return {"frames": len(res.rows), "alarms": len(res.alarms)}


def cmd_submit(args) -> dict:
    import os

    from ..pipeline.submit import submit_step

    dashboard = args.dashboard or os.environ.get("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:8265")
    job, status, _ = submit_step(dashboard, args.step, args.args, args.working_dir,
                                 wait=not args.no_wait, echo=_say)
    if status in ("FAILED", "STOPPED"):
        raise RuntimeError(f"job {job} {status.lower()}")
    return {"job": job, "status": status}


def run_pipeline(args, items: list[dict], default_backbone: str,
                 default_recipes=("default", "paper")) -> dict:
    """`vitad evaluate` / `vitad demo`: the checked flags handed to the engine."""
    from .checks import UsageError, check_pipeline, recipes as checked_recipes

    check_pipeline(args, default_backbone)
    recipes = checked_recipes(args, args.recipes or default_recipes)
    if args.image_size:
        recipes = [r.replace(image_size=args.image_size) for r in recipes]
    names = [r.name for r in recipes]
    if len(set(names)) != len(names):
        raise UsageError("--recipe", f"recipes named twice: {names}")
    from ..pipeline.engine import Engine

    engine = Engine(Path(args.out), recipes, args.backbones or [default_backbone],
                    weights=args.weights, image_size=args.image_size, layers=args.layers,
                    batch_size=args.batch_size, actors=args.actors, shards=args.shards,
                    chroma_url=args.chroma_url, index=args.index,
                    threshold_mode=args.threshold_mode, calib_fraction=args.calib_fraction,
                    seed=args.seed, say=_say)
    engine.feature_groups()  # a backbone or layer problem shows before Ray starts
    _start_ray(args)
    return engine.run(items, getattr(args, "manifest", None))


def cmd_evaluate(args) -> dict:
    from .checks import DEFAULT_BACKBONE, manifest_items

    return run_pipeline(args, manifest_items(args.manifest), DEFAULT_BACKBONE)


def cmd_demo(args) -> dict:
    from ..data.frames import items_from_manifest, items_from_videos
    from ..data.synthetic import SceneConfig, generate_scene

    out = Path(args.out)
    scene = generate_scene(out / "scene", SceneConfig(frames_per_clip=args.frames_per_clip,
                                                      seed=args.seed))
    _say(f"generated a walkway scene: training videos in {scene['train_videos']}, labelled test "
         f"frames in {scene['test_manifest']}")
    items = items_from_videos([scene["train_videos"]], "train", label=0, fps=0) + \
        items_from_manifest(scene["test_manifest"])
    if args.k_max is None:
        args.k_max = 4
    return run_pipeline(args, items, "tiny-dinov2", default_recipes=("default",))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after "--" belongs to the submitted step (argparse's subparsers mishandle it).
    passthrough: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1:]
    parser = build_parser()
    try:
        apply_config(parser, argv)
    except ValueError as exc:  # checks.UsageError
        command = next((a for a in argv if not a.startswith("-")), "")
        print(f"vitad {command}: error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if passthrough:
        if args.command != "submit":
            parser.error("arguments after -- are only for `vitad submit`")
        args.args = [*args.args, *passthrough]
    if args.command == "backbones":
        from ..features.backbones import get_spec, list_backbones

        for name in list_backbones():
            spec = get_spec(name)
            _say(f"{name:18s} {spec.source or '(random)':40s} {spec.description}")
        return 0
    handler = {"embed": cmd_embed, "fit": cmd_fit, "score": cmd_score, "submit": cmd_submit,
               "serve": cmd_serve, "verify": cmd_verify, "evaluate": cmd_evaluate, "demo": cmd_demo,
               "report": cmd_report, "watch": cmd_watch, "update": cmd_update}[args.command]
    try:
        handler(args)
    except (FileNotFoundError, ValueError, RuntimeError, KeyError, ConnectionError) as exc:
        print(f"vitad {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

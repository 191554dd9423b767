"""The ``vitad`` commands' inputs, checked before Ray starts or a model loads.

Every check is cheap (file system and registry look-ups, a manifest's header, a metadata file) and
fails with a ``UsageError`` naming the flag and what to do; the CLI prints it as one line and exits
with 2, before anything is written.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_BACKBONE = "dinov2-s14"  # of `vitad embed` and `vitad evaluate`


class UsageError(ValueError):
    """A bad flag or argument: ``flag`` names it, the message says the fix."""

    def __init__(self, flag: str, message: str):
        super().__init__(f"{flag}: {message}")
        self.flag = flag


def existing_file(flag: str, path: str | None, what: str) -> None:
    if path is None:
        return
    p = Path(path)
    if not p.exists():
        raise UsageError(flag, f"{path} does not exist (give {what})")
    if not p.is_file():
        raise UsageError(flag, f"{path} is not a file (give {what})")


def existing_dir(flag: str, path: str, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise UsageError(flag, f"{path} does not exist (give {what})")
    if not p.is_dir():
        raise UsageError(flag, f"{path} is not a folder (give {what})")
    return p


def output_path(flag: str, path: str | None, folder: bool = True) -> None:
    """An output that exists already must be of the right kind; its parent must be writable."""
    if path is None:
        return
    p = Path(path)
    if p.exists() and p.is_dir() != folder:
        raise UsageError(flag, f"{path} exists and is {'a file' if folder else 'a folder'}; "
                               f"give {'a folder' if folder else 'a file'} path")
    parent = next((q for q in [p, *p.parents] if q.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UsageError(flag, f"cannot write under {parent}")


def positive(flag: str, value, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if value is None or value < 1:
        raise UsageError(flag, f"must be >= 1, got {value}")


def backbones(args, default: str = DEFAULT_BACKBONE) -> None:
    """--backbone names (``default`` when none is given), --weights, --image-size, --layers."""
    from ..features.backbones import get_spec, parse_layers

    names = getattr(args, "backbones", None) or [default]
    for name in names:
        try:
            spec = get_spec(name)
        except KeyError as exc:
            raise UsageError("--backbone", f"{exc.args[0]} (`vitad backbones` lists them)"
                             ) from None
        if getattr(args, "image_size", None):
            try:
                get_spec(name, args.image_size)
            except ValueError as exc:
                raise UsageError("--image-size", str(exc)) from None
        layers = getattr(args, "layers", None)
        if layers not in (None, "last"):
            try:
                blocks = parse_layers(layers)
            except ValueError as exc:
                raise UsageError("--layers", str(exc)) from None
            if not blocks or min(blocks) < 1 or max(blocks) > spec.depth:
                raise UsageError("--layers", f"{name} has blocks 1..{spec.depth}, got {layers}")
    weights = getattr(args, "weights", None) or []
    if isinstance(weights, str):
        weights = [weights]
    if len(weights) > len(names):
        raise UsageError("--weights", "more --weights than --backbone")
    for w in weights:
        # A hub id ("facebook/dinov2-small") and a relative path look alike; a value written as
        # a path (absolute, ./, ../, ~) must exist.
        if w and w.startswith(("/", "./", "../", "~")) and not Path(w).expanduser().is_dir():
            raise UsageError("--weights", f"{w} is not a folder of weights (give a local "
                                          "folder, a hub id or 'random')")


def sources(args) -> list[dict]:
    """--manifest / --frames / --videos as items, each source checked on its own."""
    from ..data.frames import PAPER_FPS, items_from_frame_folder, items_from_videos

    if not (args.manifest or args.frames or args.videos):
        raise UsageError("--manifest/--frames/--videos", "nothing to embed: give a manifest CSV, "
                                                         "folders of frames or videos")
    items = []
    if args.manifest:
        items += manifest_items(args.manifest)
    for folder in args.frames:
        existing_dir("--frames", folder, "a folder of clip folders of images")
        found = items_from_frame_folder(folder, args.split)
        if not found:
            raise UsageError("--frames", f"no images (.jpg, .png, ...) in {folder} or its clip "
                                         "folders")
        items += found
    fps = PAPER_FPS if args.fps is None else args.fps
    if fps < 0:
        raise UsageError("--fps", f"must be >= 0 (0 = every frame), got {fps}")
    for path in args.videos:
        if not Path(path).exists():
            raise UsageError("--videos", f"{path} does not exist (give a video file or a folder "
                                         "of videos)")
        found = items_from_videos([path], args.split, fps=fps)
        if not found:
            raise UsageError("--videos", f"no video files (.mp4, .avi, ...) in {path}")
        items += found
    return items


def manifest_items(path: str, flag: str = "--manifest") -> list[dict]:
    from ..data.frames import items_from_manifest

    existing_file(flag, path, "a CSV with columns split, clip, frame_index, label, path")
    try:
        items = items_from_manifest(path)
    except (ValueError, KeyError) as exc:
        raise UsageError(flag, f"{exc} (columns: split, clip, frame_index, label, path)"
                         ) from None
    if not items:
        raise UsageError(flag, f"{path} has no rows")
    return items


def embeddings_dir(flag: str, path: str) -> dict:
    from ..data.embeddings import read_metadata

    existing_dir(flag, path, "one backbone's folder written by `vitad embed`, e.g. "
                             "OUT/dinov2-s14")
    try:
        return read_metadata(path)
    except (FileNotFoundError, ValueError):
        raise UsageError(flag, f"{path} is not an embeddings folder (no _metadata.json); give "
                               "one backbone's folder written by `vitad embed`, e.g. "
                               "OUT/dinov2-s14") from None


def model_dir(flag: str, path: str) -> dict:
    from ..storage.modeldir import read_model_json

    existing_dir(flag, path, "a model directory written by `vitad fit`")
    try:
        return read_model_json(path)
    except (FileNotFoundError, ValueError):
        raise UsageError(flag, f"{path} is not a model directory (no readable model.json); "
                               "give a folder written by `vitad fit`") from None


def recipes(args, names) -> list:
    """The recipes named (or YAML files), with the flags that change them."""
    from ..detect import get_recipe

    if getattr(args, "target_fpr", None) is not None and not 0 < args.target_fpr < 1:
        raise UsageError("--target-fpr", f"a false-alarm rate in (0, 1), got {args.target_fpr}")
    if getattr(args, "k_max", None) is not None and args.k_max < 2:
        raise UsageError("--k-max", f"must be >= 2, got {args.k_max}")
    out = []
    for name in names:
        try:
            recipe = get_recipe(name)
        except ValueError as exc:
            raise UsageError("--recipe", str(exc)) from None
        changes = {}
        if getattr(args, "target_fpr", None) is not None:
            changes["target_fpr"] = args.target_fpr
        if getattr(args, "k_max", None) is not None:
            changes["k_max"] = args.k_max
        if getattr(args, "no_hdbscan", False):
            changes["hdbscan"] = False
        out.append(recipe.replace(**changes) if changes else recipe)
    return out


def ray_flags(args) -> None:
    positive("--num-cpus", getattr(args, "num_cpus", None))


def zoom_views(text: str | None) -> tuple[float, ...]:
    """``--zoom-views``: comma-separated factors > 1, 'none', or the default recipe's."""
    if text is None:
        from ..detect import DEFAULT

        return DEFAULT.zoom_views
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        zooms = tuple(sorted({float(x) for x in text.split(",")}))
    except ValueError:
        raise UsageError("--zoom-views", f"comma-separated numbers or 'none', got {text!r}") \
            from None
    if any(z <= 1 for z in zooms):
        raise UsageError("--zoom-views", f"zoom factors are > 1, got {text!r}")
    return zooms


def check_embed(args) -> tuple[list[dict], tuple[float, ...]]:
    """(the source items, the zoom views of training frames)."""
    backbones(args)
    positive("--batch-size", args.batch_size, allow_none=False)
    positive("--actors", args.actors)
    zooms = zoom_views(args.zoom_views)
    ray_flags(args)
    output_path("--out", args.out)
    return sources(args), zooms


def check_fit(args) -> list:
    from ..data.embeddings import splits_present
    from ..data.frames import VIEW_SPLITS
    from ..detect.recipe import check_views, embedding_layers

    meta = embeddings_dir("embeddings", args.embeddings)
    (recipe,) = recipes(args, [args.recipe])
    if recipe.kind != "paper":
        try:
            embedding_layers(recipe, meta)
            if recipe.zoom_views:
                check_views(recipe, splits_present(args.embeddings), VIEW_SPLITS)
        except ValueError as exc:
            raise UsageError("--recipe", str(exc)) from None
    positive("--shards", args.shards, allow_none=False)
    output_path("--out", args.out)
    ray_flags(args)
    return [recipe]


def check_update(args) -> None:
    model_dir("model", args.model)
    if args.embeddings:
        embeddings_dir("--embeddings", args.embeddings)
    ray_flags(args)


def check_score(args) -> None:
    model_dir("model", args.model)
    embeddings_dir("embeddings", args.embeddings)
    methods = args.methods.split(",")
    bad = [m for m in methods if m not in ("kmeans", "hdbscan")]
    if bad:
        raise UsageError("--methods", f"comma-separated kmeans and/or hdbscan, got {bad}")
    positive("--batch-size", args.batch_size, allow_none=False)
    output_path("--out", args.out, folder=False)
    ray_flags(args)


def served_models(paths: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """`vitad serve`'s models: each path a model directory, a folder of them, or a YAML file
    (``models:`` a list of {name, dir} or a {name: dir} map; ``streams:`` a {stream: model}
    map). Returns ({name: dir}, {stream: model}); a model is named after its folder unless a
    YAML file names it."""
    import yaml

    models: dict[str, str] = {}
    streams: dict[str, str] = {}

    def add(name: str, path: Path, flag: str = "model") -> None:
        model_dir(flag, str(path))
        if name in models:
            raise UsageError(flag, f"two models named {name!r} ({models[name]} and {path}): "
                                   "name them in a YAML file")
        models[name] = str(path)

    for given in paths:
        path = Path(given)
        if path.is_file() and path.suffix.lower() in (".yaml", ".yml", ".json"):
            try:
                doc = yaml.safe_load(path.read_text())
            except yaml.YAMLError as exc:
                raise UsageError("model", f"{path}: not YAML ({exc})") from None
            entries = doc.get("models") if isinstance(doc, dict) else doc
            if isinstance(entries, dict):
                entries = [{"name": k, "dir": v} for k, v in entries.items()]
            if not isinstance(entries, list) or not all(
                    isinstance(e, dict) and {"name", "dir"} <= set(e) for e in entries):
                raise UsageError("model", f"{path}: give models as a list of {{name, dir}} or a "
                                          "{name: dir} map")
            for e in entries:
                add(str(e["name"]), (path.parent / str(e["dir"])), f"model ({path})")
            mapped = doc.get("streams", {}) if isinstance(doc, dict) else {}
            if not isinstance(mapped, dict):
                raise UsageError("model", f"{path}: streams is a {{stream: model}} map")
            streams.update({str(k): str(v) for k, v in mapped.items()})
        elif (path / "model.json").exists() or not path.is_dir():
            add(path.resolve().name, path)
        else:
            inside = sorted(p for p in path.iterdir() if (p / "model.json").exists())
            if not inside:
                raise UsageError("model", f"{path} holds no model directory (no model.json in it "
                                          "or its folders)")
            for p in inside:
                add(p.name, p)
    for stream, name in streams.items():
        if name not in models:
            raise UsageError("model", f"stream {stream!r} maps to {name!r}, which is not served "
                                      f"({sorted(models)})")
    return models, streams


def check_serve(args):
    """The serve settings (--config merged with the flags), checked."""
    from .main import serve_config

    if args.config:
        existing_file("--config", args.config, "a YAML or JSON file of serve settings")
    if not args.model:
        raise UsageError("model", "give a model directory, a folder of them or a YAML list")
    if not 0 < args.port < 65536:
        raise UsageError("--port", f"a TCP port 1..65535, got {args.port}")
    models, streams = served_models(args.model)
    if getattr(args, "model_memory_mb", None) is not None and args.model_memory_mb <= 0:
        raise UsageError("--model-memory-mb", f"a size > 0, got {args.model_memory_mb}")
    backbones(args)
    ray_flags(args)
    try:
        return serve_config(args, models, streams)
    except Exception as exc:  # noqa: BLE001 - a YAML, type or unknown-key error of the config
        flag = "--config" if args.config else "serve settings"
        raise UsageError(flag, f"{exc.__class__.__name__}: {exc}") from None


def check_watch(args) -> None:
    if "://" in args.source:
        if args.source.split("://", 1)[0] not in ("rtsp", "rtsps", "http", "https", "rtmp",
                                                  "udp", "tcp", "file"):
            raise UsageError("source", f"a stream URL PyAV opens (rtsp://, http://), got "
                                       f"{args.source!r}")
    elif not Path(args.source).exists():
        raise UsageError("source", f"{args.source} does not exist: give a video file, a folder "
                                   "of frames or a stream URL")
    if not args.endpoint.startswith(("http://", "https://")):
        raise UsageError("--endpoint", f"an http(s) URL, got {args.endpoint!r}")
    positive("--batch", args.batch, allow_none=False)
    positive("--buffer", args.buffer, allow_none=False)
    if args.fps is not None and args.fps < 0:
        raise UsageError("--fps", f"a rate >= 0, got {args.fps}")
    output_path("--out", args.out, folder=False)
    output_path("--report", args.report)


def check_pipeline(args, default_backbone: str) -> None:
    """`vitad evaluate` and `vitad demo`: backbones, recipes, run folder."""
    backbones(args, default_backbone)
    if getattr(args, "recipes", None):
        recipes(args, args.recipes)
    if not 0 < args.calib_fraction < 1:
        raise UsageError("--calib-fraction", f"a share in (0, 1), got {args.calib_fraction}")
    positive("--batch-size", args.batch_size, allow_none=False)
    output_path("--out", args.out)
    ray_flags(args)

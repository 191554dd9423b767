"""The HTTP contract of the detection endpoint: request parsing, validation and answers.

Kept free of Ray so the rules can be read (and tested) on their own. Every rejection is an
``ApiError`` carrying the HTTP status and a reason a client can act on.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from dataclasses import dataclass, field

import numpy as np

from ..data.frames import image_rgb8
from ..features.backbones import resize_frame
from ..normality import METHODS

SCOPES = ("global", "local", "both")
JSON_TYPES = ("application/json",)
MULTIPART = "multipart/form-data"


class ApiError(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


@dataclass(frozen=True)
class Limits:
    max_images: int = 32
    max_image_bytes: int = 8 << 20
    max_pixels: int = 40_000_000  # decompression bombs: a small file can declare a huge canvas
    # Pixels of all images of one request together: decoding is CPU time the ingress spends
    # before any backend is asked, so one request may not buy an unbounded amount of it.
    max_request_pixels: int = 160_000_000
    max_json_depth: int = 8  # the contract nests 3 levels; deep nesting only costs the parser

    @property
    def max_body_bytes(self) -> int:
        # base64 grows data by 4/3; leave room for the JSON or multipart framing.
        return self.max_images * (self.max_image_bytes * 4 // 3 + 4096) + 65536


@dataclass
class DetectOptions:
    method: str = "kmeans"
    scope: str = "both"
    threshold: float | None = None          # both global and patch threshold
    global_threshold: float | None = None
    patch_threshold: float | None = None
    stream: str | None = None               # camera id: frames of one stream keep state
    frame_index: int | None = None          # of the first image (default: the stream's next)
    model: str | None = None                # the scene model (default: the stream's, or the one)

    def thresholds(self, defaults: dict) -> dict:
        """{"global": t, "patch": t} for this request's method, overrides applied."""
        base = defaults[self.method]
        glob = next(t for t in (self.global_threshold, self.threshold, base["global"])
                    if t is not None)
        patch = next(t for t in (self.patch_threshold, self.threshold, base["patch"])
                     if t is not None)
        return {"global": float(glob), "patch": float(patch)}


@dataclass
class ImageInput:
    name: str
    data: bytes = field(repr=False)


def parse_options(fields: dict) -> DetectOptions:
    """Options from query parameters, form fields or JSON keys (strings or numbers)."""
    opts = DetectOptions()
    method = fields.get("method")
    if method is not None:
        if method not in METHODS:
            raise ApiError(422, f"method must be one of {list(METHODS)}, got {method!r}")
        opts.method = method
    scope = fields.get("scope")
    if scope is not None:
        if scope not in SCOPES:
            raise ApiError(422, f"scope must be one of {list(SCOPES)}, got {scope!r}")
        opts.scope = scope
    for key in ("threshold", "global_threshold", "patch_threshold"):
        if fields.get(key) is not None:
            setattr(opts, key, _threshold(key, fields[key]))
    for key in ("model", "stream"):
        name = fields.get(key)
        if name is not None:
            name = str(name)
            if not 1 <= len(name) <= MAX_STREAM_ID or not name.isprintable():
                raise ApiError(422, f"{key} must be 1 to {MAX_STREAM_ID} printable characters")
            setattr(opts, key, name)
    if fields.get("frame_index") is not None:
        if opts.stream is None:
            raise ApiError(422, "frame_index needs a stream")
        try:
            opts.frame_index = int(str(fields["frame_index"]))
        except ValueError:
            raise ApiError(422, f"frame_index must be an integer, got "
                                f"{fields['frame_index']!r}") from None
        if opts.frame_index < 0:
            raise ApiError(422, "frame_index must be >= 0")
    return opts


MAX_STREAM_ID = 128


class StreamRegistry:
    """The state of every stream an ingress replica has seen: bounded in number, forgotten
    after ``idle_s`` without a frame (a stream that comes back starts afresh, as a clip does).
    Ray-free, so its bounds can be tested on their own."""

    def __init__(self, max_streams: int = 1024, idle_s: float = 300.0, clock=None):
        import time
        from collections import OrderedDict

        self.max_streams, self.idle_s = max_streams, idle_s
        self.clock = clock or time.monotonic
        self._states: OrderedDict = OrderedDict()
        self.evicted = 0

    def get(self, key: str, new):
        """The stream's state (made by ``new()`` the first time); marks it used."""
        self.evict()
        state = self._states.pop(key, None)
        if state is None:
            state = new()
        state.last_used = self.clock()
        self._states[key] = state  # most recently used last
        while len(self._states) > self.max_streams:
            self._states.popitem(last=False)
            self.evicted += 1
        return state

    def peek(self, key: str):
        """The stream's state if it is remembered (not marked used)."""
        return self._states.get(key)

    def forget(self, key: str) -> None:
        """Drops a stream's state: its next frame starts it afresh."""
        if self._states.pop(key, None) is not None:
            self.evicted += 1

    def evict(self) -> list[str]:
        """Forget the streams idle for longer than ``idle_s``."""
        now, gone = self.clock(), []
        for key, state in list(self._states.items()):
            if now - state.last_used > self.idle_s:
                del self._states[key]
                gone.append(key)
        self.evicted += len(gone)
        return gone

    def __contains__(self, key: str) -> bool:
        return key in self._states

    def __len__(self) -> int:
        return len(self._states)

    def info(self) -> dict:
        return {"streams": len(self._states),
                "state_bytes": int(sum(s.nbytes for s in self._states.values())),
                "max_streams": self.max_streams, "idle_s": self.idle_s, "evicted": self.evicted}


def _threshold(key: str, value) -> float:
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise ApiError(422, f"{key} must be a number, got {value!r}") from None
    if not math.isfinite(t) or t < 0:
        raise ApiError(422, f"{key} must be a finite number >= 0, got {value!r}")
    return t


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


def check_content_length(header: str | None, limits: Limits) -> None:
    if header is None:
        return
    try:
        length = int(header)
    except ValueError:
        raise ApiError(400, f"bad Content-Length {header!r}") from None
    if length == 0:
        raise ApiError(400, "empty body: send images as multipart files or JSON "
                            '{"images": ["<base64>", ...]}')
    if length > limits.max_body_bytes:
        raise ApiError(413, f"request body of {length} bytes is over the limit of "
                            f"{limits.max_body_bytes} bytes")


def images_from_json(body: bytes, limits: Limits) -> tuple[list[ImageInput], dict]:
    """JSON ``{"images": ["<base64>" | {"name": str, "data": "<base64>"}, ...], options...}``."""
    if not body:
        raise ApiError(400, 'empty body: expected JSON {"images": ["<base64>", ...]}')
    _check_json_depth(body, limits.max_json_depth, 16 * limits.max_images + 1024)
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or "images" not in doc:
        raise ApiError(422, 'JSON body must be an object with an "images" list')
    raw = doc["images"]
    if not isinstance(raw, list):
        raise ApiError(422, f'"images" must be a list of base64 strings, got {type(raw).__name__}')
    _check_count(len(raw), limits)
    images = []
    for i, item in enumerate(raw):
        name = f"images[{i}]"
        if isinstance(item, dict):
            name = str(item.get("name", name))
            item = item.get("data")
        if not isinstance(item, str):
            raise ApiError(422, f"images[{i}] must be a base64 string (or an object with a base64 "
                                f'"data" string), got {type(item).__name__}')
        if item.startswith("data:") and "," in item:  # data URLs from browsers
            item = item.split(",", 1)[1]
        if len(item) > limits.max_image_bytes * 4 // 3 + 4:
            raise ApiError(413, f"images[{i}] is over the limit of {limits.max_image_bytes} bytes")
        try:
            data = base64.b64decode(item, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ApiError(422, f"images[{i}] is not valid base64: {exc}") from None
        images.append(_checked(ImageInput(name, data), limits))
    options = {k: v for k, v in doc.items() if k != "images"}
    return images, options


def _check_json_depth(body: bytes, max_depth: int, max_tokens: int) -> None:
    """Refuses JSON nested deeper than ``max_depth`` (Python's parser recurses per level) or
    with more strings and brackets than the contract can use, before it is parsed."""
    # Escaped backslashes, then escaped quotes, go first: what is left of '"' opens or closes
    # a string. Base64 payloads hold none of these bytes, so this stays a few C-speed passes
    # and a walk over a handful of bytes per image.
    unescaped = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    structural = unescaped.translate(None, _NOT_STRUCTURAL)
    depth, in_string = 0, False
    for ch in structural[:max_tokens]:
        if ch == 0x22:  # '"'
            in_string = not in_string
        elif in_string:
            continue
        elif ch in (0x5B, 0x7B):  # '[', '{'
            depth += 1
            if depth > max_depth:
                raise ApiError(400, f"JSON nested deeper than {max_depth} levels; the request "
                                    'is {"images": [...], options...}')
        else:  # ']', '}'
            depth -= 1
    if len(structural) > max_tokens:
        raise ApiError(400, f"JSON body has {len(structural)} strings and brackets, more than a "
                            'request {"images": [...], options...} can hold')


_NOT_STRUCTURAL = bytes(b for b in range(256) if b not in b'"[]{}')


def images_from_form(files: list[tuple[str, bytes]], limits: Limits) -> list[ImageInput]:
    _check_count(len(files), limits)
    return [_checked(ImageInput(name, data), limits) for name, data in files]


def _check_count(n: int, limits: Limits) -> None:
    if n == 0:
        raise ApiError(422, "no images in the request")
    if n > limits.max_images:
        raise ApiError(413, f"too many images: {n} > the limit of {limits.max_images} per request")


def _checked(image: ImageInput, limits: Limits) -> ImageInput:
    if not image.data:
        raise ApiError(422, f"{image.name} is empty")
    if len(image.data) > limits.max_image_bytes:
        raise ApiError(413, f"{image.name} is {len(image.data)} bytes, over the limit of "
                            f"{limits.max_image_bytes} bytes")
    return image


def decode_image(image: ImageInput, size: int, limits: Limits) -> np.ndarray:
    """Fully decode one image and resize it whole to size x size RGB uint8."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(image.data)) as img:
            _check_pixels(image.name, img.width, img.height, limits)
            img.load()  # a truncated file fails here, not later
            pixels = image_rgb8(img)
    except ApiError:
        raise
    except Image.DecompressionBombError as exc:  # PIL's own bound, past ours
        raise _over_pixels(image, limits, exc) from None
    except UnidentifiedImageError:
        raise ApiError(422, f"{image.name} is not an image PIL can read "
                            f"(first bytes {image.data[:8]!r})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ApiError(422, f"{image.name} cannot be decoded: {exc}") from None
    if pixels.size == 0:
        raise ApiError(422, f"{image.name} has no pixels")
    return resize_frame(pixels, size)


def _over_pixels(image: ImageInput, limits: Limits, exc: Exception) -> ApiError:
    return ApiError(413, f"{image.name} is over the pixel limit of {limits.max_pixels}: {exc}")


def _check_pixels(name: str, width: int, height: int, limits: Limits) -> None:
    if width * height > limits.max_pixels:
        raise ApiError(413, f"{name} is {width}x{height} pixels, over the limit of "
                            f"{limits.max_pixels}")


def decode_images(images: list[ImageInput], size: int, limits: Limits) -> list[np.ndarray]:
    """Every image of a request, after its headers alone show the request within the pixel
    budget (a header costs microseconds; a 36 Mpx decode, a second)."""
    from PIL import Image

    total = 0
    for image in images:
        try:
            with Image.open(io.BytesIO(image.data)) as img:
                _check_pixels(image.name, img.width, img.height, limits)
                total += img.width * img.height
        except ApiError:
            raise
        except Image.DecompressionBombError as exc:
            raise _over_pixels(image, limits, exc) from None
        except Exception:  # noqa: BLE001 - unreadable: decode_image gives the reason below
            continue
    if total > limits.max_request_pixels:
        raise ApiError(413, f"the request's images hold {total} pixels together, over the limit "
                            f"of {limits.max_request_pixels} per request: send fewer or smaller "
                            "images per request")
    return [decode_image(img, size, limits) for img in images]


def detection_answer(index: int, name: str, opts: DetectOptions, det, row: int, grid: int,
                     frame_index: int | None) -> dict:
    """The answer for one image scored by a cross-clip Detector (``det``: the ``Detection`` of
    its batch, ``row`` its place there); the same numbers `vitad score` writes."""
    threshold = float(opts.threshold) if opts.threshold is not None else det.threshold
    score = float(det.frame_score[row])
    out = {"index": index, "name": name, "stream": opts.stream, "frame_index": frame_index,
           "frame_score": score, "threshold": threshold, "anomalous": bool(score >= threshold),
           "evidence": {k: float(v[row]) for k, v in det.evidence.items()},
           "fired": [k for k, v in det.evidence.items() if v[row] >= threshold],
           "grid": det.patch_scores[row].reshape(grid, grid).astype(float).tolist(),
           "stateful": det.stateful}
    if not det.stateful:
        out["note"] = ("no stream named: scored by the recipe's appearance part alone; name a "
                       "stream to add motion and smoothing")
    return out


def frame_answer(index: int, name: str, opts: DetectOptions, thresholds: dict, grid: int,
                 global_conf: float | None, patch_conf: np.ndarray | None) -> dict:
    """The answer for one image; decisions use the same rules as `vitad score`."""
    from ..pipeline.score import majority_anomalous

    out = {"index": index, "name": name, "method": opts.method}
    if global_conf is not None:
        out["global"] = {"confidence": float(global_conf), "threshold": thresholds["global"],
                         "anomalous": bool(global_conf >= thresholds["global"])}
    if patch_conf is not None:
        n_anom = int((patch_conf >= thresholds["patch"]).sum())
        out["local"] = {
            "n_anomalous": n_anom, "n_patches": int(patch_conf.size),
            "threshold": thresholds["patch"],
            "anomalous": bool(majority_anomalous(n_anom, patch_conf.size)),
            "grid": patch_conf.reshape(grid, grid).astype(float).tolist(),
        }
    return out

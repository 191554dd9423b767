"""Registry of frozen ViT backbones, in the style of timm's model registry.

A backbone turns whole frames (resized to ``image_size`` x ``image_size``, no centre crop: an
anomaly at the edge of a fixed camera's view must stay in the picture) into one global vector and
a grid of patch vectors. Register tokens are never counted among the patches.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from .adapters import adapter_for

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)

# Weights of tiny test backbones are drawn from this seed, so every Ray actor (and every test run)
# builds the very same random network.
RANDOM_SEED = 0
# "auto": bf16 autocast on a CUDA device, float32 elsewhere.
PRECISIONS = ("auto", "bf16", "fp32")


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    family: str  # an adapter's family (adapters.py): "dinov2", "dinov2-reg", "ijepa", "timm-vit"
    source: str | None  # hub id (HF) or timm model name; None: random weights only
    image_size: int = 224
    patch_size: int = 14
    global_pool: str = "cls"  # "cls" or "mean" (I-JEPA has no CLS token)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    random_config: dict = field(default_factory=dict)  # architecture for random initialisation
    description: str = ""
    # Transformer blocks of the architecture: a recipe's block, a share of the depth, resolves
    # against it before any weights are loaded.
    depth: int = 12
    # Transformer blocks whose tokens are taken (1-based, each through the final norm, as DINOv2's
    # get_intermediate_layers does) and concatenated; () = the last block only. Mid-level blocks
    # carry more local texture than the last, which PatchCore found to matter for anomalies.
    layers: tuple[int, ...] = ()

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid


_REGISTRY: dict[str, Callable[[], BackboneSpec]] = {}


def register_backbone(fn: Callable[[], BackboneSpec]) -> Callable[[], BackboneSpec]:
    spec = fn()
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone {spec.name!r} registered twice")
    _REGISTRY[spec.name] = fn
    return fn


def list_backbones(pattern: str = "*") -> list[str]:
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def get_spec(name: str, image_size: int | None = None,
             layers: tuple[int, ...] | None = None) -> BackboneSpec:
    if name not in _REGISTRY:
        raise KeyError(f"unknown backbone {name!r}; known: {', '.join(list_backbones())}")
    spec = _REGISTRY[name]()
    if image_size is not None and image_size != spec.image_size:
        if image_size % spec.patch_size:
            raise ValueError(f"image size {image_size} is not a multiple of patch {spec.patch_size}")
        spec = replace(spec, image_size=image_size)
    if layers:
        layers = tuple(int(i) for i in layers)
        if min(layers) < 1 or len(set(layers)) != len(layers):
            raise ValueError(f"layers are distinct 1-based block numbers, got {layers}")
        spec = replace(spec, layers=layers)
    return spec


def parse_layers(text: str | None) -> tuple[int, ...]:
    """"8,12" -> (8, 12); "" or None -> () (the last block)."""
    if not text:
        return ()
    try:
        return tuple(int(t) for t in str(text).split(",") if t.strip())
    except ValueError:
        raise ValueError(f"--layers takes block numbers like 8,12, got {text!r}") from None


# --- the paper's backbones and their smaller relatives ------------------------------------------
@register_backbone
def _vit_h14_in21k() -> BackboneSpec:
    return BackboneSpec("vit-h14-in21k", "timm-vit", "vit_huge_patch14_224.orig_in21k", depth=32,
                        mean=INCEPTION_MEAN, std=INCEPTION_STD,
                        random_config=dict(embed_dim=1280, depth=32, num_heads=16, mlp_ratio=4.0),
                        description="ViT-H/14 supervised on ImageNet-21k (timm), global = CLS")


@register_backbone
def _dinov2_l14() -> BackboneSpec:
    return BackboneSpec("dinov2-l14", "dinov2", "facebook/dinov2-large", depth=24,
                        random_config=dict(hidden_size=1024, num_hidden_layers=24,
                                           num_attention_heads=16, mlp_ratio=4),
                        description="DINOv2 ViT-L/14, global = CLS")


@register_backbone
def _dinov2_b14() -> BackboneSpec:
    return BackboneSpec("dinov2-b14", "dinov2", "facebook/dinov2-base",
                        description="DINOv2 ViT-B/14, global = CLS")


@register_backbone
def _dinov2_s14() -> BackboneSpec:
    return BackboneSpec("dinov2-s14", "dinov2", "facebook/dinov2-small",
                        description="DINOv2 ViT-S/14, global = CLS")


@register_backbone
def _dinov2_s14_reg() -> BackboneSpec:
    return BackboneSpec("dinov2-s14-reg", "dinov2-reg", "facebook/dinov2-with-registers-small",
                        description="DINOv2 ViT-S/14 with 4 register tokens (excluded from patches)")


@register_backbone
def _ijepa_h14() -> BackboneSpec:
    return BackboneSpec("ijepa-h14", "ijepa", "facebook/ijepa_vith14_1k", global_pool="mean",
                        depth=32,
                        random_config=dict(hidden_size=1280, num_hidden_layers=32,
                                           num_attention_heads=16, intermediate_size=5120),
                        description="I-JEPA ViT-H/14 (no CLS): global = mean of patch tokens")


# --- tiny random backbones for tests and the demo ----------------------------------------------
_TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
_TINY_DEPTH = 2


@register_backbone
def _tiny_dinov2() -> BackboneSpec:
    return BackboneSpec("tiny-dinov2", "dinov2", None, random_config=dict(_TINY, mlp_ratio=2),
                        depth=_TINY_DEPTH, description="2-layer 32-d DINOv2, random weights (tests)")


@register_backbone
def _tiny_dinov2_reg() -> BackboneSpec:
    return BackboneSpec("tiny-dinov2-reg", "dinov2-reg", None,
                        random_config=dict(_TINY, mlp_ratio=2, num_register_tokens=4), depth=_TINY_DEPTH,
                        description="2-layer 32-d DINOv2 with 4 registers, random weights (tests)")


@register_backbone
def _tiny_ijepa() -> BackboneSpec:
    return BackboneSpec("tiny-ijepa", "ijepa", None, global_pool="mean", random_config=dict(_TINY),
                        depth=_TINY_DEPTH,
                        description="2-layer 32-d I-JEPA, random weights (tests)")


@register_backbone
def _tiny_vit() -> BackboneSpec:
    return BackboneSpec("tiny-vit", "timm-vit", None, mean=INCEPTION_MEAN, std=INCEPTION_STD,
                        random_config=dict(embed_dim=32, depth=_TINY_DEPTH, num_heads=2, mlp_ratio=2.0),
                        depth=_TINY_DEPTH,
                        description="2-layer 32-d timm ViT, random weights (tests)")


# --- weights -------------------------------------------------------------------------------------
def _is_random(spec: BackboneSpec, weights: str | None) -> bool:
    if weights == "random":
        return True
    return weights is None and spec.source is None


def resolve_weights(spec: BackboneSpec, weights: str | None) -> str | None:
    """A local directory holding the weights, ``None`` for random weights.

    ``weights`` is a local directory, a hub id, ``"random"`` or ``None`` (the spec's hub id).
    Hub ids go through huggingface_hub, which honours ``HF_HUB_OFFLINE`` and its cache.
    """
    if _is_random(spec, weights):
        if not spec.random_config:
            raise ValueError(f"{spec.name} has no random configuration; give --weights")
        return None
    ref = weights or spec.source
    if os.path.isdir(ref):
        return ref
    from huggingface_hub import snapshot_download

    repo = adapter_for(spec.family).hub_repo(ref)
    try:
        return snapshot_download(repo, allow_patterns=["*.json", "*.safetensors"])
    except Exception as exc:  # network, offline cache miss, unknown repo
        raise RuntimeError(
            f"cannot load weights {ref!r} for {spec.name}: {exc.__class__.__name__}: {exc}. "
            "Give a local directory with --weights, or make the hub reachable.") from exc


def weights_fingerprint(spec: BackboneSpec, weights: str | None) -> dict:
    """Identity of the weights: where they come from and a sha256 over the weight files."""
    local = resolve_weights(spec, weights)
    if local is None:
        digest = hashlib.sha256(f"random:{spec.name}:{RANDOM_SEED}:{sorted(spec.random_config.items())}"
                                .encode()).hexdigest()
        return {"weights": "random", "weights_sha256": digest}
    h = hashlib.sha256()
    files = sorted(p for p in Path(local).iterdir() if p.suffix in (".safetensors", ".bin", ".pth"))
    if not files:
        raise FileNotFoundError(f"no weight files (*.safetensors, *.bin) in {local}")
    for path in files:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return {"weights": weights or spec.source, "weights_sha256": h.hexdigest()}


class Backbone:
    """A loaded, frozen backbone: ``embed(uint8 frames) -> (global [B, D], local [B, P, D])``."""

    def __init__(self, spec: BackboneSpec, weights: str | None = None, device: str | None = None,
                 trace: bool | None = None, precision: str = "auto"):
        import torch

        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.spec = spec
        local = resolve_weights(spec, weights)
        self.adapter = adapter_for(spec.family)
        self.model = self.adapter.build(spec, local, RANDOM_SEED)
        self.model.eval().requires_grad_(False)
        self._drop_blocks_past(max(spec.layers, default=0))
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device)
        # bf16 autocast on CUDA by default (tensor cores; the tokens come back as float32).
        self.bf16 = precision == "bf16" or (precision == "auto" and self.device.type == "cuda")
        self._mean = torch.tensor(spec.mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(spec.std, device=self.device).view(1, 3, 1, 1)
        self.num_prefix_tokens = self._count_prefix_tokens()
        # On CPU, a DINOv2-S forward pass spends about a tenth of its time in the model's Python
        # (hooks, output records); a TorchScript trace of the same ops skips it and gives the
        # same numbers (bench/backbone_speed.py). Traced on the first batch, checked on two.
        self.trace = self.device.type == "cpu" if trace is None else trace
        self.traced_ = None
        self.trace_checked_: set[tuple] = set()  # input shapes where trace == eager was seen
        self.trace_error_: str | None = None

    def _drop_blocks_past(self, deepest: int) -> None:
        # Blocks after the deepest requested one never reach the output: not running them saves
        # (depth - deepest) / depth of the compute (a quarter for block 9 of 12).
        if not deepest:
            return
        if deepest > self.depth:
            raise ValueError(f"{self.spec.name} has {self.depth} blocks, "
                             f"layers asks for {self.spec.layers}")
        self.adapter.keep_blocks(self.model, deepest)

    def _count_prefix_tokens(self) -> int:
        return self.adapter.prefix_tokens(self.model)

    @property
    def depth(self) -> int:
        return self.adapter.depth(self.model)

    @property
    def dim(self) -> int:
        return self.adapter.width(self.model) * max(1, len(self.spec.layers))

    def _tokens(self, x):
        return self.adapter.tokens(self.model, x, self.spec.layers)

    def embed(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Embed uint8 frames [B, S, S, 3] already resized to the spec's image size."""
        import torch

        size = self.spec.image_size
        if frames.ndim != 4 or frames.shape[1:] != (size, size, 3):
            raise ValueError(f"expected frames [B, {size}, {size}, 3], got {frames.shape}")
        x = torch.from_numpy(np.ascontiguousarray(frames)).to(self.device)
        x = x.permute(0, 3, 1, 2).float().div_(255.0).sub_(self._mean).div_(self._std)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                                    enabled=self.bf16):
            tokens = self._traced_tokens(x) if self.trace else self._tokens(x)
            tokens = tokens.float()
        patches = tokens[:, self.num_prefix_tokens:]
        if patches.shape[1] != self.spec.num_patches:
            raise RuntimeError(f"{self.spec.name}: {patches.shape[1]} patch tokens, "
                               f"expected {self.spec.num_patches}")
        glob = tokens[:, 0] if self.spec.global_pool == "cls" else patches.mean(dim=1)
        return glob.cpu().numpy(), patches.cpu().numpy()

    def _traced_tokens(self, x):
        """``_tokens`` through the trace. The first two input shapes are checked against eager;
        a trace that gives eager's numbers at a batch size other than the one it was made at
        has not fixed the batch size, and later shapes go through unchecked (a check costs one
        eager pass). Any failure or difference turns tracing off (``trace_error_`` says why)."""
        import torch

        shape = tuple(x.shape)
        if shape in self.trace_checked_ or len(self.trace_checked_) >= 2:
            return self.traced_(x)
        eager = self._tokens(x)
        try:
            if self.traced_ is None:
                self.traced_ = _trace(self.model, self._tokens, x)
            same = torch.equal(self.traced_(x), eager)
        except Exception as exc:  # noqa: BLE001  (whatever TorchScript cannot record: eager)
            self._stop_tracing(f"{exc.__class__.__name__}: {str(exc)[:300]}")
            return eager
        if same:
            self.trace_checked_.add(shape)
        else:
            self._stop_tracing(f"the traced forward pass differs from eager on input {shape}")
        return eager

    def _stop_tracing(self, reason: str) -> None:
        self.trace, self.traced_, self.trace_error_ = False, None, reason
        warnings.warn(f"{self.spec.name}: running eager, not traced: {reason}", stacklevel=3)


def _trace(model, tokens: Callable, x):
    """A frozen TorchScript trace of ``tokens(x)``, the function of ``model`` (weights folded)."""
    import torch

    class Tokens(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model  # a submodule, so that freezing folds its weights in

        def forward(self, pixels):
            return tokens(pixels)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on Python-side shape checks
        return torch.jit.freeze(torch.jit.trace(Tokens().eval(), x, check_trace=False))


def create_backbone(name: str, weights: str | None = None, image_size: int | None = None,
                    device: str | None = None, layers: tuple[int, ...] | None = None,
                    trace: bool | None = None, precision: str = "auto") -> Backbone:
    return Backbone(get_spec(name, image_size, layers), weights=weights, device=device,
                    trace=trace, precision=precision)


def resize_frame(image: np.ndarray, size: int) -> np.ndarray:
    """Whole-frame resize to size x size RGB uint8 (bicubic, aspect not kept, nothing cropped)."""
    from PIL import Image

    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.shape[:2] == (size, size):
        return np.ascontiguousarray(image[:, :, :3], dtype=np.uint8)
    pil = Image.fromarray(np.ascontiguousarray(image[:, :, :3], dtype=np.uint8))
    return np.asarray(pil.resize((size, size), Image.BICUBIC), dtype=np.uint8)

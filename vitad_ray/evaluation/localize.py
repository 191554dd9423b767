"""Localization: patch scores as a heatmap over the frame, and pixel-level AUROC.

The g x g patch grid covers the whole frame (frames are resized whole, never cropped), so a
bilinear upsampling of the grid to the frame's size puts each patch score back where it came
from.
"""

from __future__ import annotations

import numpy as np

from .metrics import auroc

# Masks are compared at this size (rows, columns): a third of Ped2's 240 x 360, 19 M pixels over
# its 2,010 test frames, enough for pixel AUROC at a fraction of the cost.
MASK_SIZE = (80, 120)


def upsample_maps(patch_scores: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[B, P] (P = g * g) or [B, g, g] patch scores -> [B, H, W] float32, bilinear."""
    import torch
    import torch.nn.functional as F

    maps = np.asarray(patch_scores, np.float32)
    if maps.ndim == 2:
        g = int(round(np.sqrt(maps.shape[1])))
        if g * g != maps.shape[1]:
            raise ValueError(f"{maps.shape[1]} patches do not form a square grid")
        maps = maps.reshape(-1, g, g)
    with torch.inference_mode():
        t = torch.from_numpy(np.array(maps, np.float32, copy=True))[:, None]  # mmap: read-only
        up = F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False)
    return up[:, 0].numpy()


def load_masks(paths: list[str], size: tuple[int, int]) -> np.ndarray:
    """Binary masks [B, H, W] (bool) resized by nearest neighbour; a missing path -> all false."""
    from PIL import Image

    h, w = size
    out = np.zeros((len(paths), h, w), bool)
    for i, path in enumerate(paths):
        if not path:
            continue
        with Image.open(path) as im:
            out[i] = np.asarray(im.convert("L").resize((w, h), Image.NEAREST)) > 127
    return out


def pixel_auroc(patch_scores: np.ndarray, masks: np.ndarray) -> float:
    """AUROC of every pixel of every frame: upsampled patch scores against the masks."""
    masks = np.asarray(masks, bool)
    heat = upsample_maps(patch_scores, masks.shape[1:])
    return auroc(masks.reshape(-1), heat.reshape(-1))

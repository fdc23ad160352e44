"""The fast texture check: pixel fractions over the object's alpha mask that betray missing textures.

Blender renders an image texture it cannot load as pure magenta (1, 0, 1), and a material whose textures are
gone (or that never had any) as one plain paint colour, white/grey by default. Both survive the aesthetic score
(paper sec. 7.1, Fig. 10). Two pixel classes, measured on the curation renders:

- magenta: red and blue alike and bright, green far below both, whatever the shading;
- flat: lit and locally smooth in every channel (the largest channel gradient, relative to the pixel's
  brightness, below `FLAT_GRADIENT`), i.e. shaded plain paint with no texture detail. Counted away from the
  silhouette, where alpha blending is smooth by construction.

Measured on the shared assets at 128 px (8 samples, denoised, 10 views): untextured boxes (plain red, white
vertex-colour-less) are 85-93 % flat depending on the camera set, every textured asset 3-75 % (BoxTextured, a big
logo on a plain face, is the highest); hence `curate.flat_max` = 0.8. Smooth untextured *curved* shapes score
lower (55-70 %): that is what the VLM layer is for. The render stage uses the same magenta
test for its per-view validation.
"""

from __future__ import annotations

import numpy as np

from flux3d.stages.render_layout import magenta_mask

FLAT_GRADIENT = 0.05  # relative per-pixel gradient: shading on curved paint stays below, texture edges above
LIT = 0.1  # darker pixels are unlit sides: nothing to tell paint from texture there
FOREGROUND_ALPHA = 0.5


def flat_mask(rgb: np.ndarray) -> np.ndarray:
    """Boolean mask of lit, texture-free (plain paint) pixels in an (H, W, 3) float image in [0, 1]."""
    hi = rgb.max(axis=-1)
    grad = np.zeros(rgb.shape[:2], dtype=np.float32)
    for c in range(3):
        gy, gx = np.gradient(rgb[..., c])
        grad = np.maximum(grad, np.hypot(gx, gy))
    return (hi > LIT) & (grad < FLAT_GRADIENT * np.maximum(hi, LIT))


def _interior(fg: np.ndarray) -> np.ndarray:
    inner = fg.copy()
    inner[1:] &= fg[:-1]
    inner[:-1] &= fg[1:]
    inner[:, 1:] &= fg[:, :-1]
    inner[:, :-1] &= fg[:, 1:]
    return inner


def texture_counts(rgba: np.ndarray) -> tuple[int, int, int, int]:
    """(foreground, magenta, interior, flat) pixel counts of one RGBA uint8 view."""
    img = rgba.astype(np.float32) / 255.0
    fg = img[..., 3] > FOREGROUND_ALPHA
    inner = _interior(fg)
    rgb = img[..., :3]
    return int(fg.sum()), int((magenta_mask(rgb) & fg).sum()), int(inner.sum()), int((flat_mask(rgb) & inner).sum())


def texture_fractions(views: list[np.ndarray]) -> tuple[float, float]:
    """(magenta, flat) fractions pooled over the pixels of every view (0 where nothing is in frame)."""
    fg = magenta = inner = flat = 0
    for rgba in views:
        a, b, c, d = texture_counts(rgba)
        fg, magenta, inner, flat = fg + a, magenta + b, inner + c, flat + d
    return (magenta / fg if fg else 0.0), (flat / inner if inner else 0.0)

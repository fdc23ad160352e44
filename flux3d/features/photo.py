"""A user's photo -> the conditioning image the models were trained on (`flux3d generate --image photo.png` without a
ground-truth layout).

The training conditioning images are Blender renders: straight-alpha RGBA of an asset normalised to a longest side of
1 and centred at the origin, seen from radius 2 with a 40-degree field of view, composited at train time over a
uniform background by `over_background`. A photo is brought into that framing: an alpha matte (the file's own alpha,
a TorchScript matting model, or a key against a plain background), then a uniform rescale so that the object's alpha
bounding box spans `FRAME_FILL` of the frame along its longer side, centred on a transparent square canvas.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch  # annotations only: importing this module must not load torch

# The renders' framing: at distance 2 a 40-degree FoV sees 2 * 2 * tan(20 deg) ~= 1.456 units across, so an object of
# longest side 1 spans 1 / 1.456 ~= 0.687 of the frame (its depth extent and perspective aside).
FRAME_FILL = 1.0 / (2 * 2.0 * math.tan(math.radians(40.0) / 2))

OPAQUE_MIN = 250  # an alpha channel whose every pixel is >= this is a flattened photo, not a matte
# Plain-background key; colour distances are Euclidean in 0-255 RGB units.
BORDER_FRACTION, BORDER_MIN_PX = 0.02, 2  # the strip along the image's edges that samples the background
MAX_BORDER_SPREAD = 30.0  # 90th-percentile border distance to the median: above it the background is not plain
# Alpha ramps linearly from 0 at KEY_LOW to 1 at KEY_LOW + KEY_WIDTH. KEY_LOW sits above JPEG noise and paper grain
# (and rises to 1.5x the measured border spread on noisier backgrounds); the 36-unit width keeps the mixed
# object/background pixels of anti-aliased or slightly blurred edges fractional instead of snapping them to 0 or 1.
KEY_LOW, KEY_WIDTH = 12.0, 36.0
EDGE_FRACTION, EDGE_MIN_PX = 0.004, 3.0  # the soft band kept either side of the kept object's outline


class PhotoError(ValueError):
    """A photo that cannot be made into a conditioning image, with a reason a user can act on."""


@dataclass
class Prepared:
    rgba: np.ndarray  # (R, R, 4) uint8 straight alpha, recentred and rescaled
    alpha_source: str  # "alpha" | "matting_model" | "plain_background"
    background_rgb: tuple[float, float, float] | None  # the estimated plain background colour (0-1), if used


def _load(path_or_image: Any) -> tuple[np.ndarray, bool]:
    """(H, W, 4) uint8 RGBA, upright per EXIF, and whether the source had an alpha channel or transparency."""
    from PIL import Image, ImageOps

    if isinstance(path_or_image, Image.Image):
        image = path_or_image
    else:
        name = os.fspath(path_or_image)
        try:
            image = Image.open(name)
            image.load()  # open() is lazy: a truncated or corrupt file fails only here
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise PhotoError(f"cannot read image {name}: {e}") from e
    has_alpha = image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info
    rgba = np.asarray(ImageOps.exif_transpose(image).convert("RGBA"))  # phone photos store rotation in EXIF
    if rgba.shape[0] < 2 * BORDER_MIN_PX + 1 or rgba.shape[1] < 2 * BORDER_MIN_PX + 1:
        raise PhotoError(f"image is too small ({rgba.shape[1]}x{rgba.shape[0]})")
    return rgba, has_alpha


def _model_alpha(rgb: np.ndarray, matting: str) -> np.ndarray:
    """(H, W) alpha in [0, 1] from a TorchScript matting model, run on the CPU, given (H, W, 3) RGB in [0, 1]."""
    import torch

    if not os.path.isfile(matting):
        raise PhotoError(f"matting model {matting} not found")
    try:
        with warnings.catch_warnings():  # torch's TorchScript deprecation notice is nothing a user can act on
            warnings.simplefilter("ignore", FutureWarning)
            model = torch.jit.load(matting, map_location="cpu").eval()
    except (RuntimeError, ValueError) as e:
        raise PhotoError(f"cannot load matting model {matting} (expected a TorchScript file): {e}") from e
    x = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1), np.float32))[None]
    with torch.inference_mode():
        out = model(x)
    if isinstance(out, (tuple, list)):  # some exported matting models also return a foreground estimate
        out = out[0]
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, 1, *rgb.shape[:2]):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise PhotoError(f"matting model {matting} returned {shape}, expected (1, 1, {rgb.shape[0]}, {rgb.shape[1]})")
    return out[0, 0].float().clamp(0, 1).numpy()


def _plain_alpha(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(alpha (H, W) in [0, 1], un-mixed straight RGB (H, W, 3) in [0, 255], background (3,) in [0, 255]) keyed
    against the plain background that the image's border shows; `rgb` (H, W, 3) float in [0, 255]."""
    from scipy import ndimage

    h, w = rgb.shape[:2]
    b = max(BORDER_MIN_PX, round(BORDER_FRACTION * min(h, w)))
    border = np.concatenate([rgb[:b].reshape(-1, 3), rgb[-b:].reshape(-1, 3),
                             rgb[:, :b].reshape(-1, 3), rgb[:, -b:].reshape(-1, 3)])
    background = np.median(border, axis=0)
    # The 90th percentile tolerates an object that touches a tenth of the border; a textured or cluttered
    # background spreads most border pixels far from the median.
    spread = float(np.percentile(np.linalg.norm(border - background, axis=1), 90))
    if spread > MAX_BORDER_SPREAD:
        raise PhotoError(f"the photo's background is not plain (border colour spread {spread:.0f} > "
                         f"{MAX_BORDER_SPREAD:.0f} of 255): give an RGBA image with alpha, or a matting model "
                         "(--matting)")
    low = max(KEY_LOW, 1.5 * spread)
    alpha = np.clip((np.linalg.norm(rgb - background, axis=-1) - low) / KEY_WIDTH, 0.0, 1.0)

    core = alpha > 0.5
    labels, count = ndimage.label(core, structure=np.ones((3, 3)))
    if count == 0:
        return np.zeros_like(alpha), rgb, background
    # Only the largest component is the object: specks of dust or sensor noise elsewhere would stretch the bounding
    # box that sets the object's scale and centre. Its holes are filled because the key cannot tell a white
    # highlight or label on the object from background seen through it, and a highlight punched out as a hole
    # reads as broken geometry; a real through-hole then shows the photo's background colour (give alpha for those).
    core = labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
    solid = ndimage.binary_fill_holes(core)
    edge = max(EDGE_MIN_PX, EDGE_FRACTION * max(h, w))
    outside_dist = ndimage.distance_transform_edt(~solid)  # 0 on the object
    inside_dist = ndimage.distance_transform_edt(solid)  # 0 off the object
    # Only the outline stays soft: inside it, faint texture and filled highlights are opaque object; outside the
    # band, fractional alpha belongs to other (dropped) components.
    alpha = np.where(inside_dist > edge, 1.0, np.where(outside_dist <= edge, alpha, 0.0))
    alpha[solid & ~core] = 1.0

    # Un-mix the edge colours: an observed pixel is a*fg + (1-a)*bg, so fg = bg + (obs - bg) / a. Kept as is, the
    # photo's background would leak into the edges twice over (a*(1-a)*bg, then (1-a)*new background); un-mixed, a
    # composite over a new background B is obs + (1-a)*(B - bg) exactly, the photo with its background swapped,
    # which does not amplify noise even where a is small (the division cancels against the premultiplication).
    a = alpha[..., None]
    fg = np.where(a > 0, background + (rgb - background) / np.maximum(a, 1e-6), rgb)
    return alpha, np.clip(fg, 0.0, 255.0), background


def _frame(rgb: np.ndarray, alpha: np.ndarray, resolution: int, fill: float) -> np.ndarray:
    """(R, R, 4) uint8 straight RGBA: the object's alpha box scaled to `fill * R` along its longer side and centred;
    `rgb` (H, W, 3) straight in [0, 1], `alpha` (H, W) in [0, 1]."""
    from PIL import Image

    # The box is taken at alpha > 0.5: the half-coverage contour is the silhouette's edge, as a render's would be
    # measured, while a lower threshold would let faint fringes or JPEG halos grow it.
    ys, xs = np.nonzero(alpha > 0.5)
    if ys.size == 0:
        raise PhotoError("no object found in the photo: its alpha (or matte) is empty")
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1  # pixel edges
    scale = fill * resolution / max(x1 - x0, y1 - y0)  # output pixels per photo pixel
    cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, resolution / (2 * scale)  # half: half the frame, in photo pixels
    # A zero-padded window around the frame's footprint: resize's box must lie inside its image, and Lanczos reads
    # up to 3 output pixels beyond it. Zero is transparent in premultiplied colour.
    pad = math.ceil(3 / scale) + 2
    wx0, wy0 = math.floor(cx - half) - pad, math.floor(cy - half) - pad
    wx1, wy1 = math.ceil(cx + half) + pad, math.ceil(cy + half) + pad
    window = np.zeros((wy1 - wy0, wx1 - wx0, 4), np.float32)
    sx0, sy0, sx1, sy1 = max(wx0, 0), max(wy0, 0), min(wx1, alpha.shape[1]), min(wy1, alpha.shape[0])
    a = alpha[sy0:sy1, sx0:sx1, None]
    # Resampled premultiplied, so transparent pixels' colours (arbitrary, or the background's) don't bleed in.
    window[sy0 - wy0:sy1 - wy0, sx0 - wx0:sx1 - wx0] = np.concatenate([rgb[sy0:sy1, sx0:sx1] * a, a], axis=-1)
    box = (cx - half - wx0, cy - half - wy0, cx + half - wx0, cy + half - wy0)
    out = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(window[..., c])).resize(
        (resolution, resolution), Image.Resampling.LANCZOS, box=box)) for c in range(4)], axis=-1)
    out_a = np.clip(out[..., 3:], 0.0, 1.0)  # Lanczos rings slightly outside [0, 1]
    out_rgb = np.where(out_a > 1e-4, np.clip(out[..., :3] / np.maximum(out_a, 1e-4), 0.0, 1.0), 0.0)
    rgba = np.round(np.concatenate([out_rgb, out_a], axis=-1) * 255).astype(np.uint8)
    rgba[rgba[..., 3] == 0, :3] = 0  # like the renders: no colour under zero alpha
    return rgba


def prepare_photo(path_or_image: Any, resolution: int, matting: str = "", fill: float = FRAME_FILL) -> Prepared:
    """A photo (a path or a PIL image) framed like the conditioning renders: (R, R, 4) straight-alpha RGBA.

    Alpha comes, in order, from the image's own alpha channel when some pixel is below OPAQUE_MIN; else from
    `matting`, a TorchScript file (`torch.jit.load`) of a module mapping a (1, 3, H, W) float32 image in [0, 1] to a
    (1, 1, H, W) alpha in [0, 1] at the same size (a tuple or list output counts by its first element), run on the
    CPU, e.g. an exported background-removal model; else from a key against a plain background sampled on the
    image's border (PhotoError when the border is not plain). No object (no alpha > 0.5) is a PhotoError.
    """
    if resolution < 1 or not 0 < fill <= 1:
        raise ValueError(f"need resolution >= 1 and 0 < fill <= 1, got {resolution}, {fill}")
    rgba, has_alpha = _load(path_or_image)
    rgb = rgba[..., :3].astype(np.float32)
    background_rgb = None
    if has_alpha and rgba[..., 3].min() < OPAQUE_MIN:
        source, alpha, rgb = "alpha", rgba[..., 3].astype(np.float32) / 255, rgb / 255
    elif matting:
        source, rgb = "matting_model", rgb / 255
        alpha = _model_alpha(rgb, matting)
    else:
        source = "plain_background"
        alpha, rgb, background = _plain_alpha(rgb)
        rgb = rgb / 255
        background_rgb = tuple(float(v) / 255 for v in background)
    return Prepared(_frame(rgb, alpha, resolution, fill), source, background_rgb)


def conditioning_image(prepared: Prepared, background: float | tuple[float, float, float] = 1.0) -> torch.Tensor:
    """(1, 3, R, R) float32 in [0, 1]: the prepared RGBA over a uniform background (a grey level or an RGB triple in
    [0, 1]), as the renders are in training."""
    import torch

    from flux3d.features.vae import over_background

    return torch.from_numpy(over_background(prepared.rgba, background))[None]

"""The render folder contract: where an asset's renders live and how a reader gets views back, apart from the
Blender code that writes them. Readers (curation, encode, shards, evaluation) import this, never Blender's module.
It also says what a missing texture looks like in a render (Blender draws an unresolved image as magenta), which
render validation and curation's heuristic both test for.

    renders/<sha>/views<N>/, cond<N>/, curation<N>/    each with NNN.png and transforms.json (render.py says more)
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import numpy as np

from flux3d.config.pipeline import RenderConfig

if TYPE_CHECKING:
    from flux3d.storage import Storage


def render_rel(sha256: str) -> str:
    return f"renders/{sha256}"


def view_sets(cfg: RenderConfig) -> list[tuple[str, int, int]]:
    """(folder, views, resolution) of the three view sets, in render order (a set of 0 views is not rendered)."""
    return [(f"views{cfg.views}", cfg.views, cfg.resolution),
            (f"cond{cfg.cond_views}", cfg.cond_views, cfg.cond_resolution),
            (f"curation{cfg.curation_views}", cfg.curation_views, cfg.curation_resolution)]


CURATION_FROM_MAIN = 10
"""Main-set views curation reads when no curation set is rendered (`render.curation_views = 0`)."""


def curation_set(cfg: RenderConfig) -> tuple[str, int]:
    """(folder, views) that curation scores and shows: the curation set, or without one (`curation_views = 0`, 10
    fewer renders per asset) `CURATION_FROM_MAIN` views spread over the main set, at the same 512 px."""
    folder, n, _ = view_sets(cfg)[2]
    if n:
        return folder, n
    folder, n, _ = view_sets(cfg)[0]
    return folder, min(n, CURATION_FROM_MAIN)


def spread(n: int, limit: int | None) -> list[int]:
    """Indices of `limit` views spread evenly over a set of `n` (all of them when limit is None or >= n)."""
    if limit is None or limit >= n:
        return list(range(n))
    return np.linspace(0, n - 1, limit).round().astype(int).tolist()


def load_views(storage: Storage, render_dir: str, folder: str, limit: int | None = None) -> list[np.ndarray]:
    """RGBA arrays of a published view set, in frame order; `limit` picks that many spread evenly.
    Raises OSError/ValueError when the render is missing or damaged."""
    from PIL import Image

    frames = json.loads(storage.fs.cat_file(f"{render_dir}/{folder}/transforms.json"))["frames"]
    frames = [frames[i] for i in spread(len(frames), limit)]
    out = []
    for frame in frames:
        with storage.fs.open(f"{render_dir}/{folder}/{frame['file_path']}", "rb") as f:
            out.append(np.asarray(Image.open(f).convert("RGBA")))
    return out


def curation_views(storage: Storage, render_dir: str, cfg: RenderConfig, limit: int | None = None) -> list[np.ndarray]:
    """The views curation judges (`curation_set`), at most `limit` of them spread evenly."""
    folder, n = curation_set(cfg)
    return load_views(storage, render_dir, folder, n if limit is None else min(limit, n))


def magenta_mask(rgb: np.ndarray) -> np.ndarray:
    """Boolean mask of missing-texture magenta in an (..., 3) float image in [0, 1]."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    lo = np.minimum(r, b)
    return (lo > 0.15) & (g < 0.35 * lo) & (np.abs(r - b) < 0.3 * np.maximum(r, b))

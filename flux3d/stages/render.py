"""Render stage: three view sets, their cameras and the normalised mesh of one asset, from one Blender session.

Output, `renders/<sha>/` (on local disk it appears complete or not at all: rendered into a temporary sibling,
then renamed; on an object store `render.json` is uploaded last):

    views150/000.png ...  transforms.json      main set (count and resolution from `[render]`)
    views150/000_depth.png, 000_normal.png     main-set passes (`render.passes`; see blender_passes.py)
    cond24/...            transforms.json      conditioning set
    curation10/...        transforms.json      curation set
    mesh.ply                                   the normalised scene, triangulated (input of voxelization)
    contact.png                                a few main-set views tiled on grey, for eyeballing
    render.json                                per-view validation stats, timings, device

`transforms.json` is TRELLIS's (aabb, scale, offset, frames[file_path, camera_angle_x, transform_matrix]) plus
OpenCV `K` and `w2c` per frame; see `cameras.py` for the conventions. All three sets share one normalisation.

Validation per view: foreground coverage (alpha > 0.5), blank (coverage < `blank_coverage`: out of frame or
invisible), clipped (foreground touches the image border), and the missing-texture magenta fraction of the
foreground (Blender renders an unresolved image texture as (1, 0, 1)). Every view blank -> `failed:blank_render`;
otherwise ok, with counts and the worst magenta fraction stored for curation.

Reasons: failed: import_error, unsupported_format, no_geometry, non_finite_geometry, degenerate_geometry,
no_device, blank_render, render_error, timeout, out_of_memory, blender_crash, missing_file.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import uuid
from typing import Any

import numpy as np
import pyarrow as pa

from flux3d.config.pipeline import RenderConfig, section_params
from flux3d.isolation import ChildWorker, run_isolated
from flux3d.records import FAILED, OK, StageResult, params_hash
from flux3d.stages.blender_render import RenderError, render_scene
from flux3d.stages.render_layout import magenta_mask, render_rel, view_sets
from flux3d.storage import TMP_MARK, Storage

RENDER_VERSION = 1
RENDER_COLUMNS = pa.schema([
    ("num_views", pa.int32()),
    ("blank_views", pa.int32()),
    ("clipped_views", pa.int32()),
    ("coverage_min", pa.float64()),
    ("magenta_fraction_max", pa.float64()),
    ("magenta_fraction_mean", pa.float64()),
    ("missing_images", pa.int32()),
    ("scale", pa.float64()),
    ("offset", pa.list_(pa.float64(), 3)),
    ("render_dir", pa.string()),
    ("render_device", pa.string()),
    ("setup_seconds", pa.float64()),
    ("views_seconds", pa.float64()),
])
# Fields that do not change the images: a different worker count or timeout leaves finished renders valid.
_NOT_OUTPUT = ("device", "threads", "workers", "timeout_s", "memory_mb", "assets_per_session")


def render_params(cfg: RenderConfig) -> str:
    params = {k: v for k, v in section_params(cfg).items() if k not in _NOT_OUTPUT}
    return params_hash("render", RENDER_VERSION, params)


def view_stats(png_path: str, blank_coverage: float) -> dict[str, Any]:
    """Validation numbers of one rendered RGBA view."""
    from PIL import Image

    rgba = np.asarray(Image.open(png_path).convert("RGBA"), dtype=np.float32) / 255.0
    fg = rgba[..., 3] > 0.5
    coverage = float(fg.mean())
    border = bool(fg[0].any() or fg[-1].any() or fg[:, 0].any() or fg[:, -1].any())
    magenta = magenta_mask(rgba[..., :3][fg])
    return {"coverage": coverage, "blank": coverage < blank_coverage, "clipped": border,
            "magenta": float(magenta.mean()) if fg.any() else 0.0}


def contact_sheet(paths: list[str], out_path: str, tile: int = 128, cols: int = 4) -> None:
    from PIL import Image

    rows = -(-len(paths) // cols)
    sheet = Image.new("RGB", (cols * tile, rows * tile), (128, 128, 128))
    for i, p in enumerate(paths):
        im = Image.open(p).convert("RGBA").resize((tile, tile), Image.LANCZOS)
        sheet.paste(im, ((i % cols) * tile, (i // cols) * tile), im)
    sheet.save(out_path)


def render_views(path: str, fmt: str, sha256: str, cfg: RenderConfig, out_dir: str) -> dict[str, Any]:
    """The child's work: Blender render, then validation and the contact sheet. Raises RenderError."""
    if not os.path.isfile(path):
        raise RenderError("missing_file", f"asset file {path} does not exist")
    facts = render_scene(path, fmt, sha256, cfg, out_dir)
    per_view = {}
    for folder, n, _ in view_sets(cfg):
        for i in range(n):
            per_view[f"{folder}/{i:03d}.png"] = view_stats(os.path.join(out_dir, folder, f"{i:03d}.png"),
                                                           cfg.blank_coverage)
    facts["views"] = per_view
    facts["pid"] = os.getpid()  # which Blender child rendered it (one renders many assets in turn)
    main = view_sets(cfg)[0][0]
    if cfg.contact_sheet_views:
        k = min(cfg.contact_sheet_views, cfg.views)
        picks = np.linspace(0, cfg.views - 1, k).round().astype(int)
        contact_sheet([os.path.join(out_dir, main, f"{i:03d}.png") for i in picks],
                      os.path.join(out_dir, "contact.png"))
    with open(os.path.join(out_dir, "render.json"), "w") as f:
        json.dump(facts, f, indent=1)
    return facts


def _child(path: str, fmt: str, sha256: str, cfg: RenderConfig, out_dir: str, worker: Any) -> tuple:
    """Runs in the isolated child: asset-level errors come back as ("error", reason, message)."""
    try:
        return ("ok", worker(path, fmt, sha256, cfg, out_dir))
    except RenderError as e:
        return ("error", e.reason, e.message)
    except MemoryError:
        return ("error", "out_of_memory", "MemoryError while rendering")
    except Exception as e:  # noqa: BLE001 - Blender raises RuntimeError for render failures
        return ("error", "render_error", f"{type(e).__name__}: {e}")


def _columns(facts: dict[str, Any] | None = None, render_dir: str | None = None) -> dict[str, Any]:
    if not facts:
        return {name: None for name in RENDER_COLUMNS.names}
    stats = list(facts["views"].values())
    magenta = [s["magenta"] for s in stats]
    return {
        "num_views": len(stats),
        "blank_views": sum(s["blank"] for s in stats),
        "clipped_views": sum(s["clipped"] for s in stats),
        "coverage_min": min(s["coverage"] for s in stats),
        "magenta_fraction_max": max(magenta),
        "magenta_fraction_mean": float(np.mean(magenta)),
        "missing_images": facts["missing_images"],
        "scale": facts["scale"],
        "offset": facts["offset"],
        "render_dir": render_dir,
        "render_device": facts["device"],
        "setup_seconds": facts["setup_s"],
        "views_seconds": sum(s["seconds"] for s in facts["sets"].values()),
    }


def render_asset(path: str, fmt: str, sha256: str, cfg: RenderConfig, storage: Storage,
                 worker: Any = render_views, session: ChildWorker | None = None) -> StageResult:
    """Render one asset in a bounded child and publish `renders/<sha>/` atomically; never raises for the asset.

    `worker(path, fmt, sha256, cfg, out_dir) -> facts` is the child's work (a test hook; default `render_views`).
    `session` is a Blender child kept for many assets (`BlenderSessions`); None starts one for this asset alone.
    """
    final_rel = render_rel(sha256)
    work = storage.local_dir(f"renders/{TMP_MARK}{uuid.uuid4().hex[:12]}-{sha256}")
    os.makedirs(work)
    try:
        args = (_child, path, fmt, sha256, cfg, work, worker)
        if session is None:
            outcome = run_isolated(*args, timeout_s=cfg.timeout_s, memory_mb=cfg.memory_mb)
        else:
            outcome = session.call(*args, timeout_s=cfg.timeout_s)
        if not outcome.ok:
            reason = {"crashed": "blender_crash", "error": "blender_crash"}.get(outcome.reason, outcome.reason)
            return StageResult(sha256, FAILED, reason, outcome.message, seconds=outcome.seconds, columns=_columns())
        kind, *rest = outcome.value
        if kind == "error":
            reason, message = rest
            return StageResult(sha256, FAILED, reason, message, seconds=outcome.seconds, columns=_columns())
        facts = rest[0]
        columns = _columns(facts, storage.path(final_rel))
        if columns["blank_views"] == columns["num_views"]:
            return StageResult(sha256, FAILED, "blank_render", "every view is empty (nothing visible in frame)",
                               seconds=outcome.seconds, columns=columns)
        storage.publish_dir(work, final_rel, last="render.json")
        return StageResult(sha256, OK, seconds=outcome.seconds, columns=columns)
    finally:
        shutil.rmtree(work, ignore_errors=True)


class BlenderSessions:
    """Blender children kept across assets, one per concurrent render (`render.workers`): each renders asset after
    asset (factory reset between them, `build_scene`), so the process start and `bpy` import are paid once per
    `render.assets_per_session` assets instead of once per asset. A hang or crash still costs only its own asset:
    that child is killed and the next asset gets a fresh one. Built by the stage's `setup` (once per local run or
    Ray actor); children end with it (`close`) or, at the latest, when their parent process does."""

    def __init__(self, cfg: RenderConfig) -> None:
        self._idle: queue.LifoQueue[ChildWorker] = queue.LifoQueue()
        for _ in range(cfg.workers):
            self._idle.put(ChildWorker(cfg.memory_mb, max_calls=cfg.assets_per_session))

    def render(self, path: str, fmt: str, sha256: str, cfg: RenderConfig, storage: Storage,
               worker: Any = render_views) -> StageResult:
        session = self._idle.get()  # one per concurrent caller: the stage runs at most `workers` at once
        try:
            return render_asset(path, fmt, sha256, cfg, storage, worker=worker, session=session)
        finally:
            self._idle.put(session)

    def close(self) -> None:
        while not self._idle.empty():
            self._idle.get().close()

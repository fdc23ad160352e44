"""`flux3d render`: render every inspect-ok asset not yet rendered with the current params, resumably.

One render per content hash (sha256), however many listings share it. Results go to the catalog's `render` stage
in batches of `ingest.batch_size`; a killed run loses at most the batches in flight, and temporary render folders
it left are swept on the next run (after an hour, so a concurrent worker's in-flight folder survives).
"""

from __future__ import annotations

from collections.abc import Callable

from flux3d.catalog import Catalog
from flux3d.config.pipeline import Config
from flux3d.executors.local import run_local
from flux3d.pipeline.stage import Stage, StageSummary, gpu_request
from flux3d.records import StageResult
from flux3d.stages.render import RENDER_COLUMNS, BlenderSessions, render_params, render_views
from flux3d.storage import Storage


def render_stage(cfg: Config, storage: Storage, catalog: Catalog, worker: Callable = render_views) -> Stage:
    """`worker` is the Blender child's work (a test hook)."""
    params = render_params(cfg.render)

    def one(sessions: BlenderSessions, row: dict) -> StageResult:
        return sessions.render(storage.local_copy(row["local_path"]), row["format"], row["sha256"], cfg.render,
                               storage, worker=worker)

    # Blender renders with every core it is given: a Ray actor holding the sessions claims `threads` CPUs (all of a
    # small node when 0).
    return Stage(name="render", params=params, columns=RENDER_COLUMNS, apply=one, workers=cfg.render.workers,
                 setup=lambda: BlenderSessions(cfg.render), teardown=BlenderSessions.close,
                 plan=lambda: catalog.todo("render", params, after=["download", "inspect"],
                                           result_columns=("state", "local_path"),
                                           asset_columns=("source", "file_identifier", "sha256", "format")),
                 cpus=float(cfg.render.threads or 2),
                 gpus=gpu_request("cuda" if cfg.render.device == "optix" else cfg.render.device),
                 sweep=("renders",), timeout_s=cfg.render.timeout_s * 1.5 + 60)


def run_render(cfg: Config, storage: Storage, catalog: Catalog, limit: int | None = None,
               worker: Callable = render_views) -> StageSummary:
    """Render up to `limit` pending assets (None = all)."""
    return run_local(render_stage(cfg, storage, catalog, worker), catalog, batch_size=cfg.ingest.batch_size,
                     limit=limit)

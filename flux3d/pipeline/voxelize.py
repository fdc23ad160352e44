"""`flux3d voxelize`: voxelize every kept (curate ok) asset not yet voxelized at this resolution, resumably."""

from __future__ import annotations

from flux3d.catalog import Catalog
from flux3d.config.pipeline import Config
from flux3d.executors.local import run_local
from flux3d.pipeline.stage import Stage, StageSummary
from flux3d.stages.voxelize import VOXEL_COLUMNS, voxelize_asset, voxelize_params
from flux3d.storage import Storage


def voxelize_stage(cfg: Config, storage: Storage, catalog: Catalog) -> Stage:
    resolution = cfg.voxelize.resolution
    params = voxelize_params(resolution)
    # numpy releases the GIL in the heavy parts, so threads give real parallelism here.
    return Stage(name="voxelize", params=params, columns=VOXEL_COLUMNS, workers=cfg.voxelize.workers,
                 plan=lambda: catalog.todo("voxelize", params, after=["render", "curate"],
                                           result_columns=("state", "render_dir"), asset_columns=("sha256",)),
                 apply=lambda _, row: voxelize_asset(row["sha256"], row["render_dir"], storage, resolution),
                 timeout_s=600.0)


def run_voxelize(cfg: Config, storage: Storage, catalog: Catalog, limit: int | None = None) -> StageSummary:
    return run_local(voxelize_stage(cfg, storage, catalog), catalog, batch_size=cfg.ingest.batch_size, limit=limit)

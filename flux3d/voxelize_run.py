"""`flux3d voxelize`: voxelize every kept (curate ok) asset not yet voxelized at this resolution, resumably."""

from __future__ import annotations

from typing import Any

from flux3d.catalog import Catalog
from flux3d.config import Config
from flux3d.records import StageResult
from flux3d.runner import StageRun, run_stage
from flux3d.stages.voxelize import VOXEL_COLUMNS, voxelize_asset, voxelize_params
from flux3d.storage import Storage


def run_voxelize(cfg: Config, storage: Storage, catalog: Catalog, limit: int | None = None) -> StageRun:
    resolution = cfg.voxelize.resolution
    params = voxelize_params(resolution)
    todo = catalog.todo("voxelize", params, after=["render", "curate"], result_columns=("state", "render_dir"),
                        asset_columns=("sha256",))
    if limit is not None:
        todo = todo.slice(0, limit)
    rows = (row for batch in todo.to_batches(4096) for row in batch.to_pylist())

    def one(row: dict[str, Any]) -> StageResult:
        return voxelize_asset(row["sha256"], row["render_dir"], storage, resolution)

    # numpy releases the GIL in the heavy parts, so threads give real parallelism here.
    return run_stage("voxelize", one, rows, workers=cfg.voxelize.workers, batch_size=cfg.ingest.batch_size,
                     commit=lambda rs: catalog.write_results("voxelize", params, rs, VOXEL_COLUMNS))

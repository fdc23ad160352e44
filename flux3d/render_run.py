"""`flux3d render`: render every inspect-ok asset not yet rendered with the current params, resumably.

One render per content hash (sha256), however many listings share it. Results go to the catalog's `render` stage
in batches of `ingest.batch_size`; a killed run loses at most the batches in flight, and temporary render folders
it left are swept on the next run (after an hour, so a concurrent worker's in-flight folder survives).
"""

from __future__ import annotations

from collections.abc import Callable

from flux3d.catalog import Catalog, records
from flux3d.config import Config
from flux3d.records import AssetRecord, StageResult
from flux3d.runner import StageRun, run_stage
from flux3d.stages.render import RENDER_COLUMNS, render_asset, render_params, render_views
from flux3d.storage import Storage


def run_render(cfg: Config, storage: Storage, catalog: Catalog, limit: int | None = None,
               worker: Callable = render_views) -> StageRun:
    """Render up to `limit` pending assets (None = all). `worker` is the child's work (a test hook)."""
    storage.sweep_tmp("renders")  # unfinished render folders of killed workers
    params = render_params(cfg.render)
    todo = catalog.todo("render", params, after=["download", "inspect"], result_columns=("state", "local_path"),
                        asset_columns=("source", "file_identifier", "sha256", "format"))
    if limit is not None:
        todo = todo.slice(0, limit)

    def one(rec: AssetRecord) -> StageResult:
        return render_asset(storage.local_copy(rec.local_path), rec.format, rec.sha256, cfg.render, storage,
                            worker=worker)

    return run_stage("render", one, records(todo), workers=cfg.render.workers, batch_size=cfg.ingest.batch_size,
                     commit=lambda rs: catalog.write_results("render", params, rs, RENDER_COLUMNS))

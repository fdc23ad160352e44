"""`flux3d encode`: FLUX feature volumes for every kept, voxelized asset not yet encoded with these settings."""

from __future__ import annotations

from typing import Any

from flux3d.catalog import Catalog
from flux3d.config import Config
from flux3d.features.encode import FEATURE_COLUMNS, encode_asset, encode_params
from flux3d.features.vae import LatentEncoder
from flux3d.records import StageResult
from flux3d.runner import StageRun, run_stage
from flux3d.storage import Storage


def load_encoder(cfg: Config) -> LatentEncoder:
    e = cfg.encode
    return LatentEncoder.load(e.encoder, e.location, e.decoder or None, device=e.device, dtype=e.dtype)


def run_encode(cfg: Config, storage: Storage, catalog: Catalog, limit: int | None = None,
               encoder: LatentEncoder | None = None) -> StageRun:
    params = encode_params(cfg)
    todo = catalog.todo("encode", params, after=["render", "curate", "voxelize"],
                        result_columns=("state", "render_dir", "voxels_path"), asset_columns=("sha256",))
    if limit is not None:
        todo = todo.slice(0, limit)
    if not todo.num_rows:
        return StageRun("encode")
    encoder = encoder or load_encoder(cfg)  # once per run: the model is the expensive part to set up
    rows = (row for batch in todo.to_batches(4096) for row in batch.to_pylist())

    def one(row: dict[str, Any]) -> StageResult:
        return encode_asset(row["sha256"], row["render_dir"], row["voxels_path"], encoder, cfg, storage)

    return run_stage("encode", one, rows, workers=cfg.encode.workers, batch_size=cfg.ingest.batch_size,
                     commit=lambda rs: catalog.write_results("encode", params, rs, FEATURE_COLUMNS))

"""`flux3d encode`: feature volumes (FLUX latents, or `encode.encoder`'s features) for every kept, voxelized asset not
yet encoded with these settings."""

from __future__ import annotations

from flux3d.catalog import Catalog
from flux3d.config.pipeline import Config
from flux3d.executors.local import run_local
from flux3d.features.encode import FEATURE_COLUMNS, encode_asset, encode_params
from flux3d.features.encoders import FeatureEncoder, load_feature_encoder
from flux3d.pipeline.stage import Stage, StageSummary, gpu_request
from flux3d.storage import Storage


def load_encoder(cfg: Config) -> FeatureEncoder:
    return load_feature_encoder(cfg.encode)


def encode_stage(cfg: Config, storage: Storage, catalog: Catalog, encoder: FeatureEncoder | None = None) -> Stage:
    """The encoder is built once per worker (a Ray actor holds it across assets); `encoder` is a test hook."""
    params = encode_params(cfg)
    return Stage(name="encode", params=params, columns=FEATURE_COLUMNS, workers=cfg.encode.workers,
                 plan=lambda: catalog.todo("encode", params, after=["render", "curate", "voxelize"],
                                           result_columns=("state", "render_dir", "voxels_path"),
                                           asset_columns=("sha256",)),
                 setup=(lambda: encoder) if encoder is not None else (lambda: load_encoder(cfg)),
                 apply=lambda enc, row: encode_asset(row["sha256"], row["render_dir"], row["voxels_path"], enc, cfg,
                                                     storage),
                 cpus=1.0, gpus=gpu_request(cfg.encode.device), timeout_s=1800.0)


def run_encode(cfg: Config, storage: Storage, catalog: Catalog, limit: int | None = None,
               encoder: FeatureEncoder | None = None) -> StageSummary:
    return run_local(encode_stage(cfg, storage, catalog, encoder), catalog, batch_size=cfg.ingest.batch_size,
                     limit=limit)

"""Small real datasets for the model tests: assets through the real pipeline stages in this process (ingest,
Blender render, curation with the demo's tiny scorer, voxelize, encode, shard) into a dataset version.

The encoder is the real TAEF1 when ../shared/weights has it (latents that mean something), else the demo's tiny
random FLUX-shaped AutoencoderKL, so tests that only need *a* dataset run without ../shared.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from flux3d.catalog import Catalog
from flux3d.config import Config, load_config
from flux3d.curate_run import curate
from flux3d.demo import make_demo_models
from flux3d.encode_run import run_encode
from flux3d.ingest import ingest
from flux3d.render_run import run_render
from flux3d.shard_run import run_shard
from flux3d.storage import Storage
from flux3d.voxelize_run import run_voxelize

SHARED = Path(__file__).resolve().parents[2] / "shared"
TAEF1 = SHARED / "weights" / "taef1_encoder.safetensors"


@dataclass
class Dataset:
    root: Path
    version_dir: str
    cfg: Config
    stats: dict
    encoder: str
    encoder_location: str


def build_dataset(tmp: Path, files: list[Path], *, views: int = 24, resolution: int = 64, voxels: int = 32,
                  supervision_views: int = 16, cond_views: int = 2, cond_resolution: int = 64,
                  cond: str = "images", image_quality: int = 100, expect: int | None = None) -> Dataset:
    """Run the data pipeline over `files` (copied into tmp/assets; an OBJ brings its .mtl and texture folder as
    further entries, hence `expect`, the assets that must reach the shards) and return the dataset version."""
    assets = tmp / "assets"
    assets.mkdir(parents=True, exist_ok=True)
    for f in files:
        dst = assets / f.name
        shutil.copytree(f, dst) if f.is_dir() else shutil.copy(f, dst)
    models = make_demo_models(str(tmp / "models"))
    encode = ({"encoder": "taef1", "location": str(TAEF1)} if TAEF1.is_file() else models["encode"])
    cfg = load_config(overrides={
        "storage.root": str(tmp / "data"),
        "render": {"views": views, "resolution": resolution, "cond_views": cond_views,
                   "cond_resolution": cond_resolution, "curation_views": 2, "curation_resolution": 64, "samples": 8,
                   "denoise": False, "contact_sheet_views": 0, "timeout_s": 300.0},
        "curate": models["curate"],
        "voxelize": {"resolution": voxels},
        "encode": {**encode, "batch_size": 8, "cond_latents": cond == "latents"},
        "shard": {"supervision_views": supervision_views, "cond_views": cond_views, "val_fraction": 0.0,
                  "image_quality": image_quality, "cond": cond},
    })
    ingest(cfg, [f"local:{assets}"])
    storage = Storage(cfg.storage.root)
    catalog = Catalog(storage)
    run_render(cfg, storage, catalog)
    curate(cfg, storage, catalog, report=False)
    run_voxelize(cfg, storage, catalog)
    run_encode(cfg, storage, catalog)
    run = run_shard(cfg, storage, catalog)
    expect = len(files) if expect is None else expect
    if not run.stats or sum(run.stats["assets"].values()) != expect:
        raise AssertionError(f"expected {expect} assets in the shards, got {run.stats and run.stats['assets']}; "
                             f"catalog: {catalog.status()}")
    return Dataset(tmp, run.path, cfg, run.stats, cfg.encode.encoder, cfg.encode.location)


def render_frames(ds: Dataset) -> dict[str, list[dict]]:
    """sha256 -> the main view set's frames (transforms.json) with absolute image paths, for held-out views."""
    import json

    out = {}
    for render_dir in sorted((ds.root / "data" / "renders").iterdir()):
        folder = next(p for p in render_dir.iterdir() if p.is_dir() and p.name.startswith("views"))
        t = json.loads((folder / "transforms.json").read_text())
        out[render_dir.name] = [{**f, "path": str(folder / f["file_path"])} for f in t["frames"]]
    return out

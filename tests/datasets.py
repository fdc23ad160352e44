"""Small datasets for the model tests, two ways.

`build_dataset`: assets through the real pipeline stages in this process (ingest, Blender render, curation with the
demo's tiny scorer, voxelize, encode, shard) into a dataset version, for tests that check learning on real geometry.
The encoder is the real TAEF1 when ../shared/weights has it (latents that mean something), else the demo's tiny
random FLUX-shaped AutoencoderKL.

`synthetic_dataset`: no Blender. Per-asset stage outputs made up here (a voxel blob, its views painted from the
render's own cameras, random latents) are written where the stages write them and sharded by the project's own
builder and writer (`make_item`, `ShardSet`, `finish`): a valid dataset version in seconds, for the contracts
of the loader, trainer, models and evaluation that only need valid shards.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

from flux3d.catalog import Catalog
from flux3d.config.load import load_config
from flux3d.config.pipeline import Config
from flux3d.demo import make_demo_models
from flux3d.pipeline.curate import curate
from flux3d.pipeline.encode import run_encode
from flux3d.pipeline.ingest import ingest
from flux3d.pipeline.render import run_render
from flux3d.pipeline.shard import run_shard
from flux3d.pipeline.voxelize import run_voxelize
from flux3d.storage import Storage
from tests.conftest import TAEF1


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


def synthetic_dataset(tmp: Path, assets: int, *, views: int = 8, resolution: int = 32, voxels: int = 16,
                      supervision_views: int = 8, cond_views: int = 2, cond_resolution: int = 32,
                      encode: dict | None = None, seed: int = 0, image_quality: int = 100,
                      val_fraction: float = 0.0) -> Dataset:
    """A dataset version of `assets` synthetic assets under tmp/data, laid out as the pipeline lays it out
    (renders/<sha>/<view set>/NNN.png + transforms.json, voxels/<sha>.npy, features/<encoder>/<sha>.npz,
    shards/<version>/...). `encode`: the config's encode section (default: the demo's tiny random VAE);
    `val_fraction`: the share of assets held out in the val split."""
    import io
    import json

    import numpy as np
    from PIL import Image

    from flux3d.pipeline.shard import finish
    from flux3d.shards.build import dataset_version, make_item, split_of
    from flux3d.shards.writer import ShardSet
    from flux3d.stages.cameras import frame_record, project, view_set_cameras
    from flux3d.stages.render_layout import view_sets

    encode = encode or make_demo_models(str(tmp / "models"))["encode"]
    cfg = load_config(overrides={
        "storage.root": str(tmp / "data"),
        "render": {"views": views, "resolution": resolution, "cond_views": cond_views,
                   "cond_resolution": cond_resolution},
        "voxelize": {"resolution": voxels},
        "encode": encode,
        "shard": {"supervision_views": supervision_views, "cond_views": cond_views, "val_fraction": val_fraction,
                  "image_quality": image_quality, "cond": "images"},
    })
    storage = Storage(cfg.storage.root)
    rng = np.random.default_rng(seed)
    fov = np.radians(cfg.render.fov_deg)
    grid = np.stack(np.meshgrid(*[np.arange(voxels)] * 3, indexing="ij"), -1).reshape(-1, 3)
    rows = []
    for a in range(assets):
        sha = hashlib.sha256(f"synthetic-{seed}-{a}".encode()).hexdigest()
        # The surface voxels of an ellipsoid, its size and place differing per asset; one colour per asset.
        centre = voxels / 2 + rng.uniform(-voxels / 8, voxels / 8, 3)
        radii = rng.uniform(voxels / 6, voxels / 3, 3)
        inside = (((grid + 0.5 - centre) / radii) ** 2).sum(1) <= 1
        core = (((grid + 0.5 - centre) / (radii - 1)) ** 2).sum(1) <= 1
        coords = grid[inside & ~core].astype(np.uint8)  # sorted (x, y, z), as voxelize writes them
        colour = np.append(rng.integers(40, 256, 3), 255).astype(np.uint8)
        points = (coords + 0.5) / voxels - 0.5
        render_dir = f"renders/{sha}"
        for folder, n, res in view_sets(cfg.render)[:2]:
            frames = []
            for i, c2w in enumerate(view_set_cameras(sha, folder, n, cfg.render.radius)):
                frame = frame_record(f"{i:03d}.png", c2w, fov, res, res)
                uv, _ = project(points, np.array(frame["K"]), np.array(frame["w2c"]))
                image = np.zeros((res, res, 4), np.uint8)
                px = np.clip(np.floor(uv).astype(int), 0, res - 1)
                for dy in (-1, 0, 1):  # each voxel centre paints a 3x3 pixel footprint
                    for dx in (-1, 0, 1):
                        image[np.clip(px[:, 1] + dy, 0, res - 1), np.clip(px[:, 0] + dx, 0, res - 1)] = colour
                buf = io.BytesIO()
                Image.fromarray(image, "RGBA").save(buf, format="PNG")
                storage.write_bytes(f"{render_dir}/{folder}/{frame['file_path']}", buf.getvalue())
                frames.append(frame)
            storage.write_bytes(f"{render_dir}/{folder}/transforms.json", json.dumps({"frames": frames}).encode())
        buf = io.BytesIO()
        np.save(buf, coords, allow_pickle=False)
        storage.write_bytes(f"voxels/{sha}.npy", buf.getvalue())
        mu = (rng.standard_normal(16) + 0.5 * rng.standard_normal((len(coords), 16))).astype(np.float16)
        sigma = rng.uniform(0.01, 0.1, (len(coords), 16)).astype(np.float16)
        buf = io.BytesIO()
        np.savez(buf, coords=coords, mu=mu, sigma=sigma)
        storage.write_bytes(f"features/{cfg.encode.encoder}/{sha}.npz", buf.getvalue())
        rows.append({"sha256": sha, "features_path": storage.path(f"features/{cfg.encode.encoder}/{sha}.npz"),
                     "render_dir": storage.path(render_dir), "source": "synthetic",
                     "file_identifier": f"synthetic/{a}", "license": "CC0-1.0", "attribution": "", "metadata": None})
    rows.sort(key=lambda r: r["sha256"])
    version = dataset_version(cfg, [r["sha256"] for r in rows])
    shards = ShardSet(storage, f"shards/{version}", cfg.shard.max_bytes)
    for split in ("train", "val"):
        todo = [r for r in rows if split_of(r["sha256"], cfg.shard.val_fraction, cfg.shard.split_seed) == split]
        list(shards.write(split, (make_item(r, cfg, storage, version) for r in todo)))
    stats = finish(shards, cfg, version, failed=0)
    return Dataset(tmp, storage.path(f"shards/{version}"), cfg, stats, cfg.encode.encoder, cfg.encode.location)


def render_frames(ds: Dataset) -> dict[str, list[dict]]:
    """sha256 -> the main view set's frames (transforms.json) with absolute image paths, for held-out views."""
    import json

    out = {}
    for render_dir in sorted((ds.root / "data" / "renders").iterdir()):
        folder = next(p for p in render_dir.iterdir() if p.is_dir() and p.name.startswith("views"))
        t = json.loads((folder / "transforms.json").read_text())
        out[render_dir.name] = [{**f, "path": str(folder / f["file_path"])} for f in t["frames"]]
    return out

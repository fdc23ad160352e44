"""The encode stage on one asset: its views through the FLUX VAE (or another `encode.encoder`, features/encoders.py),
latents projected onto its voxels (DA-SLAT).

Output `features/<encoder>/<sha>.npz` (written atomically), read by `flux3d shard`; C is the encoder's channel
count (16 for FLUX; mu's shape records it):

    coords   uint8 (N, 3)     the voxelize stage's active voxels
    mu       float16 (N, C)   per-voxel mean over the views of the bilinearly sampled latent mean
    sigma    float16 (N, C)   the same for the latent std (0 for deterministic encoders: TAEF1, DINOv2, rgb)
    seen     uint16 (N,)      views that counted for each voxel
    cond     float16 (V, 16, h, w)  conditioning-view latents, only with encode.cond_latents (FLUX encoders)

float16 halves the bytes of the 360K-asset feature set; normalised FLUX latents lie within a few units, where
float16's step (~1e-3) is far below the VAE's own noise (sigma ~ 1e-2 .. 1e-1).
"""

from __future__ import annotations

import io
import json
import time
from typing import Any

import numpy as np
import pyarrow as pa

from flux3d.config.pipeline import Config
from flux3d.curation.aesthetic import BACKGROUNDS
from flux3d.features.encoders import FeatureEncoder
from flux3d.features.project import aggregate
from flux3d.features.vae import over_background
from flux3d.records import FAILED, OK, StageResult, params_hash
from flux3d.stages.render_layout import load_views, view_sets
from flux3d.storage import Storage

ENCODE_VERSION = 1
FEATURE_COLUMNS = pa.schema([
    ("features_path", pa.string()),
    ("views", pa.int32()),
    ("visibility", pa.bool_()),
    ("unseen_voxels", pa.int64()),
    ("mean_seen_views", pa.float32()),
    ("cond_views", pa.int32()),
    ("project_seconds", pa.float32()),
])


def encode_params(cfg: Config) -> str:
    """What decides the features: encoder and weights, view set, background, visibility, voxel grid. Device and
    dtype are left out: bf16 on GPU and fp32 on CPU differ by rounding, not by meaning."""
    e = cfg.encode
    return params_hash("encode", ENCODE_VERSION, {
        "encoder": e.encoder, "location": e.location, "background": e.background, "visibility": e.visibility,
        "tolerance": e.tolerance, "cond_latents": e.cond_latents, "views": view_sets(cfg.render)[0][:2],
        "cond": view_sets(cfg.render)[1][:2], "resolution": cfg.voxelize.resolution})


def features_rel(encoder: str, sha256: str) -> str:
    return f"features/{encoder}/{sha256}.npz"


def flatten(rgba: np.ndarray, background: str) -> np.ndarray:
    """(V, H, W, 4) uint8 RGBA -> (V, 3, H, W) float32 in [0, 1] over a named background colour."""
    return over_background(rgba, np.asarray(BACKGROUNDS[background], np.float32) / 255)


def encode_views(encoder: FeatureEncoder, images: list[np.ndarray], background: str, batch_size: int
                 ) -> tuple[Any, Any]:
    """(mu, sigma), each (V, C, h, w) float32 on the encoder's device, `batch_size` views per forward pass."""
    import torch

    mus, sigmas = [], []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(flatten(np.stack(images[i:i + batch_size]), background))
        mu, sigma = encoder.encode(x)
        mus.append(mu.float())
        sigmas.append(sigma.float())
    return torch.cat(mus), torch.cat(sigmas)


def _depths(storage: Storage, render_dir: str, folder: str, t: dict[str, Any]) -> Any | None:
    """(V, H, W) float32 camera depth from the render's depth pass, or None when the render was made without one."""
    import torch
    from PIL import Image

    if "depth_scale" not in t:
        return None
    out = []
    for frame in t["frames"]:
        path = f"{render_dir}/{folder}/{frame['file_path'].removesuffix('.png')}_depth.png"
        with storage.fs.open(path, "rb") as f:  # absent: the render claims a depth pass it lacks, bad_render
            out.append(np.asarray(Image.open(f), dtype=np.float32) / t["depth_scale"])
    return torch.from_numpy(np.stack(out))


def encode_asset(sha256: str, render_dir: str, voxels_path: str, encoder: FeatureEncoder, cfg: Config,
                 storage: Storage) -> StageResult:
    """Encode one asset; a missing or damaged input becomes a failed result, never an exception."""
    t0 = time.perf_counter()
    empty = {name: None for name in FEATURE_COLUMNS.names}
    e = cfg.encode
    folder, _, res = view_sets(cfg.render)[0]
    try:
        coords = np.load(io.BytesIO(storage.fs.cat_file(voxels_path)), allow_pickle=False)
        t = json.loads(storage.fs.cat_file(f"{render_dir}/{folder}/transforms.json"))
        images = load_views(storage, render_dir, folder)
        depth = _depths(storage, render_dir, folder, t) if e.visibility else None
        cond_folder = view_sets(cfg.render)[1][0]
        cond_images = load_views(storage, render_dir, cond_folder) if e.cond_latents else []
    except (OSError, ValueError, KeyError) as exc:  # absent files, truncated PNG/JSON/npy
        return StageResult(sha256, FAILED, "bad_render", f"{render_dir}: {exc}", columns=empty)
    if any(im.shape[:2] != (res, res) for im in images):
        return StageResult(sha256, FAILED, "bad_render", f"views are not {res} px", columns=empty)

    mu, sigma = encode_views(encoder, images, e.background, e.batch_size)
    t1 = time.perf_counter()
    K = np.array([f["K"] for f in t["frames"]])
    w2c = np.array([f["w2c"] for f in t["frames"]])
    vmu, vsigma, seen = aggregate(coords, mu, sigma, K, w2c, res, depth, e.tolerance or None,
                                  cfg.voxelize.resolution)
    project_s = time.perf_counter() - t1
    arrays = {"coords": coords, "mu": vmu.numpy().astype(np.float16), "sigma": vsigma.numpy().astype(np.float16),
              "seen": seen.numpy().astype(np.uint16)}
    if cond_images:
        arrays["cond"] = encode_views(encoder, cond_images, e.background, e.batch_size)[0].cpu().numpy().astype(
            np.float16)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    rel = features_rel(e.encoder, sha256)
    storage.write_bytes(rel, buf.getvalue())
    return StageResult(sha256, OK, seconds=time.perf_counter() - t0, columns={
        "features_path": storage.path(rel), "views": len(images), "visibility": depth is not None,
        "unseen_voxels": int((seen == 0).sum()), "mean_seen_views": float(seen.float().mean()),
        "cond_views": len(cond_images), "project_seconds": project_s})


"""One asset's shard sample from the stage outputs, the train/val split and the dataset version.

`make_item` is a plain function over one asset: its feature file (`flux3d encode`), its render (views, cameras)
and its catalog row (source, license, attribution). A damaged input raises `SampleError` with a reason code;
the shard run records it and leaves the asset out.
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

import numpy as np

from flux3d.config.pipeline import Config, section_params
from flux3d.features.encode import encode_params
from flux3d.shards.format import encode_image, encode_sample
from flux3d.shards.writer import Item, Sums, tar_bytes
from flux3d.stages.render_layout import spread, view_sets
from flux3d.storage import Storage

SHARD_FORMAT = 1


class SampleError(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def split_of(sha256: str, val_fraction: float, seed: int) -> str:
    """train | val from a seeded hash of the asset: the same asset stays on the same side in every dataset
    version, so a retrained model is never validated on what an earlier version trained on."""
    h = int.from_bytes(hashlib.sha256(f"{seed}:{sha256}".encode()).digest()[:8], "big")
    return "val" if h < val_fraction * 2 ** 64 else "train"


def dataset_version(cfg: Config, keys: list[str]) -> str:
    """Hash of everything that decides the shards' contents: shard settings, feature params, the kept assets."""
    shard = section_params(cfg.shard)
    if not shard["max_voxels"]:  # added after versions existed: hashed only when set, so they keep their names
        del shard["max_voxels"]
    h = hashlib.sha256(json.dumps({"format": SHARD_FORMAT, "shard": shard, "encode": encode_params(cfg)},
                                  sort_keys=True).encode())
    for key in sorted(keys):
        h.update(key.encode())
    return h.hexdigest()[:16]


def _cameras(storage: Storage, render_dir: str, folder: str, picks: list[int]) -> tuple[list[dict], list[str]]:
    t = json.loads(storage.fs.cat_file(f"{render_dir}/{folder}/transforms.json"))
    frames = [t["frames"][i] for i in picks]
    return [{"K": f["K"], "w2c": f["w2c"]} for f in frames], [f"{render_dir}/{folder}/{f['file_path']}" for f in frames]


def _images(storage: Storage, paths: list[str], quality: int) -> list[bytes]:
    from PIL import Image

    out = []
    for path in paths:
        with storage.fs.open(path, "rb") as f:
            out.append(encode_image(np.asarray(Image.open(f).convert("RGBA")), quality))
    return out


def make_item(row: dict[str, Any], cfg: Config, storage: Storage, version: str) -> Item:
    """The sample of one asset. `row`: sha256, features_path, render_dir, source, file_identifier, license,
    attribution, metadata (the listing's JSON; its captions, e.g. TRELLIS-500K's, go into meta.json)."""
    sha, render_dir = row["sha256"], row["render_dir"]
    try:
        f = np.load(io.BytesIO(storage.fs.cat_file(row["features_path"])), allow_pickle=False)
        coords, mu, sigma = f["coords"], f["mu"], f["sigma"]
        cond_latents = f["cond"] if cfg.shard.cond == "latents" else None
    except (OSError, ValueError, KeyError) as e:
        raise SampleError("bad_features", f"{row['features_path']}: {e}") from e
    if cfg.shard.max_voxels and len(coords) > cfg.shard.max_voxels:
        raise SampleError("over_voxel_cap", f"{len(coords)} active voxels, shard.max_voxels = {cfg.shard.max_voxels}")
    (views, n_views, res), (cond, n_cond, cond_res) = view_sets(cfg.render)[:2]
    try:
        cams, paths = _cameras(storage, render_dir, views, spread(n_views, cfg.shard.supervision_views))
        cond_cams, cond_paths = _cameras(storage, render_dir, cond, spread(n_cond, cfg.shard.cond_views))
        images = _images(storage, paths, cfg.shard.image_quality)
        cond_images = _images(storage, cond_paths, cfg.shard.image_quality) if cfg.shard.cond == "images" else None
    except (OSError, ValueError, KeyError) as e:  # absent or truncated render files
        raise SampleError("bad_render", f"{render_dir}: {e}") from e
    if cond_latents is not None:
        cond_latents = cond_latents[spread(len(cond_latents), cfg.shard.cond_views)]
    split = split_of(sha, cfg.shard.val_fraction, cfg.shard.split_seed)
    meta = {"sha256": sha, "source": row["source"], "uid": row["file_identifier"], "license": row["license"],
            "attribution": row["attribution"], "num_voxels": int(len(coords)), "split": split,
            "encoder": cfg.encode.encoder, "dataset_version": version,
            "captions": json.loads(row.get("metadata") or "{}").get("captions", [])}
    cameras = {"views": cams, "cond": cond_cams, "resolution": res, "cond_resolution": cond_res}
    sample = encode_sample(sha, coords, mu, sigma, images, cameras, meta, cond_images, cond_latents)
    m = mu.astype(np.float64)
    sums = Sums(voxels=len(coords), mu=m.sum(0).tolist(), mu_sq=(m * m).sum(0).tolist(),
                sigma=sigma.astype(np.float64).sum(0).tolist(), field_bytes=_field_bytes(sample))
    index_row = {"key": sha, "split": split, "num_voxels": int(len(coords)), "source": row["source"],
                 "license": row["license"]}
    return Item(sample, index_row, sums)


def _field_bytes(sample: dict[str, Any]) -> dict[str, int]:
    """Tar bytes per kind of field (all views together), for the bytes-per-asset report."""
    out: dict[str, int] = {}
    for k, v in sample.items():
        if not k.startswith("_"):
            kind = k.split("_")[0].split(".")[0]  # view_007.webp -> view, mu.npy -> mu
            out[kind] = out.get(kind, 0) + tar_bytes({k: v})
    return out

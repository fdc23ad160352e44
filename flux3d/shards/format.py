"""The shard sample format, in one place for the writer (`flux3d shard`) and the training loader.

One webdataset sample per asset, key = sha256 (no dots, as webdataset splits the key at the first one). Fields:

    coords.npy      uint8 (N, 3)        active voxels of the 64^3 grid, sorted (x, y, z)
    mu.npy          float16 (N, C)      per-voxel FLUX latent mean (DA-SLAT); C = 16, or the channels of the
                                        study's other encoders (stats.json "channels")
    sigma.npy       float16 (N, C)      per-voxel FLUX latent std (all 0 for a deterministic encoder)
    view_000.webp   RGBA                decoder-supervision views (a subset of the render's main set)
    cond_000.webp   RGBA                conditioning views, when shard.cond = images
    cond.npy        float16 (V, 16, h, w) conditioning latents, when shard.cond = latents
    cameras.json    {"views": [{"K", "w2c"}...], "cond": [...], "resolution", "cond_resolution"}  OpenCV, world-to-camera
    meta.json       sha256, source, uid, license, attribution, num_voxels, split, encoder, dataset version,
                    captions (the source list's text descriptions, [] when it has none)

Arrays are plain `.npy` (no pickle) so any reader, in any language, can decode them without this package.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def read_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def view_field(i: int) -> str:
    return f"view_{i:03d}.webp"


def cond_field(i: int) -> str:
    return f"cond_{i:03d}.webp"


def encode_sample(key: str, coords: np.ndarray, mu: np.ndarray, sigma: np.ndarray, views: list[bytes],
                  cameras: dict[str, Any], meta: dict[str, Any], cond_images: list[bytes] | None = None,
                  cond_latents: np.ndarray | None = None) -> dict[str, Any]:
    """The webdataset dict of one asset (`__key__` plus field -> bytes)."""
    if "." in key:
        raise ValueError(f"sample key {key!r} must not contain a dot")
    if coords.dtype != np.uint8 or coords.ndim != 2 or coords.shape[1] != 3:
        raise ValueError(f"coords must be uint8 (N, 3), got {coords.dtype} {coords.shape}")
    if mu.ndim != 2 or len(mu) != len(coords) or sigma.shape != mu.shape:
        raise ValueError(f"mu and sigma must be (N, C) for N = {len(coords)}, got {mu.shape}, {sigma.shape}")
    sample: dict[str, Any] = {
        "__key__": key,
        "coords.npy": npy_bytes(coords),
        "mu.npy": npy_bytes(mu.astype(np.float16)),
        "sigma.npy": npy_bytes(sigma.astype(np.float16)),
        "cameras.json": json.dumps(cameras, sort_keys=True).encode(),
        "meta.json": json.dumps(meta, sort_keys=True).encode(),
    }
    for i, data in enumerate(views):
        sample[view_field(i)] = data
    for i, data in enumerate(cond_images or []):
        sample[cond_field(i)] = data
    if cond_latents is not None:
        sample["cond.npy"] = npy_bytes(cond_latents.astype(np.float16))
    return sample


def decode_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """Arrays and JSON of one raw sample (as webdataset yields it: field -> bytes); images stay compressed bytes,
    in view order, so a loader decodes only the ones it uses."""
    out: dict[str, Any] = {
        "key": sample["__key__"],
        "coords": read_npy(sample["coords.npy"]),
        "mu": read_npy(sample["mu.npy"]),
        "sigma": read_npy(sample["sigma.npy"]),
        "cameras": json.loads(sample["cameras.json"]),
        "meta": json.loads(sample["meta.json"]),
    }
    out["views"] = [sample[k] for k in sorted(k for k in sample if k.startswith("view_"))]
    out["cond_images"] = [sample[k] for k in sorted(k for k in sample if k.startswith("cond_"))]
    out["cond_latents"] = read_npy(sample["cond.npy"]) if "cond.npy" in sample else None
    return out


def decode_image(data: bytes) -> np.ndarray:
    """RGBA uint8 (H, W, 4) from a stored view."""
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGBA"))


def encode_image(rgba: np.ndarray, quality: int) -> bytes:
    """WebP bytes of an RGBA view. quality 100 = lossless, then bit-exact (`exact` keeps the colour under
    transparent pixels too, so a round trip is the identity); `method=4` is Pillow's default speed/size balance."""
    from PIL import Image

    buf = io.BytesIO()
    lossless = quality >= 100
    Image.fromarray(rgba, "RGBA").save(buf, format="WEBP", quality=quality, lossless=lossless, exact=lossless,
                                       method=4)
    return buf.getvalue()


def is_lossless(data: bytes) -> bool:
    """Whether a stored view is lossless WebP (a VP8L bitstream, `image_quality = 100`): walks the RIFF chunks
    (VP8X and ALPH may come first) to the image bitstream's chunk; lossy views carry a VP8 one instead."""
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        raise ValueError("not a WebP image")
    at = 12
    while at + 8 <= len(data):
        fourcc, size = data[at:at + 4], int.from_bytes(data[at + 4:at + 8], "little")
        if fourcc in (b"VP8L", b"VP8 "):
            return fourcc == b"VP8L"
        at += 8 + size + (size & 1)  # chunks are padded to even sizes
    raise ValueError("a WebP image without an image bitstream")

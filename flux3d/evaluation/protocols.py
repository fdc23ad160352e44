"""The paper's evaluation protocols over the assets of a dataset version (Toys4k in the paper, any here):

- reconstruction (Tab. 2): the decoder on the ground-truth feature volume, rendered from one random supervision
  view per asset; SSIM / PSNR / LPIPS against that view.
- generation (Tab. 3): SMDiT samples the latents from one conditioning view on the ground-truth sparse layout (the
  paper's setting), the decoder renders them from the input view's camera: SSIM / PSNR / LPIPS against the input;
  CLIP score of `metric_views` renders against the input; FD / KD (Inception-v3 and DINOv2 features) between the
  generated and ground-truth views at the same cameras, over all assets.
- predicted_layout (Tab. 10, with a structure model): the full image-to-3D pipeline on the same input view: stage 1
  predicts the layout from the image, then generation as above on it (PSNR / LPIPS / CLIP / FD), and the layout
  against the ground-truth voxels (IoU, Chamfer distance between voxel centres in the unit cube).
- multiview (Tab. 12): the final Gaussians (generated, else reconstructed) at `multiview_views` views spread over
  the full azimuth (the stored supervision views nearest to evenly spaced azimuths), PSNR per view: mean and std.

Every random choice (asset sample, views, noise) is seeded by (seed, asset), so two runs evaluate the same things.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from flux3d.config.evaluation import EvalConfig
from flux3d.features.vae import over_background
from flux3d.models.gaussians import Gaussians
from flux3d.models.rasterizer import render_views
from flux3d.shards.format import decode_image, decode_sample


@dataclass
class EvalAsset:
    key: str
    coords: np.ndarray  # uint8 (N, 3)
    mu: np.ndarray  # float (N, 16)
    views: list[bytes]
    cameras: dict[str, Any]
    cond_images: list[bytes]


def sample_keys(version_dir: str, split: str, n: int, seed: int) -> dict[str, str]:
    """key -> shard of a seeded sample of `n` assets of `split` ("all" = both), from index.parquet."""
    with fsspec.open(f"{version_dir.rstrip('/')}/index.parquet", "rb") as f:
        table = pq.read_table(f, columns=["key", "shard", "split"])
    if split != "all":
        table = table.filter(pc.equal(table["split"], split))
    rows = sorted(zip(table["key"].to_pylist(), table["shard"].to_pylist()))
    if not rows:
        raise ValueError(f"{version_dir} has no {split!r} assets to evaluate")
    chosen = random.Random(seed).sample(rows, min(n, len(rows)))
    return dict(sorted(chosen))


def eval_assets(version_dir: str, keys: dict[str, str]) -> Iterator[EvalAsset]:
    """The chosen assets, read shard by shard (each shard opened once)."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    base = version_dir.rstrip("/")
    for shard in sorted(set(keys.values())):
        url = f"{base}/{shard}"
        with fsspec.open(url, "rb") as f:
            for raw in group_by_keys(tar_file_expander([{"url": url, "stream": f}])):
                if raw["__key__"] in keys:
                    s = decode_sample(raw)
                    yield EvalAsset(s["key"], s["coords"], s["mu"].astype(np.float32), s["views"], s["cameras"],
                                    s["cond_images"])


def image(data: bytes, background: float, resolution: int) -> torch.Tensor:
    """(3, R, R) float in [0, 1]: a stored RGBA view over the background, resized (antialiased) to R."""
    x = torch.from_numpy(over_background(decode_image(data), background))
    if x.shape[-1] != resolution:
        x = F.interpolate(x[None], size=(resolution, resolution), mode="bilinear", antialias=True)[0]
    return x.clamp(0, 1)


def scaled(K: list | np.ndarray, stored: int, resolution: int) -> torch.Tensor:
    """Pixel intrinsics of a `stored`-px camera for a `resolution`-px image of the same view."""
    k = torch.tensor(K, dtype=torch.float32).reshape(3, 3).clone()
    k[:2] *= resolution / stored
    return k


def render(g: Gaussians, K_V33: torch.Tensor, w2c_V44: torch.Tensor, resolution: int,
           background: float) -> torch.Tensor:
    """(V, 3, R, R) renders in [0, 1], on the CPU."""
    dev = g.means.device
    out = render_views([g], K_V33[None].to(dev), w2c_V44[None].to(dev), resolution, resolution,
                       torch.full((1, 3), background, device=dev))
    return out[0].clamp(0, 1).cpu()


def azimuth_views(cameras: list[dict], n: int) -> list[int]:
    """Indices of up to `n` distinct views whose camera azimuths are nearest to n evenly spaced azimuths."""
    w2c = np.array([c["w2c"] for c in cameras], dtype=np.float64).reshape(-1, 4, 4)
    centres = -np.einsum("vji,vj->vi", w2c[:, :3, :3], w2c[:, :3, 3])  # -R^T t
    az = np.arctan2(centres[:, 1], centres[:, 0])
    chosen: list[int] = []
    for k in range(min(n, len(cameras))):
        target = -math.pi + 2 * math.pi * k / min(n, len(cameras))
        gap = np.abs(np.angle(np.exp(1j * (az - target))))
        gap[chosen] = np.inf
        chosen.append(int(gap.argmin()))
    return sorted(chosen)


@dataclass
class AssetResult:
    key: str
    rows: dict[str, float] = field(default_factory=dict)
    grid: list[torch.Tensor] = field(default_factory=list)
    """Images for the report's grid: input, ours (input view), ground truth."""


def view_metrics(prefix: str, pred: torch.Tensor, target: torch.Tensor, lpips_net: torch.nn.Module) -> dict:
    from flux3d.evaluation.metrics import lpips, psnr, ssim

    return {f"{prefix}_psnr": float(psnr(pred, target).mean()), f"{prefix}_ssim": float(ssim(pred, target).mean()),
            f"{prefix}_lpips": float(lpips(pred, target, lpips_net).mean())}


def rng_for(cfg: EvalConfig, key: str) -> random.Random:
    return random.Random(f"{cfg.seed}:{key}")

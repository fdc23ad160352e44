"""DA-SLAT feature volumes: per-view FLUX latent maps sampled at the voxel centres and averaged over views.

For every view, each active voxel's centre is projected with the render's OpenCV camera (`K`, `w2c` from
`transforms.json`) and the view's (mu, sigma) latent maps are sampled bilinearly there (`grid_sample`,
align_corners=False: latent cell j covers pixels [8j, 8j + 8)). TRELLIS averages over every view in which the
centre lands inside the image. A voxel on the far side of the object lands on pixels that show the near side,
so that plain mean blends front and back appearance. With `depth` (the render's depth pass) a view only counts
for a voxel whose centre lies no deeper than the visible surface there plus `tolerance` (default: one voxel
diagonal, since an active voxel's centre is within half a diagonal of the surface); a voxel that no view sees
falls back to the plain mean. `tests/test_features.py` measures both on a real render.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def voxel_centres(coords: np.ndarray, resolution: int = 64) -> np.ndarray:
    """World positions (N, 3) of voxel centres of a grid over [-0.5, 0.5]^3."""
    return (coords.astype(np.float64) + 0.5) / resolution - 0.5


def project(points: torch.Tensor, K: torch.Tensor, w2c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel coordinates (V, N, 2) and camera depth (V, N) of world points (N, 3) in V OpenCV cameras."""
    cam = torch.einsum("vij,nj->vni", w2c[:, :3, :3], points) + w2c[:, None, :3, 3]
    z = cam[..., 2]
    uv = torch.einsum("vij,vnj->vni", K, cam)[..., :2] / z.clamp_min(1e-9)[..., None]
    return uv, z


def aggregate(coords: np.ndarray, mu: torch.Tensor, sigma: torch.Tensor, K: np.ndarray, w2c: np.ndarray,
              image_size: int, depth: torch.Tensor | None = None, tolerance: float | None = None,
              resolution: int = 64, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-voxel (mu, sigma) (N, C) and the number of views that saw each voxel (N,): with `depth`, views passing
    the visibility test (0 for a voxel that fell back to the plain mean); without, views it projects into.

    mu, sigma: (V, C, h, w) latent maps of V views rendered at `image_size` px; K, w2c: (V, 3, 3), (V, 4, 4);
    depth: optional (V, image_size, image_size) camera-axis depth, 0 where no surface. Runs on the maps' device
    (the encoder's GPU, so the latents never travel), `chunk` voxels at a time: the sampled features are a
    (V, 2C, chunk) tensor, ~0.6 GB at 150 views instead of 4 GB for a 60K-voxel asset at once.
    """
    device = mu.device
    pts = torch.from_numpy(voxel_centres(coords, resolution)).float().to(device)
    K_t = torch.as_tensor(np.asarray(K), dtype=torch.float32, device=device)
    w2c_t = torch.as_tensor(np.asarray(w2c), dtype=torch.float32, device=device)
    maps = torch.cat([mu, sigma], dim=1).float()
    depth = depth.to(device) if depth is not None else None
    tol = np.sqrt(3) / resolution if tolerance is None else tolerance
    parts = [_aggregate_chunk(pts[i:i + chunk], maps, K_t, w2c_t, image_size, depth, tol)
             for i in range(0, len(pts), chunk)]
    feats = torch.cat([p[0] for p in parts]) if parts else maps.new_zeros((0, maps.shape[1]))
    seen = torch.cat([p[1] for p in parts]) if parts else torch.zeros(0, dtype=torch.long, device=device)
    c = mu.shape[1]
    return feats[:, :c].cpu(), feats[:, c:].cpu(), seen.cpu()


def _aggregate_chunk(pts: torch.Tensor, maps: torch.Tensor, K: torch.Tensor, w2c: torch.Tensor, image_size: int,
                     depth: torch.Tensor | None, tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    uv, z = project(pts, K, w2c)
    grid = (uv / image_size * 2 - 1)[:, :, None, :]  # (V, N, 1, 2) in grid_sample's [-1, 1]
    inside = (grid.abs() <= 1).all(dim=-1)[..., 0] & (z > 0)  # (V, N)
    w = inside.float()
    seen_by = inside
    if depth is not None:
        px = uv.floor().long().clamp(0, image_size - 1)
        seen = depth[torch.arange(len(depth), device=pts.device)[:, None], px[..., 1], px[..., 0]]  # nearest pixel
        visible = inside & (seen > 0) & (z <= seen + tol)
        # A voxel no view sees (thin or self-occluded geometry) keeps the plain mean rather than nothing.
        w = torch.where(visible.any(dim=0, keepdim=True), visible.float(), w)
        seen_by = visible
    sampled = F.grid_sample(maps, grid, mode="bilinear", padding_mode="border", align_corners=False)[..., 0]
    total = w.sum(dim=0)  # (N,)
    feats = torch.einsum("vcn,vn->nc", sampled, w) / total.clamp_min(1)[:, None]
    return feats, seen_by.sum(dim=0)

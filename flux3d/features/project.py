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
              resolution: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-voxel (mu, sigma) (N, C) and the number of views that saw each voxel (N,): with `depth`, views passing
    the visibility test (0 for a voxel that fell back to the plain mean); without, views it projects into.

    mu, sigma: (V, C, h, w) latent maps of V views rendered at `image_size` px; K, w2c: (V, 3, 3), (V, 4, 4);
    depth: optional (V, image_size, image_size) camera-axis depth, 0 where no surface.
    """
    pts = torch.from_numpy(voxel_centres(coords, resolution)).float()
    uv, z = project(pts, torch.from_numpy(np.asarray(K)).float(), torch.from_numpy(np.asarray(w2c)).float())
    grid = (uv / image_size * 2 - 1)[:, :, None, :]  # (V, N, 1, 2) in grid_sample's [-1, 1]
    inside = (grid.abs() <= 1).all(dim=-1)[..., 0] & (z > 0)  # (V, N)
    w = inside.float()
    seen_by = inside
    if depth is not None:
        tol = np.sqrt(3) / resolution if tolerance is None else tolerance
        px = uv.floor().long().clamp(0, image_size - 1)
        seen = depth[torch.arange(len(depth))[:, None], px[..., 1], px[..., 0]]  # nearest depth pixel
        visible = inside & (seen > 0) & (z <= seen + tol)
        # A voxel no view sees (thin or self-occluded geometry) keeps the plain mean rather than nothing.
        w = torch.where(visible.any(dim=0, keepdim=True), visible.float(), w)
        seen_by = visible
    maps = torch.cat([mu, sigma], dim=1).float()
    sampled = F.grid_sample(maps, grid, mode="bilinear", padding_mode="border", align_corners=False)[..., 0]
    total = w.sum(dim=0)  # (N,)
    feats = torch.einsum("vcn,vn->nc", sampled, w) / total.clamp_min(1)[:, None]
    c = mu.shape[1]
    return feats[:, :c], feats[:, c:], seen_by.sum(dim=0)

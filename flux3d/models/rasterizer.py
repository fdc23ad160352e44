"""Differentiable 3D Gaussian splatting: one interface, two backends (gsplat's CUDA kernels, or plain PyTorch).

Conventions (gsplat's, used across the project): `w2c` is the 4x4 world-to-camera matrix in OpenCV axes (+x right,
+y down, +z forward, camera z = depth); K = [[fx, 0, cx], [0, fy, cy], [0, 0, 1]] in pixels; pixel (row i, col j)
is centred at (j + 0.5, i + 0.5).

The torch backend reproduces gsplat 1.5.3 `rasterization(..., rasterize_mode="classic")` so both give the same
image up to float rounding (and float32 fast-math in the kernels):
- Projection (ProjectionEWA3DGSFused.cu): Sigma = R S S^T R^T, moved to camera space; the pinhole Jacobian J at
  the mean, with x/z and y/z clamped to 1.3x the half field of view so a Gaussian far outside the image does not
  get a huge footprint; Sigma2d = J Sigma_cam J^T + eps2d I; conic = Sigma2d^-1. Culled: depth outside
  [near, far], det <= 0, opacity < 1/255, or a footprint box entirely off-screen. The box half-size per axis is
  ceil(e sqrt(Sigma2d_axis)), e = min(3.33, sqrt(2 ln(255 opacity))) (gsplat's opacity-aware bound).
- Compositing (RasterizeToPixels3DGSFwd.cu): front to back by depth, alpha = min(0.999, o exp(-d^T conic d / 2)),
  skipped below 1/255; a pixel stops before the Gaussian that would bring its transmittance T to <= 1e-4;
  rgb = sum c_i a_i T_i + T_final bg, alpha = 1 - T_final, depth = sum z_i a_i T_i / max(alpha, 1e-10) ("ED").

gsplat bins Gaussians into 16x16 tiles, but the result does not depend on the tiles: a pixel with alpha >= 1/255
lies inside the opacity-aware box (its half-width is exactly the ellipse's extent at that alpha), and anything
else is skipped. So the torch backend works on (pixel, Gaussian) pairs from the boxes rather than on dense
per-tile matrices: decoder Gaussians are about a pixel wide, a tile x its Gaussians matrix would be almost all
zeros, and pairs cost O(sum of footprints) in time and memory. Two passes:
1. Without autograd: expand every visible box into pairs (boxes bucketed by size, each bucket a dense stencil,
   in chunks), compute alpha, keep alpha >= 1/255, sort by one int64 key (pixel, depth rank), and drop the pairs
   past the T <= 1e-4 stop. T comes from an exclusive
   segmented cumsum of log(1 - alpha) in float64 (a global cumsum over millions of pairs would lose float32's
   digits when the segment start is subtracted).
2. With autograd, on the surviving pairs only: recompute alpha from the differentiable projection, the same
   segmented cumsum, and `index_add` colours, depth and log T into pixels.
The thresholds make the image piecewise smooth; within a piece the gradients are exact, as gsplat's are.

Shape legend: C cameras, N Gaussians, H x W pixels, V visible (camera, Gaussian) pairs, P (pixel, Gaussian) pairs.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from flux3d.models.gaussians import Gaussians

ALPHA_MIN = 1.0 / 255.0
ALPHA_MAX = 0.999
T_MIN = 1e-4
EXTEND_MAX = 3.33
PAIR_CHUNK = 1 << 23
"""Pairs expanded at once in pass 1 (about 1 GB of temporaries), so a few huge footprints cannot exhaust memory."""

Backend = Literal["auto", "torch", "gsplat"]


@dataclass
class RenderOutput:
    rgb: torch.Tensor
    """(C, H, W, 3) composited colour over the background."""
    alpha: torch.Tensor
    """(C, H, W, 1) 1 - final transmittance."""
    depth: torch.Tensor
    """(C, H, W, 1) expected camera-z depth of the composited Gaussians (0 where alpha = 0)."""


@dataclass
class Projection:
    """Per (camera, Gaussian) screen-space footprint; `visible` False marks culled entries."""

    means2d: torch.Tensor  # (C, N, 2) pixels
    conics: torch.Tensor  # (C, N, 3) upper triangle (a, b, c) of Sigma2d^-1
    depths: torch.Tensor  # (C, N) camera z
    radii: torch.Tensor  # (C, N, 2) int64 box half-size in pixels (no gradient)
    visible: torch.Tensor  # (C, N) bool


def project(g: Gaussians, w2c_C44: torch.Tensor, K_C33: torch.Tensor, width: int, height: int, *, near: float = 0.01,
            far: float = 1e10, eps2d: float = 0.3) -> Projection:
    """EWA projection of every Gaussian into every camera (gsplat's pinhole math, see the module docstring)."""
    w, x, y, z = F.normalize(g.quats, dim=-1).unbind(-1)
    R_N33 = torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
                         2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
                         2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1).reshape(-1, 3, 3)
    M_N33 = R_N33 * g.scales[:, None, :]  # Sigma = M M^T

    Rw_C33, t_C3 = w2c_C44[:, :3, :3], w2c_C44[:, :3, 3]
    mean_c_CN3 = torch.einsum("cij,nj->cni", Rw_C33, g.means) + t_C3[:, None, :]
    mx, my, mz = mean_c_CN3.unbind(-1)
    in_depth = (mz >= near) & (mz <= far)
    # Culled entries still flow through the arithmetic; a safe z keeps their inf/nan out of the backward pass.
    z = torch.where(in_depth, mz, torch.ones_like(mz))
    fx, fy, cx, cy = (K_C33[:, 0, 0, None], K_C33[:, 1, 1, None], K_C33[:, 0, 2, None], K_C33[:, 1, 2, None])
    lim_x_pos, lim_x_neg = (width - cx) / fx + 0.15 * width / fx, cx / fx + 0.15 * width / fx
    lim_y_pos, lim_y_neg = (height - cy) / fy + 0.15 * height / fy, cy / fy + 0.15 * height / fy
    tx = z * torch.minimum(torch.maximum(mx / z, -lim_x_neg), lim_x_pos)
    ty = z * torch.minimum(torch.maximum(my / z, -lim_y_neg), lim_y_pos)

    # J is 2x3 with J[0] = (fx/z, 0, -fx tx/z^2), J[1] = (0, fy/z, -fy ty/z^2); U = J Rw M gives Sigma2d = U U^T
    # without materialising the (C, N, 3, 3) camera-space covariances.
    Rw_C133 = Rw_C33[:, None]
    j0 = (fx / z)[..., None] * Rw_C133[..., 0, :] - (fx * tx / z**2)[..., None] * Rw_C133[..., 2, :]
    j1 = (fy / z)[..., None] * Rw_C133[..., 1, :] - (fy * ty / z**2)[..., None] * Rw_C133[..., 2, :]
    u0_CN3 = torch.einsum("cni,nij->cnj", j0, M_N33)
    u1_CN3 = torch.einsum("cni,nij->cnj", j1, M_N33)
    a = (u0_CN3 * u0_CN3).sum(-1) + eps2d
    b = (u0_CN3 * u1_CN3).sum(-1)
    c = (u1_CN3 * u1_CN3).sum(-1) + eps2d
    det = a * c - b * b
    det_safe = torch.where(det > 0, det, torch.ones_like(det))
    conics = torch.stack([c / det_safe, -b / det_safe, a / det_safe], -1)
    means2d = torch.stack([fx * mx / z + cx, fy * my / z + cy], -1)

    with torch.no_grad():
        opac = g.opacities.detach()[None, :].expand_as(mz)
        extend = torch.sqrt(2 * torch.log(opac.clamp_min(ALPHA_MIN) / ALPHA_MIN)).clamp_max(EXTEND_MAX)
        radii = torch.ceil(extend[..., None] * torch.stack([a, c], -1).detach().sqrt())
        m2 = means2d.detach()
        on_screen = ((m2[..., 0] + radii[..., 0] > 0) & (m2[..., 0] - radii[..., 0] < width)
                     & (m2[..., 1] + radii[..., 1] > 0) & (m2[..., 1] - radii[..., 1] < height))
        visible = in_depth & (det > 0) & (opac >= ALPHA_MIN) & on_screen & (radii > 0).any(-1)
    return Projection(means2d, conics, z, radii.long(), visible)


def _alpha(means2d: torch.Tensor, conics: torch.Tensor, opac: torch.Tensor, px: torch.Tensor,
           py: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha and the Mahalanobis half-distance sigma of Gaussians (means2d (..., 2, *), conics (..., 3, *)) at pixel
    centres (px + 0.5, py + 0.5); the trailing dims broadcast."""
    dx = means2d[:, 0] - (px + 0.5)
    dy = means2d[:, 1] - (py + 0.5)
    sigma = 0.5 * (conics[:, 0] * dx * dx + conics[:, 2] * dy * dy) + conics[:, 1] * dx * dy
    return torch.clamp(opac * torch.exp(-sigma), max=ALPHA_MAX), sigma


def _segment_exclusive_cumsum(x_P: torch.Tensor, pix_P: torch.Tensor) -> torch.Tensor:
    """Exclusive cumsum of x within runs of equal (sorted) pixel ids."""
    excl = torch.cumsum(x_P, 0) - x_P
    starts = torch.ones_like(pix_P, dtype=torch.bool)
    starts[1:] = pix_P[1:] != pix_P[:-1]
    return excl - excl[starts][torch.cumsum(starts, 0) - 1]


def _stencil_sides(max_side: int) -> list[int]:
    """Square stencil sides for bucketing boxes: every side up to 8, then steps of 1.25x (< 1.6x wasted area)."""
    sides = list(range(1, 9))
    while sides[-1] < max_side:
        sides.append(math.ceil(sides[-1] * 1.25))
    return sides


@torch.no_grad()
def _contributing_pairs(proj: Projection, opacities_N: torch.Tensor, width: int,
                        height: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 1: the (camera * N + Gaussian, pixel) pairs that gsplat would composite, in compositing order.

    Boxes are bucketed by their longer side and each bucket is expanded as a dense (boxes, S * S) stencil by
    broadcasting: per-pair gathers (repeat_interleave) cost several times more on CPU than the arithmetic itself.
    """
    C, N = proj.depths.shape
    vis_V = proj.visible.reshape(-1).nonzero()[:, 0]
    m2_V2, radii_V2 = proj.means2d.detach().reshape(-1, 2)[vis_V], proj.radii.reshape(-1, 2)[vis_V]
    conics_V3, opac_V = proj.conics.detach().reshape(-1, 3)[vis_V], opacities_N.detach()[vis_V % N]
    # Pixel j is inside the box when |j + 0.5 - mean| <= radius.
    lo_V2 = torch.ceil(m2_V2 - radii_V2 - 0.5).clamp(min=0)
    hi_V2 = torch.minimum(torch.floor(m2_V2 + radii_V2 - 0.5), m2_V2.new_tensor([width - 1, height - 1]))
    size_V2 = (hi_V2 - lo_V2 + 1).clamp(min=0).long()
    lo_V2 = lo_V2.long()
    side_V = size_V2.max(-1).values
    owners, pixels, alphas = [], [], []
    prev = 0
    for side in _stencil_sides(max(width, height)):
        bucket = ((side_V > prev) & (side_V <= side)).nonzero()[:, 0]
        prev = side
        oy, ox = (t.reshape(-1) for t in torch.meshgrid(*[torch.arange(side, device=vis_V.device)] * 2, indexing="ij"))
        for rows in bucket.split(max(1, PAIR_CHUNK // side**2)):
            px = lo_V2[rows, 0, None] + ox
            py = lo_V2[rows, 1, None] + oy
            in_box = (ox < size_V2[rows, 0, None]) & (oy < size_V2[rows, 1, None])
            alpha, sigma = _alpha(m2_V2[rows, :, None], conics_V3[rows, :, None], opac_V[rows, None], px, py)
            r, k = (in_box & (sigma >= 0) & (alpha >= ALPHA_MIN)).nonzero(as_tuple=True)
            owners.append(rows[r])
            pixels.append(py[r, k] * width + px[r, k])
            alphas.append(alpha[r, k])
    if not owners:
        empty = torch.zeros(0, dtype=torch.long, device=vis_V.device)
        return empty, empty
    owner_P, alpha_P = torch.cat(owners), torch.cat(alphas)
    pix_P = torch.cat(pixels) + (vis_V[owner_P] // N) * (height * width)
    # Ties in depth keep the lower (camera, Gaussian) index first, like gsplat's stable radix sort.
    depth_rank_V = torch.empty_like(vis_V)
    depth_rank_V[torch.sort(proj.depths.detach().reshape(-1)[vis_V], stable=True).indices] = torch.arange(
        len(vis_V), device=vis_V.device)
    order = torch.sort(pix_P * len(vis_V) + depth_rank_V[owner_P]).indices
    owner_P, pix_P, log_1m_alpha_P = owner_P[order], pix_P[order], torch.log1p(-alpha_P[order].double())
    log_t_incl = _segment_exclusive_cumsum(log_1m_alpha_P, pix_P) + log_1m_alpha_P
    # T is monotone along a pixel's run, so this keeps a prefix of every run: the pairs before gsplat's early stop.
    keep = log_t_incl > math.log(T_MIN)
    return vis_V[owner_P[keep]], pix_P[keep]


def _rasterize_torch(g: Gaussians, w2c_C44: torch.Tensor, K_C33: torch.Tensor, width: int, height: int,
                     background_C3: torch.Tensor, near: float, far: float, eps2d: float) -> RenderOutput:
    C, N = w2c_C44.shape[0], len(g)
    proj = project(g, w2c_C44, K_C33, width, height, near=near, far=far, eps2d=eps2d)
    cn_P, pix_P = _contributing_pairs(proj, g.opacities, width, height)
    # One gather of everything a pair needs (and one scatter-add in backward) instead of five.
    per_cn = torch.cat([proj.means2d, proj.conics, g.opacities[None, :, None].expand(C, N, 1),
                        g.colors[None].expand(C, N, 3), proj.depths[..., None]], -1).reshape(C * N, 10)
    m2_P2, conics_P3, opac_P, feats_P4 = per_cn[cn_P].split([2, 3, 1, 4], -1)
    alpha_P, _ = _alpha(m2_P2, conics_P3, opac_P[:, 0], (pix_P % width).to(m2_P2.dtype),
                        ((pix_P // width) % height).to(m2_P2.dtype))
    log_1m_alpha_P = torch.log1p(-alpha_P.double())
    weight_P = alpha_P * torch.exp(_segment_exclusive_cumsum(log_1m_alpha_P, pix_P)).to(alpha_P.dtype)
    feats_P4 = feats_P4 * weight_P[:, None]
    num_pix = C * height * width
    acc = feats_P4.new_zeros(num_pix, 4).index_add(0, pix_P, feats_P4).reshape(C, height, width, 4)
    log_t = log_1m_alpha_P.new_zeros(num_pix).index_add(0, pix_P, log_1m_alpha_P)
    t_final = torch.exp(log_t).to(acc.dtype).reshape(C, height, width, 1)
    alpha = 1 - t_final
    rgb = acc[..., :3] + t_final * background_C3[:, None, None, :]
    return RenderOutput(rgb=rgb, alpha=alpha, depth=acc[..., 3:] / alpha.clamp_min(1e-10))


def _rasterize_gsplat(g: Gaussians, w2c_C44: torch.Tensor, K_C33: torch.Tensor, width: int, height: int,
                      background_C3: torch.Tensor, near: float, far: float, eps2d: float) -> RenderOutput:
    import gsplat  # CUDA-only dependency: imported here so this module loads without it

    # "RGB+ED" renders depth as a 4th channel and appends a 0 to the backgrounds for it.
    out, alpha, _ = gsplat.rasterization(g.means, g.quats, g.scales, g.opacities, g.colors, w2c_C44, K_C33, width,
                                         height, near_plane=near, far_plane=far, eps2d=eps2d,
                                         backgrounds=background_C3, render_mode="RGB+ED", rasterize_mode="classic",
                                         packed=False)
    return RenderOutput(rgb=out[..., :3], alpha=alpha, depth=out[..., 3:])


@functools.cache
def _gsplat_installed() -> bool:
    return importlib.util.find_spec("gsplat") is not None


def rasterize(g: Gaussians, w2c_C44: torch.Tensor, K_C33: torch.Tensor, width: int, height: int, *,
              background: torch.Tensor | None = None, backend: Backend = "auto", near: float = 0.01,
              far: float = 1e10, eps2d: float = 0.3) -> RenderOutput:
    """Render the Gaussians `g` from C cameras; differentiable in every Gaussian parameter (not the cameras).

    Args:
        g: the Gaussians; bf16/fp16 ones are rendered in float32, float64 ones in float64 (torch backend only).
        w2c_C44: (C, 4, 4) world-to-camera matrices, OpenCV axes.
        K_C33: (C, 3, 3) pixel intrinsics.
        width, height: image size in pixels.
        background: (3,) or (C, 3) colour behind the Gaussians; None = black.
        backend: "gsplat" (CUDA tensors, needs the gsplat package), "torch" (any device), or "auto" = gsplat when
            the Gaussians are on CUDA and gsplat is installed, else torch.
        near, far: camera-z range; Gaussians whose centre lies outside it are culled.
        eps2d: screen-space blur added to every 2D covariance (pixels^2), gsplat's "classic" anti-aliasing.
    """
    C = w2c_C44.shape[0] if w2c_C44.ndim == 3 else 0
    if C < 1 or w2c_C44.shape != (C, 4, 4) or K_C33.shape != (C, 3, 3):
        raise ValueError(f"expected w2c (C, 4, 4) and K (C, 3, 3), got {tuple(w2c_C44.shape)}, {tuple(K_C33.shape)}")
    if width < 1 or height < 1 or not 0 <= near < far or eps2d < 0:
        raise ValueError(f"bad image size or planes: {width}x{height}, near={near}, far={far}, eps2d={eps2d}")
    if backend == "auto":
        backend = "gsplat" if g.means.is_cuda and _gsplat_installed() else "torch"
    if backend not in ("torch", "gsplat"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'gsplat', got {backend!r}")
    dtype = torch.float64 if g.means.dtype == torch.float64 and backend == "torch" else torch.float32
    g = g.to(dtype)
    w2c_C44, K_C33 = w2c_C44.to(g.means.device, dtype), K_C33.to(g.means.device, dtype)
    if background is None:
        background = torch.zeros(3)
    if background.shape not in ((3,), (C, 3)):
        raise ValueError(f"background must be (3,) or ({C}, 3), got {tuple(background.shape)}")
    background_C3 = background.to(g.means.device, dtype).expand(C, 3)
    if backend == "gsplat" and not g.means.is_cuda:
        raise ValueError("the gsplat backend needs CUDA tensors")
    # Geometry and compositing in fp32 whatever the caller's autocast: under bf16 the projection einsums and the
    # alpha blending round to 8 bits of mantissa (about 1% error on the image and its gradients), which the
    # training loss would then chase.
    with torch.autocast(g.means.device.type, enabled=False):
        if backend == "gsplat":
            return _rasterize_gsplat(g, w2c_C44, K_C33, width, height, background_C3.contiguous(), near, far, eps2d)
        return _rasterize_torch(g, w2c_C44, K_C33, width, height, background_C3, near, far, eps2d)


def render_views(gaussians: list[Gaussians], K_BV33: torch.Tensor, w2c_BV44: torch.Tensor, height: int, width: int,
                 background_B3: torch.Tensor) -> torch.Tensor:
    """Each asset's Gaussians from its own V cameras -> (B, V, 3, H, W) images over its background (training
    targets, evaluation views and previews all render through here)."""
    images = [rasterize(g, w2c_BV44[b], K_BV33[b], width, height, background=background_B3[b]).rgb
              for b, g in enumerate(gaussians)]
    return torch.stack(images).permute(0, 1, 4, 2, 3)

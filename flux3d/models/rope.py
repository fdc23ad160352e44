"""N-axis rotary position embedding (FLUX's EmbedND), the modal-aware positions of MARoPE, and the sinusoidal
absolute embedding that the "w/o MARoPE" ablation substitutes for it.

RoPE: the head dim D is split into per-axis bands, `axes_dim[a]` channels (axes_dim[a] / 2 adjacent pairs) for axis a,
each band with its own frequency ladder omega_k = theta^(-2k / axes_dim[a]). Channel pair (2i, 2i + 1) of a token at
position p is rotated by the angle p[a] * omega_k of its band, so <R(p) q, R(p') k> depends on p - p' only, and moving
along one axis rotates only that axis's band. This is FLUX's convention (adjacent pairs, bands concatenated in axis
order; `flux/math.py::rope`, `EmbedND`), not the half-split convention of GPT-NeoX / Llama.

MARoPE (paper sec. 4.2): 3 axes. Voxel tokens keep their (x, y, z) on the (patchified) grid of size G; image patch
(i, j) of an h x w token grid sits at (i * s, j * s, G), a virtual plane just beyond z_max = G - 1. RoPE's decay with
distance then biases each image patch toward the voxels near "its" point of the plane, and the correspondence
itself is learned (no camera). s = 1 is the paper's literal placement; s = None stretches the image grid over the
voxel grid (s = G / h down the rows, G / w across the columns).

The rotation is returned as a complex tensor (T, D/2): one multiply applies it, and it is computed in float32 (as
are the rotated activations) whatever the model's dtype, since bf16 angles lose whole radians at large positions.

Shapes: T tokens, H heads, D head dim, F = D / 2 rotated pairs, A position axes, N voxels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class RotaryEmbedding(nn.Module):
    """Positions (T, A) -> complex rotations (T, D/2), D = sum(axes_dim); no parameters."""

    omega_F: torch.Tensor  # frequency of each rotated pair
    axis_F: torch.Tensor  # position axis each pair reads

    def __init__(self, axes_dim: Sequence[int], theta: float = 10000.0) -> None:
        super().__init__()
        if not axes_dim or any(d <= 0 or d % 2 for d in axes_dim):
            raise ValueError(f"axes_dim must be positive even band widths, got {list(axes_dim)}")
        if theta <= 1:
            raise ValueError(f"theta must be > 1, got {theta}")
        self.axes_dim = tuple(axes_dim)
        self.theta = theta
        ladders = [theta ** -(torch.arange(0, d, 2, dtype=torch.float64) / d) for d in self.axes_dim]
        # Not persistent: a pure function of the config, so checkpoints need not carry it.
        self.register_buffer("omega_F", torch.cat(ladders).to(torch.float32), persistent=False)
        self.register_buffer("axis_F", torch.cat([torch.full((d // 2,), a) for a, d in enumerate(self.axes_dim)]),
                             persistent=False)

    @property
    def head_dim(self) -> int:
        return sum(self.axes_dim)

    def forward(self, pos_TA: torch.Tensor) -> torch.Tensor:
        if pos_TA.ndim != 2 or pos_TA.shape[1] != len(self.axes_dim):
            raise ValueError(f"positions must be (T, {len(self.axes_dim)}), got {tuple(pos_TA.shape)}")
        angle_TF = pos_TA.to(torch.float32)[:, self.axis_F] * self.omega_F
        return torch.polar(torch.ones_like(angle_TF), angle_TF)

    def extra_repr(self) -> str:
        return f"axes_dim={list(self.axes_dim)}, theta={self.theta}"


def apply_rotary(x_THD: torch.Tensor, rot_TF: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs (2i, 2i + 1) of every head by `rot_TF` (from RotaryEmbedding).

    Half-precision inputs are rotated in float32 and returned in their own dtype.
    """
    T, H, D = x_THD.shape
    if rot_TF.shape != (T, D // 2) or D % 2 or not rot_TF.is_complex():
        raise ValueError(f"x is (T, H, D) = {tuple(x_THD.shape)}, so the rotation must be complex ({T}, {D // 2}); "
                         f"got {rot_TF.dtype} {tuple(rot_TF.shape)}")
    compute = torch.promote_types(x_THD.dtype, torch.float32)  # bf16/fp16 -> fp32; fp64 stays fp64
    pairs_THF = torch.view_as_complex(x_THD.to(compute).reshape(T, H, D // 2, 2))
    return torch.view_as_real(pairs_THF * rot_TF[:, None]).reshape(T, H, D).to(x_THD.dtype)


def marope_positions(voxel_xyz_N3: torch.Tensor, image_hw: tuple[int, int], grid: int, *,
                     image_scale: float | None = 1.0) -> torch.Tensor:
    """MARoPE positions (N + h * w, 3) float32 for one asset's joint sequence [voxel tokens; image tokens].

    Args:
        voxel_xyz_N3: integer voxel coordinates on the grid the tokens live on (after patchify), in [0, grid).
        image_hw: the image token grid (h, w); tokens are taken row-major, as the patch embedding flattens them.
        grid: the voxel grid size G; the image plane sits at z = G.
        image_scale: spacing s of image tokens on the plane; None = stretch to the voxel grid (G / h, G / w).
    """
    h, w = image_hw
    if voxel_xyz_N3.ndim != 2 or voxel_xyz_N3.shape[1] != 3:
        raise ValueError(f"voxel coordinates must be (N, 3), got {tuple(voxel_xyz_N3.shape)}")
    if h < 1 or w < 1 or grid < 1:
        raise ValueError(f"need a non-empty image grid and grid >= 1, got image_hw {image_hw}, grid {grid}")
    if len(voxel_xyz_N3) and (int(voxel_xyz_N3.min()) < 0 or int(voxel_xyz_N3.max()) >= grid):
        raise ValueError(f"voxel coordinates must lie in [0, {grid}), got range [{int(voxel_xyz_N3.min())}, "
                         f"{int(voxel_xyz_N3.max())}]")
    if image_scale is not None and image_scale <= 0:
        raise ValueError(f"image_scale must be positive or None, got {image_scale}")
    step_i, step_j = (grid / h, grid / w) if image_scale is None else (image_scale, image_scale)
    device = voxel_xyz_N3.device
    i, j = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    image_P3 = torch.stack([i.flatten() * step_i, j.flatten() * step_j, torch.full((h * w,), float(grid),
                                                                                   device=device)], dim=1)
    return torch.cat([voxel_xyz_N3.to(torch.float32), image_P3.to(torch.float32)])


class SinusoidalPositionEmbedding(nn.Module):
    """Additive absolute embedding of positions (T, A) -> (T, dim), the ablation's stand-in for (MA)RoPE.

    Each axis gets 2K channels, [sin(p * omega_k), cos(p * omega_k)] over K = dim // (2A) frequencies
    omega_k = theta^(-k / K) (Transformer-style, as TRELLIS's AbsolutePositionEmbedder), so the same 3D positions
    MARoPE uses can be added to the tokens once at the input instead of rotating q and k in every block. When 2A
    does not divide dim (a width-64 debug model), the last dim mod 2A channels stay zero, as in TRELLIS.
    """

    omega_K: torch.Tensor

    def __init__(self, dim: int, num_axes: int = 3, theta: float = 10000.0) -> None:
        super().__init__()
        if num_axes <= 0 or dim < 2 * num_axes:
            raise ValueError(f"dim must be at least 2 * num_axes = {2 * num_axes}, got dim {dim}")
        self.dim, self.num_axes = dim, num_axes
        num_freqs = dim // (2 * num_axes)
        omega = theta ** -(torch.arange(num_freqs, dtype=torch.float64) / num_freqs)
        self.register_buffer("omega_K", omega.to(torch.float32), persistent=False)

    def forward(self, pos_TA: torch.Tensor) -> torch.Tensor:
        if pos_TA.ndim != 2 or pos_TA.shape[1] != self.num_axes:
            raise ValueError(f"positions must be (T, {self.num_axes}), got {tuple(pos_TA.shape)}")
        angle_TAK = pos_TA.to(torch.float32)[:, :, None] * self.omega_K
        emb = torch.cat([angle_TAK.sin(), angle_TAK.cos()], dim=2).flatten(1)
        return F.pad(emb, (0, self.dim - emb.shape[1]))


def rope_axes(head_dim: int, num_axes: int = 3) -> list[int]:
    """An even split of `head_dim` over `num_axes` bands, the remainder pairs to the first bands (64 -> [22, 22, 20]).

    FLUX gives its 1-D axis a narrower band ([16, 56, 56] for D = 128); for three spatial axes of equal
    standing an even split is the neutral choice.
    """
    if head_dim % 2 or head_dim < 2 * num_axes:
        raise ValueError(f"head_dim must be even and at least 2 * num_axes, got {head_dim}")
    pairs, extra = divmod(head_dim // 2, num_axes)
    return [2 * (pairs + (a < extra)) for a in range(num_axes)]

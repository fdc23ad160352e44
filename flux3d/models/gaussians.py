"""The decoder's 3D Gaussians: raw per-voxel channels -> activated Gaussians, and the 3DGS `.ply` file.

The sparse decoder emits, for every active voxel of a `resolution`^3 grid over [-0.5, 0.5]^3, `per_voxel` Gaussians
of `RAW_CHANNELS` = 14 raw numbers each, in this order per Gaussian:

    offset 3 | colour 3 (SH degree-0 DC coefficient) | scale 3 | rotation 4 (wxyz) | opacity 1

`gaussians_from_raw` applies TRELLIS's parameterisation (SLatGaussianDecoder.to_representation + Gaussian.get_*),
whose biases make an all-zero output - the zero-initialised output layer - a sensible scene: K small, faint,
axis-aligned Gaussians spread over each voxel. Two deliberate differences from TRELLIS:
- A (M, K * 14) input is read Gaussian-major (`reshape(M, K, 14)`); TRELLIS lays its output layer out
  attribute-major ([all offsets | all colours | ...]). For a freshly trained output layer the two are the same up
  to a permutation of its rows; only loading TRELLIS decoder weights would need that permutation.
- TRELLIS scales the raw rotation by a per-attribute "lr" of 0.1; here every attribute uses its raw value.

Shape legend: M active voxels, K Gaussians per voxel, N = M * K Gaussians.
"""

from __future__ import annotations

import dataclasses
import math
import os
import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import torch
import torch.nn.functional as F

from flux3d.models.configs import RAW_CHANNELS, GaussianConfig

SH_C0 = 0.28209479177387814
"""Degree-0 real spherical harmonic, 1 / (2 sqrt(pi)): rgb = 0.5 + SH_C0 * sh0 (the 3DGS convention)."""

# The original 3DGS (graphdeco-inria) vertex layout without f_rest (SH degree 0), as TRELLIS also writes it.
PLY_PROPERTIES = ("x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
                  "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3")
_PLY_DTYPE = np.dtype([(name, "<f4") for name in PLY_PROPERTIES])


@dataclass
class Gaussians:
    """N activated 3D Gaussians (world space, OpenCV-agnostic: cameras only enter at rendering)."""

    means: torch.Tensor
    """(N, 3) centres."""
    quats: torch.Tensor
    """(N, 4) unit rotations, wxyz."""
    scales: torch.Tensor
    """(N, 3) standard deviations along the rotated axes, > 0."""
    opacities: torch.Tensor
    """(N,) in (0, 1)."""
    sh0: torch.Tensor
    """(N, 3) SH degree-0 (DC) colour coefficients."""

    def __post_init__(self) -> None:
        n = self.means.shape[0] if self.means.ndim == 2 else -1
        expected = {"means": (n, 3), "quats": (n, 4), "scales": (n, 3), "opacities": (n,), "sh0": (n, 3)}
        for name, shape in expected.items():
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(f"Gaussians.{name} must be {shape} with N from means {tuple(self.means.shape)}, "
                                 f"got {tuple(getattr(self, name).shape)}")

    def __len__(self) -> int:
        return self.means.shape[0]

    @property
    def colors(self) -> torch.Tensor:
        """(N, 3) the rgb the rasterizer composites: max(0.5 + SH_C0 * sh0, 0). The clamp at 0 (not at 1) is what
        the 3DGS / TRELLIS CUDA rasterizer applies to SH colours; gsplat clamps nothing, so both backends render
        these values for identical images."""
        return (0.5 + SH_C0 * self.sh0).clamp_min(0.0)

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Gaussians:
        return Gaussians(**{f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def detach(self) -> Gaussians:
        return self._map(torch.Tensor.detach)

    def to(self, *args, **kwargs) -> Gaussians:
        """`Tensor.to` on every field (device and/or dtype)."""
        return self._map(lambda t: t.to(*args, **kwargs))

    @classmethod
    def cat(cls, parts: list[Gaussians]) -> Gaussians:
        if not parts:
            raise ValueError("cannot concatenate an empty list of Gaussians")
        return cls(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(cls)})


def hammersley_offsets(cfg: GaussianConfig) -> torch.Tensor:
    """(K, 3) initial offsets in voxels, in [-0.5, 0.5): the 3D Hammersley set (i / K, radical inverses base 2, 3)
    that TRELLIS uses (its `hammersley_sequence`), i.e. scipy's unscrambled Halton points beside i / K."""
    from scipy.stats import qmc  # here, not at the top: scipy.stats costs ~1 s of every process's start

    k = cfg.per_voxel
    halton = qmc.Halton(d=2, scramble=False).random(k)
    points = np.concatenate([np.arange(k)[:, None] / k, halton], axis=1)
    return torch.from_numpy(points - 0.5).float()


def gaussians_from_raw(raw_MKC: torch.Tensor, coords_M3: torch.Tensor, cfg: GaussianConfig) -> Gaussians:
    """Activate raw decoder channels (M, K, 14) or (M, K * 14) at voxels `coords_M3` (integer x, y, z in [0, R)).

    mean = voxel centre + tanh(raw_offset + atanh(2 h / offset_range)) * offset_range / 2 / R, h the Hammersley
    start in [-0.5, 0.5) voxel (0 without `perturb_offsets`), so |mean - centre| <= offset_range / 2 voxel per axis
    for any raw value (the bound is reached only where tanh rounds to +-1, at |raw| > ~9 in float32).
    scale = sqrt(softplus(raw + inv_softplus(scale_bias))^2 + filter_3d^2); opacity = sigmoid(raw +
    logit(opacity_bias)); quat = normalize(raw + (1, 0, 0, 0)). Zero raw gives the Hammersley starts, scale
    sqrt(scale_bias^2 + filter_3d^2), opacity_bias and the identity rotation. Computed in float32, or float64 for
    float64 input, whatever the input dtype (bf16 decoder outputs included); differentiable in `raw_MKC`.
    """
    k = cfg.per_voxel
    m = raw_MKC.shape[0]
    if raw_MKC.shape[1:] not in ((k, RAW_CHANNELS), (k * RAW_CHANNELS,)):
        raise ValueError(f"raw must be (M, {k}, {RAW_CHANNELS}) or (M, {k * RAW_CHANNELS}), "
                         f"got {tuple(raw_MKC.shape)}")
    if coords_M3.shape != (m, 3) or coords_M3.is_floating_point():
        raise ValueError(f"coords must be integer (M, 3) with M = {m}, got {coords_M3.dtype} {tuple(coords_M3.shape)}")
    dtype = torch.float64 if raw_MKC.dtype == torch.float64 else torch.float32
    raw = raw_MKC.to(dtype).reshape(m, k, RAW_CHANNELS)
    offset_raw, sh0, scale_raw, rot_raw, opacity_raw = raw.split([3, 3, 3, 4, 1], dim=-1)

    half_range = cfg.offset_range / 2
    if cfg.perturb_offsets:
        offset_raw = offset_raw + torch.atanh(hammersley_offsets(cfg).to(raw) / half_range)
    centres = (coords_M3.to(dtype) + 0.5) / cfg.resolution - 0.5
    means = centres[:, None, :] + torch.tanh(offset_raw) * (half_range / cfg.resolution)

    # inv_softplus(b) = b + log(1 - exp(-b)), written with expm1 for small b.
    scale_shift = cfg.scale_bias + math.log(-math.expm1(-cfg.scale_bias))
    scales = torch.sqrt(F.softplus(scale_raw + scale_shift).square() + cfg.filter_3d**2)
    opacities = torch.sigmoid(opacity_raw + math.log(cfg.opacity_bias / (1 - cfg.opacity_bias)))
    quats = F.normalize(rot_raw + rot_raw.new_tensor([1.0, 0.0, 0.0, 0.0]), dim=-1)
    return Gaussians(means=means.reshape(-1, 3), quats=quats.reshape(-1, 4), scales=scales.reshape(-1, 3),
                     opacities=opacities.reshape(-1), sh0=sh0.reshape(-1, 3))


# The .ply frame. Our world is Blender's: z up, the renders' cameras orbit it. 3DGS files live in the INRIA/COLMAP
# frame (y down), which every 3DGS viewer assumes (SuperSplat shows a z-up file lying on its side) and TRELLIS's
# save_ply converts to: file = R @ world with R the +90 degree turn about x, (x, y, z) -> (x, -z, y); a Gaussian's
# rotation turns with it (q_file = q_R * q), its scales are in its own frame and do not change.
PLY_FRAME_COMMENT = "comment frame: 3DGS/COLMAP y-down; flux3d world (x, y, z) = file (x, z, -y)"
_Q_TO_FILE = torch.tensor([math.sqrt(0.5), math.sqrt(0.5), 0.0, 0.0], dtype=torch.float64)
"""wxyz unit quaternion of the +90 degree turn about x that takes world coordinates into the file's frame."""


def _quat_mul(a_N4: torch.Tensor, b_N4: torch.Tensor) -> torch.Tensor:
    """Hamilton product of wxyz quaternions (the rotation b, then a)."""
    aw, ax, ay, az = a_N4.unbind(-1)
    bw, bx, by, bz = b_N4.unbind(-1)
    return torch.stack([aw * bw - ax * bx - ay * by - az * bz, aw * bx + ax * bw + ay * bz - az * by,
                        aw * by - ax * bz + ay * bw + az * bx, aw * bz + ax * by - ay * bx + az * bw], dim=-1)


def save_ply(g: Gaussians, path_or_file: str | os.PathLike | IO[bytes]) -> None:
    """Write the original 3DGS binary little-endian `.ply` (SuperSplat, antimatter15 and the 3DGS viewers read it).

    Values are stored pre-activation, as those viewers expect: opacity as a logit, scale as a log, the unit
    quaternion wxyz, f_dc = sh0, zero normals, positions and rotations in the 3DGS frame (`PLY_FRAME_COMMENT`). The
    stored log-scale is that of the *filtered* scale (the 3D filter of `gaussians_from_raw` already applied), so a
    viewer shows what our rasterizer renders. A path (local or any fsspec URL) is written atomically, with the
    user's umask like every other output: to a temporary sibling, then renamed over the target.
    """
    vertices = np.empty(len(g), dtype=_PLY_DTYPE)
    d = g.detach().to("cpu", torch.float64)
    x, y, z = d.means.unbind(-1)
    quats = _quat_mul(_Q_TO_FILE.expand_as(d.quats), d.quats)
    columns = {"x": x, "y": -z, "z": y, "opacity": torch.logit(d.opacities)}
    columns |= {f"f_dc_{i}": d.sh0[:, i] for i in range(3)}
    columns |= {f"scale_{i}": d.scales[:, i].log() for i in range(3)}
    columns |= {f"rot_{i}": quats[:, i] for i in range(4)}
    for name in PLY_PROPERTIES:
        vertices[name] = columns[name].numpy() if name in columns else 0.0
    header = "\n".join(["ply", "format binary_little_endian 1.0", PLY_FRAME_COMMENT, f"element vertex {len(g)}",
                        *(f"property float {name}" for name in PLY_PROPERTIES), "end_header"]) + "\n"
    data = header.encode("ascii") + vertices.tobytes()
    if not isinstance(path_or_file, (str, os.PathLike)):
        path_or_file.write(data)
        return
    from flux3d.storage import Storage

    parent, name = posixpath.split(os.fspath(path_or_file))
    Storage(parent or ".").write_bytes(name, data)


def load_ply(path_or_file: str | os.PathLike | IO[bytes]) -> Gaussians:
    """Read a file `save_ply` wrote (or any 3DGS `.ply` of SH degree 0 with exactly these 17 float properties, in
    any order, in the 3DGS frame) back to activated float32 Gaussians in flux3d's world frame. Raises ValueError on
    any other header or a size mismatch."""
    if isinstance(path_or_file, (str, os.PathLike)):
        data = Path(path_or_file).read_bytes()
    else:
        data = path_or_file.read()
    end = data.find(b"end_header\n")
    if not data.startswith(b"ply\n") or end < 0:
        raise ValueError("not a PLY file: no 'ply' magic or no 'end_header' line")
    lines = [ln.strip() for ln in data[:end].decode("ascii", errors="replace").splitlines()[1:]]
    lines = [ln for ln in lines if ln and not ln.startswith(("comment", "obj_info"))]
    if not lines or lines[0] != "format binary_little_endian 1.0":
        raise ValueError(f"expected 'format binary_little_endian 1.0', got {lines[:1]}")
    element = lines[1].split() if len(lines) > 1 else []
    if len(element) != 3 or element[:2] != ["element", "vertex"] or not element[2].isdigit():
        raise ValueError(f"expected 'element vertex <count>' as the only element, got {lines[1:2]}")
    count = int(element[2])
    names = []
    for ln in lines[2:]:
        parts = ln.split()
        if parts[0] == "element":
            raise ValueError(f"only one element (vertex) is supported, got '{ln}'")
        if len(parts) != 3 or parts[0] != "property" or parts[1] not in ("float", "float32"):
            raise ValueError(f"only float vertex properties are supported, got '{ln}'")
        names.append(parts[2])
    if sorted(names) != sorted(PLY_PROPERTIES):
        missing, extra = set(PLY_PROPERTIES) - set(names), sorted(set(names) - set(PLY_PROPERTIES))
        raise ValueError(f"expected the 3DGS SH-degree-0 properties {PLY_PROPERTIES}; missing {sorted(missing)}, "
                         f"unexpected {extra} (or duplicated)")
    dtype = np.dtype([(name, "<f4") for name in names])
    body = data[end + len(b"end_header\n"):]
    if len(body) != count * dtype.itemsize:
        raise ValueError(f"vertex data is {len(body)} bytes, the header says {count} x {dtype.itemsize}")
    v = np.frombuffer(body, dtype=dtype)

    def stack(*cols: str) -> torch.Tensor:
        return torch.from_numpy(np.stack([v[c] for c in cols], axis=-1).astype(np.float32))

    fx, fy, fz = stack("x", "y", "z").unbind(-1)
    q_file = F.normalize(stack("rot_0", "rot_1", "rot_2", "rot_3").double(), dim=-1)
    q_back = _Q_TO_FILE * _Q_TO_FILE.new_tensor([1.0, -1.0, -1.0, -1.0])  # the inverse turn
    quats = _quat_mul(q_back.expand_as(q_file), q_file).float()
    return Gaussians(means=torch.stack([fx, fz, -fy], dim=-1), quats=quats,
                     scales=stack("scale_0", "scale_1", "scale_2").exp(),
                     opacities=torch.sigmoid(stack("opacity")[:, 0]), sh0=stack("f_dc_0", "f_dc_1", "f_dc_2"))

"""Voxelize stage: the active voxels of a 64^3 grid over [-0.5, 0.5]^3 that the normalised surface passes through.

Input: the render stage's `mesh.ply` (the scene exactly as rendered, normalised to the unit cube), so voxels, views
and cameras share one frame. Output: `voxels/<sha>.npy`, uint8 (N, 3) grid coordinates (x, y, z), sorted
lexicographically, written atomically.

Active = the closed voxel box intersects a triangle: the separating-axis test of Akenine-Moller ("Fast 3D
triangle-box overlap testing") on every (triangle, voxel) pair in each triangle's bounding box, vectorised in
numpy. TRELLIS asks open3d's `VoxelGrid.create_from_triangle_mesh_within_bounds`, which runs the same test; we do
not take open3d (a 900 MB wheel) for one function. Triangles touching the cube's outer faces select the
boundary voxels; nothing outside [-0.5, 0.5]^3 is kept.

Reasons: failed:missing_mesh, failed:bad_mesh; rejected:no_voxels (nothing inside the grid).
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa

from flux3d.records import FAILED, OK, REJECTED, StageResult, Timer, params_hash
from flux3d.storage import Storage

VOXELIZE_VERSION = 1
VOXEL_COLUMNS = pa.schema([
    ("num_voxels", pa.int32()),
    ("voxels_path", pa.string()),
])
_PAIRS_PER_CHUNK = 1 << 20  # bounds the temporary arrays to some hundred MB


def voxelize_params(resolution: int) -> str:
    return params_hash("voxelize", VOXELIZE_VERSION, {"resolution": resolution})


def voxels_rel(sha256: str) -> str:
    return f"voxels/{sha256}.npy"


def _overlaps(tri: np.ndarray, centre: np.ndarray, half: float) -> np.ndarray:
    """SAT triangle/box overlap for P pairs: tri (P, 3, 3) vertices, centre (P, 3) box centres, half the box side.

    13 candidate separating axes: the 3 box axes, the triangle normal, and the 9 cross products of a box axis
    with a triangle edge. Pairs are dropped as soon as one axis separates them, so later tests run on fewer.
    """
    v = tri - centre[:, None, :]
    alive = np.arange(len(v))

    def keep(mask: np.ndarray) -> None:
        nonlocal alive, v
        alive, v = alive[mask], v[mask]

    keep((v.min(axis=1) <= half).all(axis=1) & (v.max(axis=1) >= -half).all(axis=1))  # box axes
    e = v[:, [1, 2, 0]] - v
    n = np.cross(e[:, 0], e[:, 1])
    keep(np.abs(np.einsum("pc,pc->p", n, v[:, 0])) <= half * np.abs(n).sum(axis=1))  # triangle plane
    for j in range(3):
        for k in range(3):
            edge = v[:, (j + 1) % 3] - v[:, j]
            axis = np.zeros_like(edge)  # unit_k x edge
            k1, k2 = (k + 1) % 3, (k + 2) % 3
            axis[:, k1], axis[:, k2] = -edge[:, k2], edge[:, k1]
            p = np.einsum("pvc,pc->pv", v, axis)
            r = half * np.abs(axis).sum(axis=1)
            keep((p.min(axis=1) <= r) & (p.max(axis=1) >= -r))
    out = np.zeros(len(tri), dtype=bool)
    out[alive] = True
    return out


def voxelize_mesh(verts: np.ndarray, faces: np.ndarray, resolution: int = 64) -> np.ndarray:
    """Active voxel coordinates (N, 3) uint8 of a triangle mesh in [-0.5, 0.5]^3, sorted, unique."""
    if resolution > 256:
        raise ValueError("resolution above 256 does not fit uint8 coordinates")
    tri = np.asarray(verts, dtype=np.float64)[np.asarray(faces, dtype=np.int64)]  # (F, 3, 3)
    tri = tri[np.isfinite(tri).all(axis=(1, 2))]
    size = 1.0 / resolution
    # Closed boxes: a coordinate exactly on a voxel boundary touches the voxels on both sides, so the lower
    # end rounds down past it (ceil - 1) and the upper end up to it (floor).
    lo = np.clip(np.ceil((tri.min(axis=1) + 0.5) / size).astype(np.int64) - 1, 0, resolution - 1)
    hi = np.clip(np.floor((tri.max(axis=1) + 0.5) / size).astype(np.int64), 0, resolution - 1)
    inside = (tri.max(axis=1) >= -0.5).all(axis=1) & (tri.min(axis=1) <= 0.5).all(axis=1)
    tri, lo, hi = tri[inside], lo[inside], hi[inside]
    extent = hi - lo + 1
    counts = extent.prod(axis=1)
    found = []
    start = 0
    cum = np.cumsum(counts)
    while start < len(tri):
        stop = int(np.searchsorted(cum, (cum[start - 1] if start else 0) + _PAIRS_PER_CHUNK, side="right"))
        stop = max(stop, start + 1)
        idx = np.repeat(np.arange(start, stop), counts[start:stop])
        # The offset of each pair inside its triangle's box, unravelled over that box's extent.
        first = cum[start:stop] - counts[start:stop] - (cum[start - 1] if start else 0)
        local = np.arange(len(idx)) - np.repeat(first, counts[start:stop])
        ext = extent[idx]
        cell = lo[idx] + np.stack([local // (ext[:, 1] * ext[:, 2]), (local // ext[:, 2]) % ext[:, 1],
                                   local % ext[:, 2]], axis=1)
        centre = (cell + 0.5) * size - 0.5
        hit = _overlaps(tri[idx], centre, size / 2 * (1 + 1e-9))
        found.append(cell[hit])
        start = stop
    if not found:
        return np.empty((0, 3), dtype=np.uint8)
    cells = np.unique(np.concatenate(found), axis=0)
    return cells.astype(np.uint8)


def read_ply(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Vertices and triangles of the render stage's binary PLY (float xyz, uchar-counted int triangles)."""
    head_end = data.index(b"end_header\n") + len(b"end_header\n")
    header = data[:head_end].decode("ascii").splitlines()
    nv = int(next(h for h in header if h.startswith("element vertex")).split()[-1])
    nf = int(next(h for h in header if h.startswith("element face")).split()[-1])
    body = io.BytesIO(data[head_end:])
    verts = np.frombuffer(body.read(nv * 12), dtype="<f4").reshape(nv, 3)
    faces = np.frombuffer(body.read(nf * 13), dtype=[("n", "u1"), ("v", "<i4", 3)])
    if len(verts) != nv or len(faces) != nf or (nf and (faces["n"] != 3).any()):
        raise ValueError("truncated or non-triangle PLY")
    return verts, faces["v"]


def voxelize_asset(sha256: str, render_dir: str, storage: Storage, resolution: int = 64) -> StageResult:
    """Voxelize one rendered asset and store its coordinates; never raises for the asset."""
    empty = {"num_voxels": None, "voxels_path": None}
    with Timer() as t:
        mesh = f"{render_dir}/mesh.ply"
        if not storage.fs.exists(mesh):
            return StageResult(sha256, FAILED, "missing_mesh", f"{mesh} does not exist", columns=empty)
        try:
            verts, faces = read_ply(storage.fs.cat_file(mesh))
        except (ValueError, StopIteration) as e:
            return StageResult(sha256, FAILED, "bad_mesh", f"{mesh}: {e}", columns=empty)
        coords = voxelize_mesh(verts, faces, resolution)
        if not len(coords):
            return StageResult(sha256, REJECTED, "no_voxels", "no triangle inside the unit cube", columns=empty)
        buf = io.BytesIO()
        np.save(buf, coords)
        storage.write_bytes(voxels_rel(sha256), buf.getvalue())
    return StageResult(sha256, OK, seconds=t.seconds,
                       columns={"num_voxels": len(coords), "voxels_path": storage.path(voxels_rel(sha256))})


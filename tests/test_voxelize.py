"""Voxelization: exact counts on shapes with known answers, and agreement with an independent clipping reference."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import trimesh

from flux3d.stages.voxelize import read_ply, voxelize_asset, voxelize_mesh
from flux3d.storage import Storage


def _clip_overlap(tri: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> bool:
    """Reference: Sutherland-Hodgman-clip the triangle by the box's six planes; overlap iff something remains."""
    poly = [p for p in tri]
    for axis in range(3):
        for bound, sign in ((lo[axis], 1.0), (hi[axis], -1.0)):
            out = []
            for a, b in zip(poly, poly[1:] + poly[:1]):
                da, db = sign * (a[axis] - bound), sign * (b[axis] - bound)
                if da >= -1e-12:
                    out.append(a)
                if (da >= -1e-12) != (db >= -1e-12):
                    out.append(a + (b - a) * (da / (da - db)))
            poly = out
            if not poly:
                return False
    return True


def _reference(verts: np.ndarray, faces: np.ndarray, res: int) -> set[tuple[int, int, int]]:
    size = 1.0 / res
    found = set()
    for f in faces:
        tri = verts[f].astype(np.float64)
        for cell in np.ndindex(res, res, res):
            lo = np.array(cell) * size - 0.5
            if _clip_overlap(tri, lo, lo + size):
                found.add(cell)
    return found


def test_cube_surface_is_the_exact_shell():
    box = trimesh.creation.box(extents=(1, 1, 1))
    coords = voxelize_mesh(box.vertices, box.faces, 64)
    assert coords.dtype == np.uint8 and len(coords) == 64 ** 3 - 62 ** 3
    assert ((coords == 0) | (coords == 63)).any(axis=1).all()
    assert len(np.unique(coords, axis=0)) == len(coords)
    assert (np.lexsort(coords.T[::-1]) == np.arange(len(coords))).all()  # sorted x, then y, then z


def test_sphere_voxels_hug_the_surface_and_cover_every_sample():
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=0.4)
    coords = voxelize_mesh(sphere.vertices, sphere.faces, 64)
    centres = (coords + 0.5) / 64 - 0.5
    # A voxel the surface passes through has its centre within half a diagonal of it.
    assert (np.abs(np.linalg.norm(centres, axis=1) - 0.4) <= np.sqrt(3) / 128 + 1e-9).all()
    samples, _ = trimesh.sample.sample_surface(sphere, 100_000, seed=0)
    sampled = {tuple(c) for c in np.clip(np.floor((samples + 0.5) * 64), 0, 63).astype(int)}
    assert sampled <= {tuple(c) for c in coords.astype(int)}
    assert len(coords) < 1.2 * len(sampled)  # and not much more than the surface


def test_random_triangles_match_clipping_reference():
    rng = np.random.default_rng(0)
    verts = rng.uniform(-0.6, 0.6, (30, 3))  # some corners outside the cube: clipped away
    faces = rng.integers(0, 30, (12, 3))
    faces = faces[(faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])]
    ours = {tuple(c) for c in voxelize_mesh(verts, faces, 6).astype(int)}
    assert ours == _reference(verts, faces, 6)


def test_edge_cases():
    tiny = np.array([[0.001, 0.001, 0.001], [0.002, 0.001, 0.001], [0.001, 0.002, 0.001]])
    assert voxelize_mesh(tiny, [[0, 1, 2]], 64).tolist() == [[32, 32, 32]]
    # A triangle lying on the plane between two voxel layers touches both (closed boxes).
    on_plane = np.array([[0.001, 0.001, 0.0], [0.002, 0.001, 0.0], [0.001, 0.002, 0.0]])
    assert voxelize_mesh(on_plane, [[0, 1, 2]], 64).tolist() == [[32, 32, 31], [32, 32, 32]]
    outside = np.array([[0.7, 0.7, 0.7], [0.8, 0.7, 0.7], [0.7, 0.8, 0.7]])
    assert len(voxelize_mesh(outside, [[0, 1, 2]], 64)) == 0
    with pytest.raises(ValueError):
        voxelize_mesh(tiny, [[0, 1, 2]], 512)


def _ply(path: Path, verts: np.ndarray, faces: np.ndarray, cut: int = 0) -> None:
    """The render stage's own PLY writer; `cut` bytes dropped from the end make a truncated file."""
    from flux3d.stages.blender_render import _write_ply

    _write_ply(str(path), verts, faces)
    if cut:
        path.write_bytes(path.read_bytes()[:-cut])


def test_voxelize_asset_reads_the_render_mesh_and_reports_reasons(tmp_path):
    storage = Storage(str(tmp_path / "data"))
    box = trimesh.creation.box(extents=(1, 0.5, 0.25))
    good, empty, bad = (tmp_path / n for n in ("good", "empty", "bad"))
    for d in (good, empty, bad):
        d.mkdir()
    _ply(good / "mesh.ply", box.vertices, box.faces)
    verts, faces = read_ply((good / "mesh.ply").read_bytes())
    assert np.allclose(verts, box.vertices) and (faces == box.faces).all()
    _ply(empty / "mesh.ply", box.vertices + 5, box.faces)
    _ply(bad / "mesh.ply", box.vertices, box.faces, cut=7)
    r = voxelize_asset("a" * 64, str(good), storage)
    assert r.state == "ok" and r.columns["num_voxels"] > 0
    coords = np.load(io.BytesIO(Path(r.columns["voxels_path"]).read_bytes()))
    assert coords.shape == (r.columns["num_voxels"], 3) and coords.dtype == np.uint8
    assert np.array_equal(coords, voxelize_mesh(box.vertices, box.faces, 64))
    r = voxelize_asset("b" * 64, str(empty), storage)
    assert (r.state, r.reason) == ("rejected", "no_voxels")
    assert voxelize_asset("c" * 64, str(bad), storage).reason == "bad_mesh"
    assert voxelize_asset("d" * 64, str(tmp_path / "nowhere"), storage).reason == "missing_mesh"

"""Camera placement for the render stage: TRELLIS's Hammersley sphere, look-at matrices and both conventions.

Pure numpy (no Blender), so later stages (voxel projection, feature encoding) and tests use the same code.

World frame: Blender's, Z up (the glTF importer turns Y-up assets into it). `mesh.ply` and every matrix of a
`transforms.json` live in that frame, after normalisation to the unit cube.

Conventions, both written per frame so no later stage has to guess axes:

- `transform_matrix` (TRELLIS / NeRF): camera-to-world in Blender/OpenGL camera axes (x right, y up, looking
  down -z); exactly the Blender camera's `matrix_world`.
- `w2c` + `K` (OpenCV): world-to-camera with camera axes x right, y down, looking down +z, and the 3x3 pixel
  intrinsics, so that `uv = (K @ (w2c @ [X, 1])[:3]) / z` is in pixels with (0, 0) the top-left corner of the
  top-left pixel (pixel i covers [i, i + 1]; its centre is i + 0.5).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

PRIMES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29)
# OpenGL camera axes (y up, -z forward) -> OpenCV camera axes (y down, +z forward).
GL_TO_CV = np.diag([1.0, -1.0, -1.0, 1.0])


def radical_inverse(base: int, n: int) -> float:
    val, inv_base = 0.0, 1.0 / base
    inv_base_n = inv_base
    while n > 0:
        digit = n % base
        val += digit * inv_base_n
        n //= base
        inv_base_n *= inv_base
    return val


def sphere_hammersley(n: int, num_samples: int, offset: tuple[float, float], remap: bool = True) -> tuple[float, float]:
    """(yaw, pitch) in radians of sample `n` of `num_samples`; TRELLIS `sphere_hammersley_sequence`.

    TRELLIS's render scripts always remap u (2u below 0.25, else 2/3 u + 1/3): about 25 % of the views sit below
    the equator and 75 % above, where objects are usually looked at from.
    """
    u = n / num_samples + offset[0] / num_samples
    v = radical_inverse(PRIMES[0], n) + offset[1]
    if remap:
        u = 2 * u if u < 0.25 else 2 / 3 * u + 1 / 3
    pitch = math.acos(1 - 2 * u) - math.pi / 2
    yaw = v * 2 * math.pi
    return yaw, pitch


def asset_offset(sha256: str, view_set: str) -> tuple[float, float]:
    """The random Hammersley offset of one view set of one asset: reproducible, different per asset and set."""
    seed = int.from_bytes(hashlib.sha256(f"{sha256}\x00{view_set}".encode()).digest()[:8], "little")
    rng = np.random.default_rng(seed)
    a, b = rng.random(2)
    return float(a), float(b)


def look_at_c2w(position: np.ndarray, target: np.ndarray | None = None) -> np.ndarray:
    """Camera-to-world (OpenGL axes) of a camera at `position` looking at `target` (origin), world Z up."""
    position = np.asarray(position, dtype=np.float64)
    target = np.zeros(3) if target is None else np.asarray(target, dtype=np.float64)
    forward = target - position
    forward /= np.linalg.norm(forward)
    up = np.array([0.0, 0.0, 1.0])
    right = np.cross(forward, up)
    if np.linalg.norm(right) < 1e-8:  # looking straight up or down: any horizontal right vector will do
        right = np.array([1.0, 0.0, 0.0])
    right /= np.linalg.norm(right)
    cam_up = np.cross(right, forward)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, cam_up, -forward, position
    return c2w


def intrinsics(fov_rad: float, width: int, height: int) -> np.ndarray:
    """OpenCV pixel intrinsics for a horizontal field of view (Blender's sensor fit for width >= height)."""
    fx = width / 2 / math.tan(fov_rad / 2)
    return np.array([[fx, 0.0, width / 2], [0.0, fx, height / 2], [0.0, 0.0, 1.0]])


def w2c_opencv(c2w_gl: np.ndarray) -> np.ndarray:
    return np.linalg.inv(np.asarray(c2w_gl, dtype=np.float64) @ GL_TO_CV)


def view_set_cameras(sha256: str, view_set: str, num_views: int, radius: float) -> list[np.ndarray]:
    """Camera-to-world matrices (OpenGL axes) of one view set: Hammersley sphere, radius, looking at the origin."""
    offset = asset_offset(sha256, view_set)
    cams = []
    for i in range(num_views):
        yaw, pitch = sphere_hammersley(i, num_views, offset)
        pos = radius * np.array([math.cos(yaw) * math.cos(pitch), math.sin(yaw) * math.cos(pitch), math.sin(pitch)])
        cams.append(look_at_c2w(pos))
    return cams


def frame_record(file_path: str, c2w_gl: np.ndarray, fov_rad: float, width: int, height: int) -> dict:
    """One `frames[]` entry of transforms.json: TRELLIS's fields plus OpenCV `K` and `w2c`."""
    return {
        "file_path": file_path,
        "camera_angle_x": fov_rad,
        "transform_matrix": np.asarray(c2w_gl).tolist(),
        "K": intrinsics(fov_rad, width, height).tolist(),
        "w2c": w2c_opencv(c2w_gl).tolist(),
    }


def project(points: np.ndarray, K: np.ndarray, w2c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World points (N, 3) -> (pixel coordinates (N, 2), depth (N,)) with OpenCV K and w2c."""
    pts = np.asarray(points, dtype=np.float64)
    cam = pts @ np.asarray(w2c)[:3, :3].T + np.asarray(w2c)[:3, 3]
    uvw = cam @ np.asarray(K).T
    return uvw[:, :2] / uvw[:, 2:3], cam[:, 2]


def render_border(points: np.ndarray, c2w_gl: np.ndarray, fov_rad: float, resolution: int,
                  margin_px: float = 2.0) -> tuple[float, float, float, float] | None:
    """Blender's render border (min_x, max_x, min_y, max_y: fractions of the frame, y up) around where `points`
    project in a square view, widened by `margin_px`; None when a point is at or behind the camera plane (its
    projection is unbounded). With the asset's vertices as `points`, every pixel outside the border sees only the
    empty background."""
    uv, depth = project(points, intrinsics(fov_rad, resolution, resolution), w2c_opencv(c2w_gl))
    if not len(uv) or (depth <= 0).any():
        return None
    lo = np.clip((uv.min(axis=0) - margin_px) / resolution, 0, 1)
    hi = np.clip((uv.max(axis=0) + margin_px) / resolution, 0, 1)
    return float(lo[0]), float(hi[0]), float(1 - hi[1]), float(1 - lo[1])  # OpenCV rows run down, Blender's y up


def orbit_cameras(num_views: int, radius: float, fov_deg: float, resolution: int,
                  elevation_deg: float = 20.0) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV (K (V, 3, 3), w2c (V, 4, 4)) of `num_views` cameras evenly spaced over the full azimuth at one
    elevation, looking at the origin: turntables, and the paper's 24-view multi-view consistency protocol."""
    pitch = math.radians(elevation_deg)
    K = intrinsics(math.radians(fov_deg), resolution, resolution)
    w2c = []
    for i in range(num_views):
        yaw = 2 * math.pi * i / num_views
        pos = radius * np.array([math.cos(yaw) * math.cos(pitch), math.sin(yaw) * math.cos(pitch), math.sin(pitch)])
        w2c.append(w2c_opencv(look_at_c2w(pos)))
    return np.repeat(K[None], num_views, axis=0), np.stack(w2c)

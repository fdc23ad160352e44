"""What the inspect engines share: the facts they report, the error they raise, and how a file reference is found.

Engines (`gltf`, `mesh_files`, `blender_inspect`) only describe an asset; the keep/reject/fail policy lives in
`flux3d.stages.inspect`, so the same facts give the same decision whichever engine produced them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class InspectError(Exception):
    """An asset-level failure with a stable reason code (becomes `failed:<reason>`)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(slots=True)
class Facts:
    """What an engine learned about one asset. None = not determined (the engine stopped before it)."""

    engine: str
    vertices: int | None = None
    faces: int | None = None
    """Triangles after triangulation (polygons count as n - 2), over every placed instance."""
    bbox_min: list[float] | None = None
    bbox_max: list[float] | None = None
    num_meshes: int | None = None
    """Geometry instances placed in the scene, as the engine splits them."""
    num_materials: int | None = None
    textures_referenced: int | None = None
    textures_found: int | None = None
    vertex_colors: bool | None = None
    animated: bool | None = None
    skinned: bool | None = None
    non_finite: bool = False
    missing: list[str] = field(default_factory=list)
    """References that could not be resolved (texture images, material libraries), for the message."""


# Windows drive ("D:/...") or UNC ("//server/...") prefixes after backslashes became slashes.
_ABSOLUTE = re.compile(r"^(?:[A-Za-z]:/|//|/)")


def find_file(ref: str, base_dirs: list[str]) -> str | None:
    """Resolve a file reference written inside an asset (texture, material library, buffer) to a readable file.

    Assets are authored on other machines: references are Windows paths (`.\\tex.jpg`, `D:\\proj\\tex.jpg`), differ in
    case from the file on disk, or point at the author's absolute folders. Tried in order, in each base folder:
    the relative path, then the bare file name, each exactly and then case-insensitively. Absolute paths are never
    followed as written (an untrusted asset must not make us read `/etc/...`); only their file name is tried.
    Returns None when nothing non-empty is found; the render stage should resolve references the same way.
    """
    ref = ref.strip().strip('"').strip()
    if ref.startswith("file://"):
        ref = ref[len("file://"):]
    if not ref or re.match(r"^[A-Za-z][A-Za-z0-9+.-]+://", ref):
        return None  # remote URLs are not fetched at inspect time
    norm = ref.replace("\\", "/")
    name = norm.rsplit("/", 1)[-1]
    relative = None if _ABSOLUTE.match(norm) else norm
    candidates: list[tuple[str, str]] = []
    for base in base_dirs:
        if relative is not None:
            candidates.append((base, relative))
        if name and name != relative:
            candidates.append((base, name))
    for base, rel in candidates:
        path = os.path.normpath(os.path.join(base, rel))
        if _is_nonempty_file(path):
            return path
    for base, rel in candidates:
        path = _case_insensitive(base, rel)
        if path is not None and _is_nonempty_file(path):
            return path
    return None


def _is_nonempty_file(path: str) -> bool:
    try:
        return os.path.isfile(path) and os.path.getsize(path) > 0
    except OSError:
        return False


def _case_insensitive(base: str, rel: str) -> str | None:
    path = base
    for part in rel.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            path = os.path.dirname(path)
            continue
        exact = os.path.join(path, part)
        if os.path.exists(exact):
            path = exact
            continue
        try:
            entries = os.listdir(path)
        except OSError:
            return None
        lower = part.lower()
        match = next((e for e in sorted(entries) if e.lower() == lower), None)
        if match is None:
            return None
        path = os.path.join(path, match)
    return path


def summarize_trimesh_scene(scene: Any, facts: Facts) -> None:
    """Fill geometry facts from a `trimesh.Scene`: counts over every placed instance, world-space bbox."""
    num_vertices = num_faces = num_meshes = 0
    mins: list[np.ndarray] = []
    maxs: list[np.ndarray] = []
    vertex_colors = False
    for node in scene.graph.nodes_geometry:
        transform, geometry_name = scene.graph[node]
        geometry = scene.geometry[geometry_name]
        vertices = np.asarray(getattr(geometry, "vertices", np.empty((0, 3))), dtype=np.float64)
        faces = getattr(geometry, "faces", None)
        num_meshes += 1
        num_vertices += len(vertices)
        if faces is not None:
            faces = np.asarray(faces)
            if len(faces) and len(vertices) and (faces.min() < 0 or faces.max() >= len(vertices)):
                raise InspectError("corrupt", f"{geometry_name}: face index out of range of {len(vertices)} vertices")
            num_faces += len(faces)
        vertex_colors = vertex_colors or _has_vertex_colors(geometry)
        if not len(vertices):
            continue
        if not np.isfinite(vertices).all():
            facts.non_finite = True
            continue
        world = vertices @ np.asarray(transform)[:3, :3].T + np.asarray(transform)[:3, 3]
        mins.append(world.min(axis=0))
        maxs.append(world.max(axis=0))
    facts.vertices, facts.faces, facts.num_meshes = num_vertices, num_faces, num_meshes
    if facts.vertex_colors is None:
        facts.vertex_colors = vertex_colors
    if mins and not facts.non_finite:
        facts.bbox_min = np.min(mins, axis=0).tolist()
        facts.bbox_max = np.max(maxs, axis=0).tolist()


def _has_vertex_colors(geometry: Any) -> bool:
    visual = getattr(geometry, "visual", None)
    if visual is None:
        return False
    # A textured visual keeps colours as a vertex attribute; a colour visual reports kind "vertex".
    if "color" in getattr(visual, "vertex_attributes", {}):
        return True
    return getattr(visual, "kind", None) == "vertex"

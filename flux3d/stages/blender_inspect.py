"""FBX, .blend, USD and COLLADA inspection through Blender (the `bpy` module), meant to run in an isolated child.

These formats have no parser worth trusting outside Blender, and Blender is what renders them later, so what it
imports is what counts. `bpy` is imported here, inside the call: the forkserver must not preload Blender (every
child would carry ~400 MB for the few assets that need it), and a child's Blender state dies with the child.

Untrusted .blend files are opened with `use_scripts=False` and auto-execution off, so neither registered text
blocks nor Python driver expressions run.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from flux3d.stages.inspect_common import Facts, InspectError, find_file

BLENDER_FORMATS = frozenset({"fbx", "blend", "usd", "usda", "usdc", "usdz", "dae"})
# Object types Blender turns into renderable triangles.
_GEOMETRY_TYPES = frozenset({"MESH", "CURVE", "SURFACE", "META", "FONT"})
# Cheap content checks so a mislabelled file fails in microseconds instead of after Blender's start-up.
_MAGIC = {
    "fbx": (b"Kaydara FBX Binary",),
    "blend": (b"BLENDER", b"\x1f\x8b", b"\x28\xb5\x2f\xfd"),  # plain, gzip- or zstd-compressed
    "usdc": (b"PXR-USDC",),
    "usda": (b"#usda",),
    "usdz": (b"PK\x03\x04",),
    "usd": (b"PXR-USDC", b"#usda"),
}


def check_magic(fmt: str, data_head: bytes) -> None:
    if fmt == "fbx" and data_head.startswith(b"; FBX"):
        raise InspectError("import_error", "ASCII FBX: Blender's importer reads binary FBX only")
    if fmt == "dae":
        if b"<COLLADA" not in data_head and not data_head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"<?xml"):
            raise InspectError("bad_magic", f"not a COLLADA XML document (starts with {data_head[:8]!r})")
    elif fmt in _MAGIC and not data_head.startswith(_MAGIC[fmt]):
        raise InspectError("bad_magic", f"not a {fmt} file (starts with {data_head[:8]!r})")


def inspect_with_blender(path: str, fmt: str, facts: Facts) -> None:
    try:
        import bpy
    except ImportError as e:
        raise InspectError("import_error", f"bpy (Blender) is not installed: {e}") from None
    bpy.ops.wm.read_factory_settings(use_empty=True)  # also resets preferences, so the switch below comes after
    bpy.context.preferences.filepaths.use_scripts_auto_execute = False
    path = os.path.abspath(path)
    try:
        if fmt == "blend":
            bpy.ops.wm.open_mainfile(filepath=path, load_ui=False, use_scripts=False)
        elif fmt == "fbx":
            bpy.ops.import_scene.fbx(filepath=path, use_image_search=True)
        elif fmt == "dae":
            bpy.ops.wm.collada_import(filepath=path)
        else:
            bpy.ops.wm.usd_import(filepath=path)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - importers raise RuntimeError, but add-ons raise anything
        raise InspectError("import_error", f"Blender {fmt} import: {type(e).__name__}: {_last_line(e)}") from None
    _collect(bpy, os.path.dirname(path), facts)


def _last_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[-1] if text else ""


def _collect(bpy: Any, asset_dir: str, facts: Facts) -> None:
    depsgraph = bpy.context.evaluated_depsgraph_get()
    num_vertices = num_faces = num_meshes = 0
    mins, maxs = [], []
    materials: set[str] = set()
    vertex_colors = skinned = False
    cache: dict[str, tuple[np.ndarray, int, bool]] = {}
    # Evaluated instances: modifiers applied, collection instances and particles expanded, as a render sees them.
    for inst in depsgraph.object_instances:
        obj = inst.object
        if obj.type not in _GEOMETRY_TYPES or obj.original.hide_render:
            continue
        if obj.name not in cache:
            cache[obj.name] = _mesh_arrays(obj)
        co, tris, colors = cache[obj.name]
        num_meshes += 1
        num_vertices += len(co)
        num_faces += tris
        vertex_colors = vertex_colors or colors
        original = obj.original
        skinned = skinned or any(m.type == "ARMATURE" for m in original.modifiers)
        materials.update(slot.material.name for slot in original.material_slots if slot.material is not None)
        if not len(co):
            continue
        if not np.isfinite(co).all():
            facts.non_finite = True
            continue
        matrix = np.array(inst.matrix_world, dtype=np.float64)
        world = co @ matrix[:3, :3].T + matrix[:3, 3]
        mins.append(world.min(axis=0))
        maxs.append(world.max(axis=0))
    facts.vertices, facts.faces, facts.num_meshes = num_vertices, num_faces, num_meshes
    facts.vertex_colors, facts.skinned = vertex_colors, skinned
    facts.num_materials = len(materials)
    if mins and not facts.non_finite:
        # Blender is Z-up; report the bbox Y-up (x, z, -y) like glTF and trimesh, so the columns share one frame.
        lo, hi = np.min(mins, axis=0), np.max(maxs, axis=0)
        facts.bbox_min = [float(lo[0]), float(lo[2]), float(-hi[1])]
        facts.bbox_max = [float(hi[0]), float(hi[2]), float(-lo[1])]
    # Actions kept alive only by a fake user are library clutter, not animation of this asset.
    facts.animated = any(a.users - int(a.use_fake_user) > 0 for a in bpy.data.actions)

    images: dict[str, Any] = {}
    for name in sorted(materials):
        material = bpy.data.materials[name]
        if material.node_tree is not None:
            _tree_images(material.node_tree, images, set())
    found = [name for name, image in images.items() if _image_has_pixels(bpy, image, asset_dir)]
    facts.textures_referenced, facts.textures_found = len(images), len(found)
    facts.missing.extend(images[n].filepath or n for n in images if n not in found)


def _mesh_arrays(obj: Any) -> tuple[np.ndarray, int, bool]:
    """Local-space vertex positions, triangle count and whether colour attributes exist, of one evaluated object."""
    mesh = obj.to_mesh()
    try:
        if mesh is None:
            return np.empty((0, 3)), 0, False
        co = np.empty(len(mesh.vertices) * 3, dtype=np.float32)
        mesh.vertices.foreach_get("co", co)
        loop_total = np.empty(len(mesh.polygons), dtype=np.int32)
        mesh.polygons.foreach_get("loop_total", loop_total)
        # An n-gon renders as n - 2 triangles: the same unit trimesh counts for the other formats.
        tris = int(np.clip(loop_total - 2, 0, None).sum())
        return co.reshape(-1, 3).astype(np.float64), tris, len(mesh.color_attributes) > 0
    finally:
        obj.to_mesh_clear()


def _tree_images(tree: Any, images: dict[str, Any], seen: set[str]) -> None:
    """Images of image/environment texture nodes, following node groups (once each, so cycles cannot loop)."""
    for node in tree.nodes:
        if node.type in ("TEX_IMAGE", "TEX_ENVIRONMENT") and node.image is not None:
            # Generated and viewer images are Blender placeholders, not textures the author supplied.
            if node.image.source in ("FILE", "SEQUENCE", "MOVIE", "TILED"):
                images[node.image.name] = node.image
        elif node.type == "GROUP" and node.node_tree is not None and node.node_tree.name not in seen:
            seen.add(node.node_tree.name)
            _tree_images(node.node_tree, images, seen)


def _image_has_pixels(bpy: Any, image: Any, asset_dir: str) -> bool:
    if image.packed_file is not None:
        return True  # embedded in the file (FBX embedded media, packed .blend images)
    if image.source == "TILED":
        return bool(image.has_data)  # a UDIM path holds a <UDIM> token, not one file
    raw = image.filepath
    path = os.path.normpath(bpy.path.abspath(raw, library=image.library))
    # Blender's importers store what their image search found (inside the asset folder), and .blend files
    # use "//"-relative paths; an absolute path elsewhere is the author's machine, so, as for every other
    # format, only its file name is looked for next to the asset (any case).
    inside = raw.startswith("//") or os.path.commonpath([path, asset_dir]) == asset_dir
    if inside and os.path.isfile(path) and os.path.getsize(path) > 0:
        return True
    return find_file(raw.removeprefix("//"), [asset_dir]) is not None

"""The Blender side of the render stage: per asset, a factory reset, one import, every view set rendered (one
Blender child renders many assets in turn: `stages/render.py::BlenderSessions`).

Runs inside an isolated child (`flux3d.stages.render`); `bpy` is imported in the call, never in the forkserver.

Scene, following TRELLIS `dataset_toolkits/blender_script/render.py`:

- Import: glTF with `merge_vertices=True, import_shading='NORMALS'`; OBJ/PLY/STL/FBX/COLLADA/USD through Blender's
  importers; `.blend` opened with `use_scripts=False` and auto-execution off (no embedded script or driver
  expression runs). Texture paths the importer could not resolve are looked up like inspect does (`find_file`).
- Pose: armatures at their rest pose and the scene at frame 0, so animated and skinned assets render, voxelize
  and encode in one consistent pose.
- The asset's own cameras and lights are removed and the world is cleared; lighting is TRELLIS's: a 1000 W point
  light at (4, 1, 6), a 10000 W area light at (0, 0, 10) scaled 100x and a 1000 W area light at (0, 0, -10)
  (it faces down, away from the object, as in TRELLIS, so it adds nothing: rendered only with
  `render.bottom_light`, for the `trellis` recipe).
- Normalisation: every root object is parented to one empty holding `p' = scale * p + offset`, with scale =
  1 / longest side of the world bounding box of the evaluated geometry and offset centring it: the scene fits
  [-0.5, 0.5]^3 with its longest side exactly 1.
- Cycles, transparent film, RGBA 8-bit PNG, BOX pixel filter of width 1, persistent data between views; samples,
  adaptive threshold, sampling pattern, denoiser prefilter and light tree from `[render]` (docs/rendering.md:
  chosen by measured quality against a converged reference per second).
- Crop (`render.crop_to_object`): each view renders only the rectangle its camera sees the asset's vertices in,
  plus 2 px, as Blender's render border (the rest of the full-size image is the transparent background it would
  have been anyway). Assets with something vertices do not bound (volumes, hair, shader displacement) render
  uncropped; `render.json` says which (`cropped`).
- Passes (main set only, `render.passes`): depth and normals beside each view (`blender_passes.py`).
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import numpy as np

from flux3d.config.pipeline import RenderConfig
from flux3d.stages.blender_passes import depth_scale_for, pass_outputs, store_passes
from flux3d.stages.cameras import frame_record, render_border, view_set_cameras
from flux3d.stages.inspect_common import find_file
from flux3d.stages.render_layout import view_sets

_GEOMETRY_TYPES = frozenset({"MESH", "CURVE", "SURFACE", "META", "FONT"})
_UNSEEN_TYPES = frozenset({"EMPTY", "ARMATURE", "LIGHT", "CAMERA", "LATTICE", "SPEAKER", "LIGHT_PROBE"})
CROP_MARGIN_PX = 2.0  # the BOX filter keeps a sample in its pixel; 2 px is slack for rounding to whole pixels
LIGHTS = (  # name, type, energy (W), location, scale
    ("flux3d_point", "POINT", 1000.0, (4.0, 1.0, 6.0), 1.0),
    ("flux3d_top", "AREA", 10000.0, (0.0, 0.0, 10.0), 100.0),
    ("flux3d_bottom", "AREA", 1000.0, (0.0, 0.0, -10.0), 1.0),
)
BOTTOM_LIGHT = LIGHTS[2][0]  # faces away from the object: rendered only with `render.bottom_light`


class RenderError(Exception):
    """An asset-level failure with a stable reason code (becomes `failed:<reason>`)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


def render_scene(path: str, fmt: str, sha256: str, cfg: RenderConfig, out_dir: str) -> dict[str, Any]:
    """Import `path`, normalise, render every view set into `out_dir`; returns facts and timings."""
    t0 = time.perf_counter()
    import bpy

    scene, cam, facts = build_scene(bpy, path, fmt, cfg)
    scale, offset = facts["scale"], facts["offset"]
    verts, faces = scene_triangles(bpy)  # normalised; the mesh file and the crop share one extraction
    if cfg.save_mesh:
        _write_ply(os.path.join(out_dir, "mesh.ply"), verts, faces)
    setup_s = time.perf_counter() - t0

    fov = math.radians(cfg.fov_deg)
    sets = {}
    from mathutils import Matrix

    pass_dir = os.path.join(out_dir, ".passes")
    passes = pass_outputs(bpy, scene, cfg.passes, pass_dir)
    points = crop_points(bpy, verts) if cfg.crop_to_object else None
    facts["cropped"] = points is not None
    depth_scale = depth_scale_for(cfg.radius)
    for k, (folder, n, res) in enumerate(view_sets(cfg)):
        if not n:  # a set switched off (render.curation_views = 0)
            continue
        t1 = time.perf_counter()
        os.makedirs(os.path.join(out_dir, folder), exist_ok=True)
        scene.render.resolution_x = scene.render.resolution_y = res
        scene.use_nodes = bool(passes) and k == 0  # the compositor only runs where passes are wanted
        frames, rendered = [], 0.0
        for i, c2w in enumerate(view_set_cameras(sha256, folder, n, cfg.radius)):
            cam.matrix_world = Matrix(c2w.tolist())
            border = None if points is None else render_border(points, c2w, fov, res, CROP_MARGIN_PX)
            set_border(scene, border)
            rendered += 1.0 if border is None else (border[1] - border[0]) * (border[3] - border[2])
            name = f"{i:03d}.png"
            scene.render.filepath = os.path.join(out_dir, folder, name)
            bpy.ops.render.render(write_still=True)
            frames.append(frame_record(name, c2w, fov, res, res))
            if scene.use_nodes:
                store_passes(bpy, pass_dir, os.path.join(out_dir, folder, f"{i:03d}"), depth_scale)
        transforms = {"aabb": [[-0.5] * 3, [0.5] * 3], "scale": scale, "offset": offset,
                      "world_up": "+z (Blender)", "frames": frames}
        if scene.use_nodes:
            transforms.update(passes=sorted(passes), depth_scale=depth_scale)
        with open(os.path.join(out_dir, folder, "transforms.json"), "w") as f:
            json.dump(transforms, f)
        sets[folder] = {"views": n, "resolution": res, "seconds": time.perf_counter() - t1,
                        "rendered_fraction": rendered / n}  # of the frame's pixels, mean over the views
    if passes:
        os.rmdir(pass_dir)
    return {**facts, "setup_s": setup_s, "sets": sets}


def build_scene(bpy: Any, path: str, fmt: str, cfg: RenderConfig) -> tuple[Any, Any, dict[str, Any]]:
    """From a factory-reset session (nothing of an earlier asset survives) to the lit, normalised scene with its
    camera and Cycles set up; returns (scene, camera, facts: scale, offset, device, missing_images)."""
    bpy.ops.wm.read_factory_settings(use_empty=True)
    bpy.context.preferences.filepaths.use_scripts_auto_execute = False
    path = os.path.abspath(path)
    _import(bpy, path, fmt)
    missing = _resolve_images(bpy, os.path.dirname(path))
    _prepare_scene(bpy)
    scale, offset = _normalise(bpy)
    scene = bpy.context.scene
    _lights(bpy, scene)  # before set_cycles, which decides whether the bottom light renders
    device = set_cycles(bpy, scene, cfg)
    cam = _camera(bpy, scene, math.radians(cfg.fov_deg))
    return scene, cam, {"scale": scale, "offset": offset, "device": device, "missing_images": missing,
                        "denoise_prefilter": scene.cycles.denoising_prefilter}


def crop_points(bpy: Any, verts: np.ndarray) -> np.ndarray | None:
    """`verts` (the scene's world-space vertices) when they bound all the camera can see, else None: a volume,
    hair, a point cloud, grease pencil, or a material displacing its surface in the shader."""
    for obj in bpy.context.scene.objects:
        if obj.hide_render or obj.type in _UNSEEN_TYPES:
            continue
        if obj.type not in _GEOMETRY_TYPES:
            return None
        if any(p.settings.type == "HAIR" for p in getattr(obj, "particle_systems", ())):
            return None
    if any(m.displacement_method != "BUMP" for m in bpy.data.materials if m.node_tree is not None):
        return None
    return verts if len(verts) else None


def set_border(scene: Any, border: tuple[float, float, float, float] | None) -> None:
    r = scene.render
    r.use_border, r.use_crop_to_border = border is not None, False  # the image stays full size
    if border is not None:
        r.border_min_x, r.border_max_x, r.border_min_y, r.border_max_y = border


def _see_through(bpy: Any) -> bool:
    """Whether a material refracts or lets light through (glass, refraction, transparency, transmission, alpha).
    The denoiser's albedo and normal guides are then noisy (they follow the paths through), and only the ACCURATE
    prefilter keeps them from costing detail: -0.7 dB on GlassVaseFlowers with none, +-0.1 dB on opaque assets."""
    for mat in bpy.data.materials:
        if mat.node_tree is None:
            continue
        for node in mat.node_tree.nodes:
            if node.type in ("BSDF_GLASS", "BSDF_REFRACTION", "BSDF_TRANSPARENT"):
                return True
            if node.type == "BSDF_PRINCIPLED":
                transmission, alpha = node.inputs.get("Transmission Weight"), node.inputs.get("Alpha")
                if transmission is not None and (transmission.is_linked or transmission.default_value > 0):
                    return True
                if alpha is not None and (alpha.is_linked or alpha.default_value < 1):
                    return True
    return False


def _import(bpy: Any, path: str, fmt: str) -> None:
    try:
        if fmt in ("glb", "gltf"):
            bpy.ops.import_scene.gltf(filepath=path, merge_vertices=True, import_shading="NORMALS")
        elif fmt == "obj":
            bpy.ops.wm.obj_import(filepath=path)
        elif fmt == "ply":
            bpy.ops.wm.ply_import(filepath=path)
        elif fmt == "stl":
            bpy.ops.wm.stl_import(filepath=path)
        elif fmt == "fbx":
            bpy.ops.import_scene.fbx(filepath=path, use_image_search=True)
        elif fmt == "dae":
            bpy.ops.wm.collada_import(filepath=path)
        elif fmt == "blend":
            bpy.ops.wm.open_mainfile(filepath=path, load_ui=False, use_scripts=False)
        elif fmt in ("usd", "usda", "usdc", "usdz"):
            bpy.ops.wm.usd_import(filepath=path)
        else:
            raise RenderError("unsupported_format", f"no Blender importer for {fmt!r}")
    except (MemoryError, RenderError):
        raise
    except Exception as e:  # noqa: BLE001 - importers raise RuntimeError, add-ons anything
        text = str(e).strip()
        raise RenderError("import_error", f"Blender {fmt} import: {type(e).__name__}: "
                                          f"{text.splitlines()[-1] if text else ''}") from None


def _resolve_images(bpy: Any, asset_dir: str) -> int:
    """Point image paths the importer left dangling at the file `find_file` finds; returns how many stay missing."""
    missing = 0
    for image in bpy.data.images:
        if image.source != "FILE" or image.packed_file is not None or not image.filepath:
            continue
        if os.path.isfile(bpy.path.abspath(image.filepath, library=image.library)):
            continue
        found = find_file(image.filepath.removeprefix("//"), [asset_dir])
        if found is None:
            missing += 1
            continue
        image.filepath = found
        image.reload()
    return missing


def _prepare_scene(bpy: Any) -> None:
    for obj in list(bpy.data.objects):
        if obj.type in ("CAMERA", "LIGHT"):
            bpy.data.objects.remove(obj, do_unlink=True)
        elif obj.type == "ARMATURE":
            obj.data.pose_position = "REST"
    scene = bpy.context.scene
    scene.world = None
    scene.frame_set(0)


def _instances(bpy: Any):  # noqa: ANN202 - yields (evaluated object, 4x4 world matrix)
    depsgraph = bpy.context.evaluated_depsgraph_get()
    for inst in depsgraph.object_instances:
        obj = inst.object
        if obj.type in _GEOMETRY_TYPES and not obj.original.hide_render:
            yield obj, np.array(inst.matrix_world, dtype=np.float64)


def scene_triangles(bpy: Any) -> tuple[np.ndarray, np.ndarray]:
    """World-space vertices and triangles of every rendered geometry instance (modifiers, instancing applied)."""
    verts, faces, base = [], [], 0
    for obj, matrix in _instances(bpy):
        mesh = obj.to_mesh()
        try:
            if mesh is None or not len(mesh.vertices):
                continue
            co = np.empty(len(mesh.vertices) * 3, dtype=np.float32)
            mesh.vertices.foreach_get("co", co)
            mesh.calc_loop_triangles()
            tri = np.empty(len(mesh.loop_triangles) * 3, dtype=np.int32)
            mesh.loop_triangles.foreach_get("vertices", tri)
        finally:
            obj.to_mesh_clear()
        co = co.reshape(-1, 3).astype(np.float64)
        verts.append(co @ matrix[:3, :3].T + matrix[:3, 3])
        faces.append(tri.reshape(-1, 3) + base)
        base += len(co)
    if not verts:
        return np.empty((0, 3)), np.empty((0, 3), dtype=np.int64)
    return np.concatenate(verts), np.concatenate(faces)


def _normalise(bpy: Any) -> tuple[float, list[float]]:
    verts, _ = scene_triangles(bpy)
    if not len(verts):
        raise RenderError("no_geometry", "nothing renderable in the scene")
    if not np.isfinite(verts).all():
        raise RenderError("non_finite_geometry", "NaN or Inf vertex positions")
    lo, hi = verts.min(axis=0), verts.max(axis=0)
    extent = float((hi - lo).max())
    if extent <= 0:
        raise RenderError("degenerate_geometry", "zero-size bounding box")
    scale = 1.0 / extent
    offset = (-(lo + hi) / 2 * scale).tolist()
    pivot = bpy.data.objects.new("flux3d_normalize", None)
    bpy.context.scene.collection.objects.link(pivot)
    for obj in bpy.context.scene.objects:
        if obj.parent is None and obj is not pivot:
            world = obj.matrix_world.copy()
            obj.parent = pivot
            obj.matrix_world = world  # pivot is identity here: keeps the object where it was
    pivot.scale = (scale, scale, scale)
    pivot.location = offset
    bpy.context.view_layer.update()
    return scale, [float(v) for v in offset]


def _lights(bpy: Any, scene: Any) -> None:
    for name, kind, energy, location, scale in LIGHTS:
        light = bpy.data.lights.new(name, type=kind)
        light.energy = energy
        obj = bpy.data.objects.new(name, light)
        obj.location = location
        obj.scale = (scale, scale, scale)
        scene.collection.objects.link(obj)


def set_cycles(bpy: Any, scene: Any, cfg: RenderConfig) -> str:
    """Cycles, film and colour settings of `cfg` on `scene`; returns the device it renders on."""
    scene.render.engine = "CYCLES"
    c = scene.cycles
    c.samples = cfg.samples
    # Adaptive sampling stops a pixel once its noise estimate is under the threshold; 0.01 is Blender's factory
    # default since 3.0, i.e. what TRELLIS's script rendered with without setting it.
    c.use_adaptive_sampling = cfg.adaptive_threshold > 0
    if cfg.adaptive_threshold > 0:
        c.adaptive_threshold, c.adaptive_min_samples = cfg.adaptive_threshold, 0
    c.sampling_pattern = cfg.sampling_pattern
    c.use_denoising = cfg.denoise
    c.denoising_prefilter = cfg.denoise_prefilter if cfg.denoise_prefilter != "AUTO" else (
        "ACCURATE" if _see_through(bpy) else "NONE")
    c.use_light_tree = cfg.light_tree
    bottom = bpy.data.objects.get(BOTTOM_LIGHT)
    if bottom is not None:
        bottom.hide_render = not cfg.bottom_light
    c.pixel_filter_type, c.filter_width = "BOX", 1.0
    c.diffuse_bounces, c.glossy_bounces = cfg.diffuse_bounces, cfg.glossy_bounces
    c.transparent_max_bounces, c.transmission_bounces = cfg.transparent_bounces, cfg.transmission_bounces
    c.max_bounces = max(cfg.diffuse_bounces, cfg.glossy_bounces, cfg.transmission_bounces)
    r = scene.render
    r.film_transparent = True
    r.use_persistent_data = True
    r.resolution_percentage = 100
    r.image_settings.file_format, r.image_settings.color_mode, r.image_settings.color_depth = "PNG", "RGBA", "8"
    if cfg.threads:
        r.threads_mode, r.threads = "FIXED", cfg.threads
    scene.view_settings.view_transform = cfg.view_transform
    return _device(bpy, scene, cfg.device)


def _device(bpy: Any, scene: Any, want: str) -> str:
    scene.cycles.device = "CPU"
    if want == "cpu":
        return "cpu"
    prefs = bpy.context.preferences.addons["cycles"].preferences
    for kind in ("OPTIX", "CUDA") if want == "auto" else (want.upper(),):
        try:
            prefs.compute_device_type = kind
            prefs.refresh_devices()
        except Exception:  # noqa: BLE001 - a build without this backend
            continue
        devices = [d for d in prefs.devices if d.type == kind]
        if devices:
            for d in prefs.devices:
                d.use = d.type == kind
            scene.cycles.device = "GPU"
            if kind == "OPTIX" and scene.cycles.use_denoising:
                scene.cycles.denoiser = "OPTIX"
            return kind.lower()
    if want != "auto":
        raise RenderError("no_device", f"render.device = {want} but Blender found no {want.upper()} device")
    return "cpu"


def _camera(bpy: Any, scene: Any, fov: float) -> Any:
    data = bpy.data.cameras.new("flux3d_camera")
    data.sensor_fit, data.sensor_width = "HORIZONTAL", 32.0
    data.lens = 16.0 / math.tan(fov / 2)
    data.clip_start, data.clip_end = 0.01, 100.0
    cam = bpy.data.objects.new("flux3d_camera", data)
    scene.collection.objects.link(cam)
    scene.camera = cam
    return cam


def _write_ply(path: str, verts: np.ndarray, faces: np.ndarray) -> None:
    """Binary little-endian PLY: float32 x y z, uchar-counted int32 triangles."""
    header = (f"ply\nformat binary_little_endian 1.0\nelement vertex {len(verts)}\n"
              "property float x\nproperty float y\nproperty float z\n"
              f"element face {len(faces)}\nproperty list uchar int vertex_indices\nend_header\n")
    face_rec = np.empty(len(faces), dtype=[("n", "u1"), ("v", "<i4", 3)])
    face_rec["n"], face_rec["v"] = 3, faces
    with open(path, "wb") as f:
        f.write(header.encode("ascii"))
        f.write(np.ascontiguousarray(verts, dtype="<f4").tobytes())
        f.write(face_rec.tobytes())

"""Inspect stage: open each downloaded asset once, record what it is, and drop what cannot become training data.

Output per asset (INSPECT_COLUMNS): vertex and triangle counts, world-space bounding box, meshes, materials, image
textures referenced and found, and the flags the curation and render stages need (vertex colours, animated,
skinned). The decision is a state with a specific reason:

    failed:   empty_file, bad_magic, corrupt, truncated, unsupported_version, unsupported_extension,
              missing_external_file, no_geometry, no_faces, non_finite_geometry, import_error,
              timeout, out_of_memory, crashed
    rejected: missing_textures, untextured, vertex_colors_only, too_many_faces

Engine choice. glTF/GLB, OBJ, PLY and STL (nearly all of Objaverse) are parsed directly: the container and its
references here (gltf.py, mesh_files.py), geometry by trimesh. Measured on the shared set (2 CPU cores): median
~1 ms in process and ~16 ms through `inspect_asset` (the isolated child costs ~13 ms), 75 ms at worst (an ASCII
PLY). Blender costs ~0.35 s to import `bpy`, ~0.1 s to reset to an empty scene and then its importer: ~0.5 s per
asset for the 120 KB spider.fbx. At 500K assets that is ~70 CPU-hours of Blender start-up for nothing, so Blender
is used only where it is the only trustworthy reader: FBX, .blend, USD and COLLADA (blender_inspect.py), which it
also renders later. Every asset runs in an isolated child (`inspect_asset`); `inspect_file` is the same work in
the calling process.

Draco (`KHR_draco_mesh_compression`) is `failed:unsupported_extension`: neither DracoPy (trimesh's decoder) nor
Blender's libextern_draco is present in this environment.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pyarrow as pa

from flux3d.config.pipeline import InspectConfig
from flux3d.isolation import run_isolated
from flux3d.records import FAILED, OK, REJECTED, StageResult, Timer
from flux3d.sources import ASSET_EXTENSIONS
from flux3d.stages.blender_inspect import BLENDER_FORMATS, check_magic, inspect_with_blender
from flux3d.stages.gltf import inspect_gltf
from flux3d.stages.inspect_common import Facts, InspectError
from flux3d.stages.mesh_files import inspect_obj, inspect_ply, inspect_stl

INSPECT_VERSION = 1
INSPECT_COLUMNS = pa.schema([
    ("vertices", pa.int64()),
    ("faces", pa.int64()),
    ("bbox_min", pa.list_(pa.float64(), 3)),
    ("bbox_max", pa.list_(pa.float64(), 3)),
    ("num_meshes", pa.int32()),
    ("num_materials", pa.int32()),
    ("textures_referenced", pa.int32()),
    ("textures_found", pa.int32()),
    ("has_texture", pa.bool_()),
    ("missing_textures", pa.bool_()),
    ("vertex_colors", pa.bool_()),
    ("animated", pa.bool_()),
    ("skinned", pa.bool_()),
    ("inspect_engine", pa.string()),
])
KNOWN_FORMATS = frozenset(ASSET_EXTENSIONS.values())
_TRIMESH_READERS: dict[str, Callable[[str, bytes, Facts], None]] = {
    "glb": inspect_gltf, "gltf": inspect_gltf, "obj": inspect_obj, "ply": inspect_ply, "stl": inspect_stl,
}
assert KNOWN_FORMATS == set(_TRIMESH_READERS) | BLENDER_FORMATS, "every asset format needs an engine"
_HEAD_BYTES = 4096


def engine_for(fmt: str) -> str:
    """"trimesh" or "blender"; ValueError for a format the pipeline does not list as an asset."""
    if fmt not in KNOWN_FORMATS:
        raise ValueError(f"unknown asset format {fmt!r}; expected one of {sorted(KNOWN_FORMATS)}")
    return "blender" if fmt in BLENDER_FORMATS else "trimesh"


def inspect_file(path: str, fmt: str, cfg: InspectConfig) -> StageResult:
    """Inspect one asset in this process (no isolation; `inspect_asset` is the bounded form). Key is left ""."""
    facts = Facts(engine=engine_for(fmt))
    with Timer() as timer:
        try:
            _read(path, fmt, facts)
            state, reason, message = decide(facts, fmt, cfg)
        except InspectError as e:
            state, reason, message = FAILED, e.reason, e.message
        except MemoryError:
            # Raised under the child's address-space cap: numpy's _ArrayMemoryError is a MemoryError too.
            state, reason, message = FAILED, "out_of_memory", "MemoryError while loading the asset"
        except Exception as e:  # noqa: BLE001 - a parser bug on a hostile file is still the asset's failure
            state, reason, message = FAILED, "import_error", f"{type(e).__name__}: {e}"
    return StageResult("", state, reason, message, seconds=timer.seconds, columns=facts_columns(facts))


def inspect_asset(path: str, fmt: str, sha256: str, cfg: InspectConfig) -> StageResult:
    """Inspect one asset in a child process bounded by `cfg.timeout_s` and `cfg.memory_mb`; never raises for
    anything the asset does (a hang, a crash, memory exhaustion become failed results)."""
    engine = engine_for(fmt)
    outcome = run_isolated(inspect_file, path, fmt, cfg, timeout_s=cfg.timeout_s, memory_mb=cfg.memory_mb)
    if outcome.ok:
        result: StageResult = outcome.value
        result.key, result.seconds = sha256, outcome.seconds
        return result
    # "error" means inspect_file itself raised, which it is written never to do: count it as a crash.
    reason = outcome.reason if outcome.reason in ("timeout", "out_of_memory") else "crashed"
    return StageResult(sha256, FAILED, reason, outcome.message, seconds=outcome.seconds,
                       columns=facts_columns(Facts(engine=engine)))


def _read(path: str, fmt: str, facts: Facts) -> None:
    if not os.path.isfile(path):
        raise InspectError("missing_external_file", f"asset file {path} does not exist")
    size = os.path.getsize(path)
    if size == 0:
        raise InspectError("empty_file", "0 bytes")
    if fmt in BLENDER_FORMATS:
        with open(path, "rb") as f:
            check_magic(fmt, f.read(_HEAD_BYTES))
        inspect_with_blender(path, fmt, facts)
        return
    with open(path, "rb") as f:
        data = f.read()
    _TRIMESH_READERS[fmt](path, data, facts)


def decide(facts: Facts, fmt: str, cfg: InspectConfig) -> tuple[str, str, str]:
    """The stage's policy over an engine's facts: (state, reason, message)."""
    if not facts.vertices:
        return FAILED, "no_geometry", "no vertices in the scene"
    if not facts.faces:
        return FAILED, "no_faces", f"{facts.vertices} vertices but no triangles (points or lines only)"
    if facts.non_finite:
        return FAILED, "non_finite_geometry", "NaN or Inf vertex positions"
    if facts.missing:
        return REJECTED, "missing_textures", "not found: " + ", ".join(facts.missing[:10])
    if cfg.reject_untextured and fmt not in cfg.geometry_only_formats and not facts.textures_referenced:
        if facts.vertex_colors:
            return REJECTED, "vertex_colors_only", "no image texture; colour comes from vertex colours only"
        return REJECTED, "untextured", "no image texture referenced by any material"
    if facts.faces > cfg.max_faces:
        return REJECTED, "too_many_faces", f"{facts.faces} triangles > max_faces {cfg.max_faces}"
    return OK, "", ""


def facts_columns(facts: Facts) -> dict[str, object]:
    """One row of INSPECT_COLUMNS; None wherever the engine stopped before learning the value."""
    referenced, found = facts.textures_referenced, facts.textures_found
    known_textures = referenced is not None and found is not None
    return {
        "vertices": facts.vertices,
        "faces": facts.faces,
        "bbox_min": facts.bbox_min,
        "bbox_max": facts.bbox_max,
        "num_meshes": facts.num_meshes,
        "num_materials": facts.num_materials,
        "textures_referenced": referenced,
        "textures_found": found,
        "has_texture": bool(found) if known_textures else None,
        "missing_textures": bool(facts.missing) if known_textures or facts.missing else None,
        "vertex_colors": facts.vertex_colors,
        "animated": facts.animated,
        "skinned": facts.skinned,
        "inspect_engine": facts.engine,
    }

"""Inspect stage: every reason code on real files, the shared acceptance set, isolation limits, the Blender path."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

from flux3d.config.pipeline import InspectConfig
from flux3d.isolation import run_isolated
from flux3d.sources import ASSET_EXTENSIONS
from flux3d.stages.inspect import INSPECT_COLUMNS, inspect_asset, inspect_file
from flux3d.stages.inspect_common import find_file
from tests.conftest import ASSETS as SHARED_ASSETS

CFG = InspectConfig()

# Every 3D file of the shared acceptance set -> (state, reason). A file added there without a line here fails.
SHARED_EXPECTED = {
    "good/AlphaBlendModeTest.glb": ("ok", ""),
    "good/Avocado.glb": ("ok", ""),
    "good/BoxTextured.glb": ("ok", ""),
    "good/CesiumMan.glb": ("ok", ""),
    "good/Fox.glb": ("ok", ""),
    "good/GlassVaseFlowers.glb": ("ok", ""),
    "good/Suzanne.glb": ("ok", ""),
    "good/TextureCoordinateTest.glb": ("ok", ""),
    "good/VertexColorTest.glb": ("ok", ""),
    "good/obj_spider/spider.obj": ("ok", ""),
    "good/obj_spider/spider.fbx": ("ok", ""),
    "good/obj_spot/spot_triangulated.obj": ("ok", ""),
    "good/ply/Wuson.ply": ("ok", ""),
    "good/stl/featuretype.STL": ("ok", ""),
    "bad/empty.glb": ("failed", "empty_file"),
    "bad/not_a_glb_text.glb": ("failed", "bad_magic"),
    "bad/obj_no_faces.obj": ("failed", "no_geometry"),
    "bad/truncated_DamagedHelmet.glb": ("failed", "truncated"),
    "bad/draco_Box/Box.gltf": ("failed", "unsupported_extension"),
    "bad/missing_texture_BoomBox/BoomBox.gltf": ("rejected", "missing_textures"),
    "bad/skinned_RiggedSimple.glb": ("rejected", "untextured"),
    "bad/untextured_plain_material_Box.glb": ("rejected", "untextured"),
    "bad/vertex_colors_only_cube.obj": ("rejected", "vertex_colors_only"),
}
# Columns worth pinning per file (the rest is checked for type and presence).
SHARED_COLUMNS = {
    "good/CesiumMan.glb": {"animated": True, "skinned": True, "has_texture": True},
    "good/Fox.glb": {"animated": True, "skinned": True, "vertices": 1728, "faces": 576},
    "good/VertexColorTest.glb": {"vertex_colors": True, "has_texture": True},
    "good/obj_spider/spider.obj": {"textures_referenced": 5, "textures_found": 5, "faces": 1368},
    "good/obj_spider/spider.fbx": {"textures_referenced": 4, "textures_found": 4, "faces": 1368,
                                   "inspect_engine": "blender"},
    "good/stl/featuretype.STL": {"faces": 3476, "has_texture": False, "inspect_engine": "trimesh"},
    "bad/missing_texture_BoomBox/BoomBox.gltf": {"missing_textures": True, "textures_referenced": 4,
                                                 "textures_found": 3, "faces": 6036},
    "bad/skinned_RiggedSimple.glb": {"skinned": True, "animated": True, "vertices": 160},
    "bad/untextured_plain_material_Box.glb": {"vertices": 24, "faces": 12, "bbox_min": [-0.5, -0.5, -0.5]},
    "bad/vertex_colors_only_cube.obj": {"vertex_colors": True, "faces": 12},
}


def fmt_of(path: Path | str) -> str:
    return ASSET_EXTENSIONS[os.path.splitext(str(path))[1].lower()]


def check_columns(columns: dict) -> None:
    """A result row must fit the declared schema exactly (the catalog refuses undeclared columns)."""
    assert set(columns) == set(INSPECT_COLUMNS.names)
    import pyarrow as pa

    pa.Table.from_pylist([columns], schema=INSPECT_COLUMNS)


@pytest.mark.shared_assets
def test_shared_set_is_fully_listed() -> None:
    if not SHARED_ASSETS.is_dir():
        pytest.skip("../shared/assets not present")
    files = {p.relative_to(SHARED_ASSETS).as_posix() for kind in ("good", "bad")
             for p in (SHARED_ASSETS / kind).rglob("*") if p.suffix.lower() in ASSET_EXTENSIONS}
    assert files == set(SHARED_EXPECTED)


@pytest.mark.shared_assets
@pytest.mark.parametrize("rel", sorted(SHARED_EXPECTED))
def test_shared_assets(rel: str) -> None:
    if not SHARED_ASSETS.is_dir():
        pytest.skip("../shared/assets not present")
    path = SHARED_ASSETS / rel
    result = inspect_asset(str(path), fmt_of(path), "sha-" + rel, CFG)
    assert (result.state, result.reason) == SHARED_EXPECTED[rel], result.message
    assert result.key == "sha-" + rel and result.seconds > 0
    check_columns(result.columns)
    for name, value in SHARED_COLUMNS.get(rel, {}).items():
        assert result.columns[name] == value, name
    if result.state != "failed":  # whatever loads carries its geometry, rejected or not
        assert result.columns["vertices"] > 0 and result.columns["faces"] > 0
        assert len(result.columns["bbox_min"]) == 3


# -- generated assets ------------------------------------------------------------------------------------------
def glb_bytes(doc: dict, blob: bytes | None) -> bytes:
    js = json.dumps(doc).encode()
    js += b" " * (-len(js) % 4)
    chunks = struct.pack("<II", len(js), 0x4E4F534A) + js
    if blob is not None:
        blob += b"\0" * (-len(blob) % 4)
        chunks += struct.pack("<II", len(blob), 0x004E4942) + blob
    return struct.pack("<4sII", b"glTF", 2, 12 + len(chunks)) + chunks


def triangle_doc(positions: np.ndarray, indices: np.ndarray, uri: str | None = None) -> tuple[dict, bytes]:
    """A one-mesh glTF document over float32 positions and uint32 indices (one buffer)."""
    pos, idx = positions.astype("<f4").tobytes(), indices.astype("<u4").tobytes()
    buffer = {"byteLength": len(pos) + len(idx)} | ({"uri": uri} if uri else {})
    doc = {
        "asset": {"version": "2.0"}, "scene": 0, "scenes": [{"nodes": [0]}], "nodes": [{"mesh": 0}],
        "meshes": [{"primitives": [{"attributes": {"POSITION": 0}, "indices": 1}]}],
        "buffers": [buffer],
        "bufferViews": [{"buffer": 0, "byteOffset": 0, "byteLength": len(pos)},
                        {"buffer": 0, "byteOffset": len(pos), "byteLength": len(idx)}],
        "accessors": [{"bufferView": 0, "componentType": 5126, "count": len(positions), "type": "VEC3"},
                      {"bufferView": 1, "componentType": 5125, "count": indices.size, "type": "SCALAR"}],
    }
    return doc, pos + idx


def checker(size: int = 32) -> Image.Image:
    ij = (np.add.outer(np.arange(size), np.arange(size)) // 4) % 2
    return Image.fromarray((ij[..., None] * np.array([200, 60, 30])).astype(np.uint8))


@pytest.fixture(scope="module")
def textured_box() -> tuple[trimesh.Trimesh, bytes]:
    mesh = trimesh.creation.box(extents=(1.0, 0.6, 0.4))
    mesh.unmerge_vertices()  # per-face UVs need unshared corners
    mesh.apply_translation((0.25, -1.0, 2.0))
    uv = np.tile(np.array([[0, 0], [1, 0], [0, 1]], dtype=np.float64), (len(mesh.faces), 1))
    mesh.visual = trimesh.visual.TextureVisuals(uv=uv, image=checker())
    return mesh, trimesh.Scene(mesh).export(file_type="glb")


def run(path: Path, cfg: InspectConfig = CFG) -> tuple[str, str, dict]:
    result = inspect_file(str(path), fmt_of(path), cfg)
    check_columns(result.columns)
    return result.state, result.reason, result.columns


def test_textured_glb_counts_and_bbox_match_trimesh(tmp_path, textured_box) -> None:
    mesh, blob = textured_box
    (tmp_path / "box.glb").write_bytes(blob)
    state, reason, cols = run(tmp_path / "box.glb")
    assert (state, reason) == ("ok", "")
    assert (cols["vertices"], cols["faces"]) == (len(mesh.vertices), len(mesh.faces))
    np.testing.assert_allclose(cols["bbox_min"], mesh.bounds[0], atol=1e-6)
    np.testing.assert_allclose(cols["bbox_max"], mesh.bounds[1], atol=1e-6)
    assert (cols["textures_referenced"], cols["textures_found"], cols["has_texture"]) == (1, 1, True)
    assert (cols["missing_textures"], cols["animated"], cols["skinned"], cols["inspect_engine"]) == (
        False, False, False, "trimesh")


def test_truncated_and_empty_and_not_a_glb(tmp_path, textured_box) -> None:
    _, blob = textured_box
    (tmp_path / "half.glb").write_bytes(blob[: len(blob) // 2])
    assert run(tmp_path / "half.glb")[:2] == ("failed", "truncated")
    # Header length patched to the cut size: now the BIN chunk itself runs past the end.
    cut = bytearray(blob[: len(blob) - 40])
    cut[8:12] = struct.pack("<I", len(cut))
    (tmp_path / "cut_chunk.glb").write_bytes(bytes(cut))
    assert run(tmp_path / "cut_chunk.glb")[:2] == ("failed", "truncated")
    (tmp_path / "empty.glb").write_bytes(b"")
    assert run(tmp_path / "empty.glb")[:2] == ("failed", "empty_file")
    (tmp_path / "notes.glb").write_bytes(b"just some notes\n")
    assert run(tmp_path / "notes.glb")[:2] == ("failed", "bad_magic")
    (tmp_path / "broken.gltf").write_bytes(b'{"asset": {"version": "2.0"}, "meshes": [')
    assert run(tmp_path / "broken.gltf")[:2] == ("failed", "corrupt")


def test_nan_vertex_is_non_finite_geometry(tmp_path) -> None:
    box = trimesh.creation.box()
    positions = box.vertices.copy()
    positions[3] = np.nan
    doc, blob = triangle_doc(positions, box.faces)
    (tmp_path / "nan.glb").write_bytes(glb_bytes(doc, blob))
    state, reason, cols = run(tmp_path / "nan.glb")
    assert (state, reason) == ("failed", "non_finite_geometry")
    assert (cols["vertices"], cols["faces"], cols["bbox_min"]) == (8, 12, None)


def test_gltf_external_buffer_missing_then_present(tmp_path) -> None:
    box = trimesh.creation.box()
    doc, blob = triangle_doc(box.vertices, box.faces, uri="geo%20data.bin")
    (tmp_path / "box.gltf").write_text(json.dumps(doc))
    assert run(tmp_path / "box.gltf")[:2] == ("failed", "missing_external_file")
    (tmp_path / "geo data.bin").write_bytes(blob[:-8])
    assert run(tmp_path / "box.gltf")[:2] == ("failed", "truncated")
    (tmp_path / "geo data.bin").write_bytes(blob)  # percent-decoded name now resolves
    state, reason, cols = run(tmp_path / "box.gltf")
    assert (state, reason, cols["faces"]) == ("rejected", "untextured", 12)
    assert run(tmp_path / "box.gltf", InspectConfig(reject_untextured=False))[:2] == ("ok", "")
    assert run(tmp_path / "box.gltf", InspectConfig(reject_untextured=False, max_faces=11))[:2] == (
        "rejected", "too_many_faces")


def test_required_draco_is_unsupported_and_glb_image_missing(tmp_path) -> None:
    box = trimesh.creation.box()
    doc, blob = triangle_doc(box.vertices, box.faces)
    draco = doc | {"extensionsUsed": ["KHR_draco_mesh_compression"],
                   "extensionsRequired": ["KHR_draco_mesh_compression"]}
    (tmp_path / "draco.glb").write_bytes(glb_bytes(draco, blob))
    assert run(tmp_path / "draco.glb")[:2] == ("failed", "unsupported_extension")
    textured = doc | {"materials": [{"pbrMetallicRoughness": {"baseColorTexture": {"index": 0}}}],
                      "textures": [{"source": 0}], "images": [{"uri": "Base%20Color.png"}]}
    textured["meshes"][0]["primitives"][0]["material"] = 0
    (tmp_path / "textured.glb").write_bytes(glb_bytes(textured, blob))
    state, reason, cols = run(tmp_path / "textured.glb")
    assert (state, reason, cols["missing_textures"], cols["vertices"]) == ("rejected", "missing_textures", True, 8)
    checker().save(tmp_path / "Base Color.png")
    state, reason, cols = run(tmp_path / "textured.glb")
    assert (state, reason, cols["has_texture"]) == ("ok", "", True)


def write_box_obj(path: Path, mtllib: str | None, usemtl: str | None = None, colors: bool = False) -> None:
    box = trimesh.creation.box()
    lines = [f"mtllib {mtllib}"] if mtllib else []
    lines += [f"usemtl {usemtl}"] if usemtl else []
    lines += [f"v {x} {y} {z}" + (" 0.5 0.2 0.1" if colors else "") for x, y, z in box.vertices]
    lines += ["vt 0 0", "vt 1 0", "vt 0 1"]
    lines += [f"f {a}/1 {b}/2 {c}/3" for a, b, c in box.faces + 1]
    path.write_text("\n".join(lines) + "\n")


def test_obj_windows_texture_paths_resolve(tmp_path) -> None:
    write_box_obj(tmp_path / "model.obj", "Model.MTL", "painted")  # library name differs in case too
    (tmp_path / "model.mtl").write_text(
        "newmtl painted\nKd 1 1 1\nmap_Kd -s 1 1 1 -clamp on .\\Textures\\Stripes.PNG\n"
        "newmtl bumpy\nmap_Bump -bm 0.5 D:\\art\\project\\bump map.png\n")
    (tmp_path / "textures").mkdir()
    checker().save(tmp_path / "textures" / "stripes.png")
    checker().save(tmp_path / "bump map.png")
    state, reason, cols = run(tmp_path / "model.obj")
    assert (state, reason) == ("ok", "")
    assert (cols["textures_referenced"], cols["textures_found"], cols["faces"]) == (2, 2, 12)
    (tmp_path / "bump map.png").unlink()
    state, reason, cols = run(tmp_path / "model.obj")
    assert (state, reason, cols["textures_found"], cols["missing_textures"]) == ("rejected", "missing_textures", 1,
                                                                               True)


def test_find_file_never_follows_absolute_paths(tmp_path) -> None:
    (tmp_path / "passwd").write_text("x")
    assert find_file("/etc/passwd", [str(tmp_path)]) == str(tmp_path / "passwd")  # only the name, next to the asset
    assert find_file("/etc/hostname", [str(tmp_path)]) is None
    assert find_file("https://example.com/passwd", [str(tmp_path)]) is None


def test_obj_mtl_missing_vertex_colours_and_no_faces(tmp_path) -> None:
    write_box_obj(tmp_path / "lost.obj", "lost.mtl", "m")
    assert run(tmp_path / "lost.obj")[:2] == ("rejected", "missing_textures")
    write_box_obj(tmp_path / "coloured.obj", None, colors=True)
    state, reason, cols = run(tmp_path / "coloured.obj")
    assert (state, reason, cols["vertex_colors"]) == ("rejected", "vertex_colors_only", True)
    write_box_obj(tmp_path / "plain.obj", None)
    assert run(tmp_path / "plain.obj")[:2] == ("rejected", "untextured")
    (tmp_path / "points.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\n")
    assert run(tmp_path / "points.obj")[:2] == ("failed", "no_faces")
    cloud = trimesh.PointCloud(np.random.default_rng(0).random((50, 3)))
    (tmp_path / "cloud.ply").write_bytes(cloud.export(file_type="ply"))
    assert run(tmp_path / "cloud.ply")[:2] == ("failed", "no_faces")


def test_stl_binary_ascii_truncated(tmp_path) -> None:
    ring = trimesh.creation.annulus(r_min=0.3, r_max=0.5, height=0.2)
    binary = ring.export(file_type="stl")
    (tmp_path / "ring.stl").write_bytes(b"solid" + binary[5:])  # binary STL whose header says "solid"
    state, reason, cols = run(tmp_path / "ring.stl")  # geometry-only format: untextured is not rejected
    assert (state, reason, cols["faces"], cols["has_texture"]) == ("ok", "", len(ring.faces), False)
    (tmp_path / "ascii.stl").write_bytes(ring.export(file_type="stl_ascii").encode())
    assert run(tmp_path / "ascii.stl")[:2] == ("ok", "")
    (tmp_path / "cut.stl").write_bytes(binary[:-100])
    assert run(tmp_path / "cut.stl")[:2] == ("failed", "truncated")


def test_unknown_format_is_a_caller_error(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown asset format"):
        inspect_asset(str(tmp_path / "x.zip"), "zip", "sha", CFG)


# -- isolation: timeout, process group, memory ---------------------------------------------------------------
def sleep_with_grandchild(pid_file: str) -> None:
    """Test-only slow work that also starts a grandchild, as a Blender importer might."""
    child = subprocess.Popen(["sleep", "60"])
    Path(pid_file).write_text(f"{os.getpid()} {child.pid}")
    time.sleep(60)


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie waiting for init holds nothing
    except FileNotFoundError:
        return True


def test_timeout_kills_the_whole_process_group(tmp_path) -> None:
    pid_file = tmp_path / "pids"
    outcome = run_isolated(sleep_with_grandchild, str(pid_file), timeout_s=3.0)
    assert (outcome.ok, outcome.reason) == (False, "timeout")
    pids = [int(p) for p in pid_file.read_text().split()]
    deadline = time.time() + 5
    while time.time() < deadline and not all(gone(p) for p in pids):
        time.sleep(0.05)
    assert all(gone(p) for p in pids), pids



def test_timeout_before_the_child_leads_its_group_still_ends_it() -> None:
    """A zero timeout fires while the child is still starting (before its setsid): the child must still be killed
    and reaped, not waited on forever. Run in a thread so that a regression fails the test instead of hanging it."""
    box: dict = {}
    worker = threading.Thread(target=lambda: box.update(outcome=run_isolated(time.sleep, 60, timeout_s=0)),
                              daemon=True)
    t0 = time.monotonic()
    worker.start()
    worker.join(timeout=20)
    assert not worker.is_alive(), "run_isolated never returned after its timeout"
    assert (box["outcome"].ok, box["outcome"].reason) == (False, "timeout")
    assert time.monotonic() - t0 < 20


USDA_BOX = textwrap.dedent("""\
    #usda 1.0
    (
        upAxis = "Y"
        metersPerUnit = 1
    )
    def Xform "Root"
    {
        def Mesh "Box"
        {
            int[] faceVertexCounts = [4, 4, 4, 4, 4, 4]
            int[] faceVertexIndices = [0, 1, 3, 2, 4, 6, 7, 5, 0, 4, 5, 1, 2, 3, 7, 6, 0, 2, 6, 4, 1, 5, 7, 3]
            point3f[] points = [(0, 0, 0), (0, 0, 3), (0, 2, 0), (0, 2, 3), (1, 0, 0), (1, 0, 3), (1, 2, 0), (1, 2, 3)]
        }
    }
    """)


def test_inspect_asset_timeout_on_a_blender_import(tmp_path) -> None:
    (tmp_path / "box.usda").write_text(USDA_BOX)
    result = inspect_asset(str(tmp_path / "box.usda"), "usda", "sha", InspectConfig(timeout_s=0.2))
    assert (result.key, result.state, result.reason) == ("sha", "failed", "timeout")
    check_columns(result.columns)


def test_memory_bomb_is_out_of_memory(tmp_path) -> None:
    # 1.5e9 bufferless vertices: a few bytes on disk, 18 GB once a reader fills the placeholder accessor.
    box = trimesh.creation.box()
    doc, blob = triangle_doc(box.vertices, box.faces)
    doc["accessors"][0] = {"componentType": 5126, "count": 1_500_000_000, "type": "VEC3"}
    (tmp_path / "bomb.glb").write_bytes(glb_bytes(doc, blob))
    result = inspect_asset(str(tmp_path / "bomb.glb"), "glb", "sha", InspectConfig(memory_mb=2048))
    assert (result.state, result.reason) == ("failed", "out_of_memory"), result.message


# -- Blender path ---------------------------------------------------------------------------------------------
@pytest.mark.integration
def test_blender_usd_box(tmp_path) -> None:
    (tmp_path / "box.usda").write_text(USDA_BOX)
    result = inspect_asset(str(tmp_path / "box.usda"), "usda", "sha", CFG)
    cols = result.columns
    assert (result.state, result.reason, cols["inspect_engine"]) == ("rejected", "untextured", "blender")
    assert (cols["vertices"], cols["faces"], cols["num_meshes"]) == (8, 12, 1)
    # Reported Y-up like the trimesh path: the file's own frame comes back.
    np.testing.assert_allclose(cols["bbox_min"], [0, 0, 0], atol=1e-5)
    np.testing.assert_allclose(cols["bbox_max"], [1, 2, 3], atol=1e-5)


MAKE_BLEND = """
import bpy, sys
out, marker = sys.argv[-2], sys.argv[-1]
bpy.ops.wm.read_factory_settings(use_empty=True)
bpy.ops.mesh.primitive_cube_add(size=2.0)
text = bpy.data.texts.new("autorun.py")
text.write(f"open({marker!r}, 'w').write('ran')\\n")
text.use_module = True  # registered: Blender runs it on load when scripts are trusted
bpy.ops.wm.save_as_mainfile(filepath=out)
"""


@pytest.mark.integration
def test_blend_scripts_never_run(tmp_path) -> None:
    blend, marker = tmp_path / "cube.blend", tmp_path / "script_ran"
    subprocess.run([sys.executable, "-c", MAKE_BLEND, str(blend), str(marker)], check=True, capture_output=True,
                   timeout=120)
    result = inspect_asset(str(blend), "blend", "sha", CFG)
    assert (result.state, result.reason) == ("rejected", "untextured"), result.message
    assert (result.columns["vertices"], result.columns["faces"]) == (8, 12)
    assert not marker.exists()
    (tmp_path / "fake.blend").write_bytes(b"PK\x03\x04 not a blend")
    assert inspect_asset(str(tmp_path / "fake.blend"), "blend", "sha", CFG).reason == "bad_magic"

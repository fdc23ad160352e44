"""glTF 2.0 / GLB inspection: the container is parsed and checked here, geometry is read by trimesh.

The container is checked before trimesh sees it because trimesh's own failures are unspecific (an IndexError for a
zero-byte file, "chunk was not expected length" for a truncated one) and because it ignores `extensionsRequired`,
quietly returning zeros for Draco-compressed geometry. Textures are resolved here without decoding a pixel, and
trimesh runs with `skip_materials=True`: decoding the images would cost most of the time and tell inspect nothing.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import struct
from typing import Any
from urllib.parse import unquote

from flux3d.stages.inspect_common import Facts, InspectError, find_file, summarize_trimesh_scene

GLB_MAGIC = b"glTF"
CHUNK_JSON = 0x4E4F534A
CHUNK_BIN = 0x004E4942
# Required extensions that change only materials, lights or metadata: geometry still reads correctly without them.
# Anything else required (Draco, meshopt, ...) stores geometry trimesh cannot decode; no Draco decoder is
# installed in this environment (neither DracoPy for trimesh nor libextern_draco for Blender's importer).
GEOMETRY_SAFE_EXTENSIONS = frozenset({
    "KHR_texture_transform", "KHR_texture_basisu", "EXT_texture_webp", "EXT_texture_avif", "MSFT_texture_dds",
    "KHR_lights_punctual", "KHR_materials_variants", "KHR_mesh_quantization", "KHR_xmp_json_ld",
    "KHR_animation_pointer",
})
_COMPONENT_BYTES = {5120: 1, 5121: 1, 5122: 2, 5123: 2, 5125: 4, 5126: 4}
_TYPE_COMPONENTS = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4, "MAT2": 4, "MAT3": 9, "MAT4": 16}
# Texture extensions whose `source` names an alternative image (the plain `source` is then a fallback or absent).
_TEXTURE_SOURCE_EXTENSIONS = ("KHR_texture_basisu", "EXT_texture_webp", "EXT_texture_avif", "MSFT_texture_dds")


def inspect_gltf(path: str, data: bytes, facts: Facts) -> None:
    """Inspect a .gltf or .glb file already read into `data`. The content decides the container, not the suffix."""
    base = os.path.dirname(os.path.abspath(path))
    if data[:4] == GLB_MAGIC:
        doc, bin_chunk = _split_glb(data)
    elif data.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"{":
        doc, bin_chunk = _parse_json(data, "glTF JSON"), None
    else:
        raise InspectError("bad_magic", f"neither GLB magic nor glTF JSON (starts with {data[:8]!r})")
    _check_document(doc)
    buffers = _load_buffers(doc, bin_chunk, base)
    _check_views_and_accessors(doc, buffers)

    meshes = doc.get("meshes") or []
    materials = doc.get("materials") or []
    primitives = [p for m in meshes if isinstance(m, dict) for p in m.get("primitives") or [] if isinstance(p, dict)]
    used_materials = sorted({p["material"] for p in primitives if isinstance(p.get("material"), int)})
    facts.num_materials = len(used_materials)
    facts.vertex_colors = any("COLOR_0" in (p.get("attributes") or {}) for p in primitives)
    facts.animated = bool(doc.get("animations"))
    facts.skinned = bool(doc.get("skins"))

    images = _referenced_images(doc, [materials[i] for i in used_materials if i < len(materials)])
    found = 0
    for index in images:
        label = _image_found(doc, index, buffers, base)
        if label is None:
            found += 1
        else:
            facts.missing.append(label)
    facts.textures_referenced, facts.textures_found = len(images), found

    _load_geometry(data if bin_chunk is not None else None, doc, buffers, facts)
    # trimesh ignores `normalized` on integer positions (KHR_mesh_quantization): counts hold, the bbox would not.
    accessors = doc.get("accessors") or []
    positions = [(p.get("attributes") or {}).get("POSITION") for p in primitives]
    if any(isinstance(i, int) and i < len(accessors) and accessors[i].get("normalized") for i in positions):
        facts.bbox_min = facts.bbox_max = None


def _split_glb(data: bytes) -> tuple[dict, bytes | None]:
    if len(data) < 12:
        raise InspectError("truncated", f"GLB header needs 12 bytes, file has {len(data)}")
    version, length = struct.unpack_from("<II", data, 4)
    if version != 2:
        raise InspectError("unsupported_version", f"GLB container version {version}; only glTF 2.0 is supported")
    if length > len(data):
        raise InspectError("truncated", f"GLB header declares {length} bytes, file has {len(data)}")
    if length < 20:
        raise InspectError("corrupt", f"GLB header declares {length} bytes, too short for a JSON chunk")
    chunk_length, chunk_type = struct.unpack_from("<II", data, 12)
    if chunk_type != CHUNK_JSON:
        raise InspectError("corrupt", f"first GLB chunk is 0x{chunk_type:08x}, not JSON")
    if 20 + chunk_length > length:
        raise InspectError("truncated", f"JSON chunk of {chunk_length} bytes runs past the end ({length})")
    doc = _parse_json(data[20:20 + chunk_length], "GLB JSON chunk")
    pos = 20 + chunk_length
    bin_chunk = None
    # Later chunks: the first BIN chunk is buffer 0; unknown chunk types are skipped as the spec requires.
    while pos + 8 <= length:
        chunk_length, chunk_type = struct.unpack_from("<II", data, pos)
        if pos + 8 + chunk_length > length:
            raise InspectError("truncated", f"chunk at byte {pos} ({chunk_length} bytes) runs past the end ({length})")
        if chunk_type == CHUNK_BIN and bin_chunk is None:
            bin_chunk = data[pos + 8:pos + 8 + chunk_length]
        pos += 8 + chunk_length
    return doc, bin_chunk


def _parse_json(blob: bytes, what: str) -> dict:
    try:
        doc = json.loads(blob.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError) as e:
        raise InspectError("corrupt", f"{what} does not parse: {e}") from None
    if not isinstance(doc, dict):
        raise InspectError("corrupt", f"{what} is a JSON {type(doc).__name__}, not an object")
    return doc


def _check_document(doc: dict) -> None:
    version = str((doc.get("asset") or {}).get("version", "2.0"))
    if not version.startswith("2"):
        raise InspectError("unsupported_version", f"glTF version {version}; only 2.x is supported")
    required = [e for e in doc.get("extensionsRequired") or [] if isinstance(e, str)]
    blocking = [e for e in required if e not in GEOMETRY_SAFE_EXTENSIONS and not e.startswith("KHR_materials_")]
    if blocking:
        raise InspectError("unsupported_extension", f"extensionsRequired {blocking} cannot be decoded here")


def _decode_data_uri(uri: str, what: str) -> bytes:
    header, sep, payload = uri.partition(",")
    if not sep:
        raise InspectError("corrupt", f"{what}: malformed data URI")
    try:
        if header.endswith(";base64"):
            return base64.b64decode(payload, validate=True)
        return unquote(payload).encode("latin-1")
    except (binascii.Error, ValueError, UnicodeEncodeError) as e:
        raise InspectError("corrupt", f"{what}: bad data URI payload: {e}") from None


def _resolve_uri(uri: str, base: str) -> str | None:
    # URIs are percent-encoded ("my%20tex.png"), but some exporters write raw names that contain '%'.
    return find_file(unquote(uri), [base]) or find_file(uri, [base])


def _load_buffers(doc: dict, bin_chunk: bytes | None, base: str) -> list[bytes]:
    buffers = []
    for i, buf in enumerate(doc.get("buffers") or []):
        if not isinstance(buf, dict):
            raise InspectError("corrupt", f"buffer {i} is not an object")
        uri = buf.get("uri")
        if uri is None:
            if i != 0 or bin_chunk is None:
                raise InspectError("corrupt", f"buffer {i} has no uri and there is no GLB BIN chunk for it")
            blob = bin_chunk
        elif uri.startswith("data:"):
            blob = _decode_data_uri(uri, f"buffer {i}")
        else:
            found = _resolve_uri(uri, base)
            if found is None:
                raise InspectError("missing_external_file", f"buffer {i} file {uri!r} not found")
            with open(found, "rb") as f:
                blob = f.read()
        declared = buf.get("byteLength", 0)
        if len(blob) < declared:
            raise InspectError("truncated", f"buffer {i} declares {declared} bytes, has {len(blob)}")
        buffers.append(blob)
    return buffers


def _check_views_and_accessors(doc: dict, buffers: list[bytes]) -> None:
    """Bounds-check every view and accessor so a lying file fails as corrupt instead of reading garbage."""
    views = doc.get("bufferViews") or []
    try:
        for i, view in enumerate(views):
            buffer = buffers[view["buffer"]]
            end = view.get("byteOffset", 0) + view["byteLength"]
            if end > len(buffer):
                raise InspectError("corrupt", f"bufferView {i} ends at byte {end} of a {len(buffer)}-byte buffer")
        for i, acc in enumerate(doc.get("accessors") or []):
            item = _COMPONENT_BYTES[acc["componentType"]] * _TYPE_COMPONENTS[acc["type"]]
            if "bufferView" not in acc or acc["count"] == 0:
                continue  # sparse-only or extension-filled accessors have no bytes of their own
            view = views[acc["bufferView"]]
            stride = view.get("byteStride") or item
            end = acc.get("byteOffset", 0) + stride * (acc["count"] - 1) + item
            if acc["count"] < 0 or end > view["byteLength"]:
                raise InspectError("corrupt", f"accessor {i} reads to byte {end} of a {view['byteLength']}-byte view")
    except (KeyError, IndexError, TypeError) as e:
        raise InspectError("corrupt", f"malformed bufferView/accessor: {type(e).__name__} {e}") from None


def _referenced_images(doc: dict, materials: list[Any]) -> list[int]:
    """Image indices reachable from the materials' textureInfo objects (core and extension slots alike)."""
    textures = doc.get("textures") or []
    texture_ids: set[int] = set()

    def walk(node: Any, key: str = "") -> None:
        if isinstance(node, dict):
            if key.endswith("Texture") and isinstance(node.get("index"), int):
                texture_ids.add(node["index"])
            for k, v in node.items():
                walk(v, k)
        elif isinstance(node, list):
            for v in node:
                walk(v, key)

    walk(materials)
    images: set[int] = set()
    for t in sorted(texture_ids):
        texture = textures[t] if 0 <= t < len(textures) and isinstance(textures[t], dict) else {}
        sources = [texture.get("source")]
        sources += [(texture.get("extensions") or {}).get(e, {}).get("source") for e in _TEXTURE_SOURCE_EXTENSIONS]
        images.update(s for s in sources if isinstance(s, int))
    return sorted(images)


def _image_found(doc: dict, index: int, buffers: list[bytes], base: str) -> str | None:
    """None when image `index` has bytes (embedded, data URI or a file); else a label for the message."""
    images = doc.get("images") or []
    image = images[index] if 0 <= index < len(images) and isinstance(images[index], dict) else None
    if image is None:
        return f"image {index} (no such image)"
    if isinstance(image.get("bufferView"), int):
        views = doc.get("bufferViews") or []
        ok = image["bufferView"] < len(views) and views[image["bufferView"]].get("byteLength", 0) > 0
        return None if ok else f"image {index} (empty or invalid bufferView)"
    uri = image.get("uri")
    if not isinstance(uri, str) or not uri:
        return f"image {index} (no uri or bufferView)"
    if uri.startswith("data:"):
        try:
            return None if _decode_data_uri(uri, f"image {index}") else f"image {index} (empty data URI)"
        except InspectError:
            return f"image {index} (bad data URI)"
    return None if _resolve_uri(uri, base) is not None else uri


class _Buffers(dict):
    """The resolver trimesh asks for external buffers by uri: answered from the bytes already loaded and checked."""


def _load_geometry(glb: bytes | None, doc: dict, buffers: list[bytes], facts: Facts) -> None:
    import trimesh

    resolver = _Buffers()
    for buf, blob in zip(doc.get("buffers") or [], buffers):
        if isinstance(buf.get("uri"), str) and not buf["uri"].startswith("data:"):
            resolver[buf["uri"]] = blob
    if glb is not None:
        stream, file_type = io.BytesIO(glb), "glb"
    else:
        stream, file_type = io.BytesIO(json.dumps(doc).encode()), "gltf"
    try:
        scene = trimesh.load_scene(stream, file_type=file_type, resolver=resolver, skip_materials=True, process=False)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - any trimesh failure on a checked container is an import error
        raise InspectError("import_error", f"trimesh: {type(e).__name__}: {e}") from None
    summarize_trimesh_scene(scene, facts)

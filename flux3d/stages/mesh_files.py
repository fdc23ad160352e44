"""OBJ (+MTL), PLY and STL inspection: references and headers are read here, geometry by trimesh.

trimesh resolves OBJ material libraries and textures by exact relative path only, so a MilkShape export whose MTL
says `map_Kd .\\tex.jpg`, or a file authored on Windows with `D:\\art\\Tex.JPG`, would look untextured. The
references are therefore read here and resolved with `find_file` (backslashes, bare names, any case); trimesh
loads geometry with `skip_materials=True` so no image is decoded.
"""

from __future__ import annotations

import io
import os
import re
import struct

from flux3d.stages.inspect_common import Facts, InspectError, find_file, summarize_trimesh_scene

_MTLLIB = re.compile(rb"^[ \t]*mtllib[ \t]+(.+?)[ \t]*$", re.MULTILINE)
# MTL statements that name an image: every map_* plus the old bare keywords.
_MAP_KEYS = frozenset({"bump", "disp", "decal", "refl", "norm"})
# Texture options: those taking one word (on/off, a channel, a type) and those taking up to N numbers.
_WORD_OPTIONS = frozenset({"-blendu", "-blendv", "-cc", "-clamp", "-imfchan", "-type"})
_NUMERIC_OPTIONS = {"-bm": 1, "-boost": 1, "-texres": 1, "-mm": 2, "-o": 3, "-s": 3, "-t": 3}
# "v x y z r g b": the colour extension to OBJ. trimesh drops these colours when the file also has UVs.
_COLOURED_VERTEX = re.compile(rb"^[ \t]*v(?:[ \t]+[-+0-9.eE]+){6,}[ \t]*\r?$", re.MULTILINE)
_SNIFF = 4096


def inspect_obj(path: str, data: bytes, facts: Facts) -> None:
    if b"\x00" in data[:_SNIFF]:
        raise InspectError("bad_magic", "binary content in an .obj file (OBJ is text)")
    base = os.path.dirname(os.path.abspath(path))
    textures: dict[str, tuple[str, str | None]] = {}  # normalised reference -> (as written, resolved path)
    for match in _MTLLIB.finditer(data):
        value = os.fsdecode(match.group(1)).strip()
        # One statement may list several libraries, but names with spaces are common too: try the whole first.
        names = [value] if find_file(value, [base]) else value.split()
        for name in names:
            mtl = find_file(name, [base])
            if mtl is None:
                facts.missing.append(f"{name} (material library)")
                continue
            with open(mtl, "rb") as f:
                for ref in _mtl_image_refs(f.read()):
                    key = ref.replace("\\", "/").lower()
                    if key not in textures:
                        textures[key] = ref, find_file(ref, [os.path.dirname(mtl), base])
    facts.textures_referenced = len(textures)
    facts.textures_found = sum(p is not None for _, p in textures.values())
    facts.missing.extend(ref for ref, p in textures.values() if p is None)
    facts.animated = facts.skinned = False  # OBJ cannot carry either
    facts.vertex_colors = _COLOURED_VERTEX.search(data) is not None
    _load(data, "obj", facts)
    facts.num_materials = len(set(re.findall(rb"^[ \t]*usemtl[ \t]+(.+?)[ \t]*$", data, re.MULTILINE)))


def _mtl_image_refs(mtl: bytes) -> list[str]:
    refs = []
    for raw in mtl.splitlines():
        tokens = os.fsdecode(raw).split()
        if not tokens or not (tokens[0].lower().startswith("map_") or tokens[0].lower() in _MAP_KEYS):
            continue
        i = 1
        # Skip options; the last token always stays, as the file name.
        while i < len(tokens) - 1 and tokens[i].startswith("-"):
            option = tokens[i].lower()
            i += 1
            if option in _WORD_OPTIONS:
                i += 1 if i < len(tokens) - 1 else 0
                continue
            for _ in range(_NUMERIC_OPTIONS.get(option, 1)):
                if i < len(tokens) - 1 and _is_number(tokens[i]):
                    i += 1
        if i < len(tokens):
            refs.append(" ".join(tokens[i:]))  # the rest is the name; rejoined so names with spaces survive
    return refs


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def inspect_ply(path: str, data: bytes, facts: Facts) -> None:
    if not re.match(rb"ply[ \t]*\r?\n", data):
        raise InspectError("bad_magic", f"PLY files start with 'ply', this one with {data[:8]!r}")
    end = data.find(b"end_header", 0, 1 << 20)
    if end < 0:
        raise InspectError("corrupt", "PLY header has no end_header in its first MiB")
    base = os.path.dirname(os.path.abspath(path))
    refs = re.findall(rb"^comment[ \t]+TextureFile[ \t]+(.+?)[ \t]*$", data[:end], re.MULTILINE)
    resolved = {os.fsdecode(r): find_file(os.fsdecode(r), [base]) for r in refs}
    facts.textures_referenced = len(resolved)
    facts.textures_found = sum(p is not None for p in resolved.values())
    facts.missing.extend(r for r, p in resolved.items() if p is None)
    facts.num_materials = 0
    facts.animated = facts.skinned = False
    _load(data, "ply", facts)


def inspect_stl(path: str, data: bytes, facts: Facts) -> None:
    # Binary STL has no magic and its 80-byte header often starts with "solid" too (featuretype.STL does), so the
    # size equation decides: 84 + 50 bytes per triangle.
    if len(data) >= 84:
        count = struct.unpack_from("<I", data, 80)[0]
        binary_size = 84 + 50 * count
    else:
        binary_size = -1
    is_text = b"\x00" not in data[:_SNIFF]
    if binary_size != len(data):
        if is_text and data.lstrip()[:5].lower() == b"solid":
            pass  # ASCII STL
        elif is_text:
            raise InspectError("bad_magic", f"neither binary nor ASCII STL (starts with {data[:8]!r})")
        elif binary_size > len(data):
            raise InspectError("truncated", f"binary STL declares {count} triangles ({binary_size} bytes), "
                                            f"file has {len(data)}")
    facts.textures_referenced = facts.textures_found = facts.num_materials = 0
    facts.animated = facts.skinned = False
    _load(data, "stl", facts)


def _load(data: bytes, file_type: str, facts: Facts) -> None:
    import trimesh

    try:
        # process=False: counts and bbox as written (merging would hide duplicate vertices and NaN rows).
        scene = trimesh.load_scene(io.BytesIO(data), file_type=file_type, skip_materials=True, process=False)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - any parser failure is the asset's, reported with its text
        raise InspectError("import_error", f"trimesh: {type(e).__name__}: {e}") from None
    summarize_trimesh_scene(scene, facts)

"""Per-view passes of the main set (`render.passes`), written by the Blender side of the render stage.

The compositor's File Output node writes Cycles' Depth and Normal passes as float EXR beside each view; they are
read back through Blender's own EXR loader (no EXR library needed outside Blender) and stored as `NNN_depth.png`
(uint16, camera-axis z = value / `depth_scale`, 0 = no surface) and `NNN_normal.png` (RGB8, world-space normal
n = value / 127.5 - 1, (128, 128, 128) = no surface). Cycles' depth is the planar distance along the view axis,
i.e. OpenCV z, not the ray length. Outside a render border (`render.crop_to_object`) Cycles leaves both passes at
0, which reads as no surface in both files, as the background does.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np


def depth_scale_for(radius: float) -> int:
    """uint16 steps per scene unit of `NNN_depth.png`: the farthest surface point (radius + the unit cube's half
    diagonal) still fits in 16 bits; at radius 2 one step is 4.4e-5, far below a 64^3 voxel (1.6e-2)."""
    return int(65535 // (radius + math.sqrt(3) / 2))


def pass_outputs(bpy: Any, scene: Any, passes: list[str], pass_dir: str) -> list[str]:
    """Compositor graph: render layer -> Composite (the PNG) and -> File Output (one float EXR per pass)."""
    if not passes:
        return []
    layer = scene.view_layers[0]
    layer.use_pass_z = "depth" in passes
    layer.use_pass_normal = "normal" in passes
    scene.use_nodes = True
    tree = scene.node_tree
    for node in list(tree.nodes):
        tree.nodes.remove(node)
    src = tree.nodes.new("CompositorNodeRLayers")
    tree.links.new(src.outputs["Image"], tree.nodes.new("CompositorNodeComposite").inputs["Image"])
    out = tree.nodes.new("CompositorNodeOutputFile")
    out.base_path = pass_dir
    out.format.file_format, out.format.color_depth, out.format.exr_codec = "OPEN_EXR", "32", "NONE"
    out.file_slots.clear()
    for name in passes:
        out.file_slots.new(name)
        tree.links.new(src.outputs["Depth" if name == "depth" else "Normal"], out.inputs[name])
    return list(passes)


def store_passes(bpy: Any, pass_dir: str, stem: str, depth_scale: int) -> None:
    """Convert the File Output node's EXRs of the view just rendered to compact PNGs next to it."""
    from PIL import Image

    for exr in sorted(os.listdir(pass_dir)):
        name = "depth" if exr.startswith("depth") else "normal"  # the node appends the frame: depth0000.exr
        image = bpy.data.images.load(os.path.join(pass_dir, exr))
        try:
            w, h = image.size
            px = np.empty(w * h * image.channels, dtype=np.float32)
            image.pixels.foreach_get(px)
        finally:
            bpy.data.images.remove(image)
        os.remove(os.path.join(pass_dir, exr))
        px = px.reshape(h, w, -1)[::-1]  # Blender's pixel rows run bottom-up
        if name == "depth":
            z = px[..., 0]
            hit = (z > 0) & (z < 1e9)  # Cycles writes 1e10 where a pixel sees no surface, 0 outside a border
            q = np.where(hit, np.clip(np.rint(z * depth_scale), 1, 65535), 0).astype(np.uint16)
            Image.fromarray(q).save(f"{stem}_depth.png")  # PIL stores uint16 as a 16-bit greyscale PNG
        else:
            n = px[..., :3]
            q = np.clip(np.rint((n + 1.0) * 127.5), 0, 255).astype(np.uint8)
            Image.fromarray(q).save(f"{stem}_normal.png")

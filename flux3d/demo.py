"""Procedural demo assets and tiny demo models, made by the code itself so `make demo` needs nothing downloaded.

A small, honest mix: textured assets that pass inspect, and inputs every 3D pipeline meets in the wild (an
untextured model, a truncated file, an empty file, a text file with a 3D extension) that must be dropped with
reasons. Assets are written once; re-running the demo reuses them byte for byte.

The models are the real classes at toy sizes with seeded random weights (a ViT open_clip tower under the real
LAION head, a FLUX-shaped AutoencoderKL with 16 latent channels): the pipeline runs exactly as it would with the
real weights, only the scores and latents mean nothing.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np

DEMO_FILES = ("checker_box.glb", "striped_sphere.obj", "ring.stl", "plain_cone.glb", "truncated_box.glb",
              "empty.glb", "notes_not_a_mesh.glb")


def _checker(size: int = 64, cells: int = 8, seed: int = 0):  # noqa: ANN202 - PIL image
    from PIL import Image

    rng = np.random.default_rng(seed)
    palette = rng.integers(40, 255, size=(2, 3), dtype=np.uint8)
    ij = (np.add.outer(np.arange(size), np.arange(size)) // (size // cells)) % 2
    return Image.fromarray(palette[ij])


def _textured_box_glb() -> bytes:
    import trimesh

    mesh = trimesh.creation.box(extents=(1.0, 0.6, 0.4))
    mesh.unmerge_vertices()  # per-face UVs need unshared corners (in place)
    uv = np.tile(np.array([[0, 0], [1, 0], [0, 1]], dtype=np.float64), (len(mesh.faces), 1))
    mesh.visual = trimesh.visual.TextureVisuals(uv=uv, image=_checker())
    return trimesh.Scene(mesh).export(file_type="glb")


def _sphere_obj(folder: str) -> None:
    import trimesh

    sphere = trimesh.creation.uv_sphere(radius=0.5, count=(16, 24))
    v = sphere.vertices
    uv = np.stack([0.5 + np.arctan2(v[:, 1], v[:, 0]) / (2 * np.pi), 0.5 + np.arcsin(np.clip(v[:, 2] / 0.5, -1, 1))
                   / np.pi], axis=1)
    lines = ["mtllib striped_sphere.mtl", "usemtl stripes"]
    lines += [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in v]
    lines += [f"vt {s:.6f} {t:.6f}" for s, t in uv]
    lines += [f"f {a}/{a} {b}/{b} {c}/{c}" for a, b, c in sphere.faces + 1]
    with open(os.path.join(folder, "striped_sphere.obj"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(folder, "striped_sphere.mtl"), "w") as f:
        f.write("newmtl stripes\nKd 1 1 1\nmap_Kd textures/stripes.png\n")
    os.makedirs(os.path.join(folder, "textures"), exist_ok=True)
    _checker(cells=4, seed=1).save(os.path.join(folder, "textures", "stripes.png"))


def make_demo_assets(folder: str) -> list[str]:
    """Write the demo assets into `folder` (once) and return their paths."""
    import trimesh

    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, name) for name in DEMO_FILES]
    if all(os.path.exists(p) for p in paths):
        return paths
    box = _textured_box_glb()
    writers = {
        "checker_box.glb": lambda: box,
        "ring.stl": lambda: trimesh.creation.annulus(r_min=0.3, r_max=0.5, height=0.2).export(file_type="stl"),
        "plain_cone.glb": lambda: trimesh.creation.cone(radius=0.4, height=1.0).export(file_type="glb"),
        "truncated_box.glb": lambda: box[: len(box) // 2],
        "empty.glb": lambda: b"",
        "notes_not_a_mesh.glb": lambda: b"this is a text file, not a binary glTF\n",
    }
    for name, make in writers.items():
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            tmp = path + ".tmp"
            with open(tmp, "wb") as f:
                f.write(make())
            os.replace(tmp, path)
    if not os.path.exists(os.path.join(folder, "striped_sphere.obj")):
        _sphere_obj(folder)
    return paths


TINY_CLIP = {"embed_dim": 768, "quick_gelu": True,  # 768: the LAION head's input width
             "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 14},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}


def make_demo_models(folder: str) -> dict[str, dict[str, object]]:
    """Write the tiny scorer and encoder into `folder` (once) and return the config sections that use them."""
    import open_clip
    import torch
    from diffusers import AutoencoderKL

    from flux3d.curation.aesthetic import head_module

    os.makedirs(folder, exist_ok=True)
    clip_cfg, clip_ckpt = os.path.join(folder, "demo_clip.json"), os.path.join(folder, "demo_clip.pt")
    head, vae = os.path.join(folder, "demo_aesthetic_head.pth"), os.path.join(folder, "demo_vae")
    if not os.path.exists(clip_cfg):
        with open(clip_cfg, "w") as f:
            json.dump(TINY_CLIP, f)
    open_clip.add_model_config(clip_cfg)
    torch.manual_seed(0)
    if not os.path.exists(clip_ckpt):
        logging.disable(logging.WARNING)  # open_clip warns that a model built to be random "initialized randomly"
        try:
            clip = open_clip.create_model("demo_clip", pretrained=None)
        finally:
            logging.disable(logging.NOTSET)
        torch.save(clip.state_dict(), clip_ckpt)
    if not os.path.exists(head):
        torch.save(head_module().state_dict(), head)
    if not os.path.exists(os.path.join(vae, "vae", "config.json")):
        AutoencoderKL(latent_channels=16, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
                      down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                      norm_num_groups=8, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                      use_post_quant_conv=False).save_pretrained(os.path.join(vae, "vae"))  # FLUX's 8x, 16 ch
    return {
        # Random scores mean nothing: keep every asset the texture checks pass.
        "curate": {"clip_model": "demo_clip", "clip_pretrained": clip_ckpt, "clip_model_config": clip_cfg,
                   "aesthetic_head": head, "aesthetic_threshold": -1e9, "aesthetic_thresholds": {}, "batch_size": 8},
        "encode": {"encoder": "flux_vae", "location": vae},
        # The evaluation's CLIP score uses the same tiny CLIP; its other networks are random (debug recipe).
        "evaluate": {"recipe": "debug", "changes": {"clip_model": "demo_clip", "clip_weights": clip_ckpt,
                                                    "clip_model_config": clip_cfg}},
    }


def _toml_value(value: object) -> str:
    """A TOML value: tables inline (recursively); strings, numbers, booleans and lists as JSON writes them, which
    TOML reads alike."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def write_demo_config(path: str, models: str, overrides: dict[str, dict[str, object]] | None = None) -> str:
    """The demo's run config at `path`: the `debug` recipe's sizes plus the demo models (made in `models`) plus
    `overrides`, as a TOML file a user can read."""
    from flux3d.config.recipes import pipeline_changes

    sections = pipeline_changes("debug")
    for extra in (make_demo_models(models), overrides or {}):
        for name, values in extra.items():
            sections.setdefault(name, {}).update(values)
    lines = ["# Written by `flux3d demo`: the debug recipe's toy sizes, and tiny random models.", ""]
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
        lines.append("")
    text = "\n".join(lines)
    if not os.path.exists(path) or open(path).read() != text:  # a re-run leaves an unchanged file untouched
        with open(path, "w") as f:
            f.write(text)
    return path

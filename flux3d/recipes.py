"""Named configurations: a recipe is a set of settings a TOML file and overrides are applied on top of.

- `paper`: the defaults, which are the paper's settings (150/24/10 views at 512/1024/512 px, 64^3 voxels, FLUX VAE).
- `debug`: the same pipeline at toy sizes, so a whole run takes CPU seconds per asset (CI, laptops), with the
  training and evaluation recipes of the same name (flux3d.training.recipes, flux3d.evaluation.config).
"""

from __future__ import annotations

from typing import Any

RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {},
    "debug": {
        "render": {"views": 8, "resolution": 64, "cond_views": 2, "cond_resolution": 64, "curation_views": 4,
                   "curation_resolution": 64, "samples": 4, "denoise": False, "contact_sheet_views": 4,
                   "timeout_s": 300.0},
        "voxelize": {"resolution": 32},  # 1/8 of the paper's voxels: CPU-sized encode, shards and training
        "encode": {"batch_size": 8},
        "shard": {"supervision_views": 8, "cond_views": 2, "max_bytes": 1 << 20, "val_fraction": 0.25},
        "flow": {"batch_size": 4, "commit_every": 2, "ray_dashboard": False},
        # Toy training: enough steps to see the loss fall and exercise every node, not to learn the assets.
        "train": {"decoder_recipe": "debug", "smdit_recipe": "debug",
                  "decoder_set": ["run.steps=40", "run.ckpt_every=20"], "smdit_set": ["run.steps=40",
                                                                                     "run.ckpt_every=20"]},
        "evaluate": {"recipe": "debug"},
    },
}


def recipe(name: str) -> dict[str, dict[str, Any]]:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {sorted(RECIPES)}")
    return {section: dict(values) for section, values in RECIPES[name].items()}

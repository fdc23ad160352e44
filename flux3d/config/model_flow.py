"""Config sections of the model half of the pipeline flow: `[train]` (which training recipes run on each new dataset
version, and typed changes on top; the recipes are `flux3d.config.recipes`) and `[evaluate]` (the evaluation recipe,
`flux3d.config.evaluation`, and its changes).

The changes are TOML tables shaped like the config they change, so a typo or a wrong type fails when the run's config
is loaded (`config.load` builds both training configs and the evaluation config from them), not hours later when the
train node starts:

    [train.decoder.optim]
    lr = 3e-4
    [train.smdit]
    run = {steps = 1000}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(kw_only=True, slots=True)
class TrainSection:
    decoder_recipe: str = "paper"
    """Decoder training recipe (debug | paper) the pipeline runs."""
    smdit_recipe: str = "paper"
    decoder: dict[str, Any] = field(default_factory=dict)
    """Changes on the decoder recipe's TrainConfig, as nested tables ({"optim": {"lr": 3e-4}}). A file's table
    replaces the recipe's whole table, as any other field."""
    smdit: dict[str, Any] = field(default_factory=dict)
    """Changes on the SMDiT recipe's TrainConfig; flow.encoder defaults to the encoder the features were made with."""
    structure: bool = True
    """Train the sparse-structure stage too (the occupancy VAE, then its image-conditioned flow model), so that
    `flux3d generate --image` needs no layout and evaluation runs the paper's Tab. 10 protocol."""
    structure_vae_recipe: str = "paper"
    structure_flow_recipe: str = "paper"
    structure_vae: dict[str, Any] = field(default_factory=dict)
    """Changes on the structure VAE recipe's TrainConfig (its grid is the pipeline's voxel resolution)."""
    structure_flow: dict[str, Any] = field(default_factory=dict)
    """Changes on the structure flow recipe's TrainConfig (its latent and grid are the VAE's)."""
    runs: str = "models"
    """Run directories live at <root>/<runs>/<dataset version>/{decoder,smdit,eval}, beside models/promoted.json:
    one set per dataset version, so a re-run of the pipeline resumes (or skips) them and a new version trains
    afresh. (<root>/runs/ holds the data flow's batch manifests.)"""
    local: bool = False
    """Train in the flow's own process (one worker, no Ray Train); for machines where Ray Train cannot run."""

    def __post_init__(self) -> None:
        for name in (self.decoder_recipe, self.smdit_recipe, self.structure_vae_recipe, self.structure_flow_recipe):
            if name not in ("debug", "paper"):
                raise ValueError(f"train recipes are debug or paper, got {name!r}")

    def recipe(self, kind: str) -> str:
        return getattr(self, f"{kind}_recipe")

    def changes(self, kind: str) -> dict[str, Any]:
        return getattr(self, kind)


@dataclass(kw_only=True, slots=True)
class EvaluateSection:
    recipe: str = "paper"
    """Evaluation recipe (debug | paper; flux3d.config.evaluation) the pipeline's evaluate node runs."""
    changes: dict[str, Any] = field(default_factory=dict)
    """Fields changed on the recipe: {assets = 200, lpips_backbone = "/weights/vgg16.pth"}."""

    def __post_init__(self) -> None:
        if self.recipe not in ("debug", "paper"):
            raise ValueError(f"evaluate.recipe must be debug or paper, got {self.recipe!r}")

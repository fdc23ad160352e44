"""Config sections of the model half of the pipeline flow: `[train]` (which training recipes run on each new dataset
version, and the overrides on top; the recipes are `flux3d.config.recipes`) and `[evaluate]` (the evaluation
recipe, `flux3d.config.evaluation`)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(kw_only=True, slots=True)
class TrainSection:
    decoder_recipe: str = "paper"
    """Decoder training recipe (debug | paper) the pipeline runs."""
    smdit_recipe: str = "paper"
    decoder_set: list[str] = field(default_factory=list)
    """Overrides on the decoder recipe, as `flux3d train --set` takes them: ["optim.lr=3e-4", "run.steps=1000"]."""
    smdit_set: list[str] = field(default_factory=list)
    runs: str = "models"
    """Run directories live at <root>/<runs>/<dataset version>/{decoder,smdit,eval}, beside models/promoted.json:
    one set per dataset version, so a re-run of the pipeline resumes (or skips) them and a new version trains
    afresh. (<root>/runs/ holds the data flow's batch manifests.)"""
    local: bool = False
    """Train in the flow's own process (one worker, no Ray Train); for machines where Ray Train cannot run."""

    def __post_init__(self) -> None:
        for name in (self.decoder_recipe, self.smdit_recipe):
            if name not in ("debug", "paper"):
                raise ValueError(f"train recipes are debug or paper, got {name!r}")
        if any("=" not in o for o in self.decoder_set + self.smdit_set):
            raise ValueError("train.decoder_set / smdit_set entries are key=value strings")


@dataclass(kw_only=True, slots=True)
class EvaluateSection:
    recipe: str = "paper"
    """Evaluation recipe (debug | paper; flux3d.config.evaluation) the pipeline's evaluate node runs."""
    set: list[str] = field(default_factory=list)
    """Overrides: ["assets=200", "lpips_backbone=/weights/vgg16.pth", ...]."""

    def __post_init__(self) -> None:
        if self.recipe not in ("debug", "paper"):
            raise ValueError(f"evaluate.recipe must be debug or paper, got {self.recipe!r}")
        if any("=" not in o for o in self.set):
            raise ValueError("evaluate.set entries are key=value strings")

"""Typed configuration of an evaluation run; its named recipes are `recipes.eval_paper` and `recipes.eval_debug`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

PROTOCOLS = ("reconstruction", "generation", "multiview", "predicted_layout")


@dataclass(kw_only=True, slots=True)
class EvalConfig:
    shards: str = ""
    """Dataset version holding the evaluation assets (e.g. Toys4k ingested from a manifest); "" = the decoder's
    training shards."""
    split: Literal["val", "train", "all"] = "val"
    assets: int = 1000
    """Assets sampled (seeded) from the split; fewer if the split is smaller. The paper does not state its count
    on Toys4k: 1,000 is our choice (docs/evaluation.md)."""
    seed: int = 0
    protocols: list[str] = field(default_factory=lambda: list(PROTOCOLS))
    background: Literal["black", "white"] = "black"
    """Background of ground truth and renders (TRELLIS renders Gaussians over black)."""
    resolution: int = 512
    """Evaluation image size; ground-truth views are resized to it when stored larger."""
    sampler_steps: int = 50
    guidance: float = 3.0
    structure_steps: int = 25
    """predicted_layout (paper Tab. 10, with a structure model): stage-1 Euler steps for each asset's layout."""
    structure_guidance: float = 8.5
    """Stage-1 CFG weight (TRELLIS's app: cfg_strength 7.5, i.e. our w = 1 + 7.5)."""
    metric_views: int = 4
    """Generation: views per asset rendered for CLIP / FD / KD (the shard's supervision cameras, spread evenly)."""
    multiview_views: int = 24
    """Multi-view consistency: views spread over the full azimuth (paper Tab. 12: 24)."""
    lpips_backbone: str = ""
    """Local torchvision VGG-16 weights for LPIPS."""
    clip_model: str = "ViT-L-14-quickgelu"
    clip_weights: str = ""
    clip_model_config: str = ""
    """An open_clip model-config JSON to register first (a custom or tiny model)."""
    inception_weights: str = ""
    dinov2_weights: str = ""
    dinov2_variant: str = "vitl14"
    """DINOv2 size for FD/KD (paper and dgm-eval: ViT-L/14); vits14 keeps CPU test runs short."""
    allow_random_extractors: bool = False
    """Let missing weight files mean random networks (tests, the demo): numbers then only check the plumbing."""
    kd_subsets: int = 100
    kd_subset_size: int = 1000
    device: str = "auto"

    def __post_init__(self) -> None:
        unknown = set(self.protocols) - set(PROTOCOLS)
        if unknown or not self.protocols:
            raise ValueError(f"evaluate.protocols must be a non-empty subset of {PROTOCOLS}, got {self.protocols}")
        if min(self.assets, self.sampler_steps, self.structure_steps, self.metric_views, self.multiview_views) < 1:
            raise ValueError("evaluate.assets, sampler_steps, structure_steps, metric_views and multiview_views must "
                             "be >= 1")
        if self.resolution < 16 or self.kd_subsets < 1 or self.kd_subset_size < 2:
            raise ValueError("evaluate.resolution >= 16, kd_subsets >= 1, kd_subset_size >= 2")

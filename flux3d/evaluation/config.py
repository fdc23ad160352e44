"""Typed configuration of an evaluation run, with named recipes (`debug`: a few assets, few sampler steps, random
feature networks allowed; `paper`: the Toys4k protocol of the paper, 1,000 assets, 50 steps, real weights)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

PROTOCOLS = ("reconstruction", "generation", "multiview")


@dataclass(kw_only=True, slots=True)
class EvalConfig:
    shards: str = ""
    """Dataset version holding the evaluation assets (e.g. Toys4k ingested from a manifest); "" = the decoder's
    training shards."""
    split: Literal["val", "train", "all"] = "val"
    assets: int = 1000
    """Assets sampled (seeded) from the split (paper: 1,000 random Toys4k assets); fewer if the split is smaller."""
    seed: int = 0
    protocols: list[str] = field(default_factory=lambda: list(PROTOCOLS))
    background: Literal["black", "white"] = "black"
    """Background of ground truth and renders (TRELLIS renders Gaussians over black)."""
    resolution: int = 512
    """Evaluation image size; ground-truth views are resized to it when stored larger."""
    sampler_steps: int = 50
    guidance: float = 3.0
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
        if self.assets < 1 or self.sampler_steps < 1 or self.metric_views < 1 or self.multiview_views < 1:
            raise ValueError("evaluate.assets, sampler_steps, metric_views and multiview_views must be >= 1")
        if self.resolution < 16 or self.kd_subsets < 1 or self.kd_subset_size < 2:
            raise ValueError("evaluate.resolution >= 16, kd_subsets >= 1, kd_subset_size >= 2")


def eval_recipe(name: str) -> EvalConfig:
    if name == "paper":
        return EvalConfig()
    if name == "debug":
        return EvalConfig(split="all", assets=4, sampler_steps=10, resolution=64, metric_views=2, multiview_views=8,
                          allow_random_extractors=True, kd_subsets=10, kd_subset_size=4,
                          dinov2_variant="vits14")
    raise ValueError(f"unknown evaluation recipe {name!r}; known: debug, paper")


def eval_config(recipe: str, sets: list[str] | None = None) -> EvalConfig:
    """A recipe with `key=value` overrides (TOML values), as `flux3d evaluate --set` and `[evaluate] set` give them."""
    import dataclasses

    from flux3d.config import build_dataclass
    from flux3d.training.config import parse_value

    data = dataclasses.asdict(eval_recipe(recipe))
    for o in sets or []:
        key, sep, value = o.partition("=")
        if not sep or key not in data:
            raise ValueError(f"evaluation override {o!r}: expected key=value with key one of {sorted(data)}")
        data[key] = parse_value(value)
    return build_dataclass(EvalConfig, data, "evaluate")


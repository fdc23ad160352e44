"""Named recipes, one style for all three configs: a function returning the whole typed config, a variant calling
its base and changing what differs (torchtitan's config_registry). A TOML file, `--set` and dotted overrides then
change fields on top.

- `paper`: the paper's settings. Pipeline: the defaults (150/24/10 views at 512/1024/512 px, 64^3 voxels, FLUX
  VAE). Training: Tab. 6 and sec. 4.3/7.2 (decoder 12x768x12 heads, SMDiT 24 blocks x 1152 x 16 heads, AdamW 1e-4,
  batch 8 per GPU on 8 GPUs, 100K / 200K steps, bf16). Evaluation: the Toys4k protocol, 50 steps, 1,000 assets
  (our count: the paper does not give one).
- `trellis` (pipeline only): `paper` with TRELLIS's Cycles settings, for renders faithful to its script.
- `debug`: the same code at toy sizes, so a whole run takes CPU seconds per asset (CI, laptops, the tests):
  training overfits one asset in minutes; evaluation uses a few assets and allows random feature networks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from flux3d.config.evaluation import EvalConfig
from flux3d.config.model_flow import EvaluateSection, TrainSection
from flux3d.config.pipeline import Config
from flux3d.config.training import (
    DataConfig,
    DecoderConfig,
    FlowMatchingConfig,
    LossConfig,
    OptimConfig,
    RunConfig,
    ScaleConfig,
    SMDiTConfig,
    StructureVAEConfig,
    TrainConfig,
    parse_value,
)
from flux3d.config.typecheck import build_dataclass, merged
from flux3d.models.configs import GaussianConfig

# -- the pipeline (`flux3d pipeline --recipe`, `flux3d demo`) ----------------------------------------------------


def pipeline_paper() -> Config:
    return Config()


def pipeline_debug() -> Config:
    cfg = pipeline_paper()
    cfg.render = dataclasses.replace(
        cfg.render, views=8, resolution=64, cond_views=2, cond_resolution=64, curation_views=4,
        curation_resolution=64, samples=4, denoise=False, contact_sheet_views=4, timeout_s=300.0)
    cfg.voxelize = dataclasses.replace(cfg.voxelize, resolution=32)  # 1/8 of the paper's voxels: CPU-sized
    cfg.encode = dataclasses.replace(cfg.encode, batch_size=8)
    cfg.shard = dataclasses.replace(cfg.shard, supervision_views=8, cond_views=2, max_bytes=1 << 20,
                                    val_fraction=0.25)
    cfg.flow = dataclasses.replace(cfg.flow, batch_size=4, commit_every=2, ray_dashboard=False)
    # Toy training: enough steps to see the loss fall and exercise every node, not to learn the assets.
    cfg.train = TrainSection(decoder_recipe="debug", smdit_recipe="debug", structure_vae_recipe="debug",
                             structure_flow_recipe="debug",
                             decoder={"run": {"steps": 40, "ckpt_every": 20}},
                             smdit={"run": {"steps": 40, "ckpt_every": 20}},
                             structure_vae={"run": {"steps": 40, "ckpt_every": 20}},
                             structure_flow={"run": {"steps": 40, "ckpt_every": 20}})
    cfg.evaluate = EvaluateSection(recipe="debug")
    return cfg


def pipeline_trellis() -> Config:
    """`paper` rendered with TRELLIS's Cycles settings as our bpy 4.2 runs its script (128 samples, adaptive
    threshold 0.01, OpenImageDenoise with the ACCURATE prefilter, the light tree, all three lights): the renders
    this project made before its defaults were chosen by measured quality per second (docs/rendering.md)."""
    cfg = pipeline_paper()
    cfg.render = dataclasses.replace(cfg.render, **TRELLIS_RENDER)
    return cfg


TRELLIS_RENDER = {"samples": 128, "adaptive_threshold": 0.01, "denoise": True, "denoise_prefilter": "ACCURATE",
                  "sampling_pattern": "AUTOMATIC", "crop_to_object": False, "light_tree": True, "bottom_light": True}
PIPELINE: dict[str, Callable[[], Config]] = {"paper": pipeline_paper, "debug": pipeline_debug,
                                             "trellis": pipeline_trellis}


def pipeline_recipe(name: str) -> Config:
    if name not in PIPELINE:
        raise ValueError(f"unknown recipe {name!r}; known: {sorted(PIPELINE)}")
    return PIPELINE[name]()


# -- training (`flux3d train <model> --recipe`) -------------------------------------------------------------------


# Voxels per batch per GPU in the paper recipes: 8 assets at the 60K-voxel cap (shard.max_voxels, as
# configs/cluster.toml sets it). `benchmarks/memory.py` measured what fits 80 GB with gradient checkpointing:
# ~1.0 M voxels for the decoder (with 8 views of SSIM + LPIPS at 512 px), ~0.77 M for the SMDiT under DDP; without
# checkpointing the decoder fits ~150K and the SMDiT not even its 8 assets' image tokens. So both checkpoint, and
# the budget holds any batch of 8 capped assets with room to spare.
PAPER_TOKEN_BUDGET = 480_000


def decoder_paper() -> TrainConfig:
    return TrainConfig(kind="decoder", recipe="paper", decoder=DecoderConfig(),
                       data=DataConfig(batch_size=8, workers=8, views_per_sample=1, token_budget=PAPER_TOKEN_BUDGET),
                       optim=OptimConfig(lr=1e-4, warmup_steps=1000),
                       scale=ScaleConfig(num_workers=8, grad_checkpointing=True),
                       run=RunConfig(out="runs/decoder", steps=100_000))


def decoder_debug() -> TrainConfig:
    # 8 Gaussians per voxel instead of 32 and no LPIPS (its VGG would dominate a CPU step): the test asserts the
    # decoder learns an asset, which this size does in a few hundred steps.
    return dataclasses.replace(
        decoder_paper(), recipe="debug",
        decoder=DecoderConfig(width=64, depth=2, heads=2, window=8, train_noise=True,
                              gaussians=GaussianConfig(per_voxel=8)),
        data=DataConfig(batch_size=1, workers=0, views_per_sample=1, shuffle_buffer=1),
        optim=OptimConfig(lr=5e-3, ema_decay=0.9, grad_clip=1.0),
        loss=LossConfig(lpips=0.0),
        scale=ScaleConfig(num_workers=1),
        run=RunConfig(out="runs/decoder-debug", steps=400, log_every=20, ckpt_every=200, image_every=100))


def smdit_paper() -> TrainConfig:
    return TrainConfig(kind="smdit", recipe="paper", smdit=SMDiTConfig(),
                       data=DataConfig(batch_size=8, workers=8, views_per_sample=1, token_budget=PAPER_TOKEN_BUDGET),
                       optim=OptimConfig(lr=1e-4, warmup_steps=1000),
                       scale=ScaleConfig(num_workers=8, grad_checkpointing=True),
                       run=RunConfig(out="runs/smdit", steps=200_000))


def smdit_debug() -> TrainConfig:
    return dataclasses.replace(
        smdit_paper(), recipe="debug",
        # Width 128 with 2 + 2 blocks is the smallest size that memorises a handful of assets in a few hundred
        # steps (cosine ~0.9 to their latents after 600; width 64 with 1 + 1 reached 0.1-0.7).
        smdit=SMDiTConfig(width=128, heads=4, double_blocks=2, single_blocks=2),
        flow=FlowMatchingConfig(cond_resolution=64),
        data=DataConfig(batch_size=4, workers=0, views_per_sample=1, shuffle_buffer=1),
        optim=OptimConfig(lr=1e-3, ema_decay=0.9),
        loss=LossConfig(lpips=0.0),
        scale=ScaleConfig(num_workers=1),
        run=RunConfig(out="runs/smdit-debug", steps=600, log_every=25, ckpt_every=300, image_every=0))


# The sparse-structure stage (TRELLIS's stage 1, which the paper borrows): TRELLIS's ss VAE (conv3d, 32-128-512
# channels, 64^3 -> 16^3 x 8, Dice + 1e-3 KL) and a flow model of TRELLIS's ss flow's size (DiT-L: width 1024, 24
# blocks, 16 heads, logit-normal mean 1.0) built as an SMDiT over the 16^3 latent. TRELLIS does not publish its
# stage-1 step counts; ours are the decoder's and the SMDiT's.


def structure_vae_paper() -> TrainConfig:
    return TrainConfig(kind="structure_vae", recipe="paper", structure=StructureVAEConfig(),
                       data=DataConfig(batch_size=8, workers=8, views_per_sample=1),
                       optim=OptimConfig(lr=1e-4, warmup_steps=1000), loss=LossConfig(kl=1e-3, occupancy="dice"),
                       scale=ScaleConfig(num_workers=8), run=RunConfig(out="runs/structure_vae", steps=100_000))


def structure_vae_debug() -> TrainConfig:
    # A 32^3 grid (the debug pipeline's voxels) to an 8^3 x 8 latent, 8-16-32 channels; Dice + BCE, because Dice
    # alone starts slowly from an all-0.5 prediction, which a few hundred CPU steps cannot afford; the 48 cube
    # symmetries as augmentation, without which a dozen assets are memorised (18 synthetic training assets at 16^3:
    # held-out IoU 0.66-0.75 without it after 200 steps, 0.84-0.92 with it after 300; tests/test_structure.py).
    return dataclasses.replace(
        structure_vae_paper(), recipe="debug",
        structure=StructureVAEConfig(grid=32, channels=[8, 16, 32], blocks=1, latent_channels=8, augment=True),
        data=DataConfig(batch_size=4, workers=0, views_per_sample=1, shuffle_buffer=4),
        optim=OptimConfig(lr=3e-3, ema_decay=0.9), loss=LossConfig(kl=1e-6, occupancy="dice_bce"),
        scale=ScaleConfig(num_workers=1),
        run=RunConfig(out="runs/structure_vae-debug", steps=300, log_every=25, ckpt_every=150, image_every=0))


def structure_flow_paper() -> TrainConfig:
    return TrainConfig(kind="structure_flow", recipe="paper",
                       smdit=SMDiTConfig(in_channels=8, grid=16, width=1024, heads=16, double_blocks=12,
                                         single_blocks=12),
                       flow=FlowMatchingConfig(logit_normal_mean=1.0),
                       data=DataConfig(batch_size=8, workers=8, views_per_sample=1),
                       optim=OptimConfig(lr=1e-4, warmup_steps=1000),
                       scale=ScaleConfig(num_workers=8, grad_checkpointing=True),
                       run=RunConfig(out="runs/structure_flow", steps=200_000))


def structure_flow_debug() -> TrainConfig:
    return dataclasses.replace(
        structure_flow_paper(), recipe="debug",
        smdit=SMDiTConfig(in_channels=8, grid=8, width=128, heads=4, double_blocks=2, single_blocks=2),
        # Times skewed toward noise (TRELLIS's logit-normal mean 1.0), where the sample commits to an asset's shape:
        # on three synthetic assets (tests/test_structure.py, 1,000 steps, 5 sampling seeds each) the layouts'
        # IoU was 0.87-0.96 with mean 1.0 and 0.52-0.97 with mean 0 (one sample in five landing on another shape).
        flow=FlowMatchingConfig(cond_resolution=64, logit_normal_mean=1.0),
        data=DataConfig(batch_size=3, workers=0, views_per_sample=1, shuffle_buffer=1),
        optim=OptimConfig(lr=1e-3, ema_decay=0.9),
        scale=ScaleConfig(num_workers=1),
        # 1,000 steps: at 600 the loss still falls and the sampled layouts of three assets reach IoU 0.58-0.70.
        run=RunConfig(out="runs/structure_flow-debug", steps=1000, log_every=25, ckpt_every=500, image_every=0))


TRAINING: dict[str, dict[str, Callable[[], TrainConfig]]] = {
    "decoder": {"paper": decoder_paper, "debug": decoder_debug},
    "smdit": {"paper": smdit_paper, "debug": smdit_debug},
    "structure_vae": {"paper": structure_vae_paper, "debug": structure_vae_debug},
    "structure_flow": {"paper": structure_flow_paper, "debug": structure_flow_debug},
}


def train_recipe(kind: str, name: str) -> TrainConfig:
    if kind not in TRAINING:
        raise ValueError(f"unknown model {kind!r}; known: {sorted(TRAINING)}")
    if name not in TRAINING[kind]:
        raise ValueError(f"unknown {kind} recipe {name!r}; known: {sorted(TRAINING[kind])}")
    return TRAINING[kind][name]()


def train_config(kind: str, name: str, changes: dict[str, Any] | None = None) -> TrainConfig:
    """A training recipe with typed changes laid over it (`[train.decoder]` tables), every section checked again."""
    return build_dataclass(TrainConfig, merged(train_recipe(kind, name).to_dict(), changes or {}), f"train.{kind}")


# -- evaluation (`flux3d evaluate --recipe`) ----------------------------------------------------------------------


def eval_paper() -> EvalConfig:
    return EvalConfig()


def eval_debug() -> EvalConfig:
    # Stage 1 without guidance: a toy flow's unconditional branch is too weak to guide by (w = 3 cost 0.1-0.15 IoU
    # on three assets, w = 8.5 up to 0.4).
    return dataclasses.replace(eval_paper(), split="all", assets=4, sampler_steps=10, resolution=64,
                               structure_steps=10, structure_guidance=1.0,
                               metric_views=2, multiview_views=8, allow_random_extractors=True, kd_subsets=10,
                               kd_subset_size=4, dinov2_variant="vits14")


EVALUATION: dict[str, Callable[[], EvalConfig]] = {"paper": eval_paper, "debug": eval_debug}


def eval_recipe(name: str) -> EvalConfig:
    if name not in EVALUATION:
        raise ValueError(f"unknown evaluation recipe {name!r}; known: {', '.join(sorted(EVALUATION))}")
    return EVALUATION[name]()


def eval_config(recipe: str, sets: list[str] | None = None, changes: dict[str, Any] | None = None) -> EvalConfig:
    """A recipe with typed `changes` (`[evaluate] changes`), then `key=value` overrides (TOML values) as
    `flux3d evaluate --set` gives them."""
    data = merged(dataclasses.asdict(eval_recipe(recipe)), changes or {})
    for o in sets or []:
        key, sep, value = o.partition("=")
        if not sep or key not in data:
            raise ValueError(f"evaluation override {o!r}: expected key=value with key one of {sorted(data)}")
        data[key] = parse_value(value)
    return build_dataclass(EvalConfig, data, "evaluate")


def pipeline_changes(name: str) -> dict[str, dict[str, object]]:
    """The sections and fields where the named pipeline recipe differs from `paper`: what a TOML file over the
    defaults must say to give the same config (`flux3d demo` writes it for the user to read)."""
    base, variant = dataclasses.asdict(pipeline_paper()), dataclasses.asdict(pipeline_recipe(name))
    changes = {section: {k: v for k, v in values.items() if v != base[section][k]} for section, values in variant.items()}
    return {section: values for section, values in changes.items() if values}

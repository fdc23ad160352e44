"""Named training runs (torchtitan style: a recipe is a function returning the whole config).

- `paper`: Tab. 6 and sec. 4.3/7.2 of the paper: decoder 12x768x12 heads, SMDiT 24 blocks x 1152 x 16 heads,
  AdamW 1e-4, batch 8 per GPU on 8 GPUs, 100K / 200K steps, bf16.
- `debug`: the same code at toy sizes for CPUs: seconds per step, overfits one asset in minutes (the tests).

`flux3d train decoder --recipe debug --set decoder.depth=4` changes fields on top (config.apply_overrides).
"""

from __future__ import annotations

from collections.abc import Callable

from flux3d.training.config import (
    DataConfig,
    DecoderConfig,
    FlowMatchingConfig,
    LossConfig,
    OptimConfig,
    RunConfig,
    ScaleConfig,
    SMDiTConfig,
    TrainConfig,
)
from flux3d.training.gaussians import GaussianConfig


def decoder_paper() -> TrainConfig:
    return TrainConfig(kind="decoder", recipe="paper", decoder=DecoderConfig(),
                       data=DataConfig(batch_size=8, workers=8, views_per_sample=1),
                       optim=OptimConfig(lr=1e-4, warmup_steps=1000), scale=ScaleConfig(num_workers=8),
                       run=RunConfig(out="runs/decoder", steps=100_000))


def decoder_debug() -> TrainConfig:
    # 8 Gaussians per voxel instead of 32 and no LPIPS (its VGG would dominate a CPU step): the test asserts the
    # decoder learns an asset, which this size does in a few hundred steps.
    return TrainConfig(
        kind="decoder", recipe="debug",
        decoder=DecoderConfig(width=64, depth=2, heads=2, window=8, train_noise=True,
                              gaussians=GaussianConfig(per_voxel=8)),
        data=DataConfig(batch_size=1, workers=0, views_per_sample=1, shuffle_buffer=1),
        optim=OptimConfig(lr=5e-3, ema_decay=0.9, grad_clip=1.0),
        loss=LossConfig(lpips=0.0),
        scale=ScaleConfig(num_workers=1),
        run=RunConfig(out="runs/decoder-debug", steps=400, log_every=20, ckpt_every=200, image_every=100))


def smdit_paper() -> TrainConfig:
    return TrainConfig(kind="smdit", recipe="paper", smdit=SMDiTConfig(),
                       data=DataConfig(batch_size=8, workers=8, views_per_sample=1),
                       optim=OptimConfig(lr=1e-4, warmup_steps=1000),
                       scale=ScaleConfig(num_workers=8, grad_checkpointing=True),
                       run=RunConfig(out="runs/smdit", steps=200_000))


def smdit_debug() -> TrainConfig:
    return TrainConfig(
        kind="smdit", recipe="debug",
        # Width 128 with 2 + 2 blocks is the smallest size that memorises a handful of assets in a few hundred
        # steps (cosine ~0.9 to their latents after 600; width 64 with 1 + 1 reached 0.1-0.7).
        smdit=SMDiTConfig(width=128, heads=4, double_blocks=2, single_blocks=2),
        flow=FlowMatchingConfig(cond_resolution=64),
        data=DataConfig(batch_size=4, workers=0, views_per_sample=1, shuffle_buffer=1),
        optim=OptimConfig(lr=1e-3, ema_decay=0.9),
        loss=LossConfig(lpips=0.0),
        scale=ScaleConfig(num_workers=1),
        run=RunConfig(out="runs/smdit-debug", steps=600, log_every=25, ckpt_every=300, image_every=0))


RECIPES: dict[str, dict[str, Callable[[], TrainConfig]]] = {
    "decoder": {"paper": decoder_paper, "debug": decoder_debug},
    "smdit": {"paper": smdit_paper, "debug": smdit_debug},
}


def recipe(kind: str, name: str) -> TrainConfig:
    if kind not in RECIPES:
        raise ValueError(f"unknown model {kind!r}; known: {sorted(RECIPES)}")
    if name not in RECIPES[kind]:
        raise ValueError(f"unknown {kind} recipe {name!r}; known: {sorted(RECIPES[kind])}")
    return RECIPES[kind][name]()

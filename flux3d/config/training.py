"""Typed configuration of a training run, shared by the decoder and the SMDiT (torchtitan style: a run is a named
recipe function in `training.recipes` returning a `TrainConfig`; a user changes fields with dotted overrides).

The model's own config (`DecoderConfig`, `SMDiTConfig`) lives beside its model file; this module holds what every
run has: data, optimiser, schedule, scaling and bookkeeping. The whole config is written to the run directory and
into every checkpoint, so a checkpoint rebuilds its model without the recipe that made it.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from typing import Any, Literal

from flux3d.config.typecheck import build_dataclass
from flux3d.models.configs import DecoderConfig, GaussianConfig, SMDiTConfig, StructureVAEConfig

Kind = Literal["decoder", "smdit", "structure_vae", "structure_flow"]
KINDS = ("decoder", "smdit", "structure_vae", "structure_flow")
"""The four models: the Gaussian decoder, the SMDiT (stage 2: latents on a given layout), and the sparse-structure
stage (stage 1: the occupancy VAE, then the flow model over its latent, which predicts the layout from an image)."""
FLOW_KINDS = ("smdit", "structure_flow")
"""Image-conditioned flow-matching models: both are SMDiTs (`smdit` section) trained with the `flow` section."""


@dataclass(kw_only=True, slots=True)
class DataConfig:
    shards: str = ""
    """A dataset version folder (shards/<version>, local or any fsspec URL), as `flux3d shard` wrote it."""
    split: str = "train"
    batch_size: int = 8
    """Assets per step per worker (paper: 8 per GPU); with a token budget, the most a batch may hold."""
    token_budget: int = 0
    """Voxels per batch per worker: samples are packed in stream order until the next would pass the budget (or
    batch_size), so a step's activation memory is bounded whatever the assets' sizes; 0 = batch_size assets.
    Recipes set it from `benchmarks/memory.py`'s measurement; shard.max_voxels keeps larger assets out."""
    workers: int = 4
    """DataLoader processes per training worker (webdataset decoding; 0 = in the training process)."""
    views_per_sample: int = 1
    """Supervision views rendered per asset per step (the paper: one random view of the 150)."""
    shuffle_buffer: int = 64
    background: Literal["random", "white", "black"] = "random"
    """Decoder targets: random black or white per sample (TRELLIS), so the model cannot bake a background in."""
    epoch_samples: int = 0
    """Samples per loader epoch per worker; 0 = the split's asset count (from index.parquet)."""
    read: Literal["ranges", "stream"] = "ranges"
    """ranges: read only the shard members a step uses, by byte range from each shard's member table (bytes read
    within a few percent of bytes used, local or object store); stream: read whole shards (~3.5x what a decoder
    step uses, ~6x an SMDiT step). Both give the same batches (docs/shards.md)."""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.workers < 0 or self.views_per_sample < 1 or self.epoch_samples < 0:
            raise ValueError("data.batch_size and views_per_sample must be >= 1, workers and epoch_samples >= 0")
        if self.token_budget < 0:
            raise ValueError("data.token_budget must be >= 0 (0 = no budget)")


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    lr: float = 1e-4
    """AdamW learning rate (paper: 1e-4 for both models)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    warmup_steps: int = 0
    """Linear warm-up from 0 over this many steps, then `decay`."""
    decay: Literal["constant", "cosine", "linear"] = "constant"
    """After warm-up: hold lr (the paper states no schedule), or decay it to final_lr * lr at run.steps."""
    final_lr: float = 0.1
    """The decayed schedules' last lr, as a fraction of lr."""
    grad_accum: int = 1
    """Batches per optimiser step: gradients of `grad_accum` batches are summed (each loss / grad_accum) before the
    step, so a global batch of 64 assets needs not 8 GPUs (DDP syncs only on the last one)."""
    grad_clip: float = 1.0
    """Max global gradient norm; 0 disables."""
    ema_decay: float = 0.9999
    """EMA of the weights, kept beside them in checkpoints and used for evaluation; 0 disables."""

    def __post_init__(self) -> None:
        if self.lr <= 0 or len(self.betas) != 2 or not 0 <= self.ema_decay < 1 or self.grad_clip < 0:
            raise ValueError("optim: lr > 0, two betas, 0 <= ema_decay < 1, grad_clip >= 0")
        if self.grad_accum < 1 or not 0 <= self.final_lr <= 1 or self.warmup_steps < 0:
            raise ValueError("optim: grad_accum >= 1, 0 <= final_lr <= 1, warmup_steps >= 0")


@dataclass(kw_only=True, slots=True)
class ScaleConfig:
    num_workers: int = 1
    """Ray Train workers (one per GPU; CPU processes when use_gpu is false)."""
    use_gpu: bool | None = None
    """None = GPUs when the Ray cluster has them."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto = bf16 autocast on CUDA, fp32 on CPU (weights and optimiser state stay fp32)."""
    grad_checkpointing: bool = False
    """Recompute each block's activations in the backward pass (memory for ~30% more compute)."""
    fsdp: bool = False
    """Shard parameters, gradients and optimiser state over the workers (FSDP2) instead of DDP; for the paper SMDiT."""
    compile: bool = False
    """torch.compile the blocks (GPU; packed shapes vary per batch, so dynamic shapes)."""
    attention: str = "auto"
    """Packed attention kernel: auto | flash | varlen | nested | bucketed | padded (flux3d.models.attention)."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms: runs and resumes identical to the bit. Without it CPU training differs
    from run to run in the last float digits (index_put with accumulate, in the rasterizer's and attention's
    backward, adds in thread order), which Adam can grow to ~1e-6 in the weights; on GPU it costs speed."""

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError("scale.num_workers must be >= 1")


@dataclass(kw_only=True, slots=True)
class LossConfig:
    l1: float = 1.0
    ssim: float = 0.2
    lpips: float = 0.2
    """Decoder loss weights (TRELLIS / paper eq. 5): L1 + 0.2 (1 - SSIM) + 0.2 LPIPS + regularisers."""
    volume: float = 1e4
    opacity: float = 1e-3
    kl: float = 1e-6
    """Encoder-decoder ablation only: KL of its 8-channel latent (TRELLIS's SLat VAE weight)."""
    lpips_backbone: str = ""
    """Local torchvision VGG-16 state dict for LPIPS. "" = a random VGG, allowed only with lpips_random."""
    lpips_random: bool = False
    """Accept a random VGG backbone (tests, the demo): the loss then means little; a warning is logged."""
    occupancy: Literal["dice", "bce", "dice_bce"] = "dice"
    """The structure VAE's reconstruction loss on occupancy (TRELLIS's ss VAE: Dice; its KL weight is `kl`)."""

    def __post_init__(self) -> None:
        if min(self.l1, self.ssim, self.lpips, self.volume, self.opacity, self.kl) < 0:
            raise ValueError("loss weights must be >= 0")


@dataclass(kw_only=True, slots=True)
class FlowMatchingConfig:
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    """Training times t = sigmoid(N(mean, std)). Mean 0 is SD3's default; TRELLIS trains with mean 1.0 (skewed
    toward noise); the FLUX3D paper does not state its choice."""
    cond_drop: float = 0.1
    """Probability of training a sample without its image (the learned null condition), for CFG."""
    normalize: bool = True
    """Normalise latents per channel with the dataset's stats.json (mu_mean, mu_std) before diffusing."""
    encoder: str = ""
    """Conditioning images -> FLUX latents: flux_vae | taef1 (as `encode.encoder`); empty = the encoder the
    dataset version's features were made with (its stats.json), as the paper conditions with the FLUX VAE too."""
    encoder_location: str = ""
    """Weights of that encoder (see `encode.location`); used when shards hold images, not latents."""
    latents: str = ""
    """structure_flow: the structure VAE run whose latent it diffuses (required). SMDiT: "" = diffuse the FLUX
    features (the paper's Dec-Only model). An encoder-decoder's run directory (trained to
    its last step) = diffuse that decoder's latent (`smdit.in_channels` = its `latent_channels`; Tab. 3's Enc-Dec
    row), normalised with statistics of the train split's latents (`latent_stats_assets` of them)."""
    latent_stats_assets: int = 1000
    """Train-split assets whose encoded latents give the Enc-Dec normalisation (per-channel mean and std)."""
    cond_resolution: int = 1024
    """Conditioning images are resized to this before encoding, in training and in `flux3d generate` alike
    (paper: 1024 px -> 128x128 latents -> 64x64 image tokens); a multiple of 16 (8x VAE, 2x2 patches)."""

    def __post_init__(self) -> None:
        if not 0 <= self.cond_drop < 1 or self.logit_normal_std <= 0:
            raise ValueError("flow.cond_drop must be in [0, 1), flow.logit_normal_std > 0")
        if self.latent_stats_assets < 1:
            raise ValueError("flow.latent_stats_assets must be >= 1")
        if self.cond_resolution < 16 or self.cond_resolution % 16:
            raise ValueError(f"flow.cond_resolution must be a positive multiple of 16, got {self.cond_resolution}")


@dataclass(kw_only=True, slots=True)
class RunConfig:
    out: str = "runs/run"
    """Run directory (local or fsspec URL): config.json, checkpoints/step_XXXXXXX/, metrics.jsonl, tensorboard/."""
    steps: int = 100_000
    """Optimiser steps (paper: 100K decoder, 200K SMDiT)."""
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 5000
    image_every: int = 1000
    """TensorBoard image grids (render vs target) every this many steps; 0 = never."""
    keep_checkpoints: int = 3
    """Newest checkpoints kept; older ones are deleted after a newer one is complete."""
    decoder_run: str = ""
    """SMDiT only: a decoder run directory, whose EMA weights render the SMDiT's samples in logs and evaluation."""

    def __post_init__(self) -> None:
        if self.steps < 1 or self.log_every < 1 or self.ckpt_every < 1 or self.keep_checkpoints < 1:
            raise ValueError("run.steps, log_every, ckpt_every and keep_checkpoints must be >= 1")


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    kind: Kind
    recipe: str = ""
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    smdit: SMDiTConfig = field(default_factory=SMDiTConfig)
    """The SMDiT, and the structure flow model's transformer (an SMDiT over the structure latent's grid)."""
    structure: StructureVAEConfig = field(default_factory=StructureVAEConfig)
    """The structure VAE (structure_vae runs; a structure_flow run reads its VAE's from that run)."""
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    flow: FlowMatchingConfig = field(default_factory=FlowMatchingConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")

        if self.kind == "smdit" and not self.flow.latents and self.smdit.in_channels != self.decoder.in_channels:
            raise ValueError("smdit.in_channels must equal decoder.in_channels (both are the FLUX latent width; "
                             "an Enc-Dec SMDiT sets flow.latents)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build a config dataclass from a plain dict (config.json, a checkpoint); unknown keys are an error."""
    return build_dataclass(cls, data, where)


def parse_value(text: str) -> Any:
    """An override's value as TOML reads it (true, 3e-4, [1, 2], "x"); anything else is a bare string (a path)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(cfg: TrainConfig, overrides: list[str] | dict[str, Any]) -> TrainConfig:
    """`["optim.lr=3e-4", "decoder.depth=4", "data.shards=/x"]` (or a dict of dotted keys) applied on a copy;
    every dataclass is rebuilt, so each section's checks run again."""
    data = cfg.to_dict()
    items = overrides.items() if isinstance(overrides, dict) else (_split(o) for o in overrides)
    for dotted, value in items:
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            if not isinstance(node.get(p), dict):
                raise ValueError(f"override {dotted!r}: no section {p!r}")
            node = node[p]
        if leaf not in node:
            raise ValueError(f"override {dotted!r}: no field {leaf!r} (known: {sorted(node)})")
        node[leaf] = value
    return from_dict(TrainConfig, data)


def _split(override: str) -> tuple[str, Any]:
    if "=" not in override:
        raise ValueError(f"override {override!r} is not key=value")
    key, text = override.split("=", 1)
    return key.strip(), parse_value(text.strip())


__all__ = ["FLOW_KINDS", "KINDS", "DataConfig", "DecoderConfig", "FlowMatchingConfig", "GaussianConfig", "Kind",
           "LossConfig", "OptimConfig", "RunConfig", "ScaleConfig", "SMDiTConfig", "StructureVAEConfig",
           "TrainConfig", "apply_overrides", "from_dict"]

"""Config sections of the feature half of the data pipeline: voxelize, encode, shard (see config/pipeline.py for how a
TOML file maps onto them)."""

from __future__ import annotations

from dataclasses import dataclass

BACKGROUNDS = ("white", "black", "grey")
ENCODER_CHANNELS = {"flux_vae": 16, "taef1": 16, "sdxl_vae": 4, "dinov2": 1024, "rgb": 3}
"""Feature channels per voxel of each `encode.encoder` with its released weights (a test's tiny DINOv2 differs:
the shards' stats.json records what the features hold)."""
FLUX_ENCODERS = ("flux_vae", "taef1")
"""Encoders into FLUX's latent space, the only one the SMDiT and its conditioning encoder work in."""


@dataclass(kw_only=True, slots=True)
class VoxelizeConfig:
    resolution: int = 64
    """Grid side over [-0.5, 0.5]^3 (paper: 64)."""
    workers: int = 2
    """Assets voxelized in parallel (threads)."""

    def __post_init__(self) -> None:
        if not 1 <= self.resolution <= 256 or self.workers < 1:
            raise ValueError("voxelize.resolution must be in [1, 256] (uint8 coordinates), voxelize.workers >= 1")


@dataclass(kw_only=True, slots=True)
class EncodeConfig:
    encoder: str = "flux_vae"
    """flux_vae (the FLUX.1 AutoencoderKL, the paper's) | taef1 (AutoencoderTiny, same latent space, ~40x cheaper);
    for the input-feature study (paper Tab. 2b; decoders only): sdxl_vae (4 channels) | dinov2 (ViT-L/14 with
    registers, 1024-channel patch tokens at 518 px, TRELLIS's) | rgb (pixels pooled 8x, 3 channels, no weights)."""
    location: str = ""
    """Local weights: a diffusers folder (or hub id) for flux_vae and sdxl_vae, the encoder .safetensors for taef1,
    a state-dict file or timm model folder for dinov2. "" = black-forest-labs/FLUX.1-schnell for flux_vae,
    stabilityai/sdxl-vae for sdxl_vae, timm's vit_large_patch14_reg4_dinov2.lvd142m for dinov2 (each downloads
    only when online); taef1 needs a path, rgb none."""
    decoder: str = ""
    """taef1 only: the decoder .safetensors, for previews and checks (encoding does not need it)."""
    device: str = "auto"
    """auto (cuda if available) | cpu | cuda."""
    dtype: str = "auto"
    """auto (bfloat16 on cuda, float32 on cpu) | float32 | bfloat16."""
    batch_size: int = 16
    """Views per encoder forward pass."""
    background: str = "black"
    """Background under the transparent renders before encoding (TRELLIS premultiplies alpha: black)."""
    visibility: bool = True
    """Average a voxel's features only over views that see it (render depth pass), not over every view whose image
    it projects into (TRELLIS). Default by measurement: 0.011 vs 0.16 mean position error, tests/test_features.py."""
    tolerance: float = 0.0
    """Depth slack for visibility in world units; 0 = one voxel diagonal."""
    cond_latents: bool = False
    """Also encode the conditioning views (1024 px -> 128x128x16) into the feature file; needed only when
    `shard.cond = "latents"` (see docs/shards.md for why images are the default)."""
    workers: int = 1
    """Assets in flight (threads sharing one model: image decoding overlaps the forward passes)."""

    def __post_init__(self) -> None:
        if self.encoder not in ENCODER_CHANNELS:
            raise ValueError(f"encode.encoder must be one of {sorted(ENCODER_CHANNELS)}, got {self.encoder!r}")
        if self.cond_latents and self.encoder not in FLUX_ENCODERS:
            raise ValueError(f"encode.cond_latents feeds the SMDiT, which works in FLUX's latent space: not with "
                             f"encode.encoder = {self.encoder}")
        if self.encoder == "taef1" and not self.location:
            raise ValueError("encode.encoder = taef1 needs encode.location (the taef1 encoder .safetensors)")
        if self.device not in ("auto", "cpu", "cuda") or self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError("encode.device must be auto|cpu|cuda and encode.dtype auto|float32|bfloat16")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"encode.background must be one of {BACKGROUNDS}, got {self.background!r}")
        if self.batch_size < 1 or self.workers < 1 or self.tolerance < 0:
            raise ValueError("encode.batch_size and encode.workers must be >= 1, encode.tolerance >= 0")


@dataclass(kw_only=True, slots=True)
class ShardConfig:
    max_bytes: int = 1_000_000_000
    """A shard is closed before it would pass this size (one asset larger than it gets a shard of its own)."""
    supervision_views: int = 150
    """Decoder-supervision views per asset, spread evenly over the render's main set (paper: all 150; a render
    with fewer views gives all it has)."""
    cond_views: int = 24
    """Conditioning views per asset, spread evenly over the render's conditioning set (paper: 24; at most what the
    render has)."""
    cond: str = "images"
    """images (WebP, encoded by the trainer) | latents (float16 128x128x16 per view from `encode`)."""
    image_quality: int = 95
    """WebP quality of stored views (RGBA: the trainer picks the background); 100 = lossless."""
    val_fraction: float = 0.02
    """Share of assets held out for validation, chosen by a seeded hash of sha256 (stable across versions)."""
    split_seed: int = 0
    workers: int = 2
    """Assets prepared in parallel (threads: WebP encoding and file reads release the GIL)."""
    max_voxels: int = 0
    """Assets with more active voxels are left out of the version, recorded failed:over_voxel_cap in the catalog
    (a training batch must fit its token budget, `data.token_budget`); 0 = no cap."""

    def __post_init__(self) -> None:
        if self.max_bytes < 1 << 16 or self.workers < 1 or self.max_voxels < 0:
            raise ValueError("shard.max_bytes must be at least 64 KiB, shard.workers >= 1 and max_voxels >= 0")
        if self.supervision_views < 1 or self.cond_views < 0:
            raise ValueError("shard.supervision_views must be >= 1 and shard.cond_views >= 0")
        if self.cond not in ("images", "latents"):
            raise ValueError(f"shard.cond must be images or latents, got {self.cond!r}")
        if not 1 <= self.image_quality <= 100 or not 0 <= self.val_fraction < 1:
            raise ValueError("shard.image_quality must be in [1, 100] and shard.val_fraction in [0, 1)")

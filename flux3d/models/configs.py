"""The models' configs: what shapes a decoder, its Gaussians and an SMDiT, as plain dataclasses.

They live apart from the model code so that reading a config (the `config/` package, `flux3d --help`, the forkserver
children of per-asset stages that unpickle a config) never imports torch, which costs seconds per process.
`decoder.py`, `gaussians.py` and `smdit.py` build their modules from these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

RAW_CHANNELS = 14
"""Raw numbers per Gaussian: offset 3, SH DC colour 3, scale 3, rotation 4, opacity 1."""

@dataclass(kw_only=True, slots=True, frozen=True)
class GaussianConfig:
    per_voxel: int = 32
    """Gaussians per active voxel (TRELLIS: 32)."""
    resolution: int = 64
    """Voxel grid resolution R over the [-0.5, 0.5]^3 cube; a voxel is 1 / R wide."""
    offset_range: float = 1.5
    """TRELLIS `voxel_size`: a mean stays within +-offset_range / 2 voxels of its voxel centre per axis."""
    scale_bias: float = 4e-3
    """Scale (world units, before the 3D filter) of a zero raw scale: softplus(raw + inv_softplus(scale_bias))."""
    filter_3d: float = 9e-4
    """TRELLIS's 3D filter: every activated scale is sqrt(s^2 + filter_3d^2), so no Gaussian is thinner."""
    opacity_bias: float = 0.1
    """Opacity of a zero raw opacity: sigmoid(raw + logit(opacity_bias))."""
    perturb_offsets: bool = True
    """Start the K Gaussians of a voxel at Hammersley points spread over the voxel (TRELLIS `perturb_offset`)
    rather than all at its centre, so they are not stacked and receive different gradients from step one."""

    def __post_init__(self) -> None:
        if self.per_voxel < 1 or self.resolution < 1:
            raise ValueError(f"per_voxel and resolution must be >= 1, got {self.per_voxel}, {self.resolution}")
        # The Hammersley starts span +-0.5 voxel, and atanh needs them strictly inside +-offset_range / 2.
        if self.offset_range <= 1.0:
            raise ValueError(f"offset_range must be > 1 (voxels) to hold the initial offsets, got {self.offset_range}")
        if self.scale_bias <= 0 or self.filter_3d < 0 or not 0 < self.opacity_bias < 1:
            raise ValueError("scale_bias must be > 0, filter_3d >= 0 and opacity_bias in (0, 1)")

    @property
    def raw_channels(self) -> int:
        """Decoder output channels per voxel."""
        return self.per_voxel * RAW_CHANNELS


@dataclass(kw_only=True, slots=True)
class DecoderConfig:
    in_channels: int = 16
    """FLUX VAE latent channels per voxel."""
    width: int = 768
    depth: int = 12
    heads: int = 12
    """Paper Tab. 6: 12 layers, 12 heads, width 768 (~85 M parameters)."""
    mlp_ratio: float = 4.0
    window: int = 8
    """3D attention window (voxels per side), alternately shifted by half; 0 = full attention over each asset."""
    position: Literal["ape", "rope", "none"] = "ape"
    qk_norm: bool = False
    latent_channels: int = 0
    """0 = decoder-only (the paper's); > 0 = the encoder-decoder ablation with this latent width (paper: 8)."""
    encoder_depth: int = 0
    """Encoder blocks of the encoder-decoder ablation (0 = same as depth)."""
    train_noise: bool = True
    """Training input z = mu + sigma * eps (paper sec. 4.3); off = mu alone."""
    gaussians: GaussianConfig = field(default_factory=GaussianConfig)

    def __post_init__(self) -> None:
        if self.width % self.heads or self.depth < 1 or self.window < 0 or self.latent_channels < 0:
            raise ValueError("decoder: width must divide by heads, depth >= 1, window >= 0, latent_channels >= 0")
        if self.position == "rope" and (self.width // self.heads) % 2:
            raise ValueError("decoder.position = rope needs an even head width")


@dataclass(kw_only=True, slots=True)
class SMDiTConfig:
    in_channels: int = 16
    """Channels of the voxel latents it diffuses: 16 for the FLUX features (Dec-Only), the encoder-decoder's
    latent width (8) for the Enc-Dec variant."""
    cond_channels: int = 16
    """Channels of the conditioning image latents (the FLUX VAE's 16 in either variant)."""
    width: int = 1152
    """Paper Tab. 6 says 1156, which 16 heads cannot divide; 1152 = 16 x 72 (DESIGN.md sec. 6)."""
    heads: int = 16
    double_blocks: int = 12
    single_blocks: int = 12
    """24 blocks in all (paper); the split is not published: 12 + 12 gives 818 M parameters vs the paper's 820 M."""
    mlp_ratio: float = 4.0
    qk_norm: bool = True
    grid: int = 64
    """Voxel grid of the latents; tokens live on grid / 2."""
    arch: Literal["smdit", "dit"] = "smdit"
    position: Literal["marope", "ape"] = "marope"
    image_scale: float = 1.0
    """MARoPE: image patch (i, j) at (i * s, j * s, z_max + 1); 1.0 = the paper's literal indices."""
    theta: float = 10000.0

    def __post_init__(self) -> None:
        if self.width % self.heads or (self.width // self.heads) % 2:
            raise ValueError("smdit.width must divide into heads of even width")
        if self.double_blocks < 0 or self.single_blocks < 0 or self.double_blocks + self.single_blocks < 1:
            raise ValueError("smdit needs at least one block")
        if self.arch == "dit" and self.single_blocks:
            raise ValueError("smdit.arch = dit uses double_blocks as its block count; set single_blocks = 0")
        if self.grid % 2:
            raise ValueError("smdit.grid must be even (2^3 patchify)")


@dataclass(kw_only=True, slots=True)
class StructureVAEConfig:
    """The sparse-structure VAE (models/structure.py): dense occupancy <-> a low-resolution latent grid."""

    grid: int = 64
    """Occupancy grid: the dataset's voxel resolution."""
    channels: list[int] = field(default_factory=lambda: [32, 128, 512])
    """Channels per level, finest first; each level after the first halves the grid (TRELLIS: 32, 128, 512 ->
    64^3 -> 16^3)."""
    blocks: int = 2
    """Residual blocks per level (TRELLIS: 2)."""
    latent_channels: int = 8
    augment: bool = False
    """Train on each grid under one of its 48 axis flips and permutations, drawn per sample: shapes seen in every
    orientation, for small datasets where the VAE would otherwise memorise its few assets (TRELLIS's 500K assets
    need none)."""

    def __post_init__(self) -> None:
        if len(self.channels) < 1 or min(self.channels) < 1 or self.blocks < 0 or self.latent_channels < 1:
            raise ValueError("structure: at least one level of channels >= 1, blocks >= 0, latent_channels >= 1")
        if self.grid % (1 << (len(self.channels) - 1)) or self.latent_resolution % 2:
            raise ValueError(f"structure.grid {self.grid} must divide by 2^{len(self.channels) - 1} into an even "
                             "latent grid (the flow model patchifies it by 2^3)")

    @property
    def latent_resolution(self) -> int:
        return self.grid >> (len(self.channels) - 1)

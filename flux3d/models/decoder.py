"""The DA-SLAT Gaussian decoder (paper sec. 4.1, eq. 3, Tab. 6): per-voxel FLUX latents -> 3D Gaussians.

    feats (M, 16) = mu [+ sigma * eps in training]  --Linear-->  (M, D) + position
      --> depth x [LN -> attention (3D windows, shifted every other block, or whole assets) -> LN -> MLP]
      --> LN -> Linear (zero-initialised) -> (M, K * 14) raw Gaussian parameters -> gaussians.gaussians_from_raw

The paper's decoder-only design feeds the FLUX latents straight in (no compressing encoder); the training input
z = mu + sigma * eps makes the decoder robust to the continuous outputs the SMDiT generates. The encoder-decoder
ablation (`latent_channels = 8`) puts a sparse transformer encoder with a KL-regularised 8-channel bottleneck in
front, as TRELLIS's SLat VAE does; that variant's SMDiT diffuses the 8-channel latent (`encode`) and its samples
decode through the trunk alone (`latent=True`): the paper's Enc-Dec row of Tab. 3.

Positions: TRELLIS's absolute sinusoidal embedding of the voxel coordinates ("ape", the default) or 3-axis RoPE.
Attention: TRELLIS's decoders use 8^3 shifted windows ("swin8"), which keeps cost linear in the voxel count; a
window of 0 attends over each whole asset. Legend: M voxels of the packed batch, D width, K Gaussians per voxel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from flux3d.models.attention import window_partition
from flux3d.models.configs import RAW_CHANNELS, DecoderConfig
from flux3d.models.gaussians import Gaussians, gaussians_from_raw
from flux3d.models.layers import Block, Groups, Sequences, attention_pairs, checkpointed
from flux3d.models.rope import RotaryEmbedding, SinusoidalPositionEmbedding, rope_axes


@dataclass(frozen=True)
class DecoderLayout:
    """What the decoder derives from the voxel coordinates alone: its attention groups (8^3 windows at shift 0 and,
    when blocks alternate, at shift window // 2; or whole assets) and the assets' bounds as host ints.

    Each window partition reads data-dependent sizes back to the host (torch.unique, the window bounds), a sync
    that stalls a GPU step; the trainer builds this once per batch on the CPU in the loader's workers instead.
    """

    groups: tuple[Groups, ...]
    bounds: tuple[int, ...]  # the batch's offsets on the host

    def to(self, device: torch.device | str, non_blocking: bool = False) -> DecoderLayout:
        return DecoderLayout(tuple(g.to(device, non_blocking) for g in self.groups), self.bounds)

    def pin_memory(self) -> DecoderLayout:
        return DecoderLayout(tuple(g.pin_memory() for g in self.groups), self.bounds)


def decoder_layout(cfg: DecoderConfig, coords_M4: torch.Tensor, offsets: torch.Tensor) -> DecoderLayout:
    """The decoder's per-batch layout; `GaussianDecoder.forward` builds it when not given one."""
    if not cfg.window:
        whole = Sequences.from_offsets(offsets)
        return DecoderLayout((whole,), whole.bounds)
    groups = [window_partition(coords_M4, cfg.window, 0)]
    depth = max(cfg.depth, (cfg.encoder_depth or cfg.depth) if cfg.latent_channels else 0)
    if depth > 1 and cfg.window > 1:
        groups.append(window_partition(coords_M4, cfg.window, cfg.window // 2))
    return DecoderLayout(tuple(groups), tuple(offsets.tolist()))


@dataclass
class DecoderOutput:
    raw: torch.Tensor
    """(M, K * 14) raw Gaussian parameters."""
    kl: torch.Tensor | None = None
    """Encoder-decoder ablation: mean KL of the latent per voxel and channel."""


class SparseTransformer(nn.Module):
    """Blocks over packed voxel tokens, with the attention groups and positions built once per forward."""

    def __init__(self, width: int, depth: int, heads: int, mlp_ratio: float, window: int, position: str,
                 qk_norm: bool) -> None:
        super().__init__()
        self.window, self.position = window, position
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, qk_norm) for _ in range(depth))
        self.ape = SinusoidalPositionEmbedding(width) if position == "ape" else None
        self.rope = RotaryEmbedding(rope_axes(width // heads, 3)) if position == "rope" else None
        self.grad_checkpointing = False
        self.attention_backend = "auto"

    def groups(self, layout: DecoderLayout) -> list[Groups]:
        """Per block: windows alternating shift 0 / window // 2, or whole assets."""
        return [layout.groups[i % len(layout.groups)] for i in range(len(self.blocks))]

    def forward(self, x_MD: torch.Tensor, coords_M4: torch.Tensor, layout: DecoderLayout) -> torch.Tensor:
        pos_M3 = coords_M4[:, 1:].float()
        if self.ape is not None:
            x_MD = x_MD + self.ape(pos_M3).to(x_MD.dtype)
        rot = self.rope(pos_M3) if self.rope is not None else None
        for block, groups in zip(self.blocks, self.groups(layout)):
            x_MD = checkpointed(block, self.grad_checkpointing, x_MD, groups, rot, self.attention_backend)
        return x_MD

    def attention_pairs(self, layout: DecoderLayout) -> int:
        return sum(attention_pairs(g) for g in self.groups(layout))


class GaussianDecoder(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        trunk_in = cfg.latent_channels or cfg.in_channels
        if cfg.latent_channels:
            self.encoder_in = nn.Linear(cfg.in_channels, cfg.width)
            self.encoder = SparseTransformer(cfg.width, cfg.encoder_depth or cfg.depth, cfg.heads, cfg.mlp_ratio,
                                             cfg.window, cfg.position, cfg.qk_norm)
            self.encoder_out = nn.Sequential(nn.LayerNorm(cfg.width, elementwise_affine=False, eps=1e-6),
                                             nn.Linear(cfg.width, 2 * cfg.latent_channels))
        self.input = nn.Linear(trunk_in, cfg.width)
        self.trunk = SparseTransformer(cfg.width, cfg.depth, cfg.heads, cfg.mlp_ratio, cfg.window, cfg.position,
                                       cfg.qk_norm)
        self.out_norm = nn.LayerNorm(cfg.width, elementwise_affine=False, eps=1e-6)
        self.out = nn.Linear(cfg.width, cfg.gaussians.raw_channels)
        # Zero output (TRELLIS): training starts from the parameterisation's initial Gaussians, not random ones.
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    @property
    def blocks(self) -> nn.ModuleList:
        """The FSDP / activation-checkpointing units (trainer.py)."""
        blocks = list(self.trunk.blocks) + (list(self.encoder.blocks) if self.cfg.latent_channels else [])
        return nn.ModuleList(blocks)

    def set_runtime(self, grad_checkpointing: bool, attention_backend: str) -> None:
        for trunk in [self.trunk] + ([self.encoder] if self.cfg.latent_channels else []):
            trunk.grad_checkpointing, trunk.attention_backend = grad_checkpointing, attention_backend

    def layout(self, coords_M4: torch.Tensor, offsets: torch.Tensor) -> DecoderLayout:
        return decoder_layout(self.cfg, coords_M4, offsets)

    def forward(self, mu_MC: torch.Tensor, coords_M4: torch.Tensor, offsets: torch.Tensor,
                sigma_MC: torch.Tensor | None = None, generator: torch.Generator | None = None,
                layout: DecoderLayout | None = None, latent: bool = False) -> DecoderOutput:
        """Raw Gaussian parameters per voxel. With `sigma_MC` (training) the input is mu + sigma * eps.
        `layout`: `decoder_layout(cfg, coords_M4, offsets)` built beforehand (the same result, no host syncs).
        `latent` (encoder-decoder only): `mu_MC` is already the 8-channel latent (an SMDiT sample), so only the
        decoding trunk runs."""
        layout = self._checked(layout, coords_M4, offsets)
        if latent:
            if not self.cfg.latent_channels:
                raise ValueError("latent=True needs an encoder-decoder (decoder.latent_channels > 0)")
            return DecoderOutput(self._decode(mu_MC, coords_M4, layout))
        z_MC = mu_MC
        if sigma_MC is not None and self.cfg.train_noise:
            z_MC = mu_MC + sigma_MC * torch.randn(mu_MC.shape, generator=generator, device=mu_MC.device,
                                                  dtype=mu_MC.dtype)
        kl = None
        if self.cfg.latent_channels:
            mean_ML, logvar_ML = self._posterior(z_MC, coords_M4, layout)
            kl = 0.5 * (mean_ML ** 2 + logvar_ML.exp() - 1.0 - logvar_ML).mean()
            z_MC = mean_ML
            if self.training:
                z_MC = mean_ML + (0.5 * logvar_ML).exp() * torch.randn(
                    mean_ML.shape, generator=generator, device=mean_ML.device, dtype=mean_ML.dtype)
            z_MC = z_MC.to(mu_MC.dtype)
        return DecoderOutput(self._decode(z_MC, coords_M4, layout), kl)

    def encode(self, mu_MC: torch.Tensor, coords_M4: torch.Tensor, offsets: torch.Tensor,
               layout: DecoderLayout | None = None) -> torch.Tensor:
        """Encoder-decoder only: the latent (M, latent_channels) the SMDiT diffuses, the posterior mean of the
        noiseless features (TRELLIS encodes its SLat the same way: no posterior sample)."""
        if not self.cfg.latent_channels:
            raise ValueError("a decoder-only model has no latent to encode into (decoder.latent_channels = 0)")
        layout = self._checked(layout, coords_M4, offsets)
        return self._posterior(mu_MC, coords_M4, layout)[0]

    def _posterior(self, z_MC: torch.Tensor, coords_M4: torch.Tensor, layout: DecoderLayout
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        h_MD = self.encoder(self.encoder_in(z_MC), coords_M4, layout)
        mean_ML, logvar_ML = self.encoder_out(h_MD).float().chunk(2, dim=-1)
        return mean_ML, logvar_ML.clamp(-30.0, 20.0)

    def _decode(self, z_MC: torch.Tensor, coords_M4: torch.Tensor, layout: DecoderLayout) -> torch.Tensor:
        return self.out(self.out_norm(self.trunk(self.input(z_MC), coords_M4, layout)))

    def _checked(self, layout: DecoderLayout | None, coords_M4: torch.Tensor, offsets: torch.Tensor) -> DecoderLayout:
        if layout is None:
            return self.layout(coords_M4, offsets)
        if layout.bounds[-1] != coords_M4.shape[0] or len(layout.bounds) != len(offsets):
            raise ValueError(f"the layout is for {len(layout.bounds) - 1} assets of {layout.bounds[-1]} voxels, the "
                             f"batch has {len(offsets) - 1} of {coords_M4.shape[0]}")
        return layout

    def to_gaussians(self, raw_MC: torch.Tensor, coords_M4: torch.Tensor, offsets: torch.Tensor,
                     layout: DecoderLayout | None = None) -> list[Gaussians]:
        """One Gaussian set per asset of the packed batch (with `layout`, its host bounds: no readback)."""
        bounds = offsets.tolist() if layout is None else layout.bounds
        g = self.cfg.gaussians
        return [gaussians_from_raw(raw_MC[s:e].float().view(e - s, g.per_voxel, RAW_CHANNELS), coords_M4[s:e, 1:], g)
                for s, e in zip(bounds[:-1], bounds[1:])]

    def flops(self, coords_M4: torch.Tensor, offsets: torch.Tensor, layout: DecoderLayout | None = None) -> float:
        """Training FLOPs of one step on this batch: 6 x (matmul parameters) x tokens + attention scores and
        values (2 matmuls x 2 FLOPs x pairs x width, x3 for the backward pass)."""
        layout = self._checked(layout, coords_M4, offsets)
        tokens = coords_M4.shape[0]
        matmul_params = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        pairs = self.trunk.attention_pairs(layout)
        if self.cfg.latent_channels:
            pairs += self.encoder.attention_pairs(layout)
        return 6.0 * matmul_params * tokens + 12.0 * pairs * self.cfg.width

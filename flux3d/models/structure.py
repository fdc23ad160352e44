"""The sparse-structure stage (TRELLIS's stage 1): which voxels of the 64^3 grid an asset occupies, from its image.

    voxel coords (N, 3) --occupancy_grid--> dense occupancy (B, 1, 64, 64, 64)
      --StructureVAE.encode: 3D convolutions, 2 stride-2 downsamples--> latent (B, 8, 16, 16, 16)
      --StructureVAE.decode: the mirror, 2 x2 upsamples--> occupancy logits; logit > 0 = an active voxel

    the flow model (an SMDiT, smdit.py) denoises that latent as a fully occupied 16^3 "sparse" grid of tokens,
    conditioned on the image's FLUX latents exactly as the stage-2 SMDiT is; the decoded positive cells are the layout.

Why the stage-2 SMDiT serves as the flow model: a dense 16^3 latent is a sparse batch whose every voxel is active,
so the SMDiT's blocks, its MARoPE (latent cells at (x, y, z) on the 8^3 token grid, image patches on the plane
above) and its sampler apply unchanged. Its 2^3 structured patchify makes 512 tokens per asset where TRELLIS's
dense DiT uses patch 1 (4,096 tokens): 8x fewer tokens for the same latent, which TRELLIS's own stage 2 shows a
flow transformer handles (it patchifies its 64^3 latents by 2^3 too).

The VAE follows TRELLIS's `SparseStructureEncoder/Decoder` (ss_vae_conv3d_16l8): a conv stem, residual blocks of
GroupNorm-SiLU-Conv3d at each level, strided-conv downsampling, a Gaussian posterior (mean, logvar) of 8 channels;
the decoder upsamples with a conv to 8x the channels and a 3D pixel shuffle. Trained with a Dice (or BCE) loss on
the occupancy plus a small KL (training/structure_step.py).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flux3d.models.configs import StructureVAEConfig


def occupancy_grid(coords_M4: torch.Tensor, batch_size: int, resolution: int) -> torch.Tensor:
    """(B, 1, R, R, R) float 0/1 from packed voxel coords [b, x, y, z] (models/sparse.py)."""
    c = coords_M4.long()
    if len(c) and (int(c[:, 1:].max()) >= resolution or int(c.min()) < 0):
        raise ValueError(f"voxel coordinates outside the {resolution}^3 grid")
    occ = torch.zeros((batch_size, 1, resolution, resolution, resolution), device=coords_M4.device)
    occ[c[:, 0], 0, c[:, 1], c[:, 2], c[:, 3]] = 1.0
    return occ


def grid_tokens(batch_size: int, resolution: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor,
                                                                                                torch.Tensor]:
    """Coords (B * r^3, 4) and offsets (B + 1,) of fully occupied r^3 grids, in the row order `to_tokens` uses."""
    axis = torch.arange(resolution, device=device)
    xyz = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    b = torch.arange(batch_size, device=device).repeat_interleave(len(xyz))
    coords = torch.cat([b[:, None], xyz.repeat(batch_size, 1)], 1).int()
    offsets = torch.arange(batch_size + 1, device=device, dtype=torch.int64) * len(xyz)
    return coords, offsets


def to_tokens(z_BCRRR: torch.Tensor) -> torch.Tensor:
    """(B, C, r, r, r) -> (B * r^3, C), row (b, x, y, z) as `grid_tokens` orders them."""
    return z_BCRRR.permute(0, 2, 3, 4, 1).reshape(-1, z_BCRRR.shape[1])


def from_tokens(z_MC: torch.Tensor, batch_size: int, resolution: int) -> torch.Tensor:
    """The inverse of `to_tokens`."""
    return z_MC.reshape(batch_size, resolution, resolution, resolution, -1).permute(0, 4, 1, 2, 3)


def layouts(logits_B1RRR: torch.Tensor) -> list[np.ndarray]:
    """Per asset the uint8 (N, 3) coordinates of the cells with a positive logit: its predicted sparse layout."""
    return [torch.nonzero(x[0] > 0).to(torch.uint8).cpu().numpy() for x in logits_B1RRR]


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, ch // 4) if ch >= 4 else 1, ch)


class ResBlock3d(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_norm(ch), nn.SiLU(), nn.Conv3d(ch, ch, 3, padding=1),
                                  _norm(ch), nn.SiLU(), nn.Conv3d(ch, ch, 3, padding=1))
        nn.init.zeros_(self.body[-1].weight)  # each block starts as the identity (TRELLIS's zero_module)
        nn.init.zeros_(self.body[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Upsample3d(nn.Module):
    """x2 per axis: a conv to 8x the channels, then each voxel's 8 channel groups spread over its 2^3 children."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv, self.cout = nn.Conv3d(cin, cout * 8, 3, padding=1), cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, r, _, _ = x.shape
        y = self.conv(x).view(B, self.cout, 2, 2, 2, r, r, r)
        return y.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(B, self.cout, 2 * r, 2 * r, 2 * r)


class StructureVAE(nn.Module):
    def __init__(self, cfg: StructureVAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        ch, n = list(cfg.channels), cfg.blocks
        enc: list[nn.Module] = [nn.Conv3d(1, ch[0], 3, padding=1)]
        for i, c in enumerate(ch):
            enc += [ResBlock3d(c) for _ in range(n)]
            if i + 1 < len(ch):
                enc.append(nn.Conv3d(c, ch[i + 1], 3, stride=2, padding=1))
        enc += [ResBlock3d(ch[-1]) for _ in range(n)]
        enc += [_norm(ch[-1]), nn.SiLU(), nn.Conv3d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)]
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [nn.Conv3d(cfg.latent_channels, ch[-1], 3, padding=1)]
        dec += [ResBlock3d(ch[-1]) for _ in range(n)]
        for i in range(len(ch) - 1, -1, -1):
            dec += [ResBlock3d(ch[i]) for _ in range(n)]
            if i > 0:
                dec.append(Upsample3d(ch[i], ch[i - 1]))
        dec += [_norm(ch[0]), nn.SiLU(), nn.Conv3d(ch[0], 1, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)
        self._flops_per_sample: float | None = None

    def encode(self, occ_B1RRR: torch.Tensor, generator: torch.Generator | None = None,
               sample: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent (B, C, r, r, r) and the KL to N(0, I) per asset: the posterior mean, or a draw with `sample`
        (training); the flow model learns the means, as TRELLIS encodes with `sample_posterior=False`."""
        if occ_B1RRR.shape[-1] != self.cfg.grid:
            raise ValueError(f"occupancy must be {self.cfg.grid}^3, got {tuple(occ_B1RRR.shape)}")
        mean, logvar = self.encoder(occ_B1RRR).chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(1)
        if sample:
            mean = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=generator, device=mean.device)
        return mean, kl

    def decode(self, z_BCrrr: torch.Tensor) -> torch.Tensor:
        """Occupancy logits (B, 1, R, R, R)."""
        return self.decoder(z_BCrrr)

    def forward(self, occ_B1RRR: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor,
                                                                                                  torch.Tensor]:
        z, kl = self.encode(occ_B1RRR, generator, sample=self.training)
        return self.decode(z), kl

    def flops(self, batch_size: int) -> float:
        """Training FLOPs of one step: 2 x weights x output cells of every Conv3d (one forward of a copy on the
        meta device, which computes shapes only, once per model), x3 for the backward."""
        if self._flops_per_sample is not None:
            return 3.0 * batch_size * self._flops_per_sample
        total = [0.0]

        def count(m: nn.Module, _: tuple, out: torch.Tensor) -> None:
            total[0] += 2.0 * m.weight.numel() * out.shape[2:].numel()

        with torch.device("meta"):
            meta = StructureVAE(self.cfg)
        for m in meta.modules():
            if isinstance(m, nn.Conv3d):
                m.register_forward_hook(count)
        with torch.no_grad():
            meta.decode(meta.encode(torch.zeros(1, 1, *(3 * [self.cfg.grid]), device="meta"))[0])
        self._flops_per_sample = total[0]
        return 3.0 * batch_size * total[0]


def occupancy_loss(logits: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Dice (TRELLIS's ss VAE), BCE, or their sum, over each asset's grid, averaged over the batch."""
    p, dims = torch.sigmoid(logits.float()), tuple(range(1, logits.ndim))
    dice = 1 - (2 * (p * target).sum(dims) + 1) / (p.sum(dims) + target.sum(dims) + 1)
    bce = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none").mean(dims)
    return {"dice": dice, "bce": bce, "dice_bce": dice + bce}[kind].mean()


def iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per asset |pred & target| / |pred | target| of boolean grids (B, ...)."""
    p, t = pred.flatten(1).bool(), target.flatten(1).bool()
    return (p & t).sum(1) / (p | t).sum(1).clamp_min(1)

"""The sparse-structure stage's two training steps (models/structure.py): first the occupancy VAE, then the
image-conditioned flow model over its latent.

- `structure_vae`: each batch's voxel coords become a dense occupancy grid; the VAE reconstructs it through its
  latent (Dice or BCE + KL). It reads no views, no conditioning and no features: the shards' voxels are all it needs.
- `structure_flow`: the SMDiT step (smdit_step.py) with one thing changed, what it diffuses: a frozen finished VAE
  encodes each batch's occupancy to its latent grid (posterior means, as TRELLIS encodes its ss latents), laid out
  as a fully occupied sparse grid. Conditioning (the FLUX latents of one conditioning view per asset, dropped for
  CFG), flow-matching loss, normalisation from the train split's latents and the sampler are the SMDiT's.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from flux3d.config.training import TrainConfig
from flux3d.models.smdit import smdit_layout
from flux3d.models.sparse import PatchLayout, SparseBatch
from flux3d.models.structure import StructureVAE, grid_tokens, iou, occupancy_grid, occupancy_loss, to_tokens
from flux3d.training.data import Batch
from flux3d.training.smdit_step import SMDiTStep, latent_stats
from flux3d.training.step import Step, unwrap

log = logging.getLogger(__name__)


class StructureVAEStep(Step):
    needs_sigma = False

    def views_needed(self) -> int:
        return 0

    def build_model(self) -> nn.Module:
        return StructureVAE(self.cfg.structure)

    def step(self, model: nn.Module, batch: Batch, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, Any]]:
        v = batch.voxels
        occ = occupancy_grid(v.coords, v.batch_size, self.cfg.structure.grid)
        if self.cfg.structure.augment:
            occ = reorient(occ, gen)
        logits, kl = model(occ, gen)
        recon = occupancy_loss(logits, occ, self.cfg.loss.occupancy)
        return recon + self.cfg.loss.kl * kl.mean(), {"recon": recon.detach(), "kl": kl.mean().detach(),
                                                        "iou": iou(logits.detach() > 0, occ).mean()}

    def work(self, model: nn.Module, batch: Batch) -> dict[str, float]:
        B = batch.voxels.batch_size
        flops = unwrap(model).flops(B) if self.device.type == "cuda" else 0.0
        return {"samples": float(B), "tokens": float(B * self.cfg.structure.grid ** 3), "flops": flops}


def reorient(occ_B1RRR: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each grid under a random one of the cube's 48 symmetries (an axis permutation, then flips)."""
    out = []
    for x in occ_B1RRR:
        perm = torch.randperm(3, generator=gen, device=gen.device).tolist()
        flips = torch.nonzero(torch.rand(3, generator=gen, device=gen.device) < 0.5).flatten().tolist()
        x = x.permute(0, *(p + 1 for p in perm))
        out.append(x.flip([f + 1 for f in flips]) if flips else x)
    return torch.stack(out)


class StructureLatents:
    """`flow.latents` of a structure_flow run: a frozen finished structure VAE (EMA weights) mapping a batch's
    voxels to its latent grid's tokens (B * r^3, C)."""

    def __init__(self, cfg: TrainConfig, device: torch.device, voxel_grid: int | None) -> None:
        from flux3d.training.checkpoint import load_frozen

        self.vae, vcfg, run, ckpt = load_frozen(cfg.flow.latents, device, lambda c: c.kind == "structure_vae",
                                                "a structure_vae run")
        s = vcfg.structure
        if voxel_grid is not None and voxel_grid != s.grid:
            raise ValueError(f"{cfg.data.shards} holds {voxel_grid}^3 voxels but the VAE {run.url} is {s.grid}^3")
        if (cfg.smdit.in_channels, cfg.smdit.grid) != (s.latent_channels, s.latent_resolution):
            raise ValueError(f"smdit.in_channels = {cfg.smdit.in_channels} and smdit.grid = {cfg.smdit.grid}, but "
                             f"{run.url}'s latent is {s.latent_channels} x {s.latent_resolution}^3")
        self.cfg = s
        log.info("diffusing the %d x %d^3 structure latent of %s at step %d", s.latent_channels,
                 s.latent_resolution, run.url, ckpt.step)

    @torch.no_grad()
    def __call__(self, voxels: SparseBatch) -> torch.Tensor:
        occ = occupancy_grid(voxels.coords, voxels.batch_size, self.cfg.grid)
        return to_tokens(self.vae.encode(occ)[0].float())

    def stats(self, urls: list[str], assets: int, batch_size: int) -> tuple[list[float], list[float]]:
        return latent_stats(self, urls, assets, batch_size, next(self.vae.parameters()).device)


class StructureFlowStep(SMDiTStep):
    def __init__(self, cfg: TrainConfig, device: torch.device) -> None:
        super().__init__(cfg, device)
        # The same few batch sizes every step: each grid's tokens and patchify are built once.
        self._grids: dict[int, tuple[torch.Tensor, torch.Tensor, PatchLayout]] = {}

    def frozen_encoder(self) -> StructureLatents:
        return StructureLatents(self.cfg, self.device, self.stats.get("voxel_resolution"))

    def layout_fn(self) -> None:
        return None  # the tokens are the latent's full grid, whatever the batch's voxels: `tokens` builds it

    def tokens(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, PatchLayout]:
        B = batch.voxels.batch_size
        if B not in self._grids:
            r = self.cfg.smdit.grid
            coords, offsets = grid_tokens(B, r)
            self._grids[B] = (coords.to(self.device), offsets.to(self.device),
                              smdit_layout(coords, offsets).to(self.device))
        return self._grids[B]

    def images(self, model: nn.Module, batch: Batch) -> torch.Tensor | None:
        return None

"""The decoder's training step: decode the voxels' latents into Gaussians, render them from the batch's
supervision views and take the reconstruction loss against the renders."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn

from flux3d.config.training import TrainConfig
from flux3d.models.decoder import GaussianDecoder, decoder_layout
from flux3d.models.gaussians import Gaussians
from flux3d.models.rasterizer import render_views
from flux3d.training.data import Batch, LayoutFn
from flux3d.training.step import Step, unwrap


class DecoderStep(Step):
    """Render the decoded Gaussians from the batch's supervision views; reconstruction loss against the renders."""

    def __init__(self, cfg: TrainConfig, device: torch.device) -> None:
        super().__init__(cfg, device)
        from flux3d.training.losses import ReconstructionLoss

        self.loss = ReconstructionLoss(cfg.loss).to(device)

    def build_model(self) -> nn.Module:
        model = GaussianDecoder(self.cfg.decoder)
        model.set_runtime(self.cfg.scale.grad_checkpointing, self.cfg.scale.attention)
        return model

    def layout_fn(self) -> LayoutFn:
        return partial(decoder_layout, self.cfg.decoder)

    def forward(self, model: nn.Module, batch: Batch, gen: torch.Generator | None) -> tuple[Any, list[Gaussians],
                                                                                             torch.Tensor]:
        v = batch.voxels
        out = model(v.feats, v.coords, v.offsets, sigma_MC=batch.sigma if model.training else None, generator=gen,
                    layout=batch.layout)
        gaussians = unwrap(model).to_gaussians(out.raw, v.coords, v.offsets, batch.layout)
        B, V, _, H, W = batch.images.shape
        pred = render_views(gaussians, batch.K, batch.w2c, H, W, batch.background)
        return out, gaussians, pred

    def step(self, model: nn.Module, batch: Batch, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, Any]]:
        out, gaussians, pred = self.forward(model, batch, gen)
        return self.loss(pred.flatten(0, 1), batch.images.flatten(0, 1), gaussians, out.kl)

    def work(self, model: nn.Module, batch: Batch) -> dict[str, float]:
        v = batch.voxels
        flops = unwrap(model).flops(v.coords, v.offsets, batch.layout) if self.device.type == "cuda" else 0.0
        return {"samples": float(v.batch_size), "tokens": float(v.coords.shape[0]), "flops": flops}

    def images(self, model: nn.Module, batch: Batch) -> torch.Tensor | None:
        """Row 1: targets, row 2: renders (first view of up to 4 assets)."""
        was = model.training
        model.eval()
        _, _, pred = self.forward(model, batch, None)
        model.train(was)
        n = min(4, pred.shape[0])
        from torchvision.utils import make_grid  # here: torchvision costs ~1 s of every training worker's start

        return make_grid(torch.cat([batch.images[:n, 0], pred[:n, 0].clamp(0, 1)]), nrow=n)

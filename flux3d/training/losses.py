"""The decoder's reconstruction objective (paper eq. 5, TRELLIS's weights):

    L = l1 |I - I_gt| + ssim (1 - SSIM) + lpips LPIPS_vgg + volume mean(prod(scales)) + opacity mean((1 - alpha)^2)

SSIM is torchmetrics' (11-px Gaussian window, sigma 1.5, as 3DGS and TRELLIS); LPIPS is the VGG network with
weights from a local file (`perceptual.load_lpips_vgg`), frozen and outside the trained model (so DDP never sees
it). The regularisers keep Gaussians small and decided (opaque or gone), as TRELLIS's decoder training does.
"""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics.functional.image import structural_similarity_index_measure

from flux3d.config.training import LossConfig
from flux3d.models.gaussians import Gaussians


class ReconstructionLoss(nn.Module):
    def __init__(self, cfg: LossConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.lpips = None
        if cfg.lpips > 0:
            from flux3d.training.perceptual import load_lpips_vgg

            if not cfg.lpips_backbone and not cfg.lpips_random:
                raise ValueError("loss.lpips > 0 needs loss.lpips_backbone (a local torchvision VGG-16 state dict; "
                                 "weights cannot be downloaded at run time), or loss.lpips_random = true, or "
                                 "loss.lpips = 0")
            self.lpips = load_lpips_vgg(cfg.lpips_backbone or None, allow_random=cfg.lpips_random)
            self.lpips.requires_grad_(False)

    def forward(self, pred_NCHW: torch.Tensor, target_NCHW: torch.Tensor, gaussians: list[Gaussians],
                kl: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Images in [0, 1], N = rendered views of the batch. Returns the total and its parts (detached).

        Every part is computed in fp32 whatever the caller's autocast, as TRELLIS does: SSIM's E[x^2] - mu^2 from
        bf16 convolutions loses most of its digits (a 0.75 read for a true 0.86, gradients off by 100%), and
        LPIPS's VGG features by ~14% in gradient."""
        with torch.autocast(pred_NCHW.device.type, enabled=False):
            return self._loss(pred_NCHW.float(), target_NCHW.float(), gaussians,
                              None if kl is None else kl.float())

    def _loss(self, pred_NCHW: torch.Tensor, target_NCHW: torch.Tensor, gaussians: list[Gaussians],
              kl: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        parts: dict[str, torch.Tensor] = {}
        total = pred_NCHW.new_zeros(())
        l1 = (pred_NCHW - target_NCHW).abs().mean()
        parts["l1"], total = l1, total + self.cfg.l1 * l1
        if self.cfg.ssim > 0:
            ssim = structural_similarity_index_measure(pred_NCHW, target_NCHW, data_range=1.0)
            parts["ssim"], total = ssim, total + self.cfg.ssim * (1.0 - ssim)
        if self.lpips is not None:
            lp = self.lpips(pred_NCHW, target_NCHW).mean()
            parts["lpips"], total = lp, total + self.cfg.lpips * lp
        if self.cfg.volume > 0:
            vol = torch.cat([g.scales.float().prod(-1) for g in gaussians]).mean()
            parts["volume"], total = vol, total + self.cfg.volume * vol
        if self.cfg.opacity > 0:
            op = torch.cat([(1.0 - g.opacities.float()) ** 2 for g in gaussians]).mean()
            parts["opacity_reg"], total = op, total + self.cfg.opacity * op
        if kl is not None:
            parts["kl"], total = kl, total + self.cfg.kl * kl
        with torch.no_grad():
            mse = ((pred_NCHW.clamp(0, 1) - target_NCHW) ** 2).flatten(1).mean(1)
            parts["psnr"] = (-10.0 * torch.log10(mse.clamp_min(1e-10))).mean()
        return total, {k: v.detach() for k, v in parts.items()}

"""The SMDiT training step: flow matching of the per-voxel FLUX latents, conditioned on one image of the asset.

The conditioning view comes from the shards either as FLUX latents (`shard.cond = "latents"`) or, by default, as
an image (docs/shards.md says why), which a frozen copy of the configured FLUX encoder turns into latents on the
training device. Latent statistics come from the dataset version's stats.json (train split) and are stored in the
model as buffers, so a checkpoint samples without the shards.

The Enc-Dec variant (`flow.latents`, paper Tab. 3) diffuses an encoder-decoder's 8-channel latent instead: a frozen
copy of that finished decoder encodes each batch's FLUX features on the training device (TRELLIS encodes its SLat
once, offline; here the latent follows the decoder run it names, with no second dataset to keep in step), and
the statistics are those of the encoded train split.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from flux3d.config.training import TrainConfig
from flux3d.features.vae import ConditionEncoder
from flux3d.models.flow_matching import flow_matching_loss, logit_normal, normalize
from flux3d.models.smdit import SMDiT, smdit_layout
from flux3d.models.sparse import PatchLayout, SparseBatch
from flux3d.training.data import Batch, LayoutFn, every_sample, shard_urls
from flux3d.training.step import Step, unwrap

log = logging.getLogger(__name__)


class SMDiTStep(Step):
    needs_cond = True
    needs_sigma = False  # it diffuses mu; sigma is the decoder's (sec. 4.3)

    def views_needed(self) -> int:
        return 1 if self.cfg.run.decoder_run and self.cfg.run.image_every else 0  # the grid's target view only

    def __init__(self, cfg: TrainConfig, device: torch.device) -> None:
        super().__init__(cfg, device)
        f = cfg.flow
        self.cond_encoder = ConditionEncoder(f.encoder, f.encoder_location, f.cond_resolution, device)
        self._decoder: tuple[int, nn.Module] | None = None  # (step, decoder) for the image grids
        self.latents = self.frozen_encoder()

    def frozen_encoder(self) -> EncDecLatents | None:
        """What turns a batch's voxels into the latents diffused: None = the FLUX features themselves."""
        return EncDecLatents(self.cfg, self.device) if self.cfg.flow.latents else None

    def diffused(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Normalised latents z0 (M, C) of the batch, rows as `tokens` lays them out."""
        v = batch.voxels
        return normalize(unwrap(model), self.latents(v) if self.latents else v.feats.float())

    def tokens(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, PatchLayout]:
        """Where the diffused latents live: coords (M, 4), offsets (B + 1,) and their 2^3 patchify (the loader's
        workers built it on the host)."""
        v = batch.voxels
        return v.coords, v.offsets, batch.layout if batch.layout is not None else smdit_layout(v.coords, v.offsets)

    def build_model(self) -> nn.Module:
        model = SMDiT(self.cfg.smdit)
        if self.cfg.flow.normalize:
            d, f = self.cfg.data, self.cfg.flow
            mean, std = (self.latents.stats(shard_urls(d.shards, d.split), f.latent_stats_assets, d.batch_size)
                         if self.latents else (self.stats["mu_mean"], self.stats["mu_std"]))
            model.set_latent_stats(mean, std)
        model.set_runtime(self.cfg.scale.grad_checkpointing, self.cfg.scale.attention)
        return model

    def layout_fn(self) -> LayoutFn:
        return smdit_layout

    def step(self, model: nn.Module, batch: Batch, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, Any]]:
        if batch.cond is None:
            raise ValueError("SMDiT training needs conditioning views in the shards (shard.cond_views > 0)")
        f, B = self.cfg.flow, batch.voxels.batch_size
        cond = self.cond_encoder(batch.cond)
        z0, (coords, offsets, layout) = self.diffused(model, batch), self.tokens(batch)
        t = logit_normal(B, f.logit_normal_mean, f.logit_normal_std, gen, self.device)
        eps = torch.randn(z0.shape, generator=gen, device=self.device)
        drop = torch.rand(B, generator=gen, device=self.device) < f.cond_drop
        loss = flow_matching_loss(model, z0, coords, offsets, cond, t, eps, drop, layout)
        return loss, {"t_mean": t.mean().detach()}

    def work(self, model: nn.Module, batch: Batch) -> dict[str, float]:
        B, img_tokens = batch.voxels.batch_size, 0
        if batch.cond is not None:
            side = batch.cond.shape[-1] if batch.cond.shape[1] != 3 else self.cfg.flow.cond_resolution // 8
            img_tokens = (side // 2) ** 2
        # The voxel tokens are the coarse voxels of the 2^3 patchify: the layout has them on the host.
        coords, offsets, layout = self.tokens(batch)
        flops = unwrap(model).flops(coords, offsets, img_tokens, layout) if self.device.type == "cuda" else 0.0
        return {"samples": float(B), "tokens": float(layout.num_coarse + B * img_tokens), "flops": flops}

    def images(self, model: nn.Module, batch: Batch) -> torch.Tensor | None:
        """With `run.decoder_run`: the first asset's target view above its render from latents sampled for its
        conditioning image (10 Euler steps: a quick look at what the model has learned, not an evaluation). None
        while the decoder run has no checkpoint yet."""
        if not self.cfg.run.decoder_run or batch.cond is None:
            return None
        from torchvision.utils import make_grid

        from flux3d.models.flow_matching import SamplerConfig
        from flux3d.models.inference import generate
        from flux3d.models.rasterizer import render_views
        from flux3d.training.checkpoint import load_model, resolve

        try:  # the decoder may be training alongside (flows/train.py): use its newest checkpoint, if any yet
            run, ckpt = resolve(self.cfg.run.decoder_run)
        except ValueError as e:
            log.info("no image grid at this step: %s", e)
            return None
        if self.latents:  # its samples are that decoder's latents
            self._decoder = (ckpt.step, self.latents.decoder)
        elif self._decoder is None or self._decoder[0] != ckpt.step:
            self._decoder = (ckpt.step, load_model(run.path(ckpt.rel), device=self.device)[0])
        decoder = self._decoder[1]
        v = batch.voxels
        was = model.training
        model.eval()
        g = generate(unwrap(model), decoder, self.cond_encoder(batch.cond[:1]),
                     v.coords[:int(v.offsets[1]), 1:], SamplerConfig(steps=10), latent=bool(self.latents)).gaussians
        model.train(was)
        H, W = batch.images.shape[-2:]
        pred = render_views([g], batch.K[:1], batch.w2c[:1], H, W, batch.background[:1])
        return make_grid(torch.cat([batch.images[:1, 0], pred[:, 0].clamp(0, 1)]), nrow=1)


class EncDecLatents:
    """`flow.latents`: a frozen encoder-decoder (EMA weights) mapping a batch's FLUX features to its latent."""

    def __init__(self, cfg: TrainConfig, device: torch.device) -> None:
        from flux3d.training.checkpoint import load_frozen

        self.decoder, dcfg, run, ckpt = load_frozen(
            cfg.flow.latents, device, lambda c: c.kind == "decoder" and c.decoder.latent_channels > 0,
            "an encoder-decoder run (a decoder run with decoder.latent_channels > 0)")
        if cfg.smdit.in_channels != dcfg.decoder.latent_channels:
            raise ValueError(f"smdit.in_channels = {cfg.smdit.in_channels}, but {run.url} has "
                             f"{dcfg.decoder.latent_channels} latent channels")
        if dcfg.data.shards.rstrip("/") != cfg.data.shards.rstrip("/"):
            log.warning("the encoder-decoder %s was trained on %s, the SMDiT trains on %s", run.url,
                        dcfg.data.shards, cfg.data.shards)
        log.info("diffusing the %d-channel latent of %s at step %d", dcfg.decoder.latent_channels, run.url, ckpt.step)

    @torch.no_grad()
    def __call__(self, voxels: SparseBatch) -> torch.Tensor:
        return self.decoder.encode(voxels.feats.float(), voxels.coords, voxels.offsets).float()

    def stats(self, urls: list[str], assets: int, batch_size: int) -> tuple[list[float], list[float]]:
        return latent_stats(self, urls, assets, batch_size, next(self.decoder.parameters()).device)


def latent_stats(encode: Callable[[SparseBatch], torch.Tensor], urls: list[str], assets: int, batch_size: int,
                 device: torch.device) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of `encode`'s latents (rows x channels) over the first `assets` samples in shard
    order (every rank reads the same ones, so every rank normalises alike)."""
    total, count = None, 0
    for batch in every_sample(urls, batch_size):
        z = encode(batch.voxels.to(device)).double()
        sums = torch.stack([z.sum(0), (z * z).sum(0)])
        total, count = (sums if total is None else total + sums), count + len(z)
        assets -= len(batch.keys)
        if assets <= 0:
            break
    if total is None:
        raise ValueError(f"no samples in {urls[:3]} to take latent statistics from")
    mean = total[0] / count
    std = (total[1] / count - mean * mean).clamp_min(0).sqrt()
    return mean.tolist(), std.tolist()

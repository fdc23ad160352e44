"""What one training step is, per model: the part of the loop that differs (torchtitan's FluxTrainer overrides only
its step). `trainer.train_loop` owns everything else; `decoder_step` and `smdit_step` fill this base in.

A step builds its model, its loader over the dataset version's shards, computes a step's loss from a `Batch`,
counts the step's work (samples, tokens, FLOPs for MFU) and draws the image grid TensorBoard shows.
"""

from __future__ import annotations

import math
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import nn

from flux3d.config.features import FLUX_ENCODERS
from flux3d.config.training import TrainConfig
from flux3d.training.data import Batch, LayoutFn, make_loader, shard_urls


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (FSDP2 and plain modules are their own model)."""
    return getattr(model, "module", model)


def read_stats(version_dir: str) -> dict[str, Any]:
    """A dataset version's stats.json (written last by `flux3d shard`: its presence marks the version complete)."""
    import json

    import fsspec

    path = f"{version_dir.rstrip('/')}/stats.json"
    try:
        with fsspec.open(path, "rb") as f:
            return json.load(f)
    except FileNotFoundError as e:
        raise ValueError(f"{path} does not exist: data.shards must be a complete dataset version") from e


def check_features(cfg: TrainConfig, stats: dict[str, Any]) -> None:
    """The shards' features must be what the model reads: as many channels as its input, and FLUX latents for the
    image-conditioned models (the SMDiT denoises them; both it and the structure flow encode their conditioning
    image with the FLUX encoder the features were made with). The other encoders' datasets are for the decoder's
    input-feature study (paper Tab. 2b, `flux3d study features`). The structure VAE reads occupancy only."""
    encoder = stats.get("encoder")
    if cfg.kind == "structure_flow" and not cfg.flow.latents:
        raise ValueError("a structure_flow run diffuses a structure VAE's latent: set flow.latents to that run")
    if cfg.kind == "smdit" and encoder and encoder not in FLUX_ENCODERS:
        raise ValueError(f"{cfg.data.shards} holds {encoder} features: the SMDiT works in FLUX's latent space only "
                         f"({' or '.join(FLUX_ENCODERS)} shards); other encoders are for decoder studies")
    if cfg.kind == "structure_flow" and not cfg.flow.encoder and encoder and encoder not in FLUX_ENCODERS:
        raise ValueError(f"{cfg.data.shards} holds {encoder} features: set flow.encoder to the FLUX encoder the "
                         "structure flow conditions on")
    if cfg.kind in ("structure_vae", "structure_flow") or cfg.flow.latents:
        return  # occupancy, or a latent made from the features by a frozen model (smdit_step / structure_step)
    # Versions written before stats.json named its channel count have 16-channel FLUX statistics.
    channels = stats.get("channels") or len(stats.get("mu_mean") or [])
    field = "decoder.in_channels" if cfg.kind == "decoder" else "smdit.in_channels"
    width = cfg.decoder.in_channels if cfg.kind == "decoder" else cfg.smdit.in_channels
    if channels and channels != width:
        raise ValueError(f"{cfg.data.shards} holds {channels}-channel {encoder} features but {field} = {width}: "
                         f"set {field} = {channels}")


def model_grid(cfg: TrainConfig) -> tuple[str, int]:
    """The config field naming the voxel grid the model reads, and its value (checked against the shards'). A
    structure flow's grid is its VAE's (structure_step checks it against that run)."""
    return {"decoder": ("decoder.gaussians.resolution", cfg.decoder.gaussians.resolution),
            "smdit": ("smdit.grid", cfg.smdit.grid),
            "structure_vae": ("structure.grid", cfg.structure.grid)}.get(cfg.kind, ("", 0))


class Step:
    needs_cond = False
    needs_sigma = True

    def views_needed(self) -> int:
        """Supervision views per sample that the step (with its image grids) uses: the loader reads only those."""
        return self.cfg.data.views_per_sample

    def __init__(self, cfg: TrainConfig, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self.stats = read_stats(cfg.data.shards)
        grid = self.stats.get("voxel_resolution")
        field, want = model_grid(cfg)
        if grid is not None and field and grid != want:
            raise ValueError(f"{cfg.data.shards} holds {grid}^3 voxels but {field} = {want}")
        check_features(cfg, self.stats)

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def layout_fn(self) -> LayoutFn | None:
        """The model's layout function, which the loader's workers apply to each batch (`Batch.layout`)."""
        return None

    def step(self, model: nn.Module, batch: Batch, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, Any]]:
        raise NotImplementedError

    def work(self, model: nn.Module, batch: Batch) -> dict[str, float]:
        """Samples, tokens and model FLOPs of the step (FLOPs only on CUDA, where MFU is reported)."""
        raise NotImplementedError

    def images(self, model: nn.Module, batch: Batch) -> torch.Tensor | None:
        return None

    def loader(self, rank: int, world: int, start_epoch: int, skip_batches: int = 0):  # noqa: ANN201 - a WebLoader
        """An endless stream of this worker's batches: shards resampled per worker and rank, `epoch_samples` per
        epoch (default: the split's assets spread over the workers), every epoch reproducible from the seed;
        `skip_batches` of `start_epoch` are passed over undecoded (a resume)."""
        d = self.cfg.data
        urls = shard_urls(d.shards, d.split)
        per_rank = d.epoch_samples or math.ceil(_split_size(d.shards, d.split) / world)
        return make_loader(urls, batch_size=d.batch_size, num_workers=d.workers, resampled=True,
                           epoch_samples=max(per_rank, 1), seed=self.cfg.run.seed, start_epoch=start_epoch,
                           skip_batches=skip_batches,
                           background=d.background, cond=self.needs_cond, views_per_sample=self.views_needed(),
                           sigma=self.needs_sigma, read=d.read,
                           shuffle_buffer=d.shuffle_buffer, token_budget=d.token_budget, layout=self.layout_fn(),
                           pin_memory=self.device.type == "cuda")


def _split_size(version_dir: str, split: str) -> int:
    import fsspec

    with fsspec.open(f"{version_dir.rstrip('/')}/index.parquet", "rb") as f:
        table = pq.read_table(f, columns=["split"])
    return int(pc.sum(pc.equal(table["split"], split)).as_py() or 0)

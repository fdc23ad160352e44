"""VAE image encoders (8x downsampling) through diffusers: FLUX.1's 16-channel latent space (the paper's features)
and, for the input-feature study (paper Tab. 2b), SDXL's 4-channel one.

- `AutoencoderKL` (the FLUX.1 VAE): from a local folder or a hub id (`black-forest-labs/FLUX.1-schnell`,
  subfolder `vae`) when the machine is online. The posterior mean and std are normalised like FLUX's
  transformer sees them: mu = (mean - shift_factor) * scaling_factor, sigma = std * scaling_factor.
- `AutoencoderTiny` (TAEF1, madebyollin, MIT): a ~1.2 M-parameter distillation into the same normalised latent
  space; deterministic, so sigma = 0. The weights ship as two bare `nn.Sequential` state dicts (ComfyUI's
  `vae_approx` files); `load_taef1` maps them onto diffusers' layout: encoder indices are identical, decoder
  indices shift by one because taesd's first decoder layer is the tanh clamp that diffusers applies in `forward`.
- `AutoencoderKL` (the SDXL VAE, `sdxl_vae`): a local diffusers folder or the hub id `stabilityai/sdxl-vae`;
  mu = mean * scaling_factor (0.13025, no shift), sigma = std * scaling_factor, the normalisation SDXL's UNet sees.

Images go in as (N, 3, H, W) floats in [0, 1]; latents come out as (N, C, H/8, W/8) float32 (C = 16, SDXL 4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch  # annotations only: importing this module must not load torch

TAEF1_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=16, encoder_block_out_channels=(64, 64, 64, 64),
                    decoder_block_out_channels=(64, 64, 64, 64), num_encoder_blocks=(1, 3, 3, 3),
                    num_decoder_blocks=(3, 3, 3, 1), act_fn="relu", upsample_fn="nearest",
                    upsampling_scaling_factor=2, latent_magnitude=3, latent_shift=0.5, scaling_factor=1.0,
                    shift_factor=0.0, force_upcast=False)
FLUX_HUB_ID = "black-forest-labs/FLUX.1-schnell"
SDXL_VAE_HUB_ID = "stabilityai/sdxl-vae"


def over_background(rgba: np.ndarray, background: Any) -> np.ndarray:
    """(..., H, W, 4) uint8 straight-alpha RGBA -> (..., 3, H, W) float32 in [0, 1] over a uniform background (a
    grey level or an RGB triple in [0, 1]); the one compositing rule of encoding and training."""
    x = rgba.astype(np.float32) / 255
    bg = np.asarray(background, np.float32)
    rgb = x[..., :3] * x[..., 3:] + bg * (1 - x[..., 3:])
    return np.ascontiguousarray(np.moveaxis(rgb, -1, -3))


def _bare_state(path: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(path).items()}  # stored as bf16


def load_taef1(encoder_path: str, decoder_path: str | None = None) -> Any:
    """diffusers AutoencoderTiny with TAEF1's weights (decoder optional: encoding needs only the encoder)."""
    from diffusers import AutoencoderTiny

    model = AutoencoderTiny(**TAEF1_CONFIG)
    state = {f"encoder.layers.{k}": v for k, v in _bare_state(encoder_path).items()}
    if decoder_path:
        for k, v in _bare_state(decoder_path).items():
            index, rest = k.split(".", 1)
            state[f"decoder.layers.{int(index) - 1}.{rest}"] = v
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(k.startswith("encoder.") for k in missing) or (decoder_path and missing):
        raise ValueError(f"TAEF1 weights do not fit AutoencoderTiny: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}")
    return model.eval()


def load_flux_vae(location: str = FLUX_HUB_ID, subfolder: str | None = "vae") -> Any:
    """The FLUX.1 AutoencoderKL from a local diffusers folder or a hub id (downloads only when online)."""
    from diffusers import AutoencoderKL

    # low_cpu_mem_usage needs `accelerate`, which flux3d does not depend on (an 84 M-parameter VAE loads fine
    # without it); saying so spares every load diffusers' notice to install it.
    return AutoencoderKL.from_pretrained(location, subfolder=subfolder, low_cpu_mem_usage=False).eval()


def load_sdxl_vae(location: str = SDXL_VAE_HUB_ID) -> Any:
    """The SDXL AutoencoderKL from a diffusers VAE folder (the layout of `stabilityai/sdxl-vae`), an SDXL pipeline
    folder (its `vae/` subfolder) or the hub id (downloads only when online)."""
    import os

    subfolder = "vae" if os.path.isfile(os.path.join(location, "vae", "config.json")) else None
    return load_flux_vae(location, subfolder)


@dataclass
class LatentEncoder:
    """One loaded VAE and how to turn its output into normalised latents."""

    vae: Any
    kind: str  # "kl" | "tiny"

    @classmethod
    def load(cls, name: str, location: str, decoder: str | None = None, device: str = "cpu",
             dtype: str = "float32") -> LatentEncoder:
        """`device` cpu | cuda | auto; `dtype` float32 | bfloat16 | auto (bfloat16 on cuda: the paper's setting,
        and the VAE's own training precision)."""
        import torch

        if name == "taef1":
            enc = cls(load_taef1(location, decoder), "tiny")
        elif name == "flux_vae":
            enc = cls(load_flux_vae(location or FLUX_HUB_ID), "kl")
        elif name == "sdxl_vae":
            enc = cls(load_sdxl_vae(location or SDXL_VAE_HUB_ID), "kl")
        else:
            raise ValueError(f"unknown encoder {name!r}: expected taef1, flux_vae or sdxl_vae")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype == "auto":
            dtype = "bfloat16" if device == "cuda" else "float32"
        enc.vae.to(device)
        if dtype != "float32":  # the models load in float32; diffusers warns on a no-op cast
            enc.vae.to(dtype=getattr(torch, dtype))
        return enc

    @property
    def channels(self) -> int:
        return int(self.vae.config.latent_channels)

    def encode(self, images: Any) -> tuple[Any, Any]:
        """(mu, sigma), each (N, C, H/8, W/8) float32, from images (N, 3, H, W) in [0, 1]."""
        import torch

        param = next(self.vae.parameters())
        x = (images.to(param.device, param.dtype) * 2 - 1)  # diffusers' convention: [-1, 1]
        with torch.inference_mode():
            if self.kind == "tiny":
                mu = self.vae.encode(x).latents.float()
                return mu, torch.zeros_like(mu)
            dist = self.vae.encode(x).latent_dist
            cfg = self.vae.config
            shift = cfg.shift_factor or 0.0  # SDXL's config has none: mean * scaling_factor
            return ((dist.mean.float() - shift) * cfg.scaling_factor, dist.std.float() * cfg.scaling_factor)

    def decode(self, mu: Any) -> Any:
        """Images (N, 3, 8h, 8w) in [0, 1] from normalised latents (for checks and previews)."""
        import torch

        param = next(self.vae.parameters())
        z = mu.to(param.device, param.dtype)
        if self.kind == "kl":
            z = z / self.vae.config.scaling_factor + (self.vae.config.shift_factor or 0.0)
        with torch.inference_mode():
            return ((self.vae.decode(z).sample.float() + 1) / 2).clamp(0, 1)


class ConditionEncoder:
    """Conditioning images -> normalised FLUX latents (B, 16, h, w), with a frozen encoder loaded once."""

    def __init__(self, name: str, location: str, resolution: int, device: torch.device) -> None:
        self.name, self.location, self.resolution, self.device = name, location, resolution, device
        self.encoder = None

    def __call__(self, cond: torch.Tensor) -> torch.Tensor:
        if cond.shape[1] != 3:
            return cond.float()  # the shards hold latents already
        if self.encoder is None:
            if not self.location:
                raise ValueError("the shards hold conditioning images: set flow.encoder_location (the FLUX encoder)")
            self.encoder = LatentEncoder.load(self.name, self.location, device=str(self.device), dtype="auto")
        import torch.nn.functional as F

        if cond.shape[-1] != self.resolution or cond.shape[-2] != self.resolution:
            cond = F.interpolate(cond, size=(self.resolution, self.resolution), mode="bilinear", antialias=True,
                                 align_corners=False)
        mu, _ = self.encoder.encode(cond)
        return mu.to(cond.device)

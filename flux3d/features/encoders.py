"""The feature stage's image encoders by name (`encode.encoder`): what each view becomes before it is projected onto
the voxels. FLUX's VAE is the paper's choice; the others are the inputs of the paper's Tab. 2b study.

    name       features per view (N views of H x W px)    sigma          weights (`encode.location`)
    flux_vae   (N, 16, H/8, W/8)  normalised FLUX latents   posterior std  diffusers folder | hub id
    taef1      (N, 16, H/8, W/8)  the same latent space     0              encoder .safetensors
    sdxl_vae   (N, 4, H/8, W/8)   SDXL latents              posterior std  diffusers folder | hub id
    dinov2     (N, 1024, 37, 37)  ViT-L/14 reg4 patch tokens 0             state-dict file | timm folder | ""
    rgb        (N, 3, H/8, W/8)   pixels, average-pooled 8x 0              none

Every encoder has `encode(images (N, 3, H, W) in [0, 1]) -> (mu, sigma)` float32 maps on its device and
`channels`; `features.project.aggregate` samples any map size in normalised image coordinates, so a 37 x 37 DINOv2
grid and a 64 x 64 latent grid land on the same voxels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from flux3d.features.vae import LatentEncoder

if TYPE_CHECKING:
    import torch  # annotations only: importing this module must not load torch

    from flux3d.config.features import EncodeConfig


class FeatureEncoder(Protocol):
    @property
    def channels(self) -> int: ...

    def encode(self, images: Any) -> tuple[Any, Any]: ...


class PooledRGB:
    """Pixels at latent resolution: the image average-pooled over 8 x 8 blocks (the VAEs' cell), sigma 0. The
    study's floor: what a decoder makes of colour alone."""

    channels = 3
    factor = 8

    def __init__(self, device: str = "cpu") -> None:
        self.device = device

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        import torch
        import torch.nn.functional as F

        mu = F.avg_pool2d(images.to(self.device, torch.float32), self.factor)
        return mu, torch.zeros_like(mu)


def load_feature_encoder(e: EncodeConfig) -> FeatureEncoder:
    """The encoder `e.encoder` with its weights from `e.location`, on `e.device` in `e.dtype` (auto: cuda and
    bfloat16 when there is a GPU)."""
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if e.device == "auto" else e.device
    if e.encoder == "rgb":
        return PooledRGB(device)
    if e.encoder == "dinov2":
        from flux3d.features.dinov2 import DINOv2Patches, load_dinov2

        net = load_dinov2(e.location).to(device)
        dtype = ("bfloat16" if device == "cuda" else "float32") if e.dtype == "auto" else e.dtype
        if dtype != "float32":
            net.to(dtype=getattr(torch, dtype))
        return DINOv2Patches(net)
    return LatentEncoder.load(e.encoder, e.location, e.decoder or None, device=e.device, dtype=e.dtype)

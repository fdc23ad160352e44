"""DINOv2 through timm, built from its real class and filled from local weights: the model and state-dict mapping
shared by the evaluation's FD_DINOv2 extractor (CLS token at 224 px) and the feature stage's `dinov2` encoder
(patch tokens at 518 px, TRELLIS's input feature and the paper's Tab. 2b "DINOv2" row).

`DINOv2Patches` is TRELLIS's `dataset_toolkits/extract_feature.py`: ViT-L/14 with 4 registers
(`dinov2_vitl14_reg`), views over a black background (premultiplied alpha) resized to 518 px, ImageNet
normalisation, and the patch tokens of the last block *before* the final norm (`x_prenorm` without the CLS and
register tokens), a (1024, 37, 37) map per view. DINOv2 is deterministic, so sigma = 0.

Shape suffixes: N images, H x W pixels, S the network's input side, D ViT width, m / n position grid sides
(weights / model), P = n * n patches.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flux3d.weights import load_exact, read_state_dict

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DINOV2_TIMM_NAMES = {
    "vits14": "vit_small_patch14_dinov2.lvd142m",
    "vitb14": "vit_base_patch14_dinov2.lvd142m",
    "vitl14": "vit_large_patch14_dinov2.lvd142m",
}
"""DINOv2 variants with a plain MLP; ViT-g/14 is left out (its SwiGLU keys would need another mapping)."""
DINOV2_REG_TIMM_NAMES = {"vitl14_reg4": "vit_large_patch14_reg4_dinov2.lvd142m"}
"""With 4 registers (torch.hub `dinov2_vitl14_reg`): TRELLIS's feature network."""
PATCH_SIZE = 518
"""TRELLIS's input side: 37 x 37 patches of 14 px."""


def dinov2_model(variant: str, img_size: int = 224, **model_args: Any) -> nn.Module:
    """The timm DINOv2 ViT (random init, no classifier) whose state dict keys the loader fills. `model_args`
    change the architecture's sizes (embed_dim, depth, num_heads: a tiny test model of the real class)."""
    import timm

    names = DINOV2_TIMM_NAMES | DINOV2_REG_TIMM_NAMES
    if variant not in names:
        raise ValueError(f"DINOv2 variant must be one of {sorted(names)}, got {variant!r}")
    return timm.create_model(names[variant], pretrained=False, num_classes=0, img_size=img_size, **model_args)


def dinov2_pos_embed(pos_1TD: Tensor, num_patches: int, prefix: int = 1) -> Tensor:
    """Resample a (1, prefix + m*m, D) position table to n*n = `num_patches` patches exactly as DINOv2's
    `interpolate_pos_encoding` does for an n*14 px input: bicubic, no antialias, scale factor (n + 0.1) / m.
    `prefix`: rows before the grid (1: the CLS token's; 0 in timm's register models, whose table is patches only)."""
    m, n = math.isqrt(pos_1TD.shape[1] - prefix), math.isqrt(num_patches)
    if m * m != pos_1TD.shape[1] - prefix or n * n != num_patches:
        raise ValueError(f"position table of {pos_1TD.shape[1]} tokens is not {prefix} + a square grid (or "
                         f"{num_patches} patches are not square)")
    if m == n:
        return pos_1TD
    grid_1Dmm = pos_1TD[:, prefix:].float().reshape(1, m, m, -1).permute(0, 3, 1, 2)
    # The +0.1 offset (facebookresearch/dino#8) makes the output size floor(m * s) = n while the sampling grid uses
    # s itself, so resampling to size=(n, n) would give slightly different tables than the DINOv2 hub model uses.
    grid_1Dnn = F.interpolate(grid_1Dmm, scale_factor=((n + 0.1) / m, (n + 0.1) / m), mode="bicubic",
                              antialias=False)
    assert grid_1Dnn.shape[-2:] == (n, n), grid_1Dnn.shape
    grid_1PD = grid_1Dnn.permute(0, 2, 3, 1).reshape(1, n * n, -1)
    return torch.cat([pos_1TD[:, :prefix].float(), grid_1PD], dim=1).to(pos_1TD.dtype)


def dinov2_state(state: Mapping[str, Tensor], num_patches: int) -> dict[str, Tensor]:
    """A DINOv2 state dict in timm keys for a model with `num_patches` patches.

    Accepts timm's format (e.g. timm/vit_large_patch14_dinov2.lvd142m, 518 px table) and the original
    facebookresearch release (`dinov2_vitl14_pretrain.pth`, the torch.hub model with block_chunks=0): for the plain
    MLP variants its keys are timm's plus `mask_token`, a masked-image-modelling token unused at inference. The
    release's register models (`dinov2_vitl14_reg4_pretrain.pth`) keep the CLS token's position row in the table
    and call the registers `register_tokens`; timm's (no_embed_class) adds the row to the CLS token and keeps a
    patches-only table, the mapping timm's own checkpoint filter makes. The chunked-block training checkpoints
    (`blocks.0.N.*`) are not mapped; their keys come back as unexpected.
    """
    out = {k: v for k, v in state.items() if k != "mask_token"}
    prefix = 1
    if "register_tokens" in out:
        out["reg_token"] = out.pop("register_tokens")
        out["cls_token"] = out["cls_token"] + out["pos_embed"][:, :1]
        out["pos_embed"] = out["pos_embed"][:, 1:]
    if "reg_token" in out:
        prefix = 0
    if "pos_embed" in out:
        out["pos_embed"] = dinov2_pos_embed(out["pos_embed"], num_patches, prefix)
    return out


def load_dinov2(location: str, variant: str = "vitl14_reg4", img_size: int = PATCH_SIZE) -> nn.Module:
    """A DINOv2 from local weights, in eval mode:

    - a state-dict file (.safetensors / .pth) in timm's or the facebookresearch release's keys, for `variant`;
    - a timm model folder (the hub snapshot of `timm/vit_large_patch14_reg4_dinov2.lvd142m`: config.json with
      `architecture` and optional `model_args`, weights in model.safetensors or pytorch_model.bin);
    - "" = timm's own download of `variant`'s pretrained weights (only when the machine is online).
    """
    if not location:
        import timm

        names = DINOV2_TIMM_NAMES | DINOV2_REG_TIMM_NAMES
        return timm.create_model(names[variant], pretrained=True, num_classes=0, img_size=img_size).eval()
    model_args: dict[str, Any] = {}
    path = location
    if os.path.isdir(location):
        with open(os.path.join(location, "config.json")) as f:
            config = json.load(f)
        arch = config.get("architecture", "")
        known = {name.split(".")[0]: v for v, name in (DINOV2_TIMM_NAMES | DINOV2_REG_TIMM_NAMES).items()}
        if arch not in known:
            raise ValueError(f"{location}/config.json: architecture {arch!r} is not a DINOv2 ({sorted(known)})")
        variant, model_args = known[arch], dict(config.get("model_args") or {})
        names = [n for n in ("model.safetensors", "pytorch_model.bin") if os.path.isfile(os.path.join(location, n))]
        if not names:
            raise ValueError(f"{location} holds no model.safetensors or pytorch_model.bin")
        path = os.path.join(location, names[0])
    # Built on the meta device and filled by assignment: ViT-L's random init alone takes ~10 s on 2 CPU cores.
    with torch.device("meta"):
        net = dinov2_model(variant, img_size, **model_args)
    state = dinov2_state(read_state_dict(path, f"dinov2_{variant}"), net.patch_embed.num_patches)
    load_exact(net, {k: v.float() for k, v in state.items()}, f"dinov2_{variant} weights {path}", assign=True)
    return net.eval()


class DINOv2Patches:
    """Images -> DINOv2 patch-token maps (N, D, S/14, S/14) and zero sigma, the feature stage's `dinov2` encoder."""

    def __init__(self, net: nn.Module, size: int = PATCH_SIZE) -> None:
        self.net, self.size = net.requires_grad_(False), size
        self.mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    @property
    def channels(self) -> int:
        return int(self.net.num_features)

    def encode(self, images_N3HW: Tensor) -> tuple[Tensor, Tensor]:
        """(mu, sigma), each (N, D, S/14, S/14) float32, from images (N, 3, H, W) in [0, 1]."""
        param = next(self.net.parameters())
        x_N3HW = images_N3HW.to(param.device, torch.float32)
        # TRELLIS resizes with PIL's Lanczos; antialiased bicubic is its tensor counterpart (a render is resized
        # up from 512 px, where both interpolate smoothly; down from larger renders the antialias matters).
        x_N3SS = F.interpolate(x_N3HW, size=(self.size, self.size), mode="bicubic", antialias=True,
                               align_corners=False).clamp(0, 1)
        x_N3SS = (x_N3SS - self.mean.to(x_N3SS.device)) / self.std.to(x_N3SS.device)
        with torch.inference_mode():
            # The last block's output without the final norm and the prefix (CLS, register) tokens: x_prenorm.
            (mu_NDnn,) = self.net.forward_intermediates(x_N3SS.to(param.dtype), indices=1, norm=False,
                                                        output_fmt="NCHW", intermediates_only=True)
        mu_NDnn = mu_NDnn.float()
        return mu_NDnn, torch.zeros_like(mu_NDnn)

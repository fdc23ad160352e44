"""Feature networks for FD, KD and the CLIP score, each built from its real class with random init and then loaded
from a LOCAL weights file (cluster nodes have no internet, and a hub download at evaluation time would make the
numbers depend on whatever the hub serves that day).

Every extractor is a `FeatureExtractor`: images in [0, 1] (B, 3, H, W) float -> features (B, F), with the
network's own resize and normalisation inside, frozen and always in eval mode, with `num_features` set (the
attribute torchmetrics' FID/KID read instead of running a dummy image through the network).

    inception_v3    torchvision Inception-v3 pool features (2048), 299 px bilinear, ImageNet normalisation
    dinov2_vitXX14  DINOv2 CLS token after the final norm (384 / 768 / 1024) via timm, 224 px bicubic, ImageNet
                    normalisation: the dgm-eval protocol (FD_DINOv2)
    clip            an open_clip image tower, L2-normalised embedding, the model's own preprocessing
                    (OpenAI ViT-L/14: shortest side to 224 bicubic, centre crop, OpenAI mean/std)

Resizing is antialiased throughout (torchvision's tensor resize): without it, downsampling 512 px renders aliases
and FD becomes sensitive to the resize filter (the clean-fid argument).

Shape suffixes: B images, H x W input pixels, S the network's input side, F features, D ViT width, m / n position
grid sides (release / ours), P = n * n patches, T = 1 + grid tokens.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flux3d.features.dinov2 import (  # noqa: F401 - dinov2_state: re-exported beside the model it fills
    DINOV2_TIMM_NAMES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    dinov2_model,
    dinov2_state,
    load_dinov2,
)
from flux3d.weights import load_exact, read_state_dict

logger = logging.getLogger(__name__)

EXTRACTORS = ("inception_v3", *(f"dinov2_{v}" for v in DINOV2_TIMM_NAMES), "clip")


class FeatureExtractor(nn.Module):
    """Resize + normalise + a frozen network: (B, 3, H, W) in [0, 1] -> (B, F)."""

    def __init__(self, net: nn.Module, *, name: str, num_features: int, size: int, interpolation: str,
                 mean: Sequence[float], std: Sequence[float], centre_crop: bool = False,
                 unit_norm: bool = False) -> None:
        """`centre_crop`: resize the shortest side to `size` and crop the centre square (CLIP); otherwise the image
        is resized to size x size regardless of aspect. `unit_norm` L2-normalises the output."""
        super().__init__()
        if interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f"interpolation must be 'bilinear' or 'bicubic', got {interpolation!r}")
        self.net, self.name, self.num_features, self.size = net, name, int(num_features), int(size)
        self.interpolation, self.centre_crop, self.unit_norm = interpolation, centre_crop, unit_norm
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FeatureExtractor:
        # Fixed statistics: Inception's batch norm must never switch to batch statistics under a parent's .train().
        return super().train(False)

    def preprocess(self, images_B3HW: Tensor) -> Tensor:
        """Resize and normalise, in float32 (torchvision's antialiased resize works in float32 anyway)."""
        import torchvision.transforms.v2.functional as TF

        if images_B3HW.ndim != 4 or images_B3HW.shape[1] != 3 or not images_B3HW.is_floating_point():
            raise ValueError(f"{self.name} wants float images (B, 3, H, W) in [0, 1], got {images_B3HW.dtype} "
                             f"{tuple(images_B3HW.shape)}")
        mode = TF.InterpolationMode.BICUBIC if self.interpolation == "bicubic" else TF.InterpolationMode.BILINEAR
        x_B3HW = images_B3HW.float()
        if self.centre_crop:
            x_B3SS = TF.center_crop(TF.resize(x_B3HW, [self.size], interpolation=mode, antialias=True),
                                    [self.size, self.size])
        else:
            x_B3SS = TF.resize(x_B3HW, [self.size, self.size], interpolation=mode, antialias=True)
        return (x_B3SS - self.mean) / self.std

    def forward(self, images_B3HW: Tensor) -> Tensor:
        x_B3SS = self.preprocess(images_B3HW)
        param = next(self.net.parameters(), None)
        feats_BF = self.net(x_B3SS if param is None else x_B3SS.to(param.dtype)).float()
        return F.normalize(feats_BF, dim=-1) if self.unit_norm else feats_BF


def _require(weights: str | None, allow_random: bool, what: str) -> None:
    if weights is None and not allow_random:
        raise ValueError(f"{what} needs a local weights file; pass allow_random=True for a random network "
                         f"(tests and the demo only: its features measure nothing)")
    if weights is None:
        # Asked for explicitly (tests, the demo); the evaluation report states it where the numbers are read.
        logger.info("%s with RANDOM weights (allow_random): metric values are meaningless", what)


def inception_v3(weights: str | None, *, allow_random: bool = False) -> FeatureExtractor:
    """torchvision Inception-v3 2048-d pool features from a local torchvision state dict (e.g.
    `inception_v3_google-0cc3c7bd.pth`); its `AuxLogits.*` and `fc.*` heads are dropped, every other key must match.

    torchvision's Inception weights are not the TF-ported "2015-12-05" graph that pytorch-fid and torch-fidelity
    use for FID, so absolute FD values here are comparable only across runs of this code, not with published FIDs.
    """
    from torchvision.models import inception_v3 as tv_inception_v3

    _require(weights, allow_random, "inception_v3")
    # transform_input=True is how torchvision runs its own weights: it maps ImageNet-normalised input back to the
    # (x - 0.5) / 0.5 scaling the Google checkpoint was trained with.
    net = tv_inception_v3(weights=None, aux_logits=False, transform_input=True, init_weights=False)
    net.fc = nn.Identity()
    if weights is not None:
        state = {k: v for k, v in read_state_dict(weights, "inception_v3").items()
                 if not k.startswith(("AuxLogits.", "fc."))}
        load_exact(net, state, f"inception_v3 weights {weights}")
    return FeatureExtractor(net, name="inception_v3", num_features=2048, size=299, interpolation="bilinear",
                            mean=IMAGENET_MEAN, std=IMAGENET_STD)


def dinov2(weights: str | None, variant: str = "vitl14", *, allow_random: bool = False) -> FeatureExtractor:
    """DINOv2 CLS features at 224 px (dgm-eval: bicubic resize to 224 x 224, ImageNet normalisation)."""
    _require(weights, allow_random, f"dinov2_{variant}")
    if variant not in DINOV2_TIMM_NAMES:
        raise ValueError(f"DINOv2 variant must be one of {sorted(DINOV2_TIMM_NAMES)}, got {variant!r}")
    if weights is None:
        net = dinov2_model(variant)
    else:
        if not os.path.isfile(weights):  # load_dinov2 also reads timm folders; FD takes one file, as documented
            raise ValueError(f"dinov2_{variant}: weights must be a local file, {weights!r} is not one (nothing is "
                             "downloaded)")
        net = load_dinov2(weights, variant, img_size=224)
    return FeatureExtractor(net, name=f"dinov2_{variant}", num_features=net.num_features, size=224,
                            interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD)


def dinov2_vitl14(weights: str | None, *, allow_random: bool = False) -> FeatureExtractor:
    """DINOv2 ViT-L/14, 1024-d CLS features: the FD_DINOv2 / KD_DINOv2 extractor of dgm-eval and EDM2."""
    return dinov2(weights, "vitl14", allow_random=allow_random)


def clip_image_encoder(model: str = "ViT-L-14-quickgelu", pretrained: str | None = None, *,
                       model_config: str | None = None, allow_random: bool = False) -> FeatureExtractor:
    """An open_clip image tower with weights from a local checkpoint, returning unit-norm embeddings.

    Args:
        model: open_clip architecture. OpenAI's ViT-L/14 was trained with QuickGELU, so its weights belong in
            "ViT-L-14-quickgelu" (plain "ViT-L-14" would load them silently and compute different embeddings;
            open_clip fixes this up only for its "openai" download tag).
        pretrained: a local open_clip checkpoint (e.g. open_clip_pytorch_model.bin of
            timm/vit_large_patch14_clip_224.openai). Tags such as "openai" would download and are refused.
        model_config: optional JSON registering a custom architecture named after the file (tests: a tiny ViT).
        allow_random: permit `pretrained=None`.
    """
    import open_clip

    if model.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(f"clip model {model!r}: name an open_clip architecture and pass a local checkpoint")
    _require(pretrained, allow_random, f"clip {model}")
    if pretrained is not None and not os.path.isfile(pretrained):
        raise ValueError(f"clip {model}: weights must be a local file, {pretrained!r} is not one (a tag such as "
                         f"'openai' would download)")
    if model_config:
        open_clip.add_model_config(model_config)
    if open_clip.get_model_config(model) is None:
        raise ValueError(f"unknown open_clip architecture {model!r} (register one with model_config)")
    try:
        clip = open_clip.create_model(model, pretrained=pretrained)
    except RuntimeError as err:  # open_clip's strict load: missing / unexpected / mis-shaped keys
        raise ValueError(f"clip {model} weights {pretrained}: {err}") from err
    visual = clip.visual
    cfg = visual.preprocess_cfg
    if cfg["resize_mode"] not in ("shortest", "squash"):
        raise ValueError(f"clip {model}: resize_mode {cfg['resize_mode']!r} is not supported")
    size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]
    num_features = getattr(visual, "output_dim", None)
    if num_features is None:  # timm-backed towers do not record it
        with torch.inference_mode():
            num_features = visual(torch.zeros(1, 3, size, size)).shape[-1]
    return FeatureExtractor(visual, name=f"clip_{model}", num_features=num_features, size=size,
                            interpolation=cfg["interpolation"], mean=cfg["mean"], std=cfg["std"],
                            centre_crop=cfg["resize_mode"] == "shortest", unit_norm=True)


def build_extractor(name: str, weights: str | None, *, device: torch.device | str | None = None,
                    allow_random: bool = False, **kw: str | None) -> FeatureExtractor:
    """One of `EXTRACTORS` by name, with its local weights file; `kw` goes to `clip_image_encoder`
    (`model`, `model_config`)."""
    if name not in EXTRACTORS:
        raise ValueError(f"unknown feature extractor {name!r}; choose from {EXTRACTORS}")
    if kw and name != "clip":
        raise ValueError(f"{name} takes no options, got {sorted(kw)}")
    if name == "inception_v3":
        ext = inception_v3(weights, allow_random=allow_random)
    elif name == "clip":
        ext = clip_image_encoder(pretrained=weights, allow_random=allow_random, **kw)  # type: ignore[arg-type]
    else:
        ext = dinov2(weights, name.removeprefix("dinov2_"), allow_random=allow_random)
    return ext.to(device) if device is not None else ext

"""LPIPS with the VGG-16 backbone (`net='vgg'`), the perceptual term TRELLIS trains its decoders with and the
LPIPS that 3DGS-style evaluation reports; shared by `training.losses` and `evaluation.metrics`.

The network is torchmetrics' port of richzhang/PerceptualSimilarity (`_LPIPS`), built so that nothing is
downloaded: `pretrained=True` loads the five linear heads from the package's own `lpips_models/vgg.pth`, and
`pnet_rand=True` leaves the VGG backbone random instead of fetching torchvision's ImageNet weights. The backbone is
then loaded from a local torchvision `vgg16` state dict (`vgg16-397923af.pth`, or any file holding the same
`features` tensors), so a cluster node without internet computes the same LPIPS as the lpips package.

`LpipsVgg` takes images in [0, 1] (B, 3, H, W) and returns per-image distances (B,). It stays frozen and in eval
mode even when a parent module calls `.train()` (the heads carry dropout layers), and it is differentiable with
respect to its inputs so the training loss can back-propagate through it.

The backbone file is read with the strict local-weights helpers of `flux3d.weights` (shared with the feature
stage's image encoders and the evaluation's feature extractors).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from flux3d.weights import load_exact, read_state_dict

logger = logging.getLogger(__name__)

# torchvision's vgg16 classifier. A full-model file carries it; LPIPS uses only `features`, so these keys (and only
# these) are dropped from such a file.
_VGG16_CLASSIFIER_KEYS = frozenset(f"classifier.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias"))


class LpipsVgg(nn.Module):
    """LPIPS-VGG distance: (B, 3, H, W) images in [0, 1] twice -> (B,), frozen, always in eval mode."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> LpipsVgg:
        # A parent's .train() would switch on the heads' dropout and make the loss and metric random.
        return super().train(False)

    def forward(self, pred_B3HW: Tensor, target_B3HW: Tensor) -> Tensor:
        if pred_B3HW.shape != target_B3HW.shape or pred_B3HW.ndim != 4 or pred_B3HW.shape[1] != 3:
            raise ValueError(f"LPIPS wants two (B, 3, H, W) batches of the same shape, got "
                             f"{tuple(pred_B3HW.shape)} and {tuple(target_B3HW.shape)}")
        # No range check: training feeds unclamped renders, and a check would sync the GPU every step.
        dist_B111 = self.net(2 * pred_B3HW - 1, 2 * target_B3HW - 1)
        return dist_B111.reshape(pred_B3HW.shape[0])

    def vgg_features(self) -> nn.Sequential:
        """The backbone's layers under torchvision's `vgg16().features` indices (0-29; LPIPS drops the last pool).

        torchmetrics splits `features` into five slices that keep the original child names, so re-joining them
        shares the same modules and its state dict keys are exactly torchvision's minus the `features.` prefix.
        """
        slices = [self.net.net.slice1, self.net.net.slice2, self.net.net.slice3, self.net.net.slice4,
                  self.net.net.slice5]
        return nn.Sequential(OrderedDict((name, layer) for s in slices for name, layer in s.named_children()))


def _vgg_feature_state(state: Mapping[str, Tensor], path: str) -> dict[str, Tensor]:
    """torchvision vgg16 keys -> `features` keys: a full-model file (features.N.* + classifier.*) or a features-only
    file (N.* or features.N.*). Any other key is left in, so `load_exact` reports it as unexpected."""
    if not any(k.startswith("features.") for k in state):
        return dict(state)
    out = {k.removeprefix("features."): v for k, v in state.items() if k not in _VGG16_CLASSIFIER_KEYS}
    stray = [k for k in state if not k.startswith("features.") and k not in _VGG16_CLASSIFIER_KEYS]
    if stray:
        raise ValueError(f"LPIPS VGG-16 backbone {path}: unexpected keys {sorted(stray)} beside the torchvision "
                         f"vgg16 features.* / classifier.* keys")
    return out


def load_lpips_vgg(backbone: str | None, *, device: torch.device | str | None = None,
                   allow_random: bool = False) -> LpipsVgg:
    """LPIPS-VGG with torchmetrics' shipped linear heads and the VGG-16 backbone from the local file `backbone`.

    Args:
        backbone: a torchvision `vgg16` state dict file (e.g. `vgg16-397923af.pth`), with the full model's keys or
            only the `features` part. None builds a random backbone, allowed only with `allow_random`.
        device: where the network lives (default CPU).
        allow_random: permit `backbone=None` (tests, the CPU demo); the distances are then not LPIPS.
    """
    from torchmetrics.functional.image.lpips import _LPIPS

    if backbone is None and not allow_random:
        raise ValueError("LPIPS needs a local VGG-16 backbone file; pass allow_random=True to use a random "
                         "backbone (its distances are not comparable to published LPIPS)")
    # use_dropout=True only to match the shipped heads' keys (lin*.model.1.weight): with False, torchmetrics'
    # non-strict load would silently skip them. Dropout itself is inert because the module never leaves eval mode.
    lpips = LpipsVgg(_LPIPS(pretrained=True, net="vgg", pnet_rand=True, use_dropout=True))
    if backbone is None:
        # Asked for explicitly (allow_random: tests, the demo); recorded in the run's config and evaluation report.
        logger.info("LPIPS-VGG with a RANDOM backbone (allow_random): values are not comparable to LPIPS")
    else:
        state = _vgg_feature_state(read_state_dict(backbone, "LPIPS VGG-16 backbone"), backbone)
        load_exact(lpips.vgg_features(), state, f"LPIPS VGG-16 backbone {backbone}")
    return lpips.to(device) if device is not None else lpips

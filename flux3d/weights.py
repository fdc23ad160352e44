"""Strict local-weights helpers shared by every room that loads a pretrained network from a file: the image
encoders of the feature stage (`features/`), the LPIPS backbone (`training/perceptual.py`) and the evaluation's
feature extractors (`evaluation/extractors.py`). Cluster nodes have no internet, so a weights argument is a local
file, and a file that does not fit the network fails loudly instead of leaving layers random.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import Tensor, nn


def read_state_dict(path: str, what: str) -> dict[str, Tensor]:
    """A flat {name: tensor} state dict from a local file (.safetensors, or a torch pickle read with
    weights_only=True so an untrusted file cannot run code). `what` names the weights in error messages."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        # Checked here rather than left to torch.load so a hub tag or URL fails with the reason, not a pickle error.
        raise ValueError(f"{what}: weights must be a local file, {path!r} is not one (nothing is downloaded)")
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{what}: {path} does not hold a flat state dict of tensors (a training checkpoint with "
                         f"nested 'model'/'state_dict' entries must be unpacked first)")
    return dict(state)


def load_exact(module: nn.Module, state: Mapping[str, Tensor], what: str, *, assign: bool = False) -> None:
    """Load `state` into `module`, every key and shape accounted for; ValueError naming the offending keys.
    `assign` adopts the tensors themselves (for a module built on the meta device)."""
    try:
        incompatible = module.load_state_dict(state, strict=False, assign=assign)
    except RuntimeError as err:  # shape mismatches raise even with strict=False
        raise ValueError(f"{what}: {err}") from err
    missing, unexpected = sorted(incompatible.missing_keys), sorted(incompatible.unexpected_keys)
    if missing or unexpected:
        raise ValueError(f"{what}: state dict does not match the network: missing keys {missing}, "
                         f"unexpected keys {unexpected}")

"""Checkpoints in a run directory (local disk or any fsspec URL):

    <run>/checkpoints/step_0000100/model.safetensors   weights (fp32), what `load_model` and evaluation read
                                   ema.safetensors     EMA weights (when optim.ema_decay > 0)
                                   state.pt            optimiser + scheduler state, data-loader position
                                   meta.json           step, config, metrics - written LAST: a checkpoint without
                                                       it is incomplete and ignored

Resume is exact without saving random-number-generator states: every random draw of a step comes from a generator
seeded by (seed, rank, step) and the loader's choices are functions of (seed, epoch, asset), so the data position
(epoch, batches consumed in it) and the optimiser state are all a resumed run needs.

Weights are safetensors (no pickle: a checkpoint from elsewhere cannot run code); `state.pt` holds only tensors
and plain containers and is loaded with weights_only=True.
"""

from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from flux3d.config.training import TrainConfig, from_dict
from flux3d.models.decoder import GaussianDecoder
from flux3d.models.smdit import SMDiT
from flux3d.storage import Storage

log = logging.getLogger(__name__)

_STEP = re.compile(r"^step_(\d{7})$")


@dataclass
class Checkpoint:
    step: int
    rel: str
    """Folder relative to the run directory."""
    meta: dict[str, Any]


def step_rel(step: int) -> str:
    return f"checkpoints/step_{step:07d}"


def list_checkpoints(run: Storage) -> list[Checkpoint]:
    """Complete checkpoints (meta.json present), oldest first."""
    out = []
    for path in run.list("checkpoints"):
        m = _STEP.match(posixpath.basename(path.rstrip("/")))
        if m and run.exists(f"{step_rel(int(m.group(1)))}/meta.json"):
            rel = step_rel(int(m.group(1)))
            out.append(Checkpoint(int(m.group(1)), rel, json.loads(run.read_bytes(f"{rel}/meta.json"))))
    return sorted(out, key=lambda c: c.step)


def latest(run: Storage) -> Checkpoint | None:
    found = list_checkpoints(run)
    return found[-1] if found else None


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage; weights are saved as independent fp32 copies.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def save(run: Storage, step: int, *, model: dict[str, torch.Tensor], ema: dict[str, torch.Tensor] | None,
         state: dict[str, Any], meta: dict[str, Any], keep: int) -> Checkpoint:
    """Write one checkpoint (rank 0 only) and drop all but the newest `keep` complete ones."""
    rel = step_rel(step)
    work = tempfile.mkdtemp(prefix="flux3d-ckpt-")
    try:
        with open(os.path.join(work, "model.safetensors"), "wb") as f:
            f.write(st_save(_contiguous(model)))
        if ema is not None:
            with open(os.path.join(work, "ema.safetensors"), "wb") as f:
                f.write(st_save(_contiguous(ema)))
        buf = io.BytesIO()
        torch.save(state, buf)
        with open(os.path.join(work, "state.pt"), "wb") as f:
            f.write(buf.getvalue())
        meta = {**meta, "step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        with open(os.path.join(work, "meta.json"), "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
        # Local: one folder rename. Object store: files uploaded in place, meta.json last (the completion marker).
        run.publish_dir(work, rel, last="meta.json")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for old in list_checkpoints(run)[:-keep]:
        run.fs.rm(run.path(old.rel), recursive=True)
    return Checkpoint(step, rel, meta)


def load_weights(run: Storage, ckpt: Checkpoint, which: str = "model") -> dict[str, torch.Tensor]:
    """`which` = model | ema; the EMA falls back to nothing: asking for a missing EMA is an error."""
    name = f"{ckpt.rel}/{which}.safetensors"
    if not run.exists(name):
        raise ValueError(f"{run.path(name)} does not exist (was the run trained with optim.ema_decay = 0?)")
    return st_load(run.read_bytes(name))


def load_state(run: Storage, ckpt: Checkpoint) -> dict[str, Any]:
    return torch.load(io.BytesIO(run.read_bytes(f"{ckpt.rel}/state.pt")), map_location="cpu", weights_only=True)


def resolve(path: str) -> tuple[Storage, Checkpoint]:
    """A run directory (its newest checkpoint) or one checkpoint folder -> (run storage, checkpoint)."""
    stripped = path.rstrip("/")
    m = _STEP.match(posixpath.basename(stripped))
    if m:
        run = Storage(posixpath.dirname(posixpath.dirname(stripped)))
        rel = step_rel(int(m.group(1)))
        if not run.exists(f"{rel}/meta.json"):
            raise ValueError(f"{path} is not a complete checkpoint (no meta.json)")
        return run, Checkpoint(int(m.group(1)), rel, json.loads(run.read_bytes(f"{rel}/meta.json")))
    run = Storage(stripped)
    ckpt = latest(run)
    if ckpt is None:
        raise ValueError(f"no complete checkpoint under {path}/checkpoints")
    return run, ckpt


def load_model(path: str, which: str = "ema", device: str | torch.device = "cpu") -> tuple[nn.Module, TrainConfig]:
    """A trained model from a run directory (its newest checkpoint) or a checkpoint folder. `which` = ema (the
    weights to evaluate, when the run kept an EMA) | model (the raw weights)."""
    if which not in ("ema", "model"):
        raise ValueError(f"which must be ema or model, got {which!r}")
    run, ckpt = resolve(path)
    cfg: TrainConfig = from_dict(TrainConfig, ckpt.meta["config"])
    model: nn.Module = GaussianDecoder(cfg.decoder) if cfg.kind == "decoder" else SMDiT(cfg.smdit)
    model.load_state_dict(load_weights(run, ckpt, "model"))
    if which == "ema" and cfg.optim.ema_decay > 0:
        missing, unexpected = model.load_state_dict(load_weights(run, ckpt, "ema"), strict=False)
        assert not unexpected, unexpected  # the EMA holds the trainable parameters; buffers come from `model`
    return model.eval().to(device), cfg

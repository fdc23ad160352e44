"""Checkpoints in a run directory (local disk or any fsspec URL), written with torch.distributed.checkpoint (DCP):

    <run>/checkpoints/step_0000100/dcp/.metadata        DCP's index: every tensor's global shape and its chunks
                                   dcp/__<rank>_0.distcp  each rank's own shards: model, ema, optim (fp32)
                                   state.json           scheduler state and every rank's data-stream position
                                   meta.json            step, config, metrics - written LAST: a checkpoint without
                                                        it is incomplete and ignored

Why DCP: under FSDP2 every rank saves only the parameter, EMA and Adam shards it holds, in parallel, and loads only
the chunks its new shards need, so no rank ever holds a whole-model copy (the old layout gathered weights, EMA and
optimiser into rank 0's memory and every rank read the whole optimiser back). DCP also reshards on load, which is
what lets a run resume on another world size. Writes go through `FsspecWriter` when the run root is a URL
(s3://, gs://, memory://) and DCP's local `FileSystemWriter` otherwise.

Completeness: on local disk the step folder is written under a temporary name and renamed into place after
meta.json (one rename: readers see all or nothing); on an object store, where a prefix cannot be renamed, the
files go straight into place and meta.json is uploaded last. A folder without meta.json is never listed.

One reader: the previous `model.safetensors` export is gone, because writing it under FSDP2 needs the whole-model
gather DCP exists to avoid. Evaluation, generation and the SMDiT's decoder all load through `load_model`, which
reads just the `model.` or `ema.` entries of the DCP checkpoint into a plain single-process model (DCP's reader
needs no process group). Checkpoints of the old layout are refused with a message rather than read.

Resume is exact without saving random-number-generator states: every random draw of a step comes from a generator
seeded by (seed, rank, step) and the loader's choices are functions of (seed, epoch, asset), so the data position
(epoch, batches consumed in it, per rank) and the optimiser state are all a resumed run needs.

Another world size: DCP reshards weights, EMA and AdamW moments to the new ranks exactly, and the step and the
schedule are kept; the data streams cannot continue (each is seeded by its rank and the worker count), so every
rank restarts at the start of rank 0's saved epoch, with a warning (`trainer._position`; docs/training.md).
"""

from __future__ import annotations

import contextlib
import json
import logging
import posixpath
import re
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from flux3d.config.training import TrainConfig, from_dict
from flux3d.models.decoder import GaussianDecoder
from flux3d.models.smdit import SMDiT
from flux3d.models.structure import StructureVAE
from flux3d.storage import TMP_MARK, Storage

log = logging.getLogger(__name__)

_STEP = re.compile(r"^step_(\d{7})$")
DCP_DIR = "dcp"


@dataclass
class Checkpoint:
    step: int
    rel: str
    """Folder relative to the run directory."""
    meta: dict[str, Any]


def step_rel(step: int) -> str:
    return f"checkpoints/step_{step:07d}"


def _work_rel(run: Storage, step: int) -> str:
    # Local disk: the folder every rank writes into before the rename. A fixed name (not a random one) so that
    # all ranks agree on it without a broadcast; `begin` clears what a killed save left there.
    return f"checkpoints/{TMP_MARK}step_{step:07d}" if run.local else step_rel(step)


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


def _url(run: Storage, rel: str) -> str:
    return run.path(rel) if run.local else run.fs.unstrip_protocol(run.path(rel))


def _writer(run: Storage, rel: str) -> dcp.StorageWriter:
    if run.local:
        return dcp.FileSystemWriter(run.path(rel))
    from torch.distributed.checkpoint import FsspecWriter

    # An object store has no fsync (an upload is durable when it completes); asking only draws a warning per file.
    return FsspecWriter(_url(run, rel), sync_files=False)


def _reader(run: Storage, rel: str) -> dcp.StorageReader:
    if run.local:
        return dcp.FileSystemReader(run.path(rel))
    from torch.distributed.checkpoint import FsspecReader

    return FsspecReader(_url(run, rel))


@contextlib.contextmanager
def _single_process_ok() -> Iterator[None]:
    # DCP warns on every call without a process group; one process (local runs, load_model) is intended here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def begin(run: Storage, step: int) -> None:
    """Rank 0, before every rank saves: clear a half-written folder of this step (a re-save after a failed worker
    group restarted) and, on local disk, any temporary step folder a killed save left (one run saves one step at
    a time, so none of them is in flight). Callers barrier after it."""
    stale = {step_rel(step), _work_rel(run, step)}
    if run.local and run.exists("checkpoints"):
        stale |= {f"checkpoints/{posixpath.basename(p.rstrip('/'))}" for p in run.fs.ls(run.path("checkpoints"))
                  if posixpath.basename(p.rstrip("/")).startswith(f"{TMP_MARK}step_")}
    for rel in stale:
        if run.exists(rel):
            run.fs.rm(run.path(rel), recursive=True)


def save_shards(run: Storage, step: int, state: dict[str, Any]) -> None:
    """Every rank: write its shards of `state` ({"model", "ema", "optim"}: sharded DTensors under FSDP2, plain
    tensors otherwise). DCP deduplicates replicated tensors (DDP), so each is written once across ranks."""
    with _single_process_ok():
        dcp.save(state, storage_writer=_writer(run, f"{_work_rel(run, step)}/{DCP_DIR}"))


def finish(run: Storage, step: int, *, train_state: dict[str, Any], meta: dict[str, Any], keep: int) -> Checkpoint:
    """Rank 0, after every rank's `save_shards` returned: the small JSON files, meta.json last, then publish and
    drop all but the newest `keep` complete checkpoints."""
    work, rel = _work_rel(run, step), step_rel(step)
    run.write_bytes(f"{work}/state.json", json.dumps(train_state, sort_keys=True).encode())
    meta = {**meta, "step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    run.write_bytes(f"{work}/meta.json", json.dumps(meta, indent=2, sort_keys=True).encode())
    if work != rel:
        run.fs.mv(run.path(work), run.path(rel), recursive=True)  # local disk: one rename of the folder
    for old in list_checkpoints(run)[:-keep]:
        run.fs.rm(run.path(old.rel), recursive=True)
    return Checkpoint(step, rel, meta)


def load_shards(run: Storage, ckpt: Checkpoint, state: dict[str, Any]) -> None:
    """Every rank: fill `state` in place (same structure as saved, possibly a subset, shaped for this world size:
    DCP reads only the chunks that overlap this rank's shards)."""
    if not run.exists(f"{ckpt.rel}/{DCP_DIR}/.metadata"):
        raise ValueError(f"{run.path(ckpt.rel)} holds no {DCP_DIR}/ checkpoint (written before checkpoints moved "
                         "to torch.distributed.checkpoint?)")
    with _single_process_ok():
        dcp.load(state, storage_reader=_reader(run, f"{ckpt.rel}/{DCP_DIR}"))


def load_train_state(run: Storage, ckpt: Checkpoint) -> dict[str, Any]:
    return json.loads(run.read_bytes(f"{ckpt.rel}/state.json"))


def names_checkpoint(path: str) -> bool:
    """Whether `path` names one checkpoint folder (step_XXXXXXX), not a run directory."""
    return _STEP.match(posixpath.basename(path.rstrip("/"))) is not None


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


def decodes_latent(smdit_cfg: TrainConfig, decoder_path: str) -> bool:
    """Whether the SMDiT's samples are `decoder_path`'s own latent (the Enc-Dec variant, `flow.latents`) rather
    than FLUX features. An SMDiT trained on another decoder's latent is refused: its samples mean nothing there."""
    if not smdit_cfg.flow.latents:
        return False
    (mine, at), (given, given_at) = resolve(smdit_cfg.flow.latents), resolve(decoder_path)
    if mine.url != given.url or at.step != given_at.step:
        raise ValueError(f"the SMDiT diffuses the latent of {mine.path(at.rel)}; decode its samples with that "
                         f"decoder, not {given.path(given_at.rel)}")
    return True


def load_frozen(path: str, device: str | torch.device, is_kind: Callable[[TrainConfig], bool],
                what: str) -> tuple[nn.Module, TrainConfig, Storage, Checkpoint]:
    """The EMA model of a run whose latent another run diffuses (`flow.latents`), frozen. Refused when it is not
    `what` (`is_kind` false) or has not finished, since its latent space still moves until then, unless `path`
    names one checkpoint folder."""
    run, ckpt = resolve(path)
    model, cfg = load_model(run.path(ckpt.rel), device=device)
    model.requires_grad_(False)
    if not is_kind(cfg):
        raise ValueError(f"flow.latents = {path} is not {what}")
    if not names_checkpoint(path) and ckpt.step < cfg.run.steps:
        raise ValueError(f"{run.url} is at step {ckpt.step} of {cfg.run.steps}: its latent space still moves "
                         "until it finishes (name one checkpoint folder to train on it anyway)")
    return model, cfg, run, ckpt


def load_structure(path: str, device: str | torch.device = "cpu") -> tuple[nn.Module, nn.Module, TrainConfig]:
    """Stage 1 from a structure_flow run (or checkpoint): the flow model, the structure VAE whose latent it
    diffuses (the run its `flow.latents` names) and the flow's config."""
    flow, cfg = load_model(path, device=device)
    if cfg.kind != "structure_flow":
        raise ValueError(f"{path} is a {cfg.kind} run, not a structure_flow run")
    vae, vcfg = load_model(cfg.flow.latents, device=device)
    if vcfg.kind != "structure_vae":
        raise ValueError(f"{cfg.flow.latents} (the latent of {path}) is a {vcfg.kind} run, not a structure_vae run")
    return flow, vae, cfg


def build_model(cfg: TrainConfig) -> nn.Module:
    """A fresh model of a run's kind (both flow models are SMDiTs: the structure flow over its latent's grid)."""
    if cfg.kind == "decoder":
        return GaussianDecoder(cfg.decoder)
    return StructureVAE(cfg.structure) if cfg.kind == "structure_vae" else SMDiT(cfg.smdit)


def load_model(path: str, which: str = "ema", device: str | torch.device = "cpu") -> tuple[nn.Module, TrainConfig]:
    """A trained model from a run directory (its newest checkpoint) or a checkpoint folder, on one process. `which`
    = ema (the weights to evaluate, when the run kept an EMA) | model (the raw weights)."""
    if which not in ("ema", "model"):
        raise ValueError(f"which must be ema or model, got {which!r}")
    run, ckpt = resolve(path)
    cfg: TrainConfig = from_dict(TrainConfig, ckpt.meta["config"])
    model = build_model(cfg)
    weights = model.state_dict()
    state: dict[str, Any] = {"model": weights}
    if which == "ema" and cfg.optim.ema_decay > 0:
        # The EMA holds the trainable parameters; buffers (and frozen weights) come from `model`.
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        state["ema"] = {n: torch.empty_like(t) for n, t in weights.items() if n in trainable}
    load_shards(run, ckpt, state)
    weights.update(state.get("ema", {}))
    model.load_state_dict(weights)
    return model.eval().to(device), cfg

"""Resuming on another world size (the rule in checkpoint.py and docs/training.md): two Ray Train CPU workers under
FSDP2 save a sharded DCP checkpoint, one worker resumes from it. Kept to the bit: weights, AdamW moments and step
counts, EMA, the optimiser step and the lr schedule. Restarted: the data stream, at rank 0's saved epoch, with a
warning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flux3d.config.recipes import train_recipe as recipe
from flux3d.config.training import apply_overrides
from flux3d.storage import Storage
from flux3d.training import checkpoint as ckpt_io
from flux3d.training.decoder_step import DecoderStep
from flux3d.training.telemetry import read_metrics
from flux3d.training.trainer import build, fit, lr_factor, restore


@pytest.mark.integration
def test_two_fsdp_workers_then_one(synthetic_shards, tmp_path, monkeypatch, caplog):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    ds = synthetic_shards(2, views=8, resolution=32, voxels=16, supervision_views=8, cond_views=2,
                          cond_resolution=32)
    out = tmp_path / "run"
    cfg = apply_overrides(recipe("decoder", "debug"), {
        "data.shards": ds.version_dir, "run.out": str(out), "run.log_every": 1, "run.image_every": 0,
        "decoder.gaussians.resolution": 16, "data.batch_size": 1, "run.steps": 2, "run.ckpt_every": 2,
        "optim.warmup_steps": 1, "optim.decay": "cosine", "scale.num_workers": 2, "scale.fsdp": True})
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    try:
        fit(cfg)
    finally:
        ray.shutdown()
    run = Storage(str(out))
    found = ckpt_io.latest(run)
    step_dir = out / found.rel
    # Each rank wrote its own shards: FSDP2 split the block weights in two chunks (DDP would save one per tensor),
    # and no whole-model file exists.
    assert sorted(p.name for p in (step_dir / "dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    from torch.distributed.checkpoint import FileSystemReader

    index = FileSystemReader(str(step_dir / "dcp")).read_metadata().state_dict_metadata
    chunks = {k: len(v.chunks) for k, v in index.items()
              if k.startswith(("model.blocks.", "ema.blocks.")) or (k.startswith("optim.state.") and "exp_avg" in k)}
    assert chunks and set(chunks.values()) == {2}, chunks
    assert not list(step_dir.glob("*.safetensors"))
    positions = json.loads((step_dir / "state.json").read_text())["positions"]
    assert len(positions) == 2

    # What the two ranks saved, consolidated by DCP's own offline converter: the reference for "kept".
    dcp_to_torch_save(str(step_dir / "dcp"), str(tmp_path / "whole.pt"))
    saved = torch.load(tmp_path / "whole.pt", weights_only=False)

    # The inference reader (one process, no process group) puts the two ranks' shards back together.
    plain, _ = ckpt_io.load_model(str(step_dir), which="model")
    for name, t in plain.state_dict().items():
        assert torch.equal(t, saved["model"][name]), name

    one = apply_overrides(cfg, {"scale.num_workers": 1, "scale.fsdp": False, "run.steps": 3})
    model, optim, sched, ema = build(one, DecoderStep(one, torch.device("cpu")), torch.device("cpu"), 1)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level("WARNING", logger="flux3d.training.trainer"):
        step, epoch, skip = restore(run, found, one, model, optim, sched, ema, 0, 1)
    assert (step, epoch, skip) == (2, positions[0][0], 0)  # the stream restarts at rank 0's epoch
    assert "resuming on 1 worker(s) a run saved on 2" in caplog.text
    weights = model.state_dict()
    assert any(not torch.equal(weights[k], fresh[k]) for k in fresh)  # trained weights, not the initial ones
    for name, t in weights.items():
        assert torch.equal(t, saved["model"][name]), name
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for name, p in zip(names, (p for p in model.parameters() if p.requires_grad), strict=True):
        state, ref = optim.state[p], saved["optim"]["state"][name]
        assert torch.equal(state["exp_avg"], ref["exp_avg"]) and torch.equal(state["exp_avg_sq"], ref["exp_avg_sq"])
        assert float(state["step"]) == 2.0
    assert any(optim.state[p]["exp_avg"].abs().sum() > 0 for p in model.parameters())
    for name, shadow in zip(ema.names, ema.shadow, strict=True):
        assert torch.equal(shadow, saved["ema"][name]), name
    assert sched.last_epoch == 2 and optim.param_groups[0]["lr"] == one.optim.lr * lr_factor(2, one)

    # And the one-worker run goes on from step 3 in the same run directory.
    fit(one, local=True)
    assert [m["step"] for m in read_metrics(str(out))] == [1, 2, 3]
    assert [c.step for c in ckpt_io.list_checkpoints(run)] == [2, 3]

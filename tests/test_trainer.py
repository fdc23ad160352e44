"""The trainer's contracts, on a tiny synthetic dataset version written by the project's shard builder (no Blender,
no ../shared): exact resume, checkpoint retention and completeness, config round trips, bad input."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from flux3d.config.recipes import train_recipe as recipe
from flux3d.config.training import TrainConfig, apply_overrides, from_dict
from flux3d.storage import Storage
from flux3d.training import checkpoint as ckpt_io
from flux3d.training.checkpoint import load_model
from flux3d.training.telemetry import read_metrics
from flux3d.training.trainer import fit, lr_factor


@pytest.fixture(scope="module")
def demo_ds(synthetic_shards):
    return synthetic_shards(2, views=8, resolution=32, voxels=16, supervision_views=8, cond_views=2,
                            cond_resolution=32)


def _cfg(kind: str, ds, out: Path, **sets) -> TrainConfig:
    base = {"data.shards": ds.version_dir, "run.out": str(out), "run.log_every": 1, "run.image_every": 0,
            "data.batch_size": 2, "scale.deterministic": True}
    if kind == "smdit":
        base |= {"flow.encoder": ds.encoder, "flow.encoder_location": ds.encoder_location,
                 "flow.cond_resolution": 32, "smdit.grid": 16}
    else:
        base |= {"decoder.gaussians.resolution": 16}
    return apply_overrides(recipe(kind, "debug"), {**base, **sets})


def _largest_asset(ds) -> int:
    import pyarrow.parquet as pq

    return max(pq.read_table(f"{ds.version_dir}/index.parquet", columns=["num_voxels"])["num_voxels"].to_pylist())


@pytest.mark.parametrize("kind,extra", [
    ("decoder", {}), ("smdit", {}),
    # One asset per batch: two batches per epoch, so the resume seeks into the middle of an epoch.
    ("decoder", {"data.batch_size": 1}),
    # Two batches per optimiser step, each packed to a token budget one asset fills, and a decaying schedule.
    ("decoder", {"optim.grad_accum": 2, "data.token_budget": "largest", "optim.decay": "cosine",
                 "optim.warmup_steps": 2}),
])
def test_resume_equals_an_uninterrupted_run(demo_ds, tmp_path, kind, extra):
    """6 steps straight vs 3 steps, stop, then resume to 6: the same loss at every step and the same weights, to
    the bit (scale.deterministic)."""
    extra = {k: _largest_asset(demo_ds) if v == "largest" else v for k, v in extra.items()}
    straight = _cfg(kind, demo_ds, tmp_path / "straight", **{"run.steps": 6, "run.ckpt_every": 3, **extra})
    fit(straight, local=True)
    halves = _cfg(kind, demo_ds, tmp_path / "halves", **{"run.steps": 3, "run.ckpt_every": 3, **extra})
    fit(halves, local=True)
    assert [c.step for c in ckpt_io.list_checkpoints(Storage(str(tmp_path / "halves")))] == [3]
    fit(apply_overrides(halves, {"run.steps": 6}), local=True)
    a = [(m["step"], m["loss"]) for m in read_metrics(str(tmp_path / "straight"))]
    b = [(m["step"], m["loss"]) for m in read_metrics(str(tmp_path / "halves"))]
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 7))
    assert [v for _, v in a] == [v for _, v in b]  # deterministic algorithms: equal to the bit
    ma, _ = load_model(str(tmp_path / "straight"), which="model")
    mb, _ = load_model(str(tmp_path / "halves"), which="model")
    for (name, pa), pb in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.equal(pa, pb), name
    # The losses moved: a resume that silently restarted from scratch could not match a curve that changes.
    assert len({round(v, 6) for _, v in a}) > 1
    if extra:  # and every step ran at its scheduled lr
        metrics = read_metrics(str(tmp_path / "straight"))
        assert [m["lr"] for m in metrics] == pytest.approx(
            [straight.optim.lr * lr_factor(s, straight) for s in range(1, 7)])


def test_the_smdit_conditions_with_the_features_encoder_unless_told(demo_ds, tmp_path):
    """flow.encoder left empty: the encoder stats.json names (the one that made the voxel features), recorded in
    the run's config so generation and evaluation encode images the same way."""
    import json

    stats = json.loads(Path(demo_ds.version_dir, "stats.json").read_text())
    assert stats["encoder"] == demo_ds.encoder
    fit(_cfg("smdit", demo_ds, tmp_path / "run", **{"flow.encoder": "", "run.steps": 1}), local=True)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["flow"]["encoder"] == demo_ds.encoder


def test_lr_schedule_warms_up_then_decays_to_its_floor():
    cfg = apply_overrides(recipe("decoder", "debug"), {"optim.warmup_steps": 10, "run.steps": 110,
                                                       "optim.final_lr": 0.1})
    for decay in ("constant", "cosine", "linear"):
        c = apply_overrides(cfg, {"optim.decay": decay})
        f = [lr_factor(s, c) for s in range(110)]
        assert f[:10] == pytest.approx([(s + 1) / 10 for s in range(10)]) and f[10] == 1.0
        assert all(a >= b for a, b in zip(f[10:], f[11:]))  # never rises after warm-up
        assert f[-1] == (1.0 if decay == "constant" else pytest.approx(0.1, abs=0.01))
    assert lr_factor(60, apply_overrides(cfg, {"optim.decay": "cosine"})) == pytest.approx(0.55)  # half-way
    assert lr_factor(60, apply_overrides(cfg, {"optim.decay": "linear"})) == pytest.approx(0.55)


def test_an_asset_over_the_voxel_cap_is_left_out_with_its_reason(demo_ds):
    """shard.max_voxels: a larger asset is a SampleError (run_shard records it failed:over_voxel_cap); no cap
    leaves the dataset version's name as it was before the field existed."""
    import dataclasses
    import hashlib

    from flux3d.config.pipeline import section_params
    from flux3d.features.encode import encode_params
    from flux3d.shards.build import SHARD_FORMAT, SampleError, dataset_version, make_item

    cfg, storage = demo_ds.cfg, Storage(demo_ds.cfg.storage.root)
    sha = sorted(p.name for p in (demo_ds.root / "data" / "renders").iterdir())[0]
    row = {"sha256": sha, "features_path": storage.path(f"features/{demo_ds.encoder}/{sha}.npz"),
           "render_dir": storage.path(f"renders/{sha}"), "source": "synthetic", "file_identifier": sha,
           "license": "CC0-1.0", "attribution": "", "metadata": None}
    n = make_item(row, cfg, storage, "v").row["num_voxels"]
    capped = dataclasses.replace(cfg, shard=dataclasses.replace(cfg.shard, max_voxels=n - 1))
    with pytest.raises(SampleError) as caught:
        make_item(row, capped, storage, "v")
    assert caught.value.reason == "over_voxel_cap" and f"{n} active voxels" in str(caught.value)
    at_cap = dataclasses.replace(cfg, shard=dataclasses.replace(cfg.shard, max_voxels=n))
    assert make_item(row, at_cap, storage, "v").row["num_voxels"] == n
    shard = section_params(cfg.shard)
    del shard["max_voxels"]
    before = hashlib.sha256(json.dumps({"format": SHARD_FORMAT, "shard": shard, "encode": encode_params(cfg)},
                                       sort_keys=True).encode())
    before.update(sha.encode())
    assert dataset_version(cfg, [sha]) == before.hexdigest()[:16] != dataset_version(capped, [sha])


def test_checkpoints_are_complete_or_absent_and_pruned(demo_ds, tmp_path):
    cfg = _cfg("decoder", demo_ds, tmp_path / "run", **{"run.steps": 4, "run.ckpt_every": 1,
                                                         "run.keep_checkpoints": 2})
    fit(cfg, local=True)
    run = Storage(str(tmp_path / "run"))
    assert [c.step for c in ckpt_io.list_checkpoints(run)] == [3, 4]
    # A folder without meta.json (a writer killed mid-checkpoint) is not a checkpoint: resume ignores it.
    (tmp_path / "run" / "checkpoints" / "step_0000009").mkdir()
    (tmp_path / "run" / "checkpoints" / "step_0000009" / "model.safetensors").write_bytes(b"partial")
    assert ckpt_io.latest(run).step == 4
    # Nor is a save killed before its rename (local disk writes the step under a temporary name, meta.json included).
    tmp = tmp_path / "run" / "checkpoints" / ".tmp-step_0000010"
    (tmp / "dcp").mkdir(parents=True)
    (tmp / "meta.json").write_text((tmp_path / "run" / "checkpoints" / "step_0000004" / "meta.json").read_text())
    assert ckpt_io.latest(run).step == 4
    ckpt_io.begin(run, 5)  # the next save clears what the killed one left
    assert not tmp.exists() and (tmp_path / "run" / "checkpoints" / "step_0000004").is_dir()
    saved = from_dict(TrainConfig, json.loads((tmp_path / "run" / "config.json").read_text()))
    assert saved == cfg
    model, loaded_cfg = load_model(str(tmp_path / "run"))
    assert loaded_cfg == cfg and not model.training


def test_bad_configs_are_refused(demo_ds, tmp_path):
    with pytest.raises(ValueError, match="no field"):
        apply_overrides(recipe("decoder", "debug"), ["optim.learning_rate=1"])
    with pytest.raises(ValueError, match="lpips_backbone"):
        fit(_cfg("decoder", demo_ds, tmp_path / "l", **{"loss.lpips": 0.2}), local=True)
    with pytest.raises(ValueError, match="data.shards"):
        fit(recipe("decoder", "debug"), local=True)
    with pytest.raises(ValueError, match="resolution"):
        fit(_cfg("decoder", demo_ds, tmp_path / "r", **{"decoder.gaussians.resolution": 64}), local=True)


@pytest.mark.parametrize("kind,sets", [
    ("smdit", {"smdit.arch": "dit", "smdit.double_blocks": 2, "smdit.single_blocks": 0}),  # TRELLIS-like DiT
    ("smdit", {"smdit.position": "ape"}),  # w/o MARoPE: absolute embeddings
    ("decoder", {"decoder.latent_channels": 8}),  # the encoder-decoder ablation (KL bottleneck)
    ("decoder", {"decoder.position": "rope", "decoder.window": 0, "decoder.qk_norm": True}),
])
def test_ablation_switches_train(demo_ds, tmp_path, kind, sets):
    """Every ablation of the paper's tables trains through the same trainer: finite losses that move, weights that
    change, and (encoder-decoder) a KL term in the loss."""
    cfg = _cfg(kind, demo_ds, tmp_path / "run", **{"run.steps": 4, "run.ckpt_every": 4, **sets})
    torch.manual_seed(cfg.run.seed)
    fit(cfg, local=True)
    metrics = read_metrics(str(tmp_path / "run"))
    assert all(np.isfinite(m["loss"]) for m in metrics) and len({m["loss"] for m in metrics}) > 1
    if sets.get("decoder.latent_channels"):
        assert all(m["kl"] > 0 for m in metrics)
    model, loaded = load_model(str(tmp_path / "run"), which="model")
    assert loaded == cfg
    assert model.out.weight.abs().sum() > 0  # the zero-initialised output layer has learned


@pytest.mark.integration
def test_generate_writes_gaussians_on_the_given_layout(demo_ds, tmp_path):
    """`flux3d generate` from a conditioning image and a voxel layout: a 3DGS .ply whose Gaussians sit in exactly
    the layout's voxels (K per voxel, within the parameterisation's +-0.75 voxel), and a turntable image."""
    import subprocess
    import sys

    from PIL import Image

    from flux3d.models.gaussians import PLY_PROPERTIES, load_ply

    for kind in ("decoder", "smdit"):
        fit(_cfg(kind, demo_ds, tmp_path / kind, **{"run.steps": 2, "run.ckpt_every": 2}), local=True)
    layout = next((demo_ds.root / "data" / "voxels").glob("*.npy"))
    sha = layout.stem
    image = next((demo_ds.root / "data" / "renders" / sha).glob("cond*/000.png"))
    args = [sys.executable, "-m", "flux3d.cli", "generate", "--image", str(image), "--layout", str(layout),
            "--smdit", str(tmp_path / "smdit"), "--decoder", str(tmp_path / "decoder"), "--out",
            str(tmp_path / "asset.ply"), "--turntable", str(tmp_path / "turntable.png"), "--steps", "4"]
    old_umask = os.umask(0o022)  # the child inherits it: outputs must honour it (0644), not a temp file's 0600
    try:
        p = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)
    finally:
        os.umask(old_umask)
    assert p.returncode == 0, p.stderr[-3000:]
    assert stat.S_IMODE((tmp_path / "asset.ply").stat().st_mode) == 0o644
    coords = np.load(layout)
    g = load_ply(tmp_path / "asset.ply")
    K = recipe("decoder", "debug").decoder.gaussians.per_voxel
    assert len(g) == len(coords) * K
    grid = 16  # the demo dataset's voxel resolution
    centres = (torch.from_numpy(coords).float() + 0.5) / grid - 0.5
    offset = (g.means.view(len(coords), K, 3) - centres[:, None]) * grid  # in voxels
    assert offset.abs().max() <= 0.75 + 1e-4
    # The file itself is in the 3DGS (y-down) frame viewers expect: its positions are those voxel centres under
    # (x, y, z) -> (x, -z, y); load_ply above turned them back.
    header, body = (tmp_path / "asset.ply").read_bytes().split(b"end_header\n", 1)
    raw = np.frombuffer(body, dtype=np.dtype([(n, "<f4") for n in PLY_PROPERTIES]))
    file_xyz = torch.from_numpy(np.stack([raw["x"], raw["y"], raw["z"]], -1).astype(np.float32))
    in_file_frame = torch.stack([centres[:, 0], -centres[:, 2], centres[:, 1]], -1)
    assert ((file_xyz.view(len(coords), K, 3) - in_file_frame[:, None]) * grid).abs().max() <= 0.75 + 1e-4
    assert b"comment frame: 3DGS/COLMAP y-down" in header
    assert Image.open(tmp_path / "turntable.png").size == (8 * 256, 256)
    swapped = [str(tmp_path / "decoder") if a == str(tmp_path / "smdit") else a for a in args]  # --smdit: a decoder
    bad = subprocess.run(swapped, capture_output=True, text=True, timeout=300, check=False)
    assert bad.returncode != 0 and "is a decoder run" in bad.stderr


def test_tensorboard_gets_scalars_and_render_grids(demo_ds, tmp_path):
    """Both models log their scalars and, every `run.image_every` steps, a render-vs-target grid (the SMDiT's
    through the decoder run it names) to TensorBoard. Before that decoder has a checkpoint (the train flow runs
    both at once) the SMDiT trains on without grids."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    early = fit(_cfg("smdit", demo_ds, tmp_path / "early", **{"run.steps": 2, "run.image_every": 1,
                                                             "run.decoder_run": str(tmp_path / "decoder")}), local=True)
    events = EventAccumulator(str(tmp_path / "early" / "tensorboard"))
    events.Reload()
    assert early["step"] == 2 and not events.Tags()["images"] and "loss" in events.Tags()["scalars"]
    fit(_cfg("decoder", demo_ds, tmp_path / "decoder", **{"run.steps": 2, "run.image_every": 2}), local=True)
    fit(_cfg("smdit", demo_ds, tmp_path / "smdit", **{"run.steps": 2, "run.image_every": 2,
                                                      "run.decoder_run": str(tmp_path / "decoder")}), local=True)
    for kind in ("decoder", "smdit"):
        events = EventAccumulator(str(tmp_path / kind / "tensorboard"))
        events.Reload()
        tags = events.Tags()
        assert {"loss", "samples_per_s", "grad_norm"} <= set(tags["scalars"]), (kind, tags)
        (image,) = events.Images("render_vs_target")
        # Targets above renders: two rows of 32 px views (make_grid pads by 2), one column per asset shown.
        assert image.step == 2 and image.height == 2 * 32 + 3 * 2
        assert image.width == (2 if kind == "decoder" else 1) * 34 + 2


def test_run_directory_on_an_object_store(demo_ds):
    """run.out on an fsspec store (memory://): checkpoints, config.json and metrics.jsonl land there, and a second
    fit with more steps resumes from the stored checkpoint instead of starting over."""
    import fsspec

    out = "memory://flux3d-tests/run"
    cfg = _cfg("decoder", demo_ds, Path("unused"), **{"run.out": out, "run.steps": 2, "run.ckpt_every": 2})
    fit(cfg, local=True)
    fs = fsspec.filesystem("memory")
    assert fs.exists("/flux3d-tests/run/checkpoints/step_0000002/meta.json")
    fit(apply_overrides(cfg, {"run.steps": 4}), local=True)
    steps = [m["step"] for m in read_metrics(out)]
    assert steps == [1, 2, 3, 4]  # resumed at 3, not retrained from 1
    assert [c.step for c in ckpt_io.list_checkpoints(Storage(out))] == [2, 4]
    model, loaded = load_model(out)
    assert loaded.run.steps == 4 and sum(p.numel() for p in model.parameters()) > 0
    fs.rm("/flux3d-tests", recursive=True)


def test_resume_position_per_rank_and_on_another_world_size(caplog):
    """Each rank resumes at its own saved place in its stream; on another world size the streams restart at the
    beginning of rank 0's epoch (the documented rule: model, optimiser and step are kept, the data order is not)."""
    from flux3d.training.trainer import _position

    state = {"epoch": 4, "batches": 7, "positions": [[4, 7], [3, 9]]}
    assert [_position(state, r, 2) for r in (0, 1)] == [(4, 7), (3, 9)]
    with caplog.at_level("WARNING", logger="flux3d.training.trainer"):
        assert _position(state, 0, 1) == (4, 0)
    assert "data order restarts at epoch 4" in caplog.text
    assert _position({"epoch": 2, "batches": 5}, 1, 2) == (2, 5)  # saved before per-rank positions

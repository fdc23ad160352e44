"""The DA-SLAT decoder learns a real asset: the debug recipe, trained through the real trainer on a dataset the real
pipeline made (Blender renders, TAEF1 latents, webdataset shards), renders views it never trained on.

Numbers (measured on a 2-core machine, Avocado at 32^3 voxels, 64 px, 16 training views of 24, 8 held out): the
held-out PSNR of the untrained decoder (its initial Gaussians) is 19.1 dB and of a black image 14.8 dB; after 400
steps (about 30 s) it is 28.6 dB, and 28.5 dB with two Ray Train workers. The test asks for > 25 dB and > 6 dB over
both baselines.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flux3d.shards.format import over_background
from flux3d.training.config import apply_overrides
from flux3d.training.decoder import GaussianDecoder
from flux3d.training.inference import load_model
from flux3d.training.rasterizer import rasterize
from flux3d.training.recipes import recipe
from flux3d.training.telemetry import read_metrics
from flux3d.training.trainer import fit
from tests.datasets import SHARED, build_dataset, render_frames

pytestmark = pytest.mark.integration
AVOCADO = SHARED / "assets" / "good" / "Avocado.glb"
STEPS = 400


@pytest.fixture(scope="module")
def avocado(tmp_path_factory):
    if not AVOCADO.is_file() or not (SHARED / "weights" / "taef1_encoder.safetensors").is_file():
        pytest.skip("needs ../shared/assets and the TAEF1 weights")
    return build_dataset(tmp_path_factory.mktemp("avocado"), [AVOCADO], views=24, resolution=64, voxels=32,
                         supervision_views=16)


def held_out(ds) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The render views the shards did not keep: K, w2c and images over black."""
    from flux3d.stages.render import spread

    (frames,) = render_frames(ds).values()
    kept = set(spread(len(frames), ds.cfg.shard.supervision_views))
    rest = [f for i, f in enumerate(frames) if i not in kept]
    K = torch.tensor([f["K"] for f in rest], dtype=torch.float32)
    w2c = torch.tensor([f["w2c"] for f in rest], dtype=torch.float32)
    images = [torch.from_numpy(over_background(np.asarray(Image.open(f["path"]).convert("RGBA")), 0.0))
              for f in rest]
    return K, w2c, torch.stack(images), rest


def psnr(model: GaussianDecoder, ds, views) -> float:
    from flux3d.training.sparse import SparseBatch

    K, w2c, target, _ = views
    path = next((ds.root / "data" / "features").rglob("*.npz"))
    with np.load(path) as f:
        batch = SparseBatch.from_list([f["coords"]], [f["mu"].astype(np.float32)])
    with torch.no_grad():
        out = model(batch.feats, batch.coords, batch.offsets)
        (g,) = model.to_gaussians(out.raw, batch.coords, batch.offsets)
        pred = rasterize(g, w2c, K, 64, 64, background=torch.zeros(3)).rgb.permute(0, 3, 1, 2).clamp(0, 1)
    mse = ((pred - target) ** 2).flatten(1).mean(1)
    return float((-10 * torch.log10(mse)).mean())


def _cfg(ds, out: Path, **sets):
    base = {"data.shards": ds.version_dir, "run.out": str(out), "run.steps": STEPS, "run.image_every": 0,
            "run.log_every": 10,
            "decoder.gaussians.resolution": 32}
    return apply_overrides(recipe("decoder", "debug"), {**base, **sets})


def test_debug_decoder_overfits_one_real_asset(avocado, tmp_path):
    views = held_out(avocado)
    cfg = _cfg(avocado, tmp_path / "run")
    torch.manual_seed(cfg.run.seed)
    untrained = psnr(GaussianDecoder(cfg.decoder).eval(), avocado, views)
    black = float((-10 * torch.log10((views[2] ** 2).flatten(1).mean(1))).mean())
    result = fit(cfg, local=True)
    model, _ = load_model(str(tmp_path / "run"))
    trained = psnr(model, avocado, views)
    print(f"held-out PSNR: untrained {untrained:.2f} dB, black {black:.2f} dB, trained {trained:.2f} dB")
    assert result["step"] == STEPS
    assert trained > 25.0 and trained > untrained + 6 and trained > black + 6
    losses = [m["loss"] for m in read_metrics(str(tmp_path / "run"))]
    assert np.mean(losses[-5:]) < 0.6 * losses[0]  # measured: 0.077 over the first 10 steps, ~0.03 at the end
    events = list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert events, "TensorBoard scalars were not written"


def test_two_ray_train_workers_learn_the_same_asset(avocado, tmp_path, monkeypatch):
    """DDP over two Ray Train CPU workers (each its own process and loader stream): the same quality bar."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    import ray

    cfg = _cfg(avocado, tmp_path / "run2", **{"scale.num_workers": 2})
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        result = fit(cfg)
    finally:
        ray.shutdown()
    model, _ = load_model(str(tmp_path / "run2"))
    trained = psnr(model, avocado, held_out(avocado))
    print(f"2 workers: held-out PSNR {trained:.2f} dB")
    assert result["step"] == STEPS and trained > 24.0
    meta = json.loads(next((tmp_path / "run2" / "checkpoints").glob("step_*/meta.json")).read_text())
    assert meta["config"]["scale"]["num_workers"] == 2

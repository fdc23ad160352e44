"""The DA-SLAT decoder learns a real asset: the debug recipe, trained through the real trainer on a dataset the real
pipeline made (Blender renders, TAEF1 latents, webdataset shards), renders views it never trained on.

Numbers (measured on a 2-core machine, Avocado at 32^3 voxels, 64 px, 16 training views of 24, 8 held out): the
held-out PSNR of the untrained decoder (its initial Gaussians) is 19.1 dB and of a black image 14.8 dB; after 400
steps (about 30 s) it is 28.6 dB, and 28.5 dB with two Ray Train workers. The test asks for > 25 dB and > 6 dB over
both baselines. A tiny config of the same class (no data) checks the Gaussians' placement and asset isolation.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flux3d.config.recipes import train_recipe as recipe
from flux3d.config.training import apply_overrides
from flux3d.features.vae import over_background
from flux3d.models.configs import DecoderConfig
from flux3d.models.decoder import GaussianDecoder
from flux3d.models.rasterizer import rasterize
from flux3d.training.checkpoint import load_model
from flux3d.training.telemetry import read_metrics
from flux3d.training.trainer import fit
from tests.conftest import SHARED
from tests.datasets import build_dataset, render_frames

AVOCADO = SHARED / "assets" / "good" / "Avocado.glb"
STEPS = 400


TINY = dict(width=32, depth=2, heads=2, window=4)  # tester config: the real class at 2 layers, 2 heads of width 16


@pytest.mark.parametrize("sets", [{}, {"position": "rope", "window": 0, "qk_norm": True}, {"latent_channels": 8}])
def test_tiny_decoder_keeps_gaussians_in_their_voxels_and_assets_apart(sets):
    """Every voxel gets K Gaussians within +-offset_range/2 voxels of its centre, and one asset's latents do not
    change another's Gaussians (attention stays within an asset), for the decoder and its ablations."""
    import dataclasses

    from flux3d.models.sparse import SparseBatch

    base = DecoderConfig()
    cfg = DecoderConfig(**{**TINY, **sets}, gaussians=dataclasses.replace(base.gaussians, resolution=16, per_voxel=4))
    torch.manual_seed(0)
    model = GaussianDecoder(cfg).eval()
    for p in model.parameters():  # the output layer starts at zero: perturb so every path carries signal
        p.data.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(0)
    flat = [torch.randperm(16 ** 3, generator=g)[:n] for n in (29, 11)]
    xyz = [torch.stack([c // 256, (c // 16) % 16, c % 16], 1) for c in flat]
    b = SparseBatch.from_list(xyz, [torch.randn(len(c), 16, generator=g) for c in xyz])
    with torch.no_grad():
        out = model(b.feats, b.coords, b.offsets)
        feats2 = b.feats.clone()
        feats2[b.offsets[1]:] += 1
        out2 = model(feats2, b.coords, b.offsets)
        gaussians = model.to_gaussians(out.raw, b.coords, b.offsets)
    n0, K = int(b.offsets[1]), cfg.gaussians.per_voxel
    torch.testing.assert_close(out.raw[:n0], out2.raw[:n0])
    assert not torch.allclose(out.raw[n0:], out2.raw[n0:])
    for gs, c in zip(gaussians, xyz):
        centres = (c.float() + 0.5) / 16 - 0.5
        offset = (gs.means.view(len(c), K, 3) - centres[:, None]) * 16
        assert len(gs) == len(c) * K and offset.abs().max() <= cfg.gaussians.offset_range / 2 + 1e-4
        assert offset.std() > 0.05  # the Gaussians are spread over the voxel, not stacked at its centre


def test_training_input_is_mu_plus_sigma_noise_on_a_vae_with_sigma(synthetic_shards, tmp_path_factory):
    """Sec. 4.3's mu + sigma * eps, on features from a tiny FLUX-shaped AutoencoderKL (sigma > 0; TAEF1 has none):
    the shards carry sigma, and the decoder's training input is exactly mu + sigma * eps for its generator."""
    import dataclasses

    from flux3d.demo import make_demo_models
    from flux3d.training.data import make_dataset, shard_urls

    encode = make_demo_models(str(tmp_path_factory.mktemp("vae")))["encode"]
    ds = synthetic_shards(2, views=4, resolution=32, voxels=16, supervision_views=4, cond_views=1, cond_resolution=32,
                          encode=encode)
    (batch,) = make_dataset(shard_urls(ds.version_dir, "train"), batch_size=2, cond=False)
    v = batch.voxels
    assert batch.sigma is not None and float((batch.sigma > 0).float().mean()) > 0.9
    base = DecoderConfig()
    cfg = DecoderConfig(**TINY, train_noise=True,
                        gaussians=dataclasses.replace(base.gaussians, resolution=16, per_voxel=4))
    torch.manual_seed(0)
    model = GaussianDecoder(cfg)
    for p in model.parameters():  # the output layer starts at zero: perturb so every path carries signal
        p.data.add_(0.05 * torch.randn_like(p))
    with torch.no_grad():
        noisy = model(v.feats, v.coords, v.offsets, sigma_MC=batch.sigma, generator=torch.Generator().manual_seed(3))
        eps = torch.randn(v.feats.shape, generator=torch.Generator().manual_seed(3))
        by_hand = model(v.feats + batch.sigma * eps, v.coords, v.offsets)
        clean = model(v.feats, v.coords, v.offsets)
    torch.testing.assert_close(noisy.raw, by_hand.raw)
    assert not torch.allclose(noisy.raw, clean.raw, atol=1e-4)


def _avocado(tmp_path_factory, voxels: int):
    if not AVOCADO.is_file() or not (SHARED / "weights" / "taef1_encoder.safetensors").is_file():
        pytest.skip("needs ../shared/assets and the TAEF1 weights")
    return build_dataset(tmp_path_factory.mktemp(f"avocado{voxels}"), [AVOCADO], views=24, resolution=64,
                         voxels=voxels, supervision_views=16)


@pytest.fixture(scope="module")
def avocado(tmp_path_factory):
    return _avocado(tmp_path_factory, 32)


@pytest.fixture(scope="module")
def avocado16(tmp_path_factory):
    """The same asset at 16^3: a quarter of the voxels, for the two-worker test (two processes on two cores)."""
    return _avocado(tmp_path_factory, 16)


def held_out(ds) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The render views the shards did not keep: K, w2c and images over black."""
    from flux3d.stages.render_layout import spread

    (frames,) = render_frames(ds).values()
    kept = set(spread(len(frames), ds.cfg.shard.supervision_views))
    rest = [f for i, f in enumerate(frames) if i not in kept]
    K = torch.tensor([f["K"] for f in rest], dtype=torch.float32)
    w2c = torch.tensor([f["w2c"] for f in rest], dtype=torch.float32)
    images = [torch.from_numpy(over_background(np.asarray(Image.open(f["path"]).convert("RGBA")), 0.0))
              for f in rest]
    return K, w2c, torch.stack(images), rest


def psnr(model: GaussianDecoder, ds, views) -> float:
    from flux3d.models.sparse import SparseBatch

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


@pytest.mark.integration
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


@pytest.mark.integration
@pytest.mark.timeout(900)  # 46 s alone; several times that in CI beside the flow runs' Ray instances and Blender
def test_two_ray_train_workers_learn_the_same_asset(avocado16, tmp_path, monkeypatch):
    """DDP over two Ray Train CPU workers (each its own process and loader stream) reach the quality bar on the
    asset at 16^3 (measured 26.8 dB after 200 steps, 46 s alone; 27.9 dB after 400)."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    import ray

    # Half the steps: each step trains on both workers' batches, twice the samples of a one-worker step.
    cfg = _cfg(avocado16, tmp_path / "run2", **{"scale.num_workers": 2, "decoder.gaussians.resolution": 16,
                                                 "run.steps": STEPS // 2})
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        result = fit(cfg)
    finally:
        ray.shutdown()
    model, _ = load_model(str(tmp_path / "run2"))
    trained = psnr(model, avocado16, held_out(avocado16))
    print(f"2 workers: held-out PSNR {trained:.2f} dB")
    assert result["step"] == STEPS // 2 and trained > 24.0
    meta = json.loads(next((tmp_path / "run2" / "checkpoints").glob("step_*/meta.json")).read_text())
    assert meta["config"]["scale"]["num_workers"] == 2

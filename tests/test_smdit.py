"""SMDiT + flow matching: the model and its ablations at tiny sizes, the paper sizes by parameter count, and the debug
recipe overfitting a handful of real assets the pipeline made, sampled back through the Euler/CFG sampler and
rendered through the debug decoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flux3d.config.recipes import train_recipe as recipe
from flux3d.config.training import apply_overrides
from flux3d.models.configs import DecoderConfig, SMDiTConfig
from flux3d.models.decoder import GaussianDecoder
from flux3d.models.flow_matching import SamplerConfig, normalize, sample
from flux3d.models.rasterizer import rasterize
from flux3d.models.smdit import SMDiT
from flux3d.models.sparse import SparseBatch
from flux3d.training.checkpoint import load_model
from flux3d.training.telemetry import read_metrics
from flux3d.training.trainer import fit
from tests.conftest import SHARED, TAEF1
from tests.datasets import build_dataset

GOOD = SHARED / "assets" / "good"


def _random_batch(sizes=(37, 5), channels=16, grid=16, seed=0) -> SparseBatch:
    g = torch.Generator().manual_seed(seed)
    coords = [torch.randperm(grid ** 3, generator=g)[:n] for n in sizes]
    xyz = [torch.stack([c // grid ** 2, (c // grid) % grid, c % grid], 1) for c in coords]
    return SparseBatch.from_list(xyz, [torch.randn(n, channels, generator=g) for n in sizes])


def _perturbed(cfg: SMDiTConfig) -> SMDiT:
    """A seeded SMDiT whose weights are perturbed: adaLN-Zero starts as identity, so every path carries signal."""
    torch.manual_seed(0)
    model = SMDiT(cfg)
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("arch,position", [("smdit", "marope"), ("smdit", "ape"), ("dit", "marope"), ("dit", "ape")])
def test_output_lies_on_the_input_layout_and_assets_do_not_mix(arch, position):
    cfg = SMDiTConfig(width=32, heads=2, double_blocks=2 if arch == "dit" else 1,
                      single_blocks=0 if arch == "dit" else 1, grid=16, arch=arch, position=position)
    model = _perturbed(cfg)
    b = _random_batch()
    cond = torch.randn(2, 16, 4, 4)
    t = torch.tensor([0.3, 0.7])
    v = model(b.feats, b.coords, b.offsets, t, cond)
    assert v.shape == b.feats.shape
    # Changing asset 1's voxels, image or time leaves asset 0's velocity unchanged.
    feats2 = b.feats.clone()
    feats2[b.offsets[1]:] += 1
    cond2 = cond.clone()
    cond2[1] += 1
    v2 = model(feats2, b.coords, b.offsets, torch.tensor([0.3, 0.1]), cond2)
    n0 = int(b.offsets[1])
    torch.testing.assert_close(v[:n0], v2[:n0])
    assert not torch.allclose(v[n0:], v2[n0:])
    # ... and asset 0's own image does change it (the conditioning is used).
    cond3 = cond.clone()
    cond3[0] += 1
    assert not torch.allclose(model(b.feats, b.coords, b.offsets, t, cond3)[:n0], v[:n0])


@pytest.mark.parametrize("arch,position", [("smdit", "marope"), ("smdit", "ape"), ("dit", "marope"), ("dit", "ape")])
def test_shuffling_the_image_patches_changes_the_output(arch, position):
    """Every variant places image patches (MARoPE's plane or APE), so the same patches in another order are another
    image. A model blind to patch positions (cross-attention with bare keys) gives the same output."""
    cfg = SMDiTConfig(width=32, heads=2, double_blocks=2, single_blocks=0, grid=16, arch=arch, position=position)
    model = _perturbed(cfg)
    b = _random_batch()
    cond = torch.randn(2, 16, 8, 8)
    patches = cond.unfold(2, 2, 2).unfold(3, 2, 2).reshape(2, 16, 16, 2, 2)  # (B, C, 4x4 patches, 2, 2)
    shuffled = patches[:, :, torch.randperm(16, generator=torch.Generator().manual_seed(1))]
    shuffled = shuffled.reshape(2, 16, 4, 4, 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(2, 16, 8, 8)
    assert sorted(shuffled.flatten().tolist()) == sorted(cond.flatten().tolist())  # the same values, moved
    t = torch.tensor([0.3, 0.7])
    with torch.no_grad():
        v, v_shuffled = (model(b.feats, b.coords, b.offsets, t, c) for c in (cond, shuffled))
    assert (v - v_shuffled).abs().max() > 1e-3 * v.abs().max()


def test_null_condition_replaces_the_image():
    torch.manual_seed(0)
    model = SMDiT(SMDiTConfig(width=32, heads=2, double_blocks=1, single_blocks=1, grid=16))
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    b = _random_batch()
    t = torch.tensor([0.5, 0.5])
    drop = torch.tensor([True, True])
    a = model(b.feats, b.coords, b.offsets, t, torch.randn(2, 16, 4, 4), drop)
    c = model(b.feats, b.coords, b.offsets, t, torch.randn(2, 16, 4, 4), drop)
    torch.testing.assert_close(a, c)  # a dropped condition is the learned null, whatever image was given


def test_paper_parameter_counts_match_the_paper():
    with torch.device("meta"):
        smdit = SMDiT(SMDiTConfig())
        decoder = GaussianDecoder(DecoderConfig())
    n_smdit = sum(p.numel() for p in smdit.parameters())
    n_decoder = sum(p.numel() for p in decoder.parameters())
    print(f"paper SMDiT {n_smdit / 1e6:.1f} M parameters (paper: 820 M); decoder {n_decoder / 1e6:.1f} M (85 M)")
    assert abs(n_smdit / 820e6 - 1) < 0.05 and abs(n_decoder / 85e6 - 1) < 0.05


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    names = ["Avocado.glb", "BoxTextured.glb", "Suzanne.glb"]
    if not all((GOOD / n).is_file() for n in names) or not TAEF1.is_file():
        pytest.skip("needs ../shared/assets and the TAEF1 weights")
    return build_dataset(tmp_path_factory.mktemp("three"), [GOOD / n for n in names], views=16, resolution=64,
                         voxels=16, supervision_views=16, cond_views=1, cond_resolution=64)


@pytest.mark.integration
@pytest.mark.timeout(900)  # two whole debug trainings and sampling: ~2 min, several times that on a loaded machine
def test_debug_smdit_overfits_a_handful_of_real_assets(assets, tmp_path):
    """Train the debug decoder and the debug SMDiT on three real assets; then, from each asset's conditioning image,
    the sampler must reproduce that asset's latents, and the decoder must render them close to the ground truth.

    Measured (2 cores, 3 assets at 16^3 voxels, 64 px; ~2 minutes): loss 1.46 -> 0.30; sampled vs true latents
    cosine 0.91-0.96; renders of the sampled latents are 24-32 dB from the decoder's renders of the true latents, and
    against the ground-truth view within 1.9 dB of what the true latents give (the debug decoder itself is the
    limit there: 16-24 dB on these assets). At 32^3 (3x the time): cosine 0.90-0.94, within 1.1 dB. Fewer steps
    (200 decoder + 400 SMDiT) passed on one stream of backgrounds (cosine 0.87) and failed on another (0.72): the
    recipes' 400 + 600 are what the bars need.
    """
    from flux3d.features.vae import ConditionEncoder
    from flux3d.training.data import make_dataset, shard_urls

    base = {"data.shards": assets.version_dir, "run.image_every": 0}
    decoder_cfg = apply_overrides(recipe("decoder", "debug"), {**base, "run.out": str(tmp_path / "decoder"),
                                                               "decoder.gaussians.resolution": 16})
    fit(decoder_cfg, local=True)
    smdit_cfg = apply_overrides(recipe("smdit", "debug"), {
        **base, "run.out": str(tmp_path / "smdit"), "smdit.grid": 16, "data.batch_size": 3,
        "flow.encoder": assets.encoder, "flow.encoder_location": assets.encoder_location})
    fit(smdit_cfg, local=True)
    losses = [m["loss"] for m in read_metrics(str(tmp_path / "smdit"))]
    print(f"SMDiT loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert np.mean(losses[-3:]) < 0.45 < losses[0]

    smdit, cfg = load_model(str(tmp_path / "smdit"))
    decoder, _ = load_model(str(tmp_path / "decoder"))
    batch = next(iter(make_dataset(shard_urls(assets.version_dir, "train"), batch_size=3, shuffle_buffer=1,
                                   background="black", seed=3)))
    v = batch.voxels
    cond = ConditionEncoder(cfg.flow.encoder, cfg.flow.encoder_location, cfg.flow.cond_resolution,
                            torch.device("cpu"))(batch.cond)
    z = sample(smdit, v.coords, v.offsets, cond, SamplerConfig(steps=25, guidance=3.0),
               torch.Generator().manual_seed(0))
    zn, truth = normalize(smdit, z), normalize(smdit, v.feats)
    bounds = v.offsets.tolist()
    for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        cos = torch.nn.functional.cosine_similarity(zn[s:e].flatten(), truth[s:e].flatten(), dim=0)
        # Conditioning picks the asset: a sample is nearer its own latents than any other asset's (same layout
        # only for itself, so compare per-channel means, which differ between assets).
        own = (zn[s:e].mean(0) - truth[s:e].mean(0)).norm()
        others = [(zn[s:e].mean(0) - truth[a:b].mean(0)).norm()
                  for j, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])) if j != i]
        with torch.no_grad():
            out_s = decoder(z[s:e], v.coords[s:e], torch.tensor([0, e - s]))
            out_t = decoder(v.feats[s:e], v.coords[s:e], torch.tensor([0, e - s]))
            (g_s,), (g_t,) = (decoder.to_gaussians(o.raw, v.coords[s:e], torch.tensor([0, e - s]))
                              for o in (out_s, out_t))
            K, w2c = batch.K[i], batch.w2c[i]
            sampled = rasterize(g_s, w2c, K, 64, 64, background=torch.zeros(3)).rgb.clamp(0, 1)
            decoded = rasterize(g_t, w2c, K, 64, 64, background=torch.zeros(3)).rgb.clamp(0, 1)
        target = batch.images[i].permute(0, 2, 3, 1)

        def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
            return float(-10 * torch.log10(((a - b) ** 2).mean()))

        print(f"asset {batch.keys[i][:8]}: cosine {cos:.3f}, own {own:.3f} vs others {min(others):.3f}; render "
              f"{psnr(sampled, target):.1f} dB vs ground truth ({psnr(decoded, target):.1f} dB from true latents), "
              f"{psnr(sampled, decoded):.1f} dB vs the true latents' render")
        assert cos > 0.8 and own < min(others)
        assert psnr(sampled, decoded) > 21.0 and psnr(sampled, target) > psnr(decoded, target) - 2.5

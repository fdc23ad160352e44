"""Evaluation metrics against independent references: PSNR / SSIM from their formulas in float64 numpy, FD / KD
against numpy formulas and torchmetrics' FID / KID objects, LPIPS-VGG against torchmetrics' shipped heads and
local backbone files, CLIP against open_clip's own preprocessing, and the Inception / DINOv2 loaders by round trips
of full-size random networks through local files (ViT-L/14 only on the meta device: its CPU forward is too slow).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flux3d.evaluation import metrics as M
from flux3d.evaluation.extractors import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_extractor,
    clip_image_encoder,
    dinov2,
    dinov2_model,
    dinov2_state,
    dinov2_vitl14,
    inception_v3,
)
from flux3d.training.perceptual import load_exact, load_lpips_vgg

TINY_CLIP = Path(__file__).resolve().parent / "fixtures" / "tiny_clip.json"


def smooth_images(n: int, size: int = 32, seed: int = 0, lo: float = 0.0, hi: float = 1.0,
                  cell: int = 4) -> torch.Tensor:
    """Natural-ish images: noise on a grid of `cell`-pixel cells upsampled bilinearly, in [lo, hi]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, max(size // cell, 2), max(size // cell, 2), generator=g)
    return lo + (hi - lo) * F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def imagenet_normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


# ---------------------------------------------------------------- PSNR / SSIM


def test_psnr_per_image_matches_analytic_values():
    target = torch.full((3, 3, 16, 16), 0.5)
    pred = target + torch.tensor([0.1, 0.01, 0.0]).view(3, 1, 1, 1)  # MSE 1e-2, 1e-4, 0
    out = M.psnr(pred, target)
    assert out.shape == (3,)
    assert out[0].item() == pytest.approx(20.0, abs=1e-4) and out[1].item() == pytest.approx(40.0, abs=1e-3)
    assert math.isinf(out[2].item()) and out[2] > 0
    noisy = (target + 0.05 * torch.randn(target.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    mse = ((noisy.double() - target.double()) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(M.psnr(noisy, target).double(), -10 * torch.log10(mse), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        M.psnr(target + 0.6, target)


def ssim_reference(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """SSIM (Wang et al. 2004) in float64: 11 x 11 Gaussian window (sigma 1.5), K1 0.01, K2 0.03, L = 1, local
    statistics of the 5 px reflect-padded image (torchmetrics' border rule), averaged over pixels and channels."""
    ax = np.arange(11) - 5.0
    g = np.exp(-ax ** 2 / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2

    def filt(a: np.ndarray) -> np.ndarray:  # (B, C, H, W) -> (B, C, H - 10, W - 10)
        a = np.pad(a, ((0, 0), (0, 0), (5, 5), (5, 5)), mode="reflect")
        return np.einsum("bchwij,ij->bchw", np.lib.stride_tricks.sliding_window_view(a, (11, 11), axis=(2, 3)), w)

    mx, my = filt(x), filt(y)
    vx, vy, cxy = filt(x * x) - mx ** 2, filt(y * y) - my ** 2, filt(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.mean(axis=(1, 2, 3))


def test_ssim_matches_float64_formula():
    x = smooth_images(3, 40, seed=1)
    y = (x + 0.08 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))).clamp(0, 1)
    out = M.ssim(x, y)
    assert out.shape == (3,)
    np.testing.assert_allclose(out.double().numpy(), ssim_reference(x.double().numpy(), y.double().numpy()),
                               atol=1e-4, rtol=0)


def test_ssim_identical_is_one_and_falls_with_shift():
    x = smooth_images(2, 48, seed=3, cell=12)
    torch.testing.assert_close(M.ssim(x, x), torch.ones(2), atol=1e-6, rtol=0)
    scores = [M.ssim(torch.roll(x, shifts=s, dims=3), x).mean().item() for s in (1, 2, 3, 5)]
    assert all(a > b for a, b in zip(scores, scores[1:])), scores
    assert scores[0] < 1.0


# ---------------------------------------------------------------- LPIPS-VGG


@pytest.fixture(scope="module")
def vgg_files(tmp_path_factory) -> dict[str, Path]:
    """Two different random VGG-16 backbones: a features-only file and one in the full-model key format."""
    import torchvision

    root = tmp_path_factory.mktemp("vgg")
    torch.manual_seed(0)
    features = torchvision.models.vgg16(weights=None).features.state_dict()
    torch.save(features, root / "features.pth")
    g = torch.Generator().manual_seed(1)
    full = {f"features.{k}": v + 0.5 * v.std() * torch.randn(v.shape, generator=g) for k, v in features.items()}
    # torchvision's classifier keys with their real shapes; stride-0 views keep the file small.
    for i, shape in ((0, (4096, 25088)), (3, (4096, 4096)), (6, (1000, 4096))):
        full[f"classifier.{i}.weight"] = torch.zeros(1).expand(shape)
        full[f"classifier.{i}.bias"] = torch.zeros(1).expand(shape[0])
    torch.save(full, root / "full.pth")
    return {"features": root / "features.pth", "full": root / "full.pth"}


@pytest.fixture(scope="module")
def lpips_a(vgg_files):
    return load_lpips_vgg(str(vgg_files["features"]))


def test_lpips_zero_symmetric_and_grows_with_noise(lpips_a):
    x = smooth_images(3, 64, seed=4)
    torch.testing.assert_close(M.lpips(x, x, lpips_a), torch.zeros(3), atol=1e-7, rtol=0)
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(x.shape, generator=g)
    dists = [M.lpips((x + s * noise).clamp(0, 1), x, lpips_a) for s in (0.02, 0.1, 0.3)]
    assert all(d.shape == (3,) for d in dists)
    assert all(bool((a < b).all()) for a, b in zip(dists, dists[1:])), dists
    y = (x + 0.1 * noise).clamp(0, 1)
    torch.testing.assert_close(M.lpips(x, y, lpips_a), M.lpips(y, x, lpips_a), atol=1e-6, rtol=1e-5)


def test_lpips_backbone_comes_from_the_file(lpips_a, vgg_files):
    lpips_b = load_lpips_vgg(str(vgg_files["full"]))
    features = torch.load(vgg_files["features"], weights_only=True)
    full = torch.load(vgg_files["full"], weights_only=True)
    for key in ("0.weight", "28.bias"):
        torch.testing.assert_close(lpips_a.vgg_features().state_dict()[key], features[key], atol=0, rtol=0)
        torch.testing.assert_close(lpips_b.vgg_features().state_dict()[key], full[f"features.{key}"], atol=0, rtol=0)
    x = smooth_images(2, 64, seed=6)
    y = smooth_images(2, 64, seed=7)
    assert not torch.allclose(lpips_a(x, y), lpips_b(x, y), rtol=1e-3)


def test_lpips_heads_are_torchmetrics_shipped_weights(lpips_a):
    import torchmetrics.functional.image.lpips as tm_lpips

    shipped = torch.load(Path(tm_lpips.__file__).parent / "lpips_models" / "vgg.pth", map_location="cpu",
                         weights_only=True)
    heads = {k: v for k, v in lpips_a.net.state_dict().items() if k.startswith("lin") and not k.startswith("lins")}
    assert sorted(heads) == sorted(shipped) and len(heads) == 5
    for key, value in shipped.items():
        torch.testing.assert_close(heads[key], value, atol=0, rtol=0)
        # LPIPS heads are non-negative channel weights; random init would be signed.
        assert bool((heads[key] >= 0).all()) and heads[key].sum() > 0


def test_lpips_bad_backbones_raise(vgg_files, tmp_path, caplog):
    features = torch.load(vgg_files["features"], weights_only=True)
    features["0.wait"] = features.pop("0.weight")
    torch.save(features, tmp_path / "renamed.pth")
    with pytest.raises(ValueError, match=r"'0\.weight'.*'0\.wait'"):
        load_lpips_vgg(str(tmp_path / "renamed.pth"))
    full = torch.load(vgg_files["full"], weights_only=True)
    full["head.weight"] = torch.zeros(1)
    torch.save(full, tmp_path / "stray.pth")
    with pytest.raises(ValueError, match="head.weight"):
        load_lpips_vgg(str(tmp_path / "stray.pth"))
    with pytest.raises(ValueError, match="local file"):
        load_lpips_vgg(str(tmp_path / "absent.pth"))
    with pytest.raises(ValueError, match="allow_random"):
        load_lpips_vgg(None)
    with caplog.at_level(logging.INFO, logger="flux3d.training.perceptual"):
        random_net = load_lpips_vgg(None, allow_random=True)
    assert "RANDOM" in caplog.text
    assert random_net(smooth_images(1, 32), smooth_images(1, 32, seed=1)).shape == (1,)


def test_lpips_is_frozen_eval_and_differentiable(lpips_a):
    parent = nn.ModuleDict({"lpips": lpips_a})
    parent.train()
    assert not lpips_a.training and not any(m.training for m in lpips_a.modules())
    assert not any(p.requires_grad for p in lpips_a.parameters())
    x = smooth_images(2, 64, seed=8)
    y = smooth_images(2, 64, seed=9).requires_grad_(True)
    d1, d2 = lpips_a(y, x), lpips_a(y, x)
    torch.testing.assert_close(d1, d2, atol=0, rtol=0)  # dropout stays off under parent.train()
    d1.sum().backward()
    assert y.grad is not None and torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0


# ---------------------------------------------------------------- FD / KD


class TinyExtractor(nn.Module):
    """A small random feature network: 4 x 4 average pool, linear, tanh -> 8 features."""

    num_features = 8

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(48, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.proj(F.adaptive_avg_pool2d(x, 4).flatten(1)))


def fd_reference(x: np.ndarray, y: np.ndarray) -> float:
    """FD with tr((S_x S_y)^(1/2)) as the sum of square roots of the eigenvalues of S_x S_y (real, >= 0 for PSD)."""
    sx, sy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvals(sx @ sy).real, 0, None)).sum()
    return float(((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(sx) + np.trace(sy) - 2 * tr_sqrt)


def mmd2_unbiased_reference(x: np.ndarray, y: np.ndarray) -> float:
    d, m = x.shape[1], x.shape[0]
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                 - 2 * kxy.mean())


def test_fd_through_extractor_matches_torchmetrics_and_formula():
    from torchmetrics.image.fid import FrechetInceptionDistance

    ext = TinyExtractor()
    real, fake = smooth_images(96, 16, seed=10), smooth_images(80, 16, seed=11, lo=0.2, hi=1.0)
    stats_real, stats_fake = M.FeatureStats(ext, batch_size=32), M.FeatureStats(ext, batch_size=32)
    stats_real.update(real[:50])
    stats_real.update(real[50:])
    stats_fake.update(fake)
    assert stats_real.features.shape == (96, 8) and stats_fake.num_samples == 80
    fd = M.frechet_distance(stats_real, stats_fake)
    assert fd == pytest.approx(fd_reference(stats_real.features.numpy(), stats_fake.features.numpy()), rel=1e-8)
    tm = FrechetInceptionDistance(feature=ext, normalize=True)
    tm.update(real, real=True)
    tm.update(fake, real=False)
    assert fd == pytest.approx(tm.compute().item(), rel=1e-4)
    assert fd > 0.01
    assert abs(M.frechet_distance(stats_real, stats_real)) < 1e-8


def test_fd_of_gaussians_approaches_squared_mean_shift():
    g = torch.Generator().manual_seed(12)
    mu = torch.tensor([0.6, -0.8, 0.0, 0.0], dtype=torch.float64)  # |mu|^2 = 1
    a = torch.randn(20000, 4, generator=g, dtype=torch.float64)
    b = torch.randn(20000, 4, generator=g, dtype=torch.float64) + mu
    assert M.frechet_distance(a, b) == pytest.approx(1.0, abs=0.06)
    assert abs(M.frechet_distance(a, torch.randn(20000, 4, generator=g, dtype=torch.float64))) < 0.01


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
def test_kd_matches_unbiased_mmd_and_torchmetrics():
    from torchmetrics.image.kid import KernelInceptionDistance

    ext = TinyExtractor()
    real, fake = smooth_images(40, 16, seed=13), smooth_images(40, 16, seed=14, lo=0.4, hi=1.0)
    stats_real, stats_fake = M.FeatureStats(ext), M.FeatureStats(ext)
    stats_real.update(real)
    stats_fake.update(fake)
    # subset_size = N: every subset is the whole set, so the value is independent of the random draw.
    kd = M.kernel_distance(stats_real, stats_fake, subsets=3, subset_size=40)
    ref = mmd2_unbiased_reference(stats_real.features.numpy(), stats_fake.features.numpy())
    assert kd.mean == pytest.approx(ref, rel=1e-9) and kd.std < 1e-12 and kd.mean > 1e-3
    tm = KernelInceptionDistance(feature=ext, subsets=2, subset_size=40, normalize=True)
    tm.update(real, real=True)
    tm.update(fake, real=False)
    assert kd.mean == pytest.approx(tm.compute()[0].item(), rel=1e-3)  # torchmetrics computes in float32
    sub = M.kernel_distance(stats_real, stats_fake, subsets=20, subset_size=10, seed=1)
    assert sub == M.kernel_distance(stats_real, stats_fake, subsets=20, subset_size=10, seed=1)
    assert sub != M.kernel_distance(stats_real, stats_fake, subsets=20, subset_size=10, seed=2)


def test_kd_of_one_distribution_is_near_zero():
    g = torch.Generator().manual_seed(15)
    a, b = (torch.randn(600, 8, generator=g, dtype=torch.float64) for _ in range(2))
    shifted = torch.randn(600, 8, generator=g, dtype=torch.float64) + 0.5
    same = M.kernel_distance(a, b, subsets=20, subset_size=300)
    apart = M.kernel_distance(a, shifted, subsets=20, subset_size=300)
    assert apart.mean > 0.1 and abs(same.mean) < 0.02 * apart.mean


def test_fd_kd_reject_bad_sample_counts():
    a, b = torch.randn(10, 4), torch.randn(10, 4)
    with pytest.raises(ValueError, match="at least 2"):
        M.frechet_distance(a[:1], b)
    with pytest.raises(ValueError, match="same F"):
        M.frechet_distance(a, torch.randn(10, 5))
    with pytest.raises(ValueError, match="subset_size"):
        M.kernel_distance(a, b, subset_size=11)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        M.FeatureStats(TinyExtractor()).update(torch.full((1, 3, 8, 8), 1.5))


# ---------------------------------------------------------------- CLIP


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    import open_clip

    open_clip.add_model_config(TINY_CLIP)
    torch.manual_seed(0)
    source = open_clip.create_model("tiny_clip", pretrained=None).eval()
    ckpt = tmp_path_factory.mktemp("clip") / "tiny_clip.pt"
    torch.save(source.state_dict(), ckpt)
    return source, ckpt, clip_image_encoder("tiny_clip", str(ckpt), model_config=str(TINY_CLIP))


def test_clip_encoder_loads_checkpoint_with_open_clip_preprocessing(tiny_clip):
    import open_clip
    from PIL import Image

    source, _, encoder = tiny_clip
    _, _, preprocess = open_clip.create_model_and_transforms("tiny_clip", pretrained=None)
    pixels = (smooth_images(2, 224, seed=16) * 255).round().to(torch.uint8)
    pil = [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pixels]
    with torch.inference_mode():
        ref = source.encode_image(torch.stack([preprocess(im) for im in pil]), normalize=True)
        out = encoder(pixels.float() / 255)
    assert out.shape == (2, encoder.num_features) == (2, 768)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2))


def test_clip_score_self_is_100_and_others_less(tiny_clip):
    *_, encoder = tiny_clip
    images = smooth_images(3, 96, seed=17)[..., :80]  # non-square: shortest side resize + centre crop
    with torch.inference_mode():
        self_score = M.clip_score(images, images, encoder)
        torch.testing.assert_close(self_score, torch.full((3,), 100.0), atol=1e-3, rtol=0)
        other = M.clip_score(images, images.flip(0), encoder)
        assert other[0] < 99.99 and other[2] < 99.99 and other[1] == pytest.approx(100.0, abs=1e-3)
        against_first = M.clip_score(images, images[:1], encoder)
        pairwise = M.clip_score(images, images[:1].expand_as(images), encoder)
    assert against_first[0] == pytest.approx(100.0, abs=1e-3) and bool((against_first[1:] < 99.99).all())
    torch.testing.assert_close(against_first, pairwise, atol=1e-3, rtol=0)
    assert against_first[2] == pytest.approx(other[0].item(), abs=1e-3)  # cosine is symmetric
    with pytest.raises(ValueError, match="references"):
        M.clip_score(images, images[:2], encoder)


def test_clip_loader_refuses_tags_and_bad_checkpoints(tiny_clip, tmp_path):
    source, *_ = tiny_clip
    with pytest.raises(ValueError, match="local file"):
        clip_image_encoder("tiny_clip", "openai", model_config=str(TINY_CLIP))
    with pytest.raises(ValueError, match="allow_random"):
        clip_image_encoder("tiny_clip", None, model_config=str(TINY_CLIP))
    state = source.state_dict()
    state["visual.extra"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="visual.extra"):
        clip_image_encoder("tiny_clip", str(tmp_path / "bad.pt"), model_config=str(TINY_CLIP))


# ---------------------------------------------------------------- Inception-v3 and DINOv2 loaders


def test_inception_loader_round_trip_and_bad_keys(tmp_path):
    from torchvision.models import inception_v3 as tv_inception_v3

    torch.manual_seed(0)
    # The torchvision file format: aux head and fc included, as in inception_v3_google-0cc3c7bd.pth.
    source = tv_inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=False)
    with torch.no_grad():
        source.Mixed_7c.branch_pool.bn.running_mean.normal_()  # buffers must travel too
    torch.save(source.state_dict(), tmp_path / "inception.pth")
    ext = inception_v3(str(tmp_path / "inception.pth"))
    source.fc = nn.Identity()
    x = smooth_images(2, 299, seed=18)
    with torch.inference_mode():
        ref, out = source.eval()(imagenet_normalise(x)), ext(x)
    assert out.shape == (2, 2048) and ext.num_features == 2048
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    state = source.state_dict()
    del state["Mixed_7c.branch_pool.conv.weight"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="Mixed_7c.branch_pool.conv.weight"):
        inception_v3(str(tmp_path / "broken.pth"))


def upstream_dinov2_pos_embed(pos_embed: torch.Tensor, w: int, h: int, patch_size: int = 14) -> torch.Tensor:
    """facebookresearch/dinov2 `DinoVisionTransformer.interpolate_pos_encoding` for a w x h input (hub models:
    interpolate_offset 0.1, no antialias), restated as the reference for the loader's one-off resampling."""
    n_pos = pos_embed.shape[1] - 1
    side = math.sqrt(n_pos)
    w0, h0 = w // patch_size + 0.1, h // patch_size + 0.1
    patch = F.interpolate(pos_embed[:, 1:].reshape(1, int(side), int(side), -1).permute(0, 3, 1, 2),
                          scale_factor=(w0 / side, h0 / side), mode="bicubic", antialias=False)
    return torch.cat([pos_embed[:, :1], patch.permute(0, 2, 3, 1).reshape(1, -1, pos_embed.shape[-1])], dim=1)


def test_dinov2_timm_format_round_trip(tmp_path):
    torch.manual_seed(0)
    source = dinov2_model("vits14").eval()
    torch.save(source.state_dict(), tmp_path / "vits14.pth")
    ext = dinov2(str(tmp_path / "vits14.pth"), "vits14")
    x = smooth_images(2, 224, seed=19)
    with torch.inference_mode():
        torch.testing.assert_close(ext(x), source(imagenet_normalise(x)), atol=1e-5, rtol=1e-4)
    assert ext.num_features == 384


def test_dinov2_original_release_format_is_mapped(tmp_path):
    import timm

    torch.manual_seed(0)
    # The released checkpoint: 518 px position table (37 x 37) plus the masked-modelling token.
    source = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=518)
    state = {**source.state_dict(), "mask_token": torch.zeros(1, 384)}
    torch.save(state, tmp_path / "dinov2_vits14_pretrain.pth")
    ext = dinov2(str(tmp_path / "dinov2_vits14_pretrain.pth"), "vits14")
    reference = dinov2_model("vits14").eval()
    reference.load_state_dict({**source.state_dict(),
                               "pos_embed": upstream_dinov2_pos_embed(source.pos_embed.detach(), 224, 224)})
    x = smooth_images(2, 224, seed=20)
    with torch.inference_mode():
        torch.testing.assert_close(ext(x), reference(imagenet_normalise(x)), atol=1e-5, rtol=1e-4)
    state["blocks.0.attn.extra"] = torch.zeros(1)
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="blocks.0.attn.extra"):
        dinov2(str(tmp_path / "broken.pth"), "vits14")


def test_dinov2_vitl14_keys_map_on_meta_device():
    with torch.device("meta"):
        net = dinov2_model("vitl14")
    assert net.num_features == 1024 and len(net.blocks) == 24
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(304e6, rel=0.01)
    target = net.state_dict()
    release = {k: torch.empty(v.shape, device="meta") for k, v in target.items()}
    release["pos_embed"] = torch.empty(1, 1 + 37 * 37, 1024, device="meta")
    release["mask_token"] = torch.empty(1, 1024, device="meta")
    mapped = dinov2_state(release, net.patch_embed.num_patches)
    assert {k: v.shape for k, v in mapped.items()} == {k: v.shape for k, v in target.items()}
    load_exact(net, mapped, "vitl14", assign=True)


def test_build_extractor_checks_names_and_weights():
    with pytest.raises(ValueError, match="unknown feature extractor"):
        build_extractor("vgg", None)
    with pytest.raises(ValueError, match="allow_random"):
        build_extractor("inception_v3", None)
    with pytest.raises(ValueError, match="takes no options"):
        build_extractor("dinov2_vits14", None, allow_random=True, model="x")
    ext = build_extractor("dinov2_vits14", None, allow_random=True)
    assert ext.num_features == 384 and not ext.training


# ---------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_metrics_on_cuda_match_cpu(lpips_a, tiny_clip):
    x, y = smooth_images(4, 64, seed=21), smooth_images(4, 64, seed=22)
    dev = torch.device("cuda")
    for fn in (M.psnr, M.ssim):
        torch.testing.assert_close(fn(x.to(dev), y.to(dev)).cpu(), fn(x, y), atol=1e-4, rtol=1e-4)
    lpips_cuda = load_lpips_vgg(None, allow_random=True)
    lpips_cuda.load_state_dict(lpips_a.state_dict())
    torch.testing.assert_close(M.lpips(x.to(dev), y.to(dev), lpips_cuda.to(dev)).cpu(), M.lpips(x, y, lpips_a),
                               atol=1e-4, rtol=1e-3)
    *_, encoder = tiny_clip
    cpu_score = M.clip_score(x, y, encoder)
    torch.testing.assert_close(M.clip_score(x.to(dev), y.to(dev), encoder.to(dev)).cpu(), cpu_score,
                               atol=1e-2, rtol=0)
    encoder.to("cpu")
    stats_cpu, stats_gpu = M.FeatureStats(TinyExtractor()), M.FeatureStats(TinyExtractor().to(dev))
    stats_cpu.update(x)
    stats_gpu.update(x)  # CPU images move to the extractor's device
    torch.testing.assert_close(stats_gpu.features, stats_cpu.features, atol=1e-5, rtol=1e-4)
    a, b = torch.randn(300, 16, dtype=torch.float64), torch.randn(300, 16, dtype=torch.float64) + 0.3
    assert M.kernel_distance(a, b, subset_size=100, subsets=5, device=dev).mean == pytest.approx(
        M.kernel_distance(a, b, subset_size=100, subsets=5).mean, rel=1e-9)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dinov2_vitl14_release_round_trip_on_cuda(tmp_path):
    """The full-size ViT-L/14 release format (518 px table + mask_token) through the loader, 512 px renders in."""
    import timm
    import torchvision.transforms.v2.functional as TF

    torch.manual_seed(0)
    with torch.device("cuda"):
        source = timm.create_model("vit_large_patch14_dinov2", pretrained=False, num_classes=0, img_size=518)
        reference = dinov2_model("vitl14").eval()
    state = {k: v.cpu() for k, v in source.state_dict().items()}
    torch.save({**state, "mask_token": torch.zeros(1, 1024)}, tmp_path / "dinov2_vitl14_pretrain.pth")
    ext = dinov2_vitl14(str(tmp_path / "dinov2_vitl14_pretrain.pth")).cuda()
    reference.load_state_dict({**state, "pos_embed": upstream_dinov2_pos_embed(state["pos_embed"], 224, 224)})
    x = smooth_images(4, 512, seed=23).cuda()
    with torch.inference_mode():
        # dgm-eval's transform: Resize((224, 224), bicubic) on tensors, then ImageNet normalisation.
        resized = TF.resize(x, [224, 224], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        ref = reference(imagenet_normalise(resized.cpu()).cuda())
        out = ext(x)
    assert out.shape == (4, 1024)
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=1e-3)

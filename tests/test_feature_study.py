"""The input-feature study (paper Tab. 2b): the rgb, sdxl_vae and dinov2 encoders through their real loading code
(tiny models of the real classes saved to local files), the rgb features checked analytically through the encode
stage, the trainer's checks on feature channels, and `flux3d study features` end to end on a synthetic dataset."""

from __future__ import annotations

import dataclasses
import io
import json
import os

import numpy as np
import pytest
import torch

from flux3d.config.features import EncodeConfig
from flux3d.features.encoders import PooledRGB, load_feature_encoder

TINY_KL = {"in_channels": 3, "out_channels": 3, "block_out_channels": (8, 16), "layers_per_block": 1,
           "down_block_types": ("DownEncoderBlock2D",) * 2, "up_block_types": ("UpDecoderBlock2D",) * 2,
           "norm_num_groups": 8}


def _tiny_sdxl_vae(folder: str) -> str:
    """A 4-channel AutoencoderKL with SDXL's scaling factor and no shift, saved as a diffusers folder. Two blocks
    downsample 2x, so a test reads latents at H/2 (the released VAE's four blocks give H/8)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(**TINY_KL, latent_channels=4, scaling_factor=0.13025).save_pretrained(folder)
    return folder


def test_rgb_encoder_pools_pixels_8x():
    images = torch.rand(2, 3, 32, 48)
    mu, sigma = PooledRGB().encode(images)
    assert mu.shape == (2, 3, 4, 6) and not sigma.any()
    assert torch.allclose(mu[1, :, 2, 3], images[1, :, 16:24, 24:32].mean(dim=(1, 2)))


def test_rgb_features_of_a_ramp_are_the_ramp_at_each_voxels_projection(tmp_path):
    """Views painted with a horizontal ramp (red = 3 * pixel column / 255): pooled 8x it is the same ramp at the
    cell centres, and bilinear sampling of a linear function is exact, so each voxel's red must be the mean over
    the views it projects into of 3 * (u - 0.5) / 255 at its projected column u."""
    from PIL import Image

    from flux3d.config.load import load_config
    from flux3d.features.encode import encode_asset
    from flux3d.features.project import project, voxel_centres
    from flux3d.stages.cameras import frame_record, view_set_cameras
    from flux3d.stages.render_layout import view_sets
    from flux3d.storage import Storage

    res, voxels = 64, 16
    cfg = load_config(overrides={"storage.root": str(tmp_path), "render": {"views": 6, "resolution": res},
                                 "voxelize": {"resolution": voxels},
                                 "encode": {"encoder": "rgb", "visibility": False, "device": "cpu"}})
    storage = Storage(cfg.storage.root)
    folder = view_sets(cfg.render)[0][0]
    ramp = np.zeros((res, res, 4), np.uint8)
    ramp[..., 0] = 3 * np.arange(res)[None, :]
    ramp[..., 1], ramp[..., 3] = 100, 255
    frames = []
    for i, c2w in enumerate(view_set_cameras("ramp", folder, cfg.render.views, cfg.render.radius)):
        frames.append(frame_record(f"{i:03d}.png", c2w, np.radians(cfg.render.fov_deg), res, res))
        buf = io.BytesIO()
        Image.fromarray(ramp, "RGBA").save(buf, format="PNG")
        storage.write_bytes(f"renders/ramp/{folder}/{i:03d}.png", buf.getvalue())
    storage.write_bytes(f"renders/ramp/{folder}/transforms.json", json.dumps({"frames": frames}).encode())
    coords = np.stack(np.meshgrid(*[np.arange(5, 11)] * 3, indexing="ij"), -1).reshape(-1, 3).astype(np.uint8)
    buf = io.BytesIO()
    np.save(buf, coords)
    storage.write_bytes("voxels/ramp.npy", buf.getvalue())

    result = encode_asset("ramp", storage.path("renders/ramp"), storage.path("voxels/ramp.npy"), PooledRGB(), cfg,
                          storage)
    assert result.state == "ok", result.message
    f = np.load(io.BytesIO(storage.read_bytes("features/rgb/ramp.npz")))
    assert f["mu"].shape == (len(coords), 3) and not f["sigma"].any()
    K = torch.tensor([fr["K"] for fr in frames], dtype=torch.float32)
    w2c = torch.tensor([fr["w2c"] for fr in frames], dtype=torch.float32)
    uv, z = project(torch.from_numpy(voxel_centres(coords, voxels)).float(), K, w2c)
    inside = ((uv >= 0) & (uv <= res)).all(-1) & (z > 0)
    linear = (((uv >= 4) & (uv <= res - 4)).all(-1) | ~inside).all(0)  # between the outer cell centres everywhere
    assert linear.float().mean() > 0.9
    expected = ((3 * (uv[..., 0] - 0.5) / 255) * inside).sum(0) / inside.sum(0)
    np.testing.assert_allclose(f["mu"][linear.numpy(), 0], expected[linear].numpy(), atol=2e-3)
    np.testing.assert_allclose(f["mu"][:, 1], 100 / 255, atol=1e-3)


def test_sdxl_vae_loads_from_a_local_folder_and_normalises_like_sdxl(tmp_path):
    folder = _tiny_sdxl_vae(str(tmp_path / "sdxl-vae"))
    enc = load_feature_encoder(EncodeConfig(encoder="sdxl_vae", location=folder, device="cpu"))
    assert enc.channels == 4
    images = torch.rand(2, 3, 32, 32)
    mu, sigma = enc.encode(images)
    with torch.inference_mode():
        dist = enc.vae.encode(images * 2 - 1).latent_dist
    assert mu.shape == (2, 4, 16, 16)
    torch.testing.assert_close(mu, dist.mean * 0.13025)  # no shift: SDXL's config has none
    torch.testing.assert_close(sigma, dist.std * 0.13025)


def _tiny_dinov2_folder(folder: str) -> torch.nn.Module:
    """timm's DINOv2 ViT-L/14 reg4 class at width 32, one block, saved as a timm model folder."""
    from safetensors.torch import save_file

    from flux3d.features.dinov2 import dinov2_model

    args = {"embed_dim": 32, "depth": 1, "num_heads": 2}
    torch.manual_seed(0)
    net = dinov2_model("vitl14_reg4", 518, **args).eval()
    with torch.no_grad():  # timm zero-initialises these; random values make the token order matter
        for p in (net.cls_token, net.reg_token, net.pos_embed):
            p.normal_()
    os.makedirs(folder)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"architecture": "vit_large_patch14_reg4_dinov2", "model_args": args}, f)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, os.path.join(folder, "model.safetensors"))
    return net


def test_dinov2_patch_tokens_before_the_final_norm_from_a_timm_folder(tmp_path):
    import torch.nn.functional as F

    from flux3d.features.dinov2 import IMAGENET_MEAN, IMAGENET_STD

    source = _tiny_dinov2_folder(str(tmp_path / "dinov2"))
    enc = load_feature_encoder(EncodeConfig(encoder="dinov2", location=str(tmp_path / "dinov2"), device="cpu"))
    assert enc.channels == 32
    images = torch.rand(2, 3, 64, 64)
    mu, sigma = enc.encode(images)
    assert mu.shape == (2, 32, 37, 37) and not sigma.any()
    x = F.interpolate(images, size=(518, 518), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():  # TRELLIS's x_prenorm: the blocks' output, CLS and 4 registers dropped, no final norm
        tokens = source.blocks(source.norm_pre(source._pos_embed(source.patch_embed(x))))
    expected = tokens[:, 5:].transpose(1, 2).reshape(2, 32, 37, 37)
    torch.testing.assert_close(mu, expected, atol=1e-4, rtol=1e-4)


def test_dinov2_release_register_keys_map_onto_timm():
    """facebookresearch's `dinov2_vitl14_reg4_pretrain.pth` layout (CLS position row in the table, registers as
    `register_tokens`) maps onto timm's no_embed_class model, as timm's own checkpoint filter does."""
    from flux3d.features.dinov2 import dinov2_model, dinov2_state

    net = dinov2_model("vitl14_reg4", 518, embed_dim=32, depth=1, num_heads=2)
    timm_state = net.state_dict()
    row0 = torch.randn(1, 1, 32)
    release = {k: v for k, v in timm_state.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    release |= {"register_tokens": timm_state["reg_token"], "cls_token": timm_state["cls_token"] - row0,
                "pos_embed": torch.cat([row0, timm_state["pos_embed"]], dim=1), "mask_token": torch.zeros(1, 32)}
    mapped = dinov2_state(release, net.patch_embed.num_patches)
    assert mapped.keys() == timm_state.keys()
    for k, v in timm_state.items():
        torch.testing.assert_close(mapped[k], v)


def test_trainer_refuses_features_the_model_cannot_read():
    from flux3d.config.recipes import train_recipe
    from flux3d.training.step import check_features

    decoder = train_recipe("decoder", "debug")
    check_features(decoder, {"encoder": "taef1", "channels": 16})
    check_features(decoder, {"encoder": "taef1", "mu_mean": [0.0] * 16})  # a version from before "channels"
    with pytest.raises(ValueError, match="set decoder.in_channels = 3"):
        check_features(decoder, {"encoder": "rgb", "channels": 3})
    check_features(dataclasses.replace(decoder, decoder=dataclasses.replace(decoder.decoder, in_channels=3)),
                   {"encoder": "rgb", "channels": 3})
    with pytest.raises(ValueError, match="SMDiT works in FLUX's latent space only"):
        check_features(train_recipe("smdit", "debug"), {"encoder": "sdxl_vae", "channels": 4})
    with pytest.raises(ValueError, match="cond_latents"):
        EncodeConfig(encoder="rgb", cond_latents=True)


def _catalog_of(ds) -> None:  # noqa: ANN001 - tests.datasets.Dataset
    """The catalog rows a synthetic dataset lacks (it writes stage outputs, not their records): assets rendered,
    curated and voxelized, so the study's encode and shard stages find them."""
    from flux3d.catalog import Catalog
    from flux3d.records import OK, AssetRecord, StageResult
    from flux3d.stages.render import RENDER_COLUMNS
    from flux3d.stages.voxelize import VOXEL_COLUMNS
    from flux3d.storage import Storage

    storage = Storage(ds.cfg.storage.root)
    catalog = Catalog(storage)
    shas = sorted(p.name for p in (ds.root / "data" / "renders").iterdir())
    catalog.add_assets([AssetRecord(asset_id=sha[:32], source="synthetic", file_identifier=f"synthetic/{sha[:8]}",
                                    format="glb", sha256=sha, license="CC0-1.0", attribution="") for sha in shas])
    catalog.write_results("render", "r", [StageResult(s, OK, columns={"render_dir": storage.path(f"renders/{s}")})
                                          for s in shas], RENDER_COLUMNS)
    catalog.write_results("curate", "c", [StageResult(s, OK) for s in shas])
    catalog.write_results("voxelize", "v", [StageResult(s, OK, columns={"voxels_path": storage.path(f"voxels/{s}.npy")})
                                            for s in shas], VOXEL_COLUMNS)


def test_study_features_end_to_end_and_a_rerun_redoes_nothing(tmp_path):
    from typer.testing import CliRunner

    from flux3d.cli import app
    from tests.datasets import synthetic_dataset

    # Its own features and version are taef1's (never loaded: the file need not exist), apart from the study's.
    ds = synthetic_dataset(tmp_path, 2, encode={"encoder": "taef1", "location": "/absent/taef1.safetensors"})
    _catalog_of(ds)
    vae = _tiny_sdxl_vae(str(tmp_path / "sdxl-vae"))
    config = tmp_path / "study.toml"
    config.write_text("""
[render]
views = 8
resolution = 32
cond_views = 2
cond_resolution = 32
[voxelize]
resolution = 16
[encode]
encoder = "rgb"
device = "cpu"
[shard]
supervision_views = 8
cond_views = 2
val_fraction = 0.0
image_quality = 100
[train]
decoder_recipe = "debug"
decoder = {run = {steps = 2, ckpt_every = 2, log_every = 1, image_every = 0}}
[evaluate]
recipe = "debug"
changes = {resolution = 32}
""")
    args = ["study", "features", "--root", str(ds.root / "data"), "--config", str(config), "--encoders",
            "rgb,sdxl_vae", "--location", f"sdxl_vae={vae}", "--split", "all"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    out = ds.root / "data" / "studies" / "features"
    doc = json.loads((out / "report.json").read_text())
    rows = {r["encoder"]: r for r in doc["rows"]}
    assert list(rows) == ["rgb", "sdxl_vae"] and rows["rgb"]["channels"] == 3 and rows["sdxl_vae"]["channels"] == 4
    for r in rows.values():
        assert 0 < r["ssim"] <= 1 and 0 < r["psnr"] < 100 and 0 <= r["lpips"] < 2, r
        assert r["steps"] == 2 and len(r["eval_assets"]) == 2
    assert rows["rgb"]["eval_assets"] == rows["sdxl_vae"]["eval_assets"]
    assert rows["rgb"]["dataset_version"] != rows["sdxl_vae"]["dataset_version"]
    assert rows["sdxl_vae"]["work"] == {"encoded": 2, "sharded": True, "trained": True, "evaluated": True}
    table = (out / "report.md").read_text()
    assert "| rgb (3 ch) |" in table and "| sdxl_vae (4 ch) |" in table and "| FLUX (Ours) | 0.9779 |" in table
    assert not (ds.root / "data" / "shards" / "LATEST").exists()  # the study's versions are side versions

    reports = {name: os.stat(os.path.join(r["decoder_run"], "eval", "report.json")).st_mtime_ns
               for name, r in rows.items()}
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    redo = json.loads((out / "report.json").read_text())["rows"]
    assert [r["work"] for r in redo] == [{"encoded": 0, "sharded": False, "trained": False, "evaluated": False}] * 2
    assert [(r["ssim"], r["psnr"], r["lpips"]) for r in redo] == [(r["ssim"], r["psnr"], r["lpips"])
                                                                   for r in rows.values()]
    assert reports == {r["encoder"]: os.stat(os.path.join(r["decoder_run"], "eval", "report.json")).st_mtime_ns
                       for r in redo}

"""Encode-stage cost on this machine: voxelization, VAE encoding, projection + aggregation, conditioning storage.

    python benchmarks/encode.py [--resolution 512] [--views 16] [--voxels 20000] [--full-vae] [--device cpu|cuda]
                                [--cond-views 4] [--cond-resolution 1024]

Voxelize: icospheres of growing triangle counts at 64^3 (seconds per mesh, triangles per second).
Encode: `--views` generated RGBA renders (a shaded, textured sphere on a transparent background) at
`--resolution` through `encode_views` (flatten + batches of EncodeConfig's batch_size): a tiny AutoencoderKL (8x
downsampling, 8-16 channels: the pipeline's own overhead around the network), TAEF1 (real weights from
../shared/weights when present, else random), and with `--full-vae` the FLUX.1 AutoencoderKL architecture (random
weights, same cost) on `--device` (bf16 on cuda, as the encode stage runs there; fp32 on cpu, 2 images).
Projection: `aggregate` of `--voxels` voxels (a shell around a sphere of radius 0.45) over 150 views on the
render's camera sphere (radius 2, fov 40 degrees) with and without depth visibility (the sphere's exact depth
maps), as a percentage of encoding the same 150 views (issue target: < 5 %). Both figures are per asset.
Conditioning storage: bytes per `--cond-resolution` view as float16 latents vs WebP q95 / lossless WebP / PNG of
the same RGBA, and what storing images costs the trainer: encoding one view (TAEF1; full VAE with `--full-vae`).
Absolute times are this machine's; ratios within one run are the portable figures.
"""

from __future__ import annotations

import argparse
import io
import math
import time
from pathlib import Path

import numpy as np
import torch
import trimesh
from PIL import Image

from flux3d.config.features import EncodeConfig
from flux3d.features.encode import encode_views
from flux3d.features.project import aggregate, voxel_centres
from flux3d.features.vae import TAEF1_CONFIG, LatentEncoder
from flux3d.shards.format import decode_image, encode_image
from flux3d.stages.cameras import intrinsics, view_set_cameras, w2c_opencv
from flux3d.stages.voxelize import voxelize_mesh

WEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "weights"
ASSET_VIEWS = 150  # the render's main set: what one asset encodes and aggregates
SPHERE = 0.45  # object radius in the unit cube; the renders below and the depth maps show the same sphere
RADIUS, FOV = 2.0, math.radians(40)  # RenderConfig's camera sphere
BATCH = EncodeConfig().batch_size
BACKGROUND = EncodeConfig().background


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def rgba_view(res: int, seed: int) -> np.ndarray:
    """A render-like RGBA view: a lit, textured sphere (as large as SPHERE appears from RADIUS), anti-aliased
    edge, fully transparent black background and faint render noise. Compressed sizes depend on content, so a
    flat or random image would misstate the WebP figures in either direction."""
    rng = np.random.default_rng(seed)
    y, x = (np.mgrid[0:res, 0:res] + 0.5) / res * 2 - 1
    r = math.tan(math.asin(SPHERE / RADIUS)) / math.tan(FOV / 2)  # projected radius in half-image units
    rho2 = (x * x + y * y) / (r * r)
    n = np.stack([x / r, -y / r, np.sqrt(np.clip(1 - rho2, 0, 1))], -1)
    light = rng.normal(size=3) + [0, 0, 2]
    shade = 0.2 + 0.8 * np.clip(n @ (light / np.linalg.norm(light)), 0, 1)
    spin = rng.uniform(0, 2 * math.pi)  # a different side of the texture per view
    lon, lat = np.arctan2(n[..., 0], n[..., 2]) + spin, np.arcsin(np.clip(n[..., 1], -1, 1))
    tex = 0.6 + 0.2 * np.sign(np.sin(5 * lon) * np.sin(5 * lat)) + 0.1 * np.sin(37 * lon + 11 * lat)
    rgb = rng.uniform(0.3, 0.9, 3) * (tex * shade)[..., None] + rng.normal(0, 1.5 / 255, (res, res, 3))
    alpha = np.clip((r - np.sqrt(x * x + y * y)) * res / 2 + 0.5, 0, 1)[..., None]
    rgba = np.concatenate([rgb * (alpha > 0), alpha], -1)
    return (np.clip(rgba, 0, 1) * 255 + 0.5).astype(np.uint8)


def on(model: torch.nn.Module, device: str) -> torch.nn.Module:
    """The model on `device`, in bf16 on cuda (the encode stage's setting there). fp32 is left uncast: diffusers
    warns on every dtype cast, even a no-op one."""
    model.to(device)
    return model.to(dtype=torch.bfloat16) if device == "cuda" else model


def tiny_kl() -> LatentEncoder:
    from diffusers import AutoencoderKL

    # Four blocks so the latents are H/8 like FLUX's; 8-16 channels so the network costs next to nothing.
    vae = AutoencoderKL(latent_channels=16, block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    return LatentEncoder(vae.eval(), "kl")


def taef1(device: str) -> LatentEncoder:
    dtype = "bfloat16" if device == "cuda" else "float32"
    enc_path = WEIGHTS / "taef1_encoder.safetensors"
    if enc_path.is_file():
        return LatentEncoder.load("taef1", str(enc_path), device=device, dtype=dtype)
    from diffusers import AutoencoderTiny

    return LatentEncoder(on(AutoencoderTiny(**TAEF1_CONFIG).eval(), device), "tiny")


def full_vae(device: str) -> LatentEncoder:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=2, use_quant_conv=False, use_post_quant_conv=False,
                        scaling_factor=0.3611, shift_factor=0.1159).eval()
    return LatentEncoder(on(vae, device), "kl")


def encode_rate(enc: LatentEncoder, images: list[np.ndarray]) -> float:
    """Images/s through encode_views, after one warm-up image (cuDNN autotuning, first-call allocations). The
    latents are copied to the CPU inside the timing, which also waits for the GPU."""
    encode_views(enc, images[:1], BACKGROUND, BATCH)
    return len(images) / timed(lambda: encode_views(enc, images, BACKGROUND, BATCH)[0].cpu())


def shell_voxels(n: int, resolution: int = 64) -> np.ndarray:
    """The n voxels nearest the sphere's surface, sorted: a surface shell as the voxelize stage gives."""
    g = np.stack(np.meshgrid(*[np.arange(resolution)] * 3, indexing="ij"), -1).reshape(-1, 3)
    dist = np.abs(np.linalg.norm(voxel_centres(g, resolution), axis=1) - SPHERE)
    return g[np.sort(np.argsort(dist, kind="stable")[:n])].astype(np.uint8)


def sphere_depth(K: np.ndarray, res: int) -> np.ndarray:
    """(res, res) camera-axis depth of the sphere from any camera of the set (they all look at its centre from
    RADIUS), 0 where a pixel's ray misses it - the render's depth-pass convention."""
    v, u = np.mgrid[0:res, 0:res] + 0.5
    d = np.stack([u, v, np.ones_like(u)], -1) @ np.linalg.inv(K).T  # rays with z = 1, so t is the depth
    b, a = d[..., 2] * RADIUS, (d * d).sum(-1)
    disc = b * b - a * (RADIUS ** 2 - SPHERE ** 2)
    return np.where(disc > 0, (b - np.sqrt(np.clip(disc, 0, None))) / a, 0).astype(np.float32)


def projection(n_voxels: int, res: int) -> dict[str, float]:
    """Seconds of `aggregate` over ASSET_VIEWS views, without and with depth visibility."""
    K = intrinsics(FOV, res, res)
    w2c = np.stack([w2c_opencv(c) for c in view_set_cameras("benchmark", "views150", ASSET_VIEWS, RADIUS)])
    Ks = np.repeat(K[None], ASSET_VIEWS, 0)
    coords = shell_voxels(n_voxels)
    mu = torch.randn(ASSET_VIEWS, 16, res // 8, res // 8)
    sigma = torch.rand(ASSET_VIEWS, 16, res // 8, res // 8) * 0.1
    # Separate copies per view, as the encode stage loads them: one shared map would sit in cache and flatter.
    depth = torch.from_numpy(sphere_depth(K, res)).repeat(ASSET_VIEWS, 1, 1)
    aggregate(coords[:100], mu, sigma, Ks, w2c, res)  # warm-up: first-call allocations
    out = {"plain": timed(lambda: aggregate(coords, mu, sigma, Ks, w2c, res))}
    seen = []
    out["visibility"] = timed(lambda: seen.append(aggregate(coords, mu, sigma, Ks, w2c, res, depth)[2]))
    print(f"  {len(coords):,} voxels x {ASSET_VIEWS} views, mean views seeing a voxel (depth test): "
          f"{seen[0].float().mean():.1f}")
    return out


def png_bytes(rgba: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")  # Pillow's default zlib level 6, as the renders use
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--views", type=int, default=16)
    ap.add_argument("--voxels", type=int, default=20000)
    ap.add_argument("--full-vae", action="store_true")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--cond-views", type=int, default=4)
    ap.add_argument("--cond-resolution", type=int, default=1024)
    args = ap.parse_args()
    for sub in (3, 5, 6):
        mesh = trimesh.creation.icosphere(subdivisions=sub, radius=SPHERE)
        s = timed(lambda: voxelize_mesh(mesh.vertices, mesh.faces, 64))  # noqa: B023
        print(f"voxelize {len(mesh.faces):>7,} triangles: {s:6.2f} s  ({len(mesh.faces) / s:,.0f} triangles/s)")

    res = args.resolution
    images = [rgba_view(res, seed) for seed in range(args.views)]
    print(f"encode {res} px, {args.views} views, batches of {BATCH} (images/s; seconds for {ASSET_VIEWS} views):")
    encoders = {"tiny AutoencoderKL (cpu)": (tiny_kl(), args.views), "TAEF1 (cpu)": (taef1("cpu"), args.views)}
    if args.device == "cuda":
        encoders["TAEF1 (cuda bf16)"] = (taef1("cuda"), args.views)
    if args.full_vae:  # fp32 on a CPU takes seconds per 512-px image: two are enough for a rate
        encoders[f"FLUX.1 AutoencoderKL ({args.device})"] = (
            full_vae(args.device), args.views if args.device == "cuda" else min(2, args.views))
    rates = {}
    for name, (enc, n) in encoders.items():
        rates[name] = encode_rate(enc, images[:n])
        print(f"  {name:<28} {rates[name]:8.2f} images/s  {ASSET_VIEWS / rates[name]:8.1f} s per asset")

    print(f"projection + aggregation, {ASSET_VIEWS} views at {res} px (latents {res // 8}^2):")
    agg = projection(args.voxels, res)
    for mode, s in agg.items():
        shares = "  ".join(f"{100 * s * rate / ASSET_VIEWS:5.1f} % of {name}" for name, rate in rates.items()
                           if not name.startswith("tiny"))
        print(f"  {mode:<10} {s:6.3f} s per asset = {shares}")

    cres = args.cond_resolution
    cond = [rgba_view(cres, 1000 + i) for i in range(args.cond_views)]
    latent = 16 * (cres // 8) ** 2 * 2
    sizes = {"float16 latents": [latent] * len(cond)}
    t0 = time.perf_counter()
    webp = [encode_image(im, 95) for im in cond]
    webp_ms = 1000 * (time.perf_counter() - t0) / len(cond)
    decode_ms = 1000 * timed(lambda: [decode_image(b) for b in webp]) / len(cond)
    sizes["WebP RGBA q95"] = [len(b) for b in webp]
    sizes["WebP lossless"] = [len(encode_image(im, 100)) for im in cond]
    sizes["PNG"] = [len(png_bytes(im)) for im in cond]
    print(f"conditioning views, {cres} px, mean of {len(cond)} (bytes per view; per asset of 24):")
    for name, b in sizes.items():
        print(f"  {name:<16} {np.mean(b):>11,.0f} B  {24 * np.mean(b) / 2 ** 20:6.1f} MiB  "
              f"(latents / this: {latent / np.mean(b):5.2f})")
    print(f"  WebP q95 encode {webp_ms:.0f} ms, decode {decode_ms:.0f} ms per view")
    costs = {}
    for name, (enc, _) in encoders.items():
        if not name.startswith("tiny"):
            costs[name] = 1 / encode_rate(enc, cond[:1])
            print(f"  {name:<28} {costs[name]:7.2f} s to encode one {cres}-px view (the trainer's cost per "
                  f"image-conditioned sample)")
    ratio = latent / np.mean(sizes["WebP RGBA q95"])
    spent = ", ".join(f"{s:.2f} s {name}" for name, s in costs.items())
    print(f"conclusion: float16 latents take {ratio:.1f}x the bytes of WebP q95 views; images cost the trainer a "
          f"{decode_ms:.0f} ms WebP decode plus one VAE encode per sample ({spent}).")


if __name__ == "__main__":
    main()

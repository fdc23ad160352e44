"""Voxelization and FLUX-latent encoding cost on this machine.

    python benchmarks/features.py [--resolution 512] [--images 8] [--full-vae]

Voxelize: icospheres of growing triangle counts at 64^3 (seconds per mesh, triangles per second).
Encode: TAEF1 (the real weights from ../shared/weights when present, else random) on `--images` views at
`--resolution`; with `--full-vae` also the full FLUX.1 AutoencoderKL architecture (random weights, same cost) -
the encoder the paper uses, which is what a GPU node runs for the 150 views of every asset.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import trimesh

from flux3d.features.vae import TAEF1_CONFIG, LatentEncoder
from flux3d.stages.voxelize import voxelize_mesh

WEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "weights"


def timed(fn) -> float:  # noqa: ANN001
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--full-vae", action="store_true")
    args = ap.parse_args()
    for sub in (3, 5, 6):
        mesh = trimesh.creation.icosphere(subdivisions=sub, radius=0.45)
        s = timed(lambda: voxelize_mesh(mesh.vertices, mesh.faces, 64))  # noqa: B023
        print(f"voxelize {len(mesh.faces):>7,} triangles: {s:6.2f} s  ({len(mesh.faces) / s:,.0f} triangles/s)")
    x = torch.rand(args.images, 3, args.resolution, args.resolution)
    enc_path = WEIGHTS / "taef1_encoder.safetensors"
    if enc_path.is_file():
        taef1 = LatentEncoder.load("taef1", str(enc_path))
    else:
        from diffusers import AutoencoderTiny

        taef1 = LatentEncoder(AutoencoderTiny(**TAEF1_CONFIG).eval(), "tiny")
    taef1.encode(x[:1])
    s = timed(lambda: taef1.encode(x))
    taef1_rate = args.images / s
    print(f"TAEF1 encode {args.resolution} px: {taef1_rate:6.2f} images/s  "
          f"(150 views per asset: {150 * s / args.images:.1f} s)")
    if args.full_vae:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16,
                            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
                            use_quant_conv=False, use_post_quant_conv=False).eval()
        full = LatentEncoder(vae, "kl")
        n = min(2, args.images)
        s = timed(lambda: full.encode(x[:n]))
        print(f"FLUX.1 AutoencoderKL encode {args.resolution} px: {n / s:6.3f} images/s  "
              f"(TAEF1 is x{taef1_rate * s / n:.0f} faster)")


if __name__ == "__main__":
    main()

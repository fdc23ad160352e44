"""Rasterizer cost per view: the torch backend (and gsplat on CUDA) vs Gaussian count and image size.

    python benchmarks/rasterizer.py [--gaussians 10000,50000,200000] [--sizes 64,128,256] [--repeats 3]
                                    [--device cpu|cuda] [--threads N] [--quick]

The scene is what the decoder produces: K = 32 Gaussians per voxel from `gaussians_from_raw` (small random raw
values around the zero-init state) on the voxels of a sphere shell of radius 0.4 in the 64^3 grid, seen from
distance 2 with a 40 degree field of view (the TRELLIS render setup). Each row is the median of `--repeats` runs
after one warm-up: forward alone, and forward + backward of the mean rgb. `pairs` is the number of (pixel,
Gaussian) pairs the torch backend composited. On CUDA the gsplat backend is timed too, when it is installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import time

import torch

from flux3d.models.gaussians import GaussianConfig, Gaussians, gaussians_from_raw
from flux3d.models.rasterizer import _contributing_pairs, project, rasterize


def shell_scene(num: int, device: str, seed: int = 0) -> Gaussians:
    cfg = GaussianConfig()
    gen = torch.Generator().manual_seed(seed)
    r = cfg.resolution
    grid = torch.stack(torch.meshgrid(*[torch.arange(r)] * 3, indexing="ij"), -1).reshape(-1, 3)
    radius = ((grid + 0.5) / r - 0.5).norm(dim=-1)
    shell = grid[(radius - 0.4).abs() < 0.75 / r]
    voxels = shell[torch.randperm(len(shell), generator=gen)[: math.ceil(num / cfg.per_voxel)]]
    raw = 0.3 * torch.randn(len(voxels), cfg.raw_channels, generator=gen)
    g = gaussians_from_raw(raw, voxels, cfg)
    return Gaussians(**{k: v[:num].to(device) for k, v in vars(g).items()})


def look_at_camera(size: int, device: str, distance: float = 2.0, fov_deg: float = 40.0) -> tuple[torch.Tensor, ...]:
    eye = torch.tensor([distance * 0.6, -distance * 0.6, distance * 0.529])
    forward = -eye / eye.norm()
    right = torch.linalg.cross(forward, torch.tensor([0.0, 0.0, 1.0]))
    right = right / right.norm()
    down = torch.linalg.cross(forward, right)
    w2c = torch.eye(4)
    w2c[:3, :3] = torch.stack([right, down, forward])
    w2c[:3, 3] = -w2c[:3, :3] @ eye
    f = size / 2 / math.tan(math.radians(fov_deg) / 2)
    K = torch.tensor([[f, 0, size / 2], [0, f, size / 2], [0, 0, 1]])
    return w2c[None].to(device), K[None].to(device)


def _time(fn, repeats: int, device: str) -> float:
    times = []
    for i in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        if i:  # the first run warms up allocators and kernels
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(num: int, size: int, backend: str, device: str, repeats: int) -> tuple[float, float]:
    g = shell_scene(num, device)
    w2c, K = look_at_camera(size, device)
    params = [p.requires_grad_() for p in (g.means, g.quats, g.scales, g.opacities, g.sh0)]

    def forward() -> None:
        with torch.no_grad():
            rasterize(g, w2c, K, size, size, backend=backend)

    def forward_backward() -> None:
        rasterize(g, w2c, K, size, size, backend=backend).rgb.mean().backward()
        for p in params:
            p.grad = None

    return _time(forward, repeats, device), _time(forward_backward, repeats, device)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gaussians", default="10000,50000,200000")
    ap.add_argument("--sizes", default="64,128,256")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--quick", action="store_true", help="one repeat; 10K and 200K Gaussians at 64 and 128 px")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    counts = [int(n) for n in args.gaussians.split(",")]
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.quick:
        counts, sizes, args.repeats = [10_000, 200_000], [64, 128], 1
    backends = ["torch"]
    if args.device == "cuda" and importlib.util.find_spec("gsplat") is not None:
        backends.append("gsplat")
    print(f"device {args.device}, {torch.get_num_threads()} threads, median of {args.repeats}, seconds per view")
    print(f"{'backend':>8} {'gaussians':>10} {'px':>5} {'pairs':>10} {'forward':>9} {'fwd+bwd':>9}")
    for num in counts:
        for size in sizes:
            g = shell_scene(num, args.device)
            w2c, K = look_at_camera(size, args.device)
            with torch.no_grad():
                pairs = len(_contributing_pairs(project(g, w2c, K, size, size), g.opacities, size, size)[0])
            for backend in backends:
                fwd, fwd_bwd = bench(num, size, backend, args.device, args.repeats)
                print(f"{backend:>8} {num:>10} {size:>5} {pairs:>10} {fwd:>9.3f} {fwd_bwd:>9.3f}")


if __name__ == "__main__":
    main()

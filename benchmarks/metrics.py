"""Evaluation cost: feature extraction per image for each FD / KD / CLIP network, LPIPS-VGG per pair, and the
FD / KD arithmetic at the paper's scale.

    python benchmarks/metrics.py [--resolution 512] [--batch 16] [--device auto] [--n 4000] [--dim 2048]

The networks are the real architectures with random weights (the pretrained files are not on this machine and do
not change the cost), fed synthetic [0, 1] renders at the evaluation resolution, preprocessing included, fp32.
FD runs scipy's sqrtm on the CPU (float64); KD's 100 kernel subsets run on the chosen device in float64.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable

import torch

from flux3d.evaluation import metrics as M
from flux3d.evaluation.extractors import build_extractor
from flux3d.training.perceptual import load_lpips_vgg


def seconds(fn: Callable[[], object], device: torch.device, repeats: int = 3) -> float:
    """Median wall time of `fn` after one warm-up (cuDNN autotune, allocator, thread pools)."""
    def timed() -> float:
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    timed()
    return sorted(timed() for _ in range(repeats))[repeats // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--n", type=int, default=4000, help="feature vectors per set for FD / KD (1,000 assets x 4 views)")
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the random-weights warnings are expected here
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"
    print(f"device {name}  {args.resolution} px  batch {args.batch}  fp32")
    images = torch.rand(args.batch, 3, args.resolution, args.resolution, device=device)
    with torch.inference_mode():
        for ext_name in ("inception_v3", "dinov2_vitl14", "clip"):
            t0 = time.perf_counter()
            ext = build_extractor(ext_name, None, device=device, allow_random=True)
            load_s = time.perf_counter() - t0
            s = seconds(lambda: ext(images), device, args.repeats)  # noqa: B023
            print(f"{ext_name:14s} {args.batch / s:9.1f} images/s  ({ext.num_features}-d, built in {load_s:.1f} s)")
        lpips = load_lpips_vgg(None, device=device, allow_random=True)
        s = seconds(lambda: lpips(images, images.flip(0)), device, args.repeats)
        print(f"{'lpips_vgg':14s} {args.batch / s:9.1f} pairs/s")
    g = torch.Generator().manual_seed(0)
    a = torch.randn(args.n, args.dim, generator=g, dtype=torch.float64)
    b = torch.randn(args.n, args.dim, generator=g, dtype=torch.float64) + 0.1
    t0 = time.perf_counter()
    fd = M.frechet_distance(a, b)
    print(f"FD  {args.n} x {args.dim}: {time.perf_counter() - t0:6.2f} s on the CPU (FD {fd:.3f})")
    subset = min(1000, args.n)
    t0 = time.perf_counter()
    kd = M.kernel_distance(a, b, subsets=100, subset_size=subset, device=device)
    print(f"KD  100 subsets of {subset}: {time.perf_counter() - t0:6.2f} s on {device.type} (KD {kd.mean:.5f})")


if __name__ == "__main__":
    main()

"""What the DA-SLAT decoder costs.

1. Forward + backward time per sample vs active voxels (debug size on CPU, paper size on GPU): the sparse
   transformer's cost must grow with the active voxels, not with the 64^3 grid.
2. Packed (no padding) vs padded attention for a batch of assets of skewed sizes, whole-asset attention.
3. Rasterizer time per view (the in-repo torch rasterizer on CPU; gsplat on CUDA) at the training resolution.
4. On CUDA: tokens/s and MFU of the paper config (12 x 768, batch 8, bf16 autocast), the transformer alone.
5. The per-batch layout (window partitions, asset bounds) built in the forward vs given by the loader: step time,
   host syncs per step (each one a GPU stall), and what building it costs the loader's worker.

Layouts are voxel shells of spheres (a surface, like real assets) of chosen sizes; features are random (the cost
does not depend on their values).

    .venv/bin/python benchmarks/decoder.py [--device cuda] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from flux3d.models.configs import DecoderConfig, GaussianConfig
from flux3d.models.decoder import DecoderLayout, GaussianDecoder, decoder_layout
from flux3d.models.sparse import SparseBatch
from flux3d.training.syncs import HostSyncs
from flux3d.training.telemetry import peak_flops


def shell(n: int, grid: int = 64, seed: int = 0) -> np.ndarray:
    """About `n` voxels on a sphere's surface in a grid^3 volume (radius chosen for the count)."""
    r = min(np.sqrt(n / (4 * np.pi)), grid / 2 - 1)
    ax = np.arange(grid) - (grid - 1) / 2
    d = np.sqrt(sum(np.meshgrid(ax, ax, ax, indexing="ij")[i] ** 2 for i in range(3)))
    coords = np.argwhere(np.abs(d - r) < 0.5)
    rng = np.random.default_rng(seed)
    return coords[np.sort(rng.choice(len(coords), min(n, len(coords)), replace=False))].astype(np.uint8)


def batch_of(sizes: list[int], device: torch.device) -> SparseBatch:
    coords = [shell(n, seed=i) for i, n in enumerate(sizes)]
    return SparseBatch.from_list(coords, [np.random.randn(len(c), 16).astype(np.float32) for c in coords]).to(device)


def timed(fn, device: torch.device, repeat: int) -> float:  # noqa: ANN001
    fn()  # warm-up (allocator, kernels, autotuning)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeat


def alternating(fns: dict[str, Callable[[], object]], device: torch.device, repeat: int) -> dict[str, float]:
    """Median seconds per call of each function, called in turn, the order reversed every round (A B B A ...): on
    a shared machine whose speed drifts, two back-to-back `timed` loops measure the drift as much as the functions."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeat):
        for name, fn in list(fns.items())[::-1 if r % 2 else 1]:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def step_fn(model: GaussianDecoder, b: SparseBatch, bf16: bool, layout: DecoderLayout | None = None):  # noqa: ANN201
    def step() -> None:
        with torch.autocast(b.feats.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(b.feats, b.coords, b.offsets, layout=layout)
        out.raw.float().square().mean().backward()
    return step


def scaling(model: GaussianDecoder, device: torch.device, sizes: list[int], repeat: int, bf16: bool) -> None:
    print("\n1. forward + backward per sample vs active voxels")
    print(f"{'voxels':>8} {'ms/sample':>10} {'us/voxel':>9}")
    for n in sizes:
        b = batch_of([n], device)
        s = timed(step_fn(model, b, bf16), device, repeat)
        print(f"{len(b.coords):>8} {s * 1e3:>10.1f} {s / len(b.coords) * 1e6:>9.2f}")


def packed_vs_padded(cfg: DecoderConfig, device: torch.device, sizes: list[int], repeat: int, bf16: bool) -> None:
    print("\n2. whole-asset attention, packed vs padded, batch of", sizes)
    with device:
        model = GaussianDecoder(dataclasses.replace(cfg, window=0))
    b = batch_of(sizes, device)
    times = {}
    for backend in ("auto", "padded"):  # auto: bucketed on CPU, varlen/flash in bf16 on CUDA
        model.set_runtime(False, backend)
        times[backend] = timed(step_fn(model, b, bf16), device, repeat)
        print(f"  {backend:>7}: {times[backend] * 1e3:8.1f} ms per batch")
    slow, fast = times["padded"], times["auto"]
    waste = 1 - sum(sizes) / (len(sizes) * max(sizes))
    print(f"  padded / packed = {slow / fast:.2f}x ({waste:.0%} of the padded tokens are padding)")


def rasterizer(device: torch.device, voxels: int, per_voxel: int, res: int, repeat: int) -> None:
    from flux3d.models.gaussians import gaussians_from_raw
    from flux3d.models.rasterizer import rasterize

    print(f"\n3. rasterizer: {voxels} voxels x {per_voxel} Gaussians at {res} px")
    coords = torch.from_numpy(shell(voxels).astype(np.int64)).to(device)
    g_cfg = GaussianConfig(per_voxel=per_voxel)
    raw = (0.1 * torch.randn(len(coords), per_voxel, 14, device=device)).requires_grad_()
    from flux3d.stages.cameras import orbit_cameras

    K, w2c = orbit_cameras(1, 2.0, 40.0, res)
    K_t, w2c_t = torch.from_numpy(K).float().to(device), torch.from_numpy(w2c).float().to(device)

    def fwd() -> None:
        with torch.no_grad():
            rasterize(gaussians_from_raw(raw, coords, g_cfg), w2c_t, K_t, res, res)

    def fwd_bwd() -> None:
        rasterize(gaussians_from_raw(raw, coords, g_cfg), w2c_t, K_t, res, res).rgb.mean().backward()

    print(f"  forward {timed(fwd, device, repeat) * 1e3:.1f} ms/view, forward+backward "
          f"{timed(fwd_bwd, device, repeat) * 1e3:.1f} ms/view ({len(coords) * per_voxel} Gaussians)")


def mfu(device: torch.device, repeat: int) -> None:
    cfg = DecoderConfig()
    with device:
        model = GaussianDecoder(cfg)
    sizes = [20000, 14000, 26000, 9000, 17000, 22000, 12000, 30000]  # a batch of 8 assets (paper batch per GPU)
    b = batch_of(sizes, device)
    s = timed(step_fn(model, b, True), device, repeat)
    flops = model.flops(b.coords, b.offsets)
    peak = peak_flops(device)
    print(f"\n4. paper decoder (85 M), batch 8, {len(b.coords)} tokens, bf16: {s * 1e3:.1f} ms/step, "
          f"{len(b.coords) / s:,.0f} tokens/s, {flops / s / 1e12:.1f} TFLOP/s"
          + (f", MFU {flops / s / peak:.1%} of {peak / 1e12:.0f}" if peak else ""))


def layout_cost(model: GaussianDecoder, device: torch.device, sizes: list[int], repeat: int, bf16: bool) -> None:
    print("\n5. layout (window partitions) built in the forward vs given by the loader, batch of", sizes)
    b = batch_of(sizes, device)
    coords, offsets = b.coords.cpu(), b.offsets.cpu()
    variants = {"in the forward": None, "by the loader": decoder_layout(model.cfg, coords, offsets).to(device)}
    fns = {name: step_fn(model, b, bf16, given) for name, given in variants.items()}
    fns["layout alone"] = lambda: decoder_layout(model.cfg, coords, offsets)  # on the host: the loader's worker
    print_layout_cost(fns, device, repeat)


def print_layout_cost(fns: dict[str, Callable[[], object]], device: torch.device, repeat: int) -> None:
    """Section 5 of both model benchmarks: the step with the layout built in the forward and given by the loader
    (interleaved runs, medians), the host syncs of each, and what building the layout alone costs."""
    secs = alternating(fns, device, max(repeat, 7))
    for name in ("in the forward", "by the loader"):
        with HostSyncs() as syncs:
            fns[name]()
        print(f"  built {name:>14}: {secs[name] * 1e3:8.1f} ms/step, {syncs.total:3d} host syncs {dict(syncs.counts)}")
    print(f"  building it on the host (the loader's worker): {secs['layout alone'] * 1e3:.1f} ms per batch "
          "(medians of interleaved runs)")


def bench_args(doc: str) -> tuple[argparse.Namespace, torch.device, bool, int]:
    """The model benchmarks' command line: --device, --quick; returns (args, device, on GPU, repeats)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    return args, device, device.type == "cuda", 3 if args.quick else 10


def main() -> None:
    args, device, gpu, repeat = bench_args(__doc__)
    cfg = DecoderConfig() if gpu else DecoderConfig(width=64, depth=2, heads=2, gaussians=GaussianConfig(per_voxel=8))
    print(f"device {device}; decoder {cfg.width}x{cfg.depth}, window {cfg.window}")
    with device:
        model = GaussianDecoder(cfg)
    sizes = [2000, 4000, 8000, 16000] + ([32000] if gpu else [])
    scaling(model, device, sizes[:3] if args.quick else sizes, repeat, gpu)
    packed_vs_padded(cfg, device, [1000, 2000, 6000] if not gpu else [4000, 8000, 30000, 12000], repeat, gpu)
    rasterizer(device, 4000 if not gpu else 20000, 8 if not gpu else 32, 64 if not gpu else 512, repeat)
    if gpu:
        mfu(device, repeat)
    layout_cost(model, device, [2000, 4000] if not gpu else [20000, 14000, 26000, 9000, 17000, 22000, 12000, 30000],
                repeat, gpu)


if __name__ == "__main__":
    main()

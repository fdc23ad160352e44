"""What the SMDiT costs.

1. Training step time (forward + backward of the flow-matching loss) vs tokens per asset: voxel tokens after the
   2^3 patchify plus the image tokens.
2. Packed (one joint sequence per asset, no padding) vs padded attention on a batch of skewed assets.
3. Sampler time for 50 Euler steps with CFG (two model calls per guided step) for one asset.
4. On CUDA: tokens/s and MFU of the paper config (24 blocks x 1152, batch 8, 64x64 image tokens, bf16).
5. The per-batch layout (the 2^3 patchify's coarse voxels and bounds) built in the forward vs given by the loader:
   step time, host syncs per step (each one a GPU stall), and what building it costs the loader's worker.

Layouts are voxel shells (benchmarks/decoder.py) at 64^3; latents and conditioning are random.

    .venv/bin/python benchmarks/smdit.py [--device cuda] [--quick]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from decoder import batch_of, bench_args, print_layout_cost, timed  # noqa: E402 - the shared layout, timing and CLI helpers

from flux3d.models.configs import SMDiTConfig  # noqa: E402
from flux3d.models.flow_matching import SamplerConfig, flow_matching_loss, sample  # noqa: E402
from flux3d.models.smdit import SMDiT, smdit_layout  # noqa: E402
from flux3d.training.telemetry import peak_flops  # noqa: E402


def step_fn(model: SMDiT, sizes: list[int], latent_hw: int, device: torch.device, bf16: bool,  # noqa: ANN201
            layout: bool = False):
    b = batch_of(sizes, device)
    # As the trainer's loader does: built on the host, moved with the batch.
    given = smdit_layout(b.coords.cpu(), b.offsets.cpu()).to(device) if layout else None
    B = len(sizes)
    cond = torch.randn(B, 16, latent_hw, latent_hw, device=device)
    t, eps = torch.rand(B, device=device), torch.randn_like(b.feats)
    drop = torch.zeros(B, dtype=torch.bool, device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = flow_matching_loss(model, b.feats, b.coords, b.offsets, cond, t, eps, drop, given)
        loss.backward()
    return step, b


def main() -> None:
    args, device, gpu, repeat = bench_args(__doc__)
    cfg = SMDiTConfig() if gpu else SMDiTConfig(width=64, heads=2, double_blocks=1, single_blocks=1)
    latent_hw = 128 if gpu else 16  # 1024 px conditioning -> 128^2 latents -> 64^2 tokens (CPU: 128 px)
    with device:
        model = SMDiT(cfg)
    model.set_runtime(gpu, "auto")  # gradient checkpointing on GPU, as the paper recipe trains
    print(f"device {device}; SMDiT {cfg.width} x {cfg.double_blocks}+{cfg.single_blocks} blocks, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, {(latent_hw // 2) ** 2} image tokens")

    print("\n1. training step vs voxels per asset (batch of 1)")
    for n in ([2000, 8000, 16000] if args.quick else [2000, 4000, 8000, 16000, 32000]):
        fn, b = step_fn(model, [n], latent_hw, device, gpu)
        s = timed(fn, device, repeat)
        print(f"  {len(b.coords):>6} voxels: {s * 1e3:8.1f} ms/step")

    print("\n2. packed vs padded joint attention, batch of skewed assets")
    sizes = [2000, 4000, 12000] if not gpu else [4000, 8000, 30000, 12000]
    times = {}
    for backend in ("auto", "padded"):
        model.set_runtime(gpu, backend)
        fn, _ = step_fn(model, sizes, latent_hw, device, gpu)
        times[backend] = timed(fn, device, repeat)
        print(f"  {backend:>7}: {times[backend] * 1e3:8.1f} ms/step")
    print(f"  padded / packed = {times['padded'] / times['auto']:.2f}x")
    model.set_runtime(gpu, "auto")

    print("\n3. sampler, one asset of 8000 voxels")
    b = batch_of([8000], device)
    cond = torch.randn(1, 16, latent_hw, latent_hw, device=device)
    steps = 50 if gpu else 10
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
        s = timed(lambda: sample(model, b.coords, b.offsets, cond, SamplerConfig(steps=steps)), device, 1)
    print(f"  {steps} Euler steps with CFG on (0.5, 1.0): {s:.2f} s" + ("" if gpu else " (CPU: 10 steps)"))

    if gpu:
        sizes = [20000, 14000, 26000, 9000, 17000, 22000, 12000, 30000]
        fn, b = step_fn(model, sizes, latent_hw, device, True)
        s = timed(fn, device, repeat)
        flops = model.flops(b.coords, b.offsets, (latent_hw // 2) ** 2)
        peak = peak_flops(device)
        print(f"\n4. paper SMDiT, batch 8 ({len(b.coords)} voxels), bf16, gradient checkpointing: "
              f"{s * 1e3:.0f} ms/step, {flops / s / 1e12:.0f} TFLOP/s" + (f", MFU {flops / s / peak:.1%}" if peak
                                                                          else "")
              + " (model FLOPs; recomputation not counted)")

    layout_cost(model, device, [2000, 4000, 12000] if not gpu else [20000, 14000, 26000, 9000, 17000, 22000, 12000,
                                                                    30000], latent_hw, repeat, gpu)


def layout_cost(model: SMDiT, device: torch.device, sizes: list[int], latent_hw: int, repeat: int, gpu: bool) -> None:
    print("\n5. layout (2^3 patchify) built in the forward vs given by the loader, batch of", sizes)
    variants = {"in the forward": False, "by the loader": True}
    fns = {name: step_fn(model, sizes, latent_hw, device, gpu, given)[0] for name, given in variants.items()}
    b = batch_of(sizes, device)
    coords, offsets = b.coords.cpu(), b.offsets.cpu()
    fns["layout alone"] = lambda: smdit_layout(coords, offsets)  # on the host: the loader's worker
    print_layout_cost(fns, device, repeat)


if __name__ == "__main__":
    main()

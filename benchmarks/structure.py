"""What the sparse-structure stage (stage 1) costs: a training step of the occupancy VAE and of the flow model,
and the stage-1 sampler per asset, at the paper recipes' sizes on CUDA (bf16, as the trainer runs them) or the
debug sizes on CPU.

1. Structure VAE (64^3 occupancy -> 16^3 x 8): step time, samples/s and MFU (FLOPs from `StructureVAE.flops`)
   at the per-GPU batch.
2. Structure flow (an SMDiT over the 16^3 latent: 512 tokens + 64x64 image tokens at 1024 px): step time,
   samples/s, MFU.
3. Stage 1 for one image: 25 Euler steps with CFG (two model calls per guided step) + the VAE decode, and the
   same for the stage-2 SMDiT's 50 steps on a 20K-voxel layout, for scale.

Occupancies are voxel shells (benchmarks/decoder.py); latents and conditioning are random.

    .venv/bin/python benchmarks/structure.py [--device cuda] [--quick]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from decoder import batch_of, bench_args, shell, timed  # noqa: E402 - the shared layout, timing and CLI helpers

from flux3d.config.recipes import train_recipe  # noqa: E402
from flux3d.models.flow_matching import SamplerConfig, flow_matching_loss, sample  # noqa: E402
from flux3d.models.smdit import SMDiT, smdit_layout  # noqa: E402
from flux3d.models.structure import (  # noqa: E402
    StructureVAE,
    from_tokens,
    grid_tokens,
    occupancy_grid,
    occupancy_loss,
)
from flux3d.training.telemetry import peak_flops  # noqa: E402


def main() -> None:
    args, device, gpu, repeat = bench_args(__doc__)
    recipe = "paper" if gpu else "debug"
    vcfg, fcfg = (train_recipe(k, recipe) for k in ("structure_vae", "structure_flow"))
    B = vcfg.data.batch_size if gpu else 2
    peak = peak_flops(device) if gpu else None
    print(f"device {device}; {recipe} recipes, batch {B} per device" + (", bf16" if gpu else ""))

    def report(name: str, secs: float, flops: float, params: int) -> None:
        mfu = f", MFU {flops / secs / peak:.1%}" if peak else ""
        print(f"  {name}: {params / 1e6:.1f} M parameters, {secs * 1e3:.1f} ms/step, {B / secs:.1f} samples/s, "
              f"{flops / secs / 1e12:.1f} TFLOP/s{mfu}")

    with device:
        vae = StructureVAE(vcfg.structure)
    grid = vcfg.structure.grid
    shells = [torch.from_numpy(shell(20000 * grid ** 2 // 64 ** 2, grid, seed=i)).int() for i in range(B)]
    occ = occupancy_grid(torch.cat([torch.nn.functional.pad(c, (1, 0), value=i) for i, c in enumerate(shells)])
                         .to(device), B, grid)

    def vae_step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
            logits, kl = vae(occ)
            loss = occupancy_loss(logits, occ, vcfg.loss.occupancy) + vcfg.loss.kl * kl.mean()
        loss.backward()

    print("\n1. structure VAE training step")
    report(f"{grid}^3 -> {vcfg.structure.latent_resolution}^3 x {vcfg.structure.latent_channels}",
           timed(vae_step, device, repeat), vae.flops(B), sum(p.numel() for p in vae.parameters()))

    with device:
        flow = SMDiT(fcfg.smdit)
    flow.set_runtime(fcfg.scale.grad_checkpointing, "auto")
    r = fcfg.smdit.grid
    coords, offsets = grid_tokens(B, r, device)
    layout = smdit_layout(coords.cpu(), offsets.cpu()).to(device)
    hw = fcfg.flow.cond_resolution // 8
    cond = torch.randn(B, 16, hw, hw, device=device)
    z0 = torch.randn(len(coords), fcfg.smdit.in_channels, device=device)
    t, eps, drop = torch.rand(B, device=device), torch.randn_like(z0), torch.zeros(B, dtype=torch.bool, device=device)

    def flow_step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
            loss = flow_matching_loss(flow, z0, coords, offsets, cond, t, eps, drop, layout)
        loss.backward()

    print("\n2. structure flow training step")
    img_tokens = (hw // 2) ** 2
    report(f"{r}^3 latent ({layout.num_coarse // B} tokens) + {img_tokens} image tokens",
           timed(flow_step, device, repeat), flow.flops(coords, offsets, img_tokens, layout),
           sum(p.numel() for p in flow.parameters()))

    print("\n3. sampling one asset")
    flow.eval()
    one, one_off = grid_tokens(1, r, device)

    @torch.no_grad()
    def stage1() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
            z = sample(flow, one, one_off, cond[:1], SamplerConfig(steps=25, guidance=8.5))
            vae.decode(from_tokens(z, 1, r))

    print(f"  stage 1 (25 steps, CFG, + VAE decode): {timed(stage1, device, 1 if args.quick else 3):.2f} s")
    if gpu:
        scfg = train_recipe("smdit", "paper").smdit
        with device:
            smdit = SMDiT(scfg).eval()
        b = batch_of([20000], device)

        @torch.no_grad()
        def stage2() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                sample(smdit, b.coords, b.offsets, cond[:1], SamplerConfig(steps=50, guidance=3.0))

        print(f"  stage 2 for scale (paper SMDiT, 50 steps, CFG, 20K voxels): {timed(stage2, device, 1):.2f} s")


if __name__ == "__main__":
    main()

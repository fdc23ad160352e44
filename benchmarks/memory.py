"""Training memory per token at paper width, for the decoder and the SMDiT, and the token budgets that fit a GPU.

How it is measured (CPU is enough: the slope is a count of bytes, not a speed):
- Activations: what autograd keeps for the backward pass. `torch.autograd.graph.saved_tensors_hooks` sees every
  tensor saved during one forward under bf16 autocast (as the trainer runs on CUDA); their storages, each counted
  once and leaving out the parameters, are the activation memory. Two batch sizes give bytes per voxel (the slope)
  and the per-batch constant. Attention runs the CPU's fused flash kernel, which, as the GPU's flash kernels, keeps
  only the output and its log-sum-exp: no T^2 score matrix.
- Model state: fp32 weights, gradients, AdamW's two moments and the fp32 EMA: 20 bytes per parameter (DDP's
  gradient buckets add 4 more; FSDP2 divides the sum by the world size).
- Peak = state + activations x PEAK_FACTOR: the backward pass holds gradients of the activations beside them and
  the allocator fragments; 1.25 is a margin, not a measurement; a GPU run (`benchmarks/decoder.py --device cuda`,
  `torch.cuda.max_memory_allocated`) should replace it.

The decoder's renders and losses (gsplat at 512 px, SSIM, LPIPS-VGG) cost per view, not per voxel: measured here
for one view (the torch rasterizer is not what a GPU runs, so gsplat's share is an estimate from its buffers).
The SMDiT's image tokens cost per asset: 64 x 64 tokens of a 1024 px conditioning image.

    .venv/bin/python benchmarks/memory.py [--gpu-gb 80] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from decoder import batch_of  # noqa: E402 - voxel shells at 64^3, as the model benchmarks use

from flux3d.config.recipes import train_recipe  # noqa: E402
from flux3d.config.training import LossConfig  # noqa: E402
from flux3d.models.decoder import GaussianDecoder  # noqa: E402
from flux3d.models.flow_matching import flow_matching_loss  # noqa: E402
from flux3d.models.smdit import SMDiT  # noqa: E402
from flux3d.training.losses import ReconstructionLoss  # noqa: E402

STATE_BYTES_PER_PARAM = 20 + 4  # weights, grads, 2 Adam moments, EMA (fp32) + DDP gradient buckets
PEAK_FACTOR = 1.25
HEADROOM = 0.9  # of the GPU's memory: CUDA context, NCCL buffers, the data loader's pinned batches


def saved_bytes(fn, params: set[int]) -> int:  # noqa: ANN001
    """Bytes of the distinct storages autograd saves while `fn()` runs, parameters left out."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(storages.values())


def _param_ptrs(model: torch.nn.Module) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in model.parameters()}


def decoder_activations(model: GaussianDecoder, voxels: int) -> int:
    b = batch_of([voxels], torch.device("cpu"))

    def forward() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(b.feats, b.coords, b.offsets, sigma_MC=torch.full_like(b.feats, 0.1))
            gaussians = model.to_gaussians(out.raw, b.coords, b.offsets)
        return sum(g.means.sum() + g.scales.sum() + g.opacities.sum() + g.sh0.sum() for g in gaussians)

    return saved_bytes(forward, _param_ptrs(model))


def loss_activations_per_view(resolution: int) -> int:
    """SSIM + LPIPS-VGG (random weights: the same shapes) + L1 of one view, in fp32 as the loss runs."""
    loss = ReconstructionLoss(LossConfig(lpips_random=True, volume=0.0, opacity=0.0))
    pred = torch.rand(1, 3, resolution, resolution, requires_grad=True)
    target = torch.rand(1, 3, resolution, resolution)
    return saved_bytes(lambda: loss(pred, target, [])[0], _param_ptrs(loss))


def smdit_activations(model: SMDiT, voxels: int, assets: int, latent_hw: int) -> int:
    b = batch_of([voxels // assets] * assets, torch.device("cpu"))
    cond = torch.randn(assets, 16, latent_hw, latent_hw)
    t, eps = torch.rand(assets), torch.randn_like(b.feats)
    drop = torch.zeros(assets, dtype=torch.bool)

    def forward() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return flow_matching_loss(model, b.feats, b.coords, b.offsets, cond, t, eps, drop)

    return saved_bytes(forward, _param_ptrs(model))


def slope(f, n1: int, n2: int) -> tuple[float, float]:  # noqa: ANN001
    """(bytes per voxel, constant) of f(n) from two sizes."""
    a, b = f(n1), f(n2)
    per = (b - a) / (n2 - n1)
    return per, a - per * n1


def budget(gpu_bytes: float, state: float, per_voxel: float, per_batch: float) -> int:
    """Voxels per batch that fit: (usable - state - constants) / peak bytes per voxel."""
    return int((gpu_bytes * HEADROOM - state - PEAK_FACTOR * per_batch) / (PEAK_FACTOR * per_voxel))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu-gb", type=float, default=80.0)
    p.add_argument("--quick", action="store_true", help="smaller voxel counts (the slope is the same)")
    args = p.parse_args()
    gpu = args.gpu_gb * 1e9
    torch.manual_seed(0)
    torch.set_grad_enabled(True)
    n1, n2 = (1000, 2000) if args.quick else (2000, 4000)
    gb = 1e9

    dcfg = train_recipe("decoder", "paper")
    decoder = GaussianDecoder(dcfg.decoder).train()
    dparams = sum(p.numel() for p in decoder.parameters())
    d_per, d_const = slope(lambda n: decoder_activations(decoder, n), n1, n2)
    # Checkpointed blocks keep only each block's input; the recompute of one block adds its own activations back.
    decoder.set_runtime(True, "auto")
    c_per, c_const = slope(lambda n: decoder_activations(decoder, n), n1, n2)
    c_per += d_per / dcfg.decoder.depth
    view = loss_activations_per_view(512)
    d_state = dparams * STATE_BYTES_PER_PARAM
    views = dcfg.data.batch_size * dcfg.data.views_per_sample
    print(f"decoder (paper: {dcfg.decoder.width} x {dcfg.decoder.depth}, {dparams / 1e6:.1f} M parameters, "
          f"{dcfg.decoder.gaussians.per_voxel} Gaussians per voxel)")
    print(f"  activations: {d_per / 1e3:.1f} KB per voxel; with gradient checkpointing {c_per / 1e3:.1f} KB")
    print(f"  loss (SSIM + LPIPS-VGG + L1) per 512 px view: {view / 1e6:.0f} MB; x {views} views per batch")
    print(f"  model state: {d_state / gb:.2f} GB")
    for name, per, const in (("no checkpointing", d_per, d_const), ("gradient checkpointing", c_per, c_const)):
        fits = budget(gpu, d_state, per, const + view * views)
        print(f"  budget on {args.gpu_gb:.0f} GB, {name}: {fits:,} voxels per batch per GPU")

    scfg = train_recipe("smdit", "paper")
    image_tokens = (scfg.flow.cond_resolution // 16) ** 2  # 8x VAE, then 2x2 patches
    # Per-block, per-voxel and per-image-token costs from small stacks at paper width (1 + 1, 2 + 1, 1 + 2 blocks;
    # 64 and 256 image tokens), then added up for the paper's 12 + 12 blocks and 4,096 image tokens: all costs are
    # linear in both token kinds (flash attention keeps no score matrix), and a CPU forward of the whole model at
    # full size would take many minutes for the same numbers.
    costs = {}
    for ckpt in (False, True):
        for double, single in ((1, 1), (2, 1), (1, 2)):
            model = SMDiT(dataclasses.replace(scfg.smdit, double_blocks=double, single_blocks=single)).train()
            model.set_runtime(ckpt, "auto")
            small, big = (smdit_activations(model, n, 1, hw) for n, hw in ((n1, 16), (n1, 32)))
            per_voxel = (smdit_activations(model, n2, 1, 16) - small) / (n2 - n1)
            costs[ckpt, double, single] = (per_voxel, (big - small) / (16**2 - 8**2))
            del model

    def paper(ckpt: bool) -> list[float]:
        nd, ns = scfg.smdit.double_blocks, scfg.smdit.single_blocks
        base, two_d, two_s = costs[ckpt, 1, 1], costs[ckpt, 2, 1], costs[ckpt, 1, 2]
        return [base[i] + (nd - 1) * (two_d[i] - base[i]) + (ns - 1) * (two_s[i] - base[i]) for i in range(2)]

    full = paper(False)
    # Checkpointing keeps each block's input; the backward recomputes one block at a time, whose activations
    # (the larger of a double- and a single-stream block) come back for the moment.
    block = [max(costs[False, 2, 1][i] - costs[False, 1, 1][i], costs[False, 1, 2][i] - costs[False, 1, 1][i])
             for i in range(2)]
    ckpt = [a + b for a, b in zip(paper(True), block, strict=True)]
    with torch.device("meta"):
        sparams = sum(p.numel() for p in SMDiT(scfg.smdit).parameters())
    s_state = sparams * STATE_BYTES_PER_PARAM
    assets = scfg.data.batch_size
    print(f"\nSMDiT (paper: {scfg.smdit.width} x {scfg.smdit.double_blocks}+{scfg.smdit.single_blocks} blocks, "
          f"{sparams / 1e6:.0f} M parameters, {image_tokens} image tokens per asset)")
    for name, (per_voxel, per_image_token) in (("no checkpointing", full), ("gradient checkpointing", ckpt)):
        print(f"  {name}: {per_voxel / 1e3:.1f} KB per voxel, {per_image_token / 1e3:.1f} KB per image token "
              f"= {per_image_token * image_tokens / 1e9:.2f} GB per asset")
    print(f"  model state: {s_state / gb:.2f} GB with DDP, {s_state / 8 / gb:.2f} GB per GPU with FSDP2 over 8")
    for name, (per_voxel, per_image_token) in (("no checkpointing", full), ("gradient checkpointing", ckpt)):
        for strategy, state in (("DDP", s_state), ("FSDP2 over 8", s_state / 8)):
            fits = budget(gpu, state, per_voxel, per_image_token * image_tokens * assets)
            print(f"  budget on {args.gpu_gb:.0f} GB, {name}, {strategy}, {assets} assets: "
                  f"{max(fits, 0):,} voxels per batch per GPU")

if __name__ == "__main__":
    main()

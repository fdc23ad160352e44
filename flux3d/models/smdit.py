"""SMDiT: the sparse-structure multimodal diffusion transformer (paper sec. 4.2, Fig. 5, Tab. 4-6), one file.

    noisy voxel latents (M, 16) on the 64^3 layout --2^3 structured patchify (gather 8 children, Linear)-->
        voxel tokens (Mv, D) on the 32^3 grid
    conditioning image latents (B, 16, h, w) --2x2 patchify, Linear--> image tokens (B * L, D), L = h/2 * w/2
    timestep t --sinusoid, MLP--> vec (B, D): adaLN-Zero modulation of every block
    --> double-stream blocks: modality-specific weights, JOINT attention over [voxels_b ; image_b] per asset b
    --> single-stream blocks: shared weights over the concatenated tokens
    --> final adaLN + Linear on the voxel tokens --unpatchify--> velocity (M, 16) on exactly the input layout

Positions (MARoPE): voxel tokens rotate by their (x, y, z) on the 32^3 grid; image patch (i, j) sits on a virtual
plane at (i, j, z_max + 1) (rope.marope_positions), so RoPE's distance decay biases each patch toward nearby voxels.
Ablation switches (paper Tab. 4-5): `arch = "dit"` is the TRELLIS-like DiT (voxel self-attention + cross-attention
to the image tokens, one weight set, the same positions: MARoPE rotates its cross-attention's queries and keys by
the voxel and plane positions), `position = "ape"` replaces MARoPE by additive absolute sinusoidal embeddings
of the same 3D positions.

Conditioning dropout for classifier-free guidance uses a learned null condition: the image tokens of a dropped
sample are replaced by one learned vector (at every image position), which the model learns to read as "no image".

Legend: M fine voxels, Mv coarse voxel tokens, B assets, L image tokens per asset, T = Mv + B*L joint tokens,
D width, H heads, Dh head width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from flux3d.models.configs import SMDiTConfig
from flux3d.models.layers import MLP, Attention, Sequences, attend, attention_pairs, checkpointed, timestep_embedding
from flux3d.models.rope import (
    RotaryEmbedding,
    SinusoidalPositionEmbedding,
    apply_rotary,
    marope_positions,
    rope_axes,
)
from flux3d.models.sparse import PatchLayout, SparseBatch, patch_layout, patchify, unpatchify


def smdit_layout(coords_M4: torch.Tensor, offsets: torch.Tensor) -> PatchLayout:
    """The SMDiT's per-batch layout: its 2^3 patchify of these voxels. `forward` builds it when not given one; the
    trainer builds it on the host in the loader's workers instead, so the GPU step never waits on a readback."""
    return patch_layout(coords_M4, len(offsets) - 1, 2)


def _modulate(x_TD: torch.Tensor, shift_TD: torch.Tensor, scale_TD: torch.Tensor) -> torch.Tensor:
    return x_TD * (1 + scale_TD) + shift_TD


class Modulation(nn.Module):
    """adaLN-Zero: vec -> n (shift, scale, gate) vectors per sample, zero at init so every block starts as identity."""

    def __init__(self, dim: int, n: int) -> None:
        super().__init__()
        self.n, self.lin = n, nn.Linear(dim, 3 * n * dim)
        nn.init.zeros_(self.lin.weight)
        nn.init.zeros_(self.lin.bias)

    def forward(self, vec_BD: torch.Tensor, batch_T: torch.Tensor) -> list[torch.Tensor]:
        return [m[batch_T] for m in self.lin(F.silu(vec_BD)).chunk(3 * self.n, dim=-1)]


@dataclass
class Layout:
    """Where each stream's tokens go in the joint sequence [voxels_b ; image_b] of each asset b."""

    vox_to_joint: torch.Tensor  # (Mv,) joint position of each voxel token
    img_to_joint: torch.Tensor  # (B * L,)
    joint: Sequences  # per-asset joint sequences
    batch_vox: torch.Tensor  # (Mv,) asset of each voxel token
    batch_img: torch.Tensor  # (B * L,)
    batch_joint: torch.Tensor  # (T,)
    vox: Sequences  # voxel tokens alone (the DiT ablation's self-attention)

    @classmethod
    def build(cls, offsets: torch.Tensor, bounds: tuple[int, ...], L: int) -> Layout:
        """From the coarse `offsets` and their host copy `bounds`: every size comes from the host ints, so nothing
        here waits for the device."""
        B, dev, Mv = len(bounds) - 1, offsets.device, bounds[-1]
        n_B = offsets[1:] - offsets[:-1]
        batch_vox = torch.repeat_interleave(torch.arange(B, device=dev), n_B, output_size=Mv)
        vox_to_joint = torch.arange(Mv, device=dev) + batch_vox * L
        img_to_joint = ((offsets[1:] + torch.arange(B, device=dev) * L)[:, None]
                        + torch.arange(L, device=dev)[None]).flatten()
        joint_offsets = offsets + torch.arange(B + 1, device=dev) * L
        batch_img = torch.arange(B, device=dev).repeat_interleave(L)
        batch_joint = torch.empty(Mv + B * L, dtype=torch.int64, device=dev)
        batch_joint[vox_to_joint], batch_joint[img_to_joint] = batch_vox, batch_img
        joint = Sequences.from_bounds(joint_offsets, [b + i * L for i, b in enumerate(bounds)])
        return cls(vox_to_joint, img_to_joint, joint, batch_vox, batch_img, batch_joint,
                   Sequences.from_bounds(offsets, bounds))

    def join(self, vox_TX: torch.Tensor, img_TX: torch.Tensor) -> torch.Tensor:
        out = vox_TX.new_empty((len(self.batch_joint), *vox_TX.shape[1:]))
        return out.index_copy(0, self.vox_to_joint, vox_TX).index_copy(0, self.img_to_joint, img_TX)


class DoubleStreamBlock(nn.Module):
    """Voxel and image streams with their own weights; one attention over both (MMDiT / FLUX double block)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, qk_norm: bool) -> None:
        super().__init__()
        self.streams = nn.ModuleList(nn.ModuleDict({
            "mod": Modulation(dim, 2), "norm1": nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6),
            "attn": Attention(dim, heads, qk_norm), "norm2": nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6),
            "mlp": MLP(dim, mlp_ratio)}) for _ in range(2))

    def forward(self, vox_TD: torch.Tensor, img_TD: torch.Tensor, vec_BD: torch.Tensor, lay: Layout,
                rot: torch.Tensor | None, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
        xs, mods, qkv = [vox_TD, img_TD], [], []
        for s, x, batch in zip(self.streams, xs, (lay.batch_vox, lay.batch_img)):
            m = s["mod"](vec_BD, batch)  # shift1, scale1, gate1, shift2, scale2, gate2
            mods.append(m)
            qkv.append(s["attn"].qkv_heads(_modulate(s["norm1"](x), m[0], m[1]), None))
        q, k, v = (lay.join(a, b) for a, b in zip(*qkv))
        if rot is not None:
            q, k = apply_rotary(q, rot), apply_rotary(k, rot)
        out_THD = attend(q.to(v.dtype), k.to(v.dtype), v, lay.joint, backend).flatten(1)
        outs = [out_THD[lay.vox_to_joint], out_THD[lay.img_to_joint]]
        for i, (s, m) in enumerate(zip(self.streams, mods)):
            x = xs[i] + m[2] * s["attn"].proj(outs[i])
            xs[i] = x + m[5] * s["mlp"](_modulate(s["norm2"](x), m[3], m[4]))
        return xs[0], xs[1]


class SingleStreamBlock(nn.Module):
    """Shared weights over the joint tokens; attention and MLP in parallel from one input projection (FLUX)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, qk_norm: bool) -> None:
        super().__init__()
        self.heads, self.head_dim, self.hidden = heads, dim // heads, int(dim * mlp_ratio)
        self.mod = Modulation(dim, 1)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.lin1 = nn.Linear(dim, 3 * dim + self.hidden)
        self.lin2 = nn.Linear(dim + self.hidden, dim)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()

    def forward(self, x_TD: torch.Tensor, vec_BD: torch.Tensor, lay: Layout, rot: torch.Tensor | None,
                backend: str) -> torch.Tensor:
        shift, scale, gate = self.mod(vec_BD, lay.batch_joint)
        qkv, mlp = self.lin1(_modulate(self.norm(x_TD), shift, scale)).split([3 * x_TD.shape[-1], self.hidden], -1)
        q, k, v = qkv.unflatten(-1, (3, self.heads, self.head_dim)).unbind(1)
        q, k = self.q_norm(q), self.k_norm(k)
        if rot is not None:
            q, k = apply_rotary(q, rot), apply_rotary(k, rot)
        attn = attend(q.to(v.dtype), k.to(v.dtype), v, lay.joint, backend).flatten(1)
        return x_TD + gate * self.lin2(torch.cat([attn, F.gelu(mlp, approximate="tanh")], -1))


class CrossDiTBlock(nn.Module):
    """The ablation baseline (TRELLIS's ModulatedSparseTransformerCrossBlock): adaLN self-attention over the voxel
    tokens, cross-attention to the asset's image tokens, adaLN MLP.

    Positions follow `position` as in the SMDiT, so that the ablation changes the architecture and nothing else
    (paper Tab. 4's "w/o SMDiT" row keeps MARoPE): with MARoPE the cross-attention queries rotate by their voxel
    positions and the keys by their patches' places on the virtual plane; with APE the image tokens carry their
    embedding from the input. (Bare keys would make the cross-attention blind to where a patch is.)"""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, qk_norm: bool) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.mod = Modulation(dim, 2)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads, qk_norm)
        self.norm_x = nn.LayerNorm(dim, eps=1e-6)
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(dim, mlp_ratio)

    def forward(self, vox_TD: torch.Tensor, img_TD: torch.Tensor, vec_BD: torch.Tensor, lay: Layout,
                rot: torch.Tensor | None, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.mod(vec_BD, lay.batch_vox)
        rot_vox = None if rot is None else rot[lay.vox_to_joint]
        x = vox_TD + gate1 * self.attn(_modulate(self.norm1(vox_TD), shift1, scale1), lay.vox, rot_vox, backend)
        # Every asset has the same L image tokens, so the keys are a dense (B, L) batch; queries vary in length, one
        # SDPA call per asset (B is the per-GPU batch, ~8) avoids padding the voxel side.
        B = len(lay.vox.cu_seqlens) - 1
        k, v = self.kv(img_TD).view(-1, 2, self.heads, self.head_dim).unbind(1)
        q = self.q(self.norm_x(x)).view(-1, self.heads, self.head_dim)
        if rot is not None:
            q, k = apply_rotary(q, rot_vox), apply_rotary(k, rot[lay.img_to_joint])
        k, v = k.view(B, -1, self.heads, self.head_dim), v.view(B, -1, self.heads, self.head_dim)
        bounds = lay.vox.bounds
        out = torch.cat([F.scaled_dot_product_attention(q[s:e].transpose(0, 1), k[b].transpose(0, 1),
                                                        v[b].transpose(0, 1)).transpose(0, 1)
                         for b, (s, e) in enumerate(zip(bounds[:-1], bounds[1:]))])
        x = x + self.proj(out.flatten(1))
        x = x + gate2 * self.mlp(_modulate(self.norm2(x), shift2, scale2))
        return x, img_TD


class SMDiT(nn.Module):
    def __init__(self, cfg: SMDiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D, C = cfg.width, cfg.in_channels
        self.vox_in = nn.Linear(8 * C, D)  # on the 2^3 children gathered into channels: a kernel-2 stride-2 conv
        self.img_in = nn.Linear(4 * cfg.cond_channels, D)  # 2x2 image patches
        self.t_embed = nn.Sequential(nn.Linear(256, D), nn.SiLU(), nn.Linear(D, D))
        self.null_cond = nn.Parameter(torch.zeros(D))
        block = CrossDiTBlock if cfg.arch == "dit" else DoubleStreamBlock
        self.double_stream = nn.ModuleList(block(D, cfg.heads, cfg.mlp_ratio, cfg.qk_norm)
                                           for _ in range(cfg.double_blocks))
        self.single_stream = nn.ModuleList(SingleStreamBlock(D, cfg.heads, cfg.mlp_ratio, cfg.qk_norm)
                                    for _ in range(cfg.single_blocks))
        self.final_mod = Modulation(D, 1)  # its gate is unused: shift and scale only, as DiT's final layer
        self.final_norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.out = nn.Linear(D, 8 * C)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        head_dim = D // cfg.heads
        self.rope = RotaryEmbedding(rope_axes(head_dim, 3), cfg.theta) if cfg.position == "marope" else None
        self.ape = SinusoidalPositionEmbedding(D) if cfg.position == "ape" else None
        self.register_buffer("latent_mean", torch.zeros(C))
        self.register_buffer("latent_std", torch.ones(C))
        self.grad_checkpointing, self.attention_backend = False, "auto"

    @property
    def blocks(self) -> nn.ModuleList:
        return nn.ModuleList([*self.double_stream, *self.single_stream])

    def set_runtime(self, grad_checkpointing: bool, attention_backend: str) -> None:
        self.grad_checkpointing, self.attention_backend = grad_checkpointing, attention_backend

    def set_latent_stats(self, mean: list[float], std: list[float]) -> None:
        """Per-channel normalisation of the voxel latents (the dataset's stats.json), kept with the weights."""
        self.latent_mean.copy_(torch.tensor(mean))
        self.latent_std.copy_(torch.tensor(std).clamp_min(1e-6))

    def image_tokens(self, cond_BCHW: torch.Tensor) -> torch.Tensor:
        B, C, h, w = cond_BCHW.shape
        if C != self.cfg.cond_channels or h % 2 or w % 2:
            raise ValueError(f"conditioning latents must be (B, {self.cfg.cond_channels}, even h, even w), got "
                             f"{tuple(cond_BCHW.shape)}")
        patches = cond_BCHW.unfold(2, 2, 2).unfold(3, 2, 2)  # (B, C, h/2, w/2, 2, 2)
        return self.img_in(patches.permute(0, 2, 3, 1, 4, 5).reshape(B * (h // 2) * (w // 2), 4 * C))

    def forward(self, x_MC: torch.Tensor, coords_M4: torch.Tensor, offsets: torch.Tensor, t_B: torch.Tensor,
                cond_BCHW: torch.Tensor, drop_B: torch.Tensor | None = None,
                layout: PatchLayout | None = None) -> torch.Tensor:
        """Velocity (M, C) for noisy latents `x_MC` at times `t_B`; `drop_B` (bool) swaps in the null condition.
        `layout`: `smdit_layout(coords_M4, offsets)` built beforehand (the same result, no host syncs here)."""
        if layout is None:
            layout = smdit_layout(coords_M4, offsets)
        coarse, index = patchify(SparseBatch(coords_M4, x_MC, offsets), 2, layout)
        vox = self.vox_in(coarse.feats)
        h, w = cond_BCHW.shape[2] // 2, cond_BCHW.shape[3] // 2
        img = self.image_tokens(cond_BCHW)
        if drop_B is not None:  # torch.where keeps null_cond in the graph even when nothing is dropped (DDP)
            img = torch.where(drop_B.repeat_interleave(h * w)[:, None], self.null_cond.to(img.dtype), img)
        lay = Layout.build(coarse.offsets, layout.bounds, h * w)
        pos = self.positions(coarse.coords, lay, (h, w))
        rot = self.rope(pos) if self.rope is not None else None
        if self.ape is not None:
            emb = self.ape(pos).to(vox.dtype)
            vox, img = vox + emb[lay.vox_to_joint], img + emb[lay.img_to_joint]
        vec = self.t_embed(timestep_embedding(t_B, 256).to(vox.dtype))
        for blk in self.double_stream:
            vox, img = checkpointed(blk, self.grad_checkpointing, vox, img, vec, lay, rot, self.attention_backend)
        if self.single_stream:
            x = lay.join(vox, img)
            for blk in self.single_stream:
                x = checkpointed(blk, self.grad_checkpointing, x, vec, lay, rot, self.attention_backend)
            vox = x[lay.vox_to_joint]
        shift, scale, _ = self.final_mod(vec, lay.batch_vox)
        return unpatchify(self.out(_modulate(self.final_norm(vox), shift, scale)), index)

    def positions(self, coarse_coords_M4: torch.Tensor, lay: Layout, hw: tuple[int, int]) -> torch.Tensor:
        """(T, 3) joint-order positions: voxels at (x, y, z), image patches on the MARoPE plane."""
        grid = self.cfg.grid // 2
        B = len(lay.joint.cu_seqlens) - 1
        img_pos = marope_positions(coarse_coords_M4.new_zeros((0, 3)), hw, grid, image_scale=self.cfg.image_scale)
        return lay.join(coarse_coords_M4[:, 1:].float(), img_pos.to(coarse_coords_M4.device).repeat(B, 1).float())

    def flops(self, coords_M4: torch.Tensor, offsets: torch.Tensor, image_tokens: int,
              layout: PatchLayout | None = None) -> float:
        """Training FLOPs of one step (forward + backward = 3x forward): 2 x weights x tokens for every token-wise
        Linear (each stream's weights over its own tokens; modulation acts per sample and is negligible), plus
        attention's two matmuls (2 x 2 x pairs x width per block)."""
        if layout is None:
            layout = smdit_layout(coords_M4, offsets)
        lay = Layout.build(layout.offsets, layout.bounds, image_tokens)
        n_vox, n_img = len(lay.vox_to_joint), len(lay.img_to_joint)

        def weights(m: nn.Module) -> int:
            return sum(x.weight.numel() for x in m.modules() if isinstance(x, nn.Linear)
                       and not any(x is mod.lin for mod in m.modules() if isinstance(mod, Modulation)))

        fwd = 2.0 * (weights(self.vox_in) + weights(self.out)) * n_vox + 2.0 * weights(self.img_in) * n_img
        for blk in self.double_stream:
            if isinstance(blk, DoubleStreamBlock):
                fwd += 2.0 * (weights(blk.streams[0]) * n_vox + weights(blk.streams[1]) * n_img)
                fwd += 4.0 * attention_pairs(lay.joint) * self.cfg.width
            else:  # cross-attention DiT: kv over image tokens, the rest over voxel tokens
                fwd += 2.0 * (weights(blk) - blk.kv.weight.numel()) * n_vox + 2.0 * blk.kv.weight.numel() * n_img
                fwd += 4.0 * (attention_pairs(lay.vox) + n_vox * image_tokens) * self.cfg.width
        for blk in self.single_stream:
            fwd += 2.0 * weights(blk) * (n_vox + n_img) + 4.0 * attention_pairs(lay.joint) * self.cfg.width
        return 3.0 * fwd


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

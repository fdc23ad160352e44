"""Transformer pieces shared by the decoder and the SMDiT, over packed tokens (no padding, no batch axis).

Legend: T tokens of a packed batch, D width, H heads, Dh head width. Which tokens attend to which is a `Groups`:
whole sequences (one per asset, `Sequences`) or 3D windows (`attention.WindowPartition`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from flux3d.models.attention import WindowPartition, varlen_attention, windowed_attention
from flux3d.models.rope import apply_rotary


@dataclass(frozen=True)
class Sequences:
    """Full attention within each packed sequence; `bounds` is `cu_seqlens` on the host (no readback per layer)."""

    cu_seqlens: torch.Tensor
    max_seqlen: int
    bounds: tuple[int, ...]

    @classmethod
    def from_offsets(cls, offsets: torch.Tensor) -> Sequences:
        """One device->host copy of the offsets (a sync on the GPU): build it once per batch, not per layer."""
        return cls.from_bounds(offsets, tuple(offsets.tolist()))

    @classmethod
    def from_bounds(cls, offsets: torch.Tensor, bounds: Sequence[int]) -> Sequences:
        """`offsets` whose host copy `bounds` the caller already holds (no sync)."""
        return cls(offsets, max((e - s for s, e in itertools.pairwise(bounds)), default=0), tuple(bounds))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Sequences:
        return Sequences(self.cu_seqlens.to(device, non_blocking=non_blocking), self.max_seqlen, self.bounds)

    def pin_memory(self) -> Sequences:
        return Sequences(self.cu_seqlens.pin_memory(), self.max_seqlen, self.bounds)


Groups = Sequences | WindowPartition


def attention_pairs(groups: Groups) -> int:
    """Query-key pairs attention computes over these groups (for FLOP counts)."""
    return sum((e - s) ** 2 for s, e in itertools.pairwise(groups.bounds))


def attend(q_THD: torch.Tensor, k_THD: torch.Tensor, v_THD: torch.Tensor, groups: Groups,
           backend: str = "auto") -> torch.Tensor:
    if isinstance(groups, WindowPartition):
        return windowed_attention(q_THD, k_THD, v_THD, groups, backend=backend)
    return varlen_attention(q_THD, k_THD, v_THD, groups.cu_seqlens, groups.max_seqlen, backend=backend,
                            bounds=groups.bounds)


class Attention(nn.Module):
    """Multi-head self-attention over packed tokens; optional QK RMSNorm (stabilises bf16 training of large
    MMDiTs, as in SD3/FLUX) and rotary positions."""

    def __init__(self, dim: int, heads: int, qk_norm: bool = False) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()

    def qkv_heads(self, x_TD: torch.Tensor, rot: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        q_THD, k_THD, v_THD = self.qkv(x_TD).unflatten(-1, (3, self.heads, self.head_dim)).unbind(1)
        q_THD, k_THD = self.q_norm(q_THD), self.k_norm(k_THD)
        if rot is not None:
            q_THD, k_THD = apply_rotary(q_THD, rot), apply_rotary(k_THD, rot)
        # Under autocast the norms may run in fp32 while v stays bf16; attention kernels want one dtype.
        return q_THD.to(v_THD.dtype), k_THD.to(v_THD.dtype), v_THD

    def forward(self, x_TD: torch.Tensor, groups: Groups, rot: torch.Tensor | None = None,
                backend: str = "auto") -> torch.Tensor:
        q_THD, k_THD, v_THD = self.qkv_heads(x_TD, rot)
        return self.proj(attend(q_THD, k_THD, v_THD, groups, backend).flatten(1))


class MLP(nn.Module):
    def __init__(self, dim: int, ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(dim * ratio)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x_TD), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm transformer block (TRELLIS's SparseTransformerBlock, over packed tokens)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, qk_norm)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, mlp_ratio)

    def forward(self, x_TD: torch.Tensor, groups: Groups, rot: torch.Tensor | None = None,
                backend: str = "auto") -> torch.Tensor:
        x_TD = x_TD + self.attn(self.norm1(x_TD), groups, rot, backend)
        return x_TD + self.mlp(self.norm2(x_TD))


def checkpointed(fn, enabled: bool, *args):  # noqa: ANN001, ANN201 - a thin wrapper
    """Run `fn(*args)`, recomputing its activations in the backward pass when `enabled` (training only)."""
    if enabled and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def timestep_embedding(t_B: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of diffusion times t in [0, 1], scaled by 1000 as DiT/FLUX do (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t_B.device, dtype=torch.float32) / half)
    args = 1000.0 * t_B.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))

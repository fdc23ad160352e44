"""Softmax attention over packed variable-length sequences, and 3D window attention on top of it.

The sparse transformers attend over B assets of 1K-60K voxel tokens each, packed without padding into (T, H, D)
tensors with `cu_seqlens` (B + 1,) marking the boundaries (`SparseBatch.offsets`). `varlen_attention` computes
softmax attention within each sequence only, through one of five interchangeable backends:

    "flash"     flash_attn.flash_attn_varlen_func: the external flash-attention build; CUDA, fp16/bf16.
    "varlen"    torch.nn.attention.varlen.varlen_attn: the same flash kernels shipped inside torch; CUDA, fp16/bf16.
    "nested"    F.scaled_dot_product_attention on jagged nested tensors, built zero-copy from the packed buffer.
                On CUDA it runs the flash / memory-efficient kernels over the packed rows (any float dtype). On CPU
                torch's jagged SDPA has only the math kernel, which pads every sequence to the longest internally;
                `benchmarks/attention.py --quick --threads 1` measured it 2-4x slower than "padded" and 5-9x
                slower than "bucketed", so it is not the CPU default.
    "bucketed"  sequences sorted by length and cut into runs within 80% of the run's longest; one dense SDPA per
                run (on CPU, torch's fused flash kernel), no mask where a run's lengths are equal. Any device; the
                Python loop is over length classes, not sequences. It needs the lengths on the host (one sync).
    "padded"    pad every sequence to max_seqlen and run dense SDPA with a key mask: the reference, and what the
                benchmark measures the packed paths against.

"auto" picks: CUDA with fp16/bf16 -> flash if the package imports, else varlen if torch has it, else nested;
CUDA fp32 -> nested (the flash kernels need half precision; SDPA's memory-efficient kernel takes fp32); CPU ->
bucketed, for the speed above (DESIGN.md sec. 6 names nested SDPA for the CPU; measurement overrode it). "padded" is
never chosen automatically: with voxel counts this skewed most of its work is padding.

`window_partition` groups the voxel tokens of each asset into cubic windows (TRELLIS's "swin" attention: the
SLat VAE uses window 8 with every other block shifted by 4). Sorting the tokens by (batch, window) turns window
attention into plain varlen attention over windows, so `windowed_attention` = gather, varlen_attention, scatter.

Shapes: T packed tokens, H heads, D head dim, B sequences, W windows.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "flash", "varlen", "nested", "bucketed", "padded")
_BUCKET_FILL = 0.8
_HALF = (torch.float16, torch.bfloat16)


@functools.cache
def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


@functools.cache
def varlen_attn_available() -> bool:
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The concrete backend `backend` means for tensors on `device` of `dtype` (ValueError if it cannot run)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
    cuda = device.type == "cuda"
    if backend == "auto":
        if cuda and dtype in _HALF:
            return "flash" if flash_attn_available() else "varlen" if varlen_attn_available() else "nested"
        return "nested" if cuda else "bucketed"
    if backend in ("flash", "varlen"):
        if not cuda or dtype not in _HALF:
            raise ValueError(f"backend {backend!r} needs CUDA fp16/bf16 tensors, got {device.type} {dtype}")
        if backend == "flash" and not flash_attn_available():
            raise ValueError("backend 'flash' requested but the flash_attn package is not installed")
        if backend == "varlen" and not varlen_attn_available():
            raise ValueError(f"backend 'varlen' requested but torch {torch.__version__} has no "
                             "torch.nn.attention.varlen")
    return backend


def _validate(q_THD: torch.Tensor, k_THD: torch.Tensor, v_THD: torch.Tensor, cu_seqlens: torch.Tensor,
              max_seqlen: int, bounds: Sequence[int] | None) -> None:
    if q_THD.ndim != 3 or k_THD.shape != q_THD.shape or v_THD.ndim != 3 or v_THD.shape[:2] != q_THD.shape[:2]:
        raise ValueError(f"q, k, v must be (T, H, D) with matching T, H (and D for q, k); got "
                         f"{tuple(q_THD.shape)}, {tuple(k_THD.shape)}, {tuple(v_THD.shape)}")
    if not (q_THD.dtype == k_THD.dtype == v_THD.dtype) or not (q_THD.device == k_THD.device == v_THD.device):
        raise ValueError(f"q, k, v differ in dtype or device: {q_THD.dtype}/{k_THD.dtype}/{v_THD.dtype} on "
                         f"{q_THD.device}/{k_THD.device}/{v_THD.device}")
    if cu_seqlens.ndim != 1 or len(cu_seqlens) < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32/int64 (B + 1,) with B >= 1, got {cu_seqlens.dtype} "
                         f"{tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != q_THD.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device}, q on {q_THD.device}")
    if bounds is None:
        lengths_B = cu_seqlens[1:] - cu_seqlens[:-1]
        # One host sync for all the checks: the varlen kernels read out of bounds on a bad cu_seqlens rather than
        # fail. Callers that hold the boundaries on the host (`bounds`) spare the step this sync in every layer.
        first, last, min_len, max_len = torch.stack([cu_seqlens[0], cu_seqlens[-1], lengths_B.min(),
                                                     lengths_B.max()]).tolist()
    else:
        if len(bounds) != len(cu_seqlens):
            raise ValueError(f"bounds has {len(bounds)} entries, cu_seqlens {len(cu_seqlens)}")
        steps = [e - s for s, e in itertools.pairwise(bounds)]
        first, last, min_len, max_len = bounds[0], bounds[-1], min(steps), max(steps)
    if first != 0 or last != q_THD.shape[0] or min_len < 0:
        raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end at T = {q_THD.shape[0]}; got "
                         f"first {first}, last {last}, smallest step {min_len}")
    if max_seqlen < max_len:
        raise ValueError(f"max_seqlen = {max_seqlen} but the longest sequence has {max_len} tokens")


def _nested(x_THD: torch.Tensor, offsets_B1: torch.Tensor, max_seqlen: int) -> torch.Tensor:
    # (T, H, D) -> jagged (B, j, H, D), a view of the same buffer, -> (B, H, j, D), the layout SDPA expects.
    # Jagged SDPA rejects strided values (q, k, v unbound from one fused qkv projection), and on CPU then fails
    # inside its cuDNN check, so make them dense first.
    values = x_THD.contiguous()
    return torch.nested.nested_tensor_from_jagged(values, offsets_B1, max_seqlen=max_seqlen).transpose(1, 2)


def _nested_attention(q_THD: torch.Tensor, k_THD: torch.Tensor, v_THD: torch.Tensor, cu_seqlens: torch.Tensor,
                      max_seqlen: int, scale: float | None) -> torch.Tensor:
    offsets = cu_seqlens.to(torch.int64)  # all three views must share one offsets tensor (one ragged dim)
    out = F.scaled_dot_product_attention(_nested(q_THD, offsets, max_seqlen), _nested(k_THD, offsets, max_seqlen),
                                         _nested(v_THD, offsets, max_seqlen), scale=scale)
    return out.transpose(1, 2).values()


def _padded_attention(q_THD: torch.Tensor, k_THD: torch.Tensor, v_THD: torch.Tensor, cu_seqlens: torch.Tensor,
                      max_seqlen: int, scale: float | None, masked: bool = True) -> torch.Tensor:
    T, B = q_THD.shape[0], len(cu_seqlens) - 1
    if not masked:
        # Equal lengths: the packed rows already are a (B, L) grid, so a view replaces the scatter and gather.
        assert T == B * max_seqlen, "unmasked padded attention needs sequences of exactly max_seqlen tokens"
        q_BHLD, k_BHLD, v_BHLD = (x.view(B, max_seqlen, *x.shape[1:]).transpose(1, 2) for x in (q_THD, k_THD, v_THD))
        out_BHLD = F.scaled_dot_product_attention(q_BHLD, k_BHLD, v_BHLD, scale=scale)
        return out_BHLD.transpose(1, 2).reshape(T, *out_BHLD.shape[1::2])
    starts = cu_seqlens.to(torch.int64)
    seq_T = torch.searchsorted(starts[1:], torch.arange(T, device=q_THD.device), right=True)
    pos_T = torch.arange(T, device=q_THD.device) - starts[seq_T]

    def pad(x_THD: torch.Tensor) -> torch.Tensor:
        x_BLHD = x_THD.new_zeros(B, max_seqlen, *x_THD.shape[1:]).index_put((seq_T, pos_T), x_THD)
        return x_BLHD.transpose(1, 2)

    # Keys only: padded query rows still see real keys (no all-masked softmax rows) and are dropped below.
    lengths_B1 = (starts[1:] - starts[:-1])[:, None]
    key_mask_B11L = (torch.arange(max_seqlen, device=q_THD.device) < lengths_B1)[:, None, None]
    out_BHLD = F.scaled_dot_product_attention(pad(q_THD), pad(k_THD), pad(v_THD), attn_mask=key_mask_B11L, scale=scale)
    return out_BHLD.transpose(1, 2)[seq_T, pos_T]


def _bucketed_attention(q_THD: torch.Tensor, k_THD: torch.Tensor, v_THD: torch.Tensor, cu_seqlens: torch.Tensor,
                        max_seqlen: int, scale: float | None, bounds: Sequence[int] | None = None) -> torch.Tensor:
    # Sequences sorted longest first and cut into runs whose lengths stay within _BUCKET_FILL of the run's longest:
    # one dense SDPA per run, so the loop is over length classes (a few dozen at most), not over sequences, and
    # padding wastes under 1 - _BUCKET_FILL**2 of the attention FLOPs. Runs of equal lengths need no mask.
    lengths = [e - s for s, e in itertools.pairwise(cu_seqlens.tolist() if bounds is None else bounds)]
    order = sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True)
    sorted_lengths = [lengths[i] for i in order]
    device = q_THD.device
    sorted_lengths_B = torch.tensor(sorted_lengths, device=device)
    new_starts_B = torch.cumsum(sorted_lengths_B, 0) - sorted_lengths_B
    old_starts_B = cu_seqlens.to(torch.int64)[torch.tensor(order, device=device)]
    # Token t of the length-sorted layout sits at row gather_T[t] of the input.
    gather_T = torch.arange(q_THD.shape[0], device=device) + torch.repeat_interleave(
        old_starts_B - new_starts_B, sorted_lengths_B, output_size=q_THD.shape[0])  # the size given: no sync
    runs, first = [], 0
    while first < len(sorted_lengths) and sorted_lengths[first] > 0:  # zero-length sequences sort last
        last = first
        while last < len(sorted_lengths) and sorted_lengths[last] >= _BUCKET_FILL * sorted_lengths[first]:
            last += 1
        runs.append(sorted_lengths[first:last])
        first = last
    # split, not slicing: each slice's backward would allocate and add a full (T, H, D) gradient.
    sizes = [sum(run) for run in runs]
    outs = []
    for run, q_RHD, k_RHD, v_RHD in zip(runs, *(x[gather_T].split(sizes) for x in (q_THD, k_THD, v_THD))):
        cu_run = torch.tensor([0, *itertools.accumulate(run)], device=device)
        outs.append(_padded_attention(q_RHD, k_RHD, v_RHD, cu_run, run[0], scale, masked=run[-1] != run[0]))
    inverse_T = torch.empty_like(gather_T)
    inverse_T[gather_T] = torch.arange(len(gather_T), device=device)
    return torch.cat(outs)[inverse_T]


@functools.cache
def _varlen_takes_scale() -> bool:
    from torch.nn.attention.varlen import varlen_attn

    names = list(inspect.signature(varlen_attn).parameters)
    # torch 2.11 (the GPU image) and 2.15 both start with these seven; anything else is an API we have not seen.
    expected = ["query", "key", "value", "cu_seq_q", "cu_seq_k", "max_q", "max_k"]
    if names[:7] != expected:
        raise RuntimeError(f"torch {torch.__version__}: varlen_attn{inspect.signature(varlen_attn)} does not start "
                           f"with {expected}; update flux3d.models.attention for this torch version")
    return "scale" in names


def _varlen_attention(q_THD: torch.Tensor, k_THD: torch.Tensor, v_THD: torch.Tensor, cu_seqlens: torch.Tensor,
                      max_seqlen: int, scale: float | None) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    cu = cu_seqlens.to(torch.int32)
    if _varlen_takes_scale():
        return varlen_attn(q_THD, k_THD, v_THD, cu, cu, max_seqlen, max_seqlen, scale=scale)
    if scale is not None:
        # Older varlen_attn always scales by 1/sqrt(D); folding the ratio into q gives the same logits.
        q_THD = q_THD * (scale * math.sqrt(q_THD.shape[-1]))
    return varlen_attn(q_THD, k_THD, v_THD, cu, cu, max_seqlen, max_seqlen)


def _flash_attention(q_THD: torch.Tensor, k_THD: torch.Tensor, v_THD: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, scale: float | None) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    cu = cu_seqlens.to(torch.int32)
    return flash_attn_varlen_func(q_THD, k_THD, v_THD, cu, cu, max_seqlen, max_seqlen, softmax_scale=scale)


_IMPLS = {"flash": _flash_attention, "varlen": _varlen_attention, "nested": _nested_attention,
          "bucketed": _bucketed_attention, "padded": _padded_attention}


def varlen_attention(q_THD: torch.Tensor, k_THD: torch.Tensor, v_THD: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, *, backend: str = "auto", scale: float | None = None,
                     bounds: Sequence[int] | None = None) -> torch.Tensor:
    """Softmax attention of each packed sequence with itself only.

    Args:
        q_THD, k_THD, v_THD: packed queries, keys, values (v may have its own head dim).
        cu_seqlens: (B + 1,) int32/int64 sequence boundaries, 0 first and T last, on q's device.
        max_seqlen: the longest sequence's length (an upper bound is accepted; the padded backend pads to it).
        backend: "auto", "flash", "varlen", "nested", "bucketed" or "padded" (see the module docstring).
        scale: logit scale; None means 1 / sqrt(D).
        bounds: `cu_seqlens` as host ints, when the caller has them (a layout built in the loader): the checks and
            the bucketed backend read them instead of copying cu_seqlens back, a device->host sync per call.

    Returns:
        (T, H, Dv) outputs in the input's row order and dtype.
    """
    _validate(q_THD, k_THD, v_THD, cu_seqlens, max_seqlen, bounds)
    impl = _IMPLS[resolve_backend(backend, q_THD.device, q_THD.dtype)]
    if q_THD.shape[0] == 0:
        return v_THD.new_zeros(v_THD.shape)
    if impl is _bucketed_attention:
        return impl(q_THD, k_THD, v_THD, cu_seqlens, max_seqlen, scale, bounds)
    return impl(q_THD, k_THD, v_THD, cu_seqlens, max_seqlen, scale)


@dataclass(frozen=True)
class WindowPartition:
    """Tokens regrouped by (batch, window): `x_THD[perm]` is window-contiguous, `y[inverse]` undoes it."""

    perm: torch.Tensor  # (T,) int64, a stable sort of the tokens by window
    inverse: torch.Tensor  # (T,) int64, inverse[perm[t]] = t
    cu_seqlens: torch.Tensor  # (W + 1,) int32 window boundaries in the permuted order
    max_seqlen: int  # most tokens in one window
    bounds: tuple[int, ...]  # cu_seqlens on the host: attention reads them without a device->host copy

    @property
    def num_windows(self) -> int:
        return len(self.cu_seqlens) - 1

    def to(self, device: torch.device | str, non_blocking: bool = False) -> WindowPartition:
        return WindowPartition(self.perm.to(device, non_blocking=non_blocking),
                               self.inverse.to(device, non_blocking=non_blocking),
                               self.cu_seqlens.to(device, non_blocking=non_blocking), self.max_seqlen, self.bounds)

    def pin_memory(self) -> WindowPartition:
        return WindowPartition(self.perm.pin_memory(), self.inverse.pin_memory(), self.cu_seqlens.pin_memory(),
                               self.max_seqlen, self.bounds)


def window_partition(coords_T4: torch.Tensor, window: int, shift: int = 0) -> WindowPartition:
    """Group voxel tokens [batch, x, y, z] into `window`^3 cells of (x + shift, y + shift, z + shift).

    A shift in (0, window) moves every window boundary by -shift (Swin's shifted windows; TRELLIS "swin8"
    alternates shift 0 and 4), so tokens split by one partition meet in the other. Windows never span two assets
    because the batch index is part of the key. Compute it once per batch and reuse it in every layer: it reads
    data-dependent sizes back to the host (torch.unique, the window bounds), so the trainer builds it in the loader.
    """
    if coords_T4.ndim != 2 or coords_T4.shape[1] != 4 or coords_T4.is_floating_point():
        raise ValueError(f"coords must be integer (T, 4) [batch, x, y, z], got {coords_T4.dtype} "
                         f"{tuple(coords_T4.shape)}")
    if window < 1 or not 0 <= shift < window:
        raise ValueError(f"need window >= 1 and 0 <= shift < window, got window {window}, shift {shift}")
    T = coords_T4.shape[0]
    if T == 0:
        raise ValueError("cannot partition zero tokens into windows")
    cells_T4 = coords_T4.to(torch.int64)
    cells_T4 = torch.cat([cells_T4[:, :1], torch.div(cells_T4[:, 1:] + shift, window, rounding_mode="floor")], dim=1)
    low, high = cells_T4.amin(0), cells_T4.amax(0)
    # Mixed-radix key over the occupied range of each column: ordering by key is ordering by (b, wx, wy, wz).
    extent = (high - low + 1).tolist()
    if math.prod(extent) >= 2**62:
        raise ValueError(f"coordinate range {extent} is too large to index windows with int64 keys")
    key_T = torch.zeros(T, dtype=torch.int64, device=coords_T4.device)
    for col in range(4):
        key_T = key_T * extent[col] + (cells_T4[:, col] - low[col])
    _, window_T, counts_W = torch.unique(key_T, return_inverse=True, return_counts=True)
    perm = torch.sort(window_T, stable=True).indices
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(T, device=perm.device)
    cu_seqlens = F.pad(torch.cumsum(counts_W, 0), (1, 0)).to(torch.int32)
    bounds = tuple(cu_seqlens.tolist())
    return WindowPartition(perm, inverse, cu_seqlens, max(e - s for s, e in itertools.pairwise(bounds)), bounds)


def windowed_attention(q_THD: torch.Tensor, k_THD: torch.Tensor, v_THD: torch.Tensor, part: WindowPartition, *,
                       backend: str = "auto", scale: float | None = None) -> torch.Tensor:
    """Attention within each window of `part`; outputs in the input's token order."""
    if q_THD.shape[0] != part.perm.shape[0]:
        raise ValueError(f"q has {q_THD.shape[0]} tokens, the window partition {part.perm.shape[0]}")
    out_THD = varlen_attention(q_THD[part.perm], k_THD[part.perm], v_THD[part.perm], part.cu_seqlens,
                               part.max_seqlen, backend=backend, scale=scale, bounds=part.bounds)
    return out_THD[part.inverse]

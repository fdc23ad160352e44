"""A packed batch of sparse voxel sets, for the shard loader and the sparse transformer.

Voxel counts per asset range from about 1K to 60K, so padding every asset to the largest one in the batch would
waste most of the memory and attention FLOPs. Instead the samples are concatenated along the voxel axis and an
`offsets` vector (the `cu_seqlens` of varlen attention kernels) marks where each one starts:

    coords   (M, 4) int32     [batch_index, x, y, z], sample i occupies rows offsets[i]:offsets[i + 1]
    feats    (M, C) float     per-voxel features, same row order as coords
    offsets  (B + 1,) int64   cumulative voxel counts, offsets[0] = 0, offsets[-1] = M

The batch index column is redundant with `offsets`, but scatter/segment ops and sparse convolutions want it per
row, and computing it once here saves every consumer a `repeat_interleave`.

`patchify` / `unpatchify` are the SMDiT's structured 2^3 patchification of this layout (a kernel-2 stride-2
sparse convolution written as gather + Linear) and its exact inverse back onto the fine voxels; `patch_layout` is
the part of `patchify` that depends on the coordinates only, built once per batch in the loader.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


def _cat(parts: Sequence[ArrayLike]) -> torch.Tensor:
    if all(isinstance(p, np.ndarray) for p in parts):
        # One numpy concatenate, then a zero-copy view: arrays np.load'ed from bytes are read-only, which
        # torch.from_numpy would warn about per sample, and the concatenation is the one copy needed anyway.
        return torch.from_numpy(np.concatenate(parts))
    return torch.cat([p if isinstance(p, torch.Tensor) else torch.tensor(p) for p in parts])


@dataclass(frozen=True)
class SparseBatch:
    """B variable-length voxel sets packed without padding (see the module docstring for the layout)."""

    coords: torch.Tensor
    feats: torch.Tensor
    offsets: torch.Tensor

    def __post_init__(self) -> None:
        if self.coords.ndim != 2 or self.coords.shape[1] != 4:
            raise ValueError(f"coords must be (M, 4), got {tuple(self.coords.shape)}")
        if self.feats.ndim < 2 or self.feats.shape[0] != self.coords.shape[0]:
            raise ValueError(f"feats must be (M, C) with M = {self.coords.shape[0]}, got {tuple(self.feats.shape)}")
        if self.offsets.ndim != 1 or len(self.offsets) < 1 or self.offsets.dtype != torch.int64:
            raise ValueError(f"offsets must be int64 (B + 1,), got {self.offsets.dtype} {tuple(self.offsets.shape)}")

    @classmethod
    def from_list(cls, coords_list: Sequence[ArrayLike], feats_list: Sequence[ArrayLike],
                  dtype: torch.dtype | None = None) -> SparseBatch:
        """Pack per-sample (N_i, 3) coords and (N_i, C) feats (numpy or torch); `dtype` casts the features."""
        if len(coords_list) != len(feats_list):
            raise ValueError(f"{len(coords_list)} coords arrays but {len(feats_list)} feature arrays")
        if not coords_list:
            raise ValueError("cannot pack an empty batch")
        for i, (c, f) in enumerate(zip(coords_list, feats_list)):
            if c.ndim != 2 or c.shape[1] != 3 or f.ndim != 2 or f.shape[0] != c.shape[0]:
                raise ValueError(f"sample {i}: coords {tuple(c.shape)} / feats {tuple(f.shape)} are not (N, 3) / "
                                 f"(N, C)")
        lengths = torch.tensor([len(c) for c in coords_list], dtype=torch.int64)
        offsets = torch.zeros(len(coords_list) + 1, dtype=torch.int64)
        torch.cumsum(lengths, 0, out=offsets[1:])
        batch_index = torch.repeat_interleave(torch.arange(len(coords_list), dtype=torch.int32), lengths)
        packed = torch.cat([batch_index[:, None], _cat(coords_list).to(torch.int32)], dim=1)
        packed_feats = _cat(feats_list)
        if dtype is not None:
            packed_feats = packed_feats.to(dtype)
        return cls(packed, packed_feats, offsets)

    @property
    def batch_size(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> torch.Tensor:
        """(B,) int64 voxel count per sample."""
        return self.offsets[1:] - self.offsets[:-1]

    @property
    def max_length(self) -> int:
        """Longest sample (varlen attention's `max_seqlen`); a host sync when offsets are on the GPU."""
        return int(self.lengths.max()) if self.batch_size else 0

    @property
    def cu_seqlens(self) -> torch.Tensor:
        """`offsets` as int32, the dtype flash-attention's varlen kernels require."""
        return self.offsets.to(torch.int32)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SparseBatch:
        return SparseBatch(self.coords.to(device, non_blocking=non_blocking),
                           self.feats.to(device, non_blocking=non_blocking),
                           self.offsets.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> SparseBatch:
        # DataLoader(pin_memory=True) calls this on custom batch types.
        return SparseBatch(self.coords.pin_memory(), self.feats.pin_memory(), self.offsets.pin_memory())

    def replace(self, feats: torch.Tensor) -> SparseBatch:
        """The same voxel layout with other features (a layer's output); coords and offsets are shared, not copied."""
        if feats.shape[0] != self.coords.shape[0]:
            raise ValueError(f"new feats have {feats.shape[0]} rows, the layout has {self.coords.shape[0]}")
        return dataclasses.replace(self, feats=feats)

    def unbind(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-sample (coords (N_i, 3), feats (N_i, C)) views into the packed tensors (no copies)."""
        bounds: list[int] = self.offsets.tolist()
        return [(self.coords[s:e, 1:], self.feats[s:e]) for s, e in itertools.pairwise(bounds)]


@dataclass(frozen=True)
class PatchIndex:
    """Where each fine voxel went in `patchify`: coarse row `coarse_row[m]`, channel slot `child_slot[m]`.

    The slot of child (dx, dy, dz) in [0, f)^3 is (dx * f + dy) * f + dz, so coarse features are laid out
    (Mc, f^3, C) flattened to (Mc, f^3 * C): slot-major, channels inside.
    """

    coarse_row: torch.Tensor  # (M,) int64
    child_slot: torch.Tensor  # (M,) int64
    factor: int
    num_coarse: int


@dataclass(frozen=True)
class PatchLayout:
    """All of `patchify` that depends on the coordinates only, with the coarse per-sample bounds as host ints.

    Building it reads data-dependent sizes back to the host (torch.unique, bincount, the bounds): on a GPU each is a
    sync that stalls the step. So the trainer builds it on the CPU in the loader's workers (`patch_layout`) and
    moves it to the device with the batch; the model's step then has nothing left to read back.
    """

    coords: torch.Tensor  # (Mc, 4) coarse [b, x, y, z], sorted, in the fine coords' dtype
    offsets: torch.Tensor  # (B + 1,) int64 coarse voxels per sample, cumulative
    bounds: tuple[int, ...]  # `offsets` on the host
    index: PatchIndex

    @property
    def num_coarse(self) -> int:
        return self.index.num_coarse

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PatchLayout:
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=non_blocking)
        i = self.index
        return PatchLayout(move(self.coords), move(self.offsets), self.bounds,
                           PatchIndex(move(i.coarse_row), move(i.child_slot), i.factor, i.num_coarse))

    def pin_memory(self) -> PatchLayout:
        i = self.index
        return PatchLayout(self.coords.pin_memory(), self.offsets.pin_memory(), self.bounds,
                           PatchIndex(i.coarse_row.pin_memory(), i.child_slot.pin_memory(), i.factor, i.num_coarse))


def patch_layout(coords_M4: torch.Tensor, batch_size: int, factor: int = 2) -> PatchLayout:
    """The coarse voxels of `patchify(batch, factor)` for a batch of `batch_size` samples with these coords."""
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    fine_dtype, coords_M4 = coords_M4.dtype, coords_M4.to(torch.int64)
    if len(coords_M4) and int(coords_M4.min()) < 0:
        raise ValueError("patchify needs non-negative batch indices and voxel coordinates")
    cells_M4 = torch.cat([coords_M4[:, :1], coords_M4[:, 1:] // factor], dim=1)
    local_M3 = coords_M4[:, 1:] % factor
    child_slot = (local_M3[:, 0] * factor + local_M3[:, 1]) * factor + local_M3[:, 2]
    # Mixed-radix key: sorting by it is sorting by (b, x, y, z), which torch.unique does for us.
    extent = (cells_M4.amax(0) + 1).tolist() if len(cells_M4) else [1, 1, 1, 1]
    key_M = torch.zeros(len(cells_M4), dtype=torch.int64, device=cells_M4.device)
    for col in range(4):
        key_M = key_M * extent[col] + cells_M4[:, col]
    coarse_keys, coarse_row = torch.unique(key_M, return_inverse=True)
    num_coarse, slots = len(coarse_keys), factor**3
    flat_slot_M = coarse_row * slots + child_slot
    if len(flat_slot_M) and int(torch.bincount(flat_slot_M, minlength=num_coarse * slots).max()) > 1:
        raise ValueError("patchify found two voxels with the same (batch, x, y, z)")

    coarse_coords = torch.empty(num_coarse, 4, dtype=torch.int64, device=cells_M4.device)
    coarse_coords[coarse_row] = cells_M4  # every child of a coarse voxel writes the same cell
    counts_B = torch.bincount(coarse_coords[:, 0], minlength=batch_size)
    if len(counts_B) != batch_size:
        raise ValueError(f"coords hold batch indices beyond the batch size {batch_size}")
    offsets = torch.zeros(batch_size + 1, dtype=torch.int64, device=cells_M4.device)
    torch.cumsum(counts_B, 0, out=offsets[1:])
    return PatchLayout(coarse_coords.to(fine_dtype), offsets, tuple(offsets.tolist()),
                       PatchIndex(coarse_row, child_slot, factor, num_coarse))


def patchify(batch: SparseBatch, factor: int = 2, layout: PatchLayout | None = None) -> tuple[SparseBatch, PatchIndex]:
    """Merge each factor^3 block of fine voxels into one coarse voxel whose features hold its children's.

    Coarse voxels are the occupied (b, x // f, y // f, z // f), sorted by (b, x, y, z) and packed per sample.
    Their features (Mc, f^3 * C) place each child's C features in its slot and zeros where a child is inactive:
    exactly the im2col input of a kernel-f stride-f sparse convolution, so a Linear(f^3 * C, C') applied to them
    is that convolution (the structured 2^3 patchification of the SMDiT) and `unpatchify` is its exact inverse.
    `layout` is `patch_layout(batch.coords, batch.batch_size, factor)` built beforehand (then nothing here syncs).
    """
    if batch.feats.ndim != 2:
        raise ValueError(f"patchify needs (M, C) feats, got {tuple(batch.feats.shape)}")
    if layout is None:
        layout = patch_layout(batch.coords, batch.batch_size, factor)
    elif layout.index.factor != factor or len(layout.index.coarse_row) != len(batch.coords):
        raise ValueError(f"the patch layout is for {len(layout.index.coarse_row)} voxels at factor "
                         f"{layout.index.factor}, the batch has {len(batch.coords)} at factor {factor}")
    index, slots = layout.index, factor**3
    feats_MC = batch.feats
    coarse_feats = feats_MC.new_zeros(index.num_coarse * slots, feats_MC.shape[1]).index_put(
        (index.coarse_row * slots + index.child_slot,), feats_MC)
    return SparseBatch(layout.coords, coarse_feats.reshape(index.num_coarse, -1), layout.offsets), index


def unpatchify(coarse_feats: torch.Tensor, index: PatchIndex) -> torch.Tensor:
    """(Mc, f^3 * C') coarse features -> (M, C') per fine voxel, in the fine batch's original row order.

    Slots of inactive children are dropped; with C' = C this inverts `patchify` exactly.
    """
    slots = index.factor**3
    if coarse_feats.ndim != 2 or coarse_feats.shape[0] != index.num_coarse or coarse_feats.shape[1] % slots:
        raise ValueError(f"coarse feats must be ({index.num_coarse}, {slots} * C), got {tuple(coarse_feats.shape)}")
    return coarse_feats.reshape(index.num_coarse * slots, -1)[index.coarse_row * slots + index.child_slot]

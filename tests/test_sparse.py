"""Structured patchify: exact round trip, equality with a dense strided conv3d (forward and gradient), and the
coarse layout (sorted, packed per sample with correct offsets) checked against plain-Python bookkeeping."""

from __future__ import annotations

import pytest
import torch

from flux3d.models.sparse import SparseBatch, patchify, unpatchify

GRID = 12  # divisible by both factors tested


def random_batch(lengths: list[int], channels: int = 3, seed: int = 0, shuffle: bool = True) -> SparseBatch:
    """Distinct random voxels per sample in [0, GRID)^3, rows in random order (not sorted by coordinate)."""
    g = torch.Generator().manual_seed(seed)
    coords, feats = [], []
    for n in lengths:
        flat = torch.randperm(GRID**3, generator=g)[:n]
        if not shuffle:
            flat = flat.sort().values
        coords.append(torch.stack([flat // GRID**2, flat // GRID % GRID, flat % GRID], dim=1))
        feats.append(torch.randn(n, channels, generator=g, dtype=torch.float64))
    return SparseBatch.from_list(coords, feats)


def densify(batch: SparseBatch, feats_MC: torch.Tensor) -> torch.Tensor:
    """(B, C, GRID, GRID, GRID) grid, zero where no voxel is active (differentiable in feats)."""
    b, x, y, z = batch.coords.long().unbind(1)
    dense = feats_MC.new_zeros(batch.batch_size, GRID, GRID, GRID, feats_MC.shape[1])
    return dense.index_put((b, x, y, z), feats_MC).permute(0, 4, 1, 2, 3)


@pytest.mark.parametrize("factor", [1, 2, 3])
def test_unpatchify_inverts_patchify_exactly(factor: int) -> None:
    batch = random_batch([1, 37, 200])
    coarse, index = patchify(batch, factor)
    assert coarse.feats.shape == (index.num_coarse, factor**3 * 3)
    assert torch.equal(unpatchify(coarse.feats, index), batch.feats)


@pytest.mark.parametrize("factor", [2, 3])
def test_linear_after_patchify_is_a_strided_conv3d(factor: int) -> None:
    batch = random_batch([5, 150, 60], channels=4, seed=1)
    fine_feats = batch.feats.clone().requires_grad_()
    coarse, _ = patchify(batch.replace(fine_feats), factor)
    conv = torch.nn.Conv3d(4, 6, kernel_size=factor, stride=factor, dtype=torch.float64)
    linear = torch.nn.Linear(factor**3 * 4, 6, dtype=torch.float64)
    with torch.no_grad():
        # Conv weight (out, in, dx, dy, dz) -> slot-major (out, dx, dy, dz, in), the patchify channel layout.
        linear.weight.copy_(conv.weight.permute(0, 2, 3, 4, 1).reshape(6, -1))
        linear.bias.copy_(conv.bias)
    sparse_out = linear(coarse.feats)

    dense_feats = batch.feats.clone().requires_grad_()
    dense_out = conv(densify(batch, dense_feats))
    b, x, y, z = coarse.coords.long().unbind(1)
    dense_at_active = dense_out.permute(0, 2, 3, 4, 1)[b, x, y, z]
    torch.testing.assert_close(sparse_out, dense_at_active, atol=1e-12, rtol=0)

    weights = torch.randn_like(sparse_out)
    (sparse_out * weights).sum().backward()
    (dense_at_active * weights).sum().backward()
    assert fine_feats.grad is not None and fine_feats.grad.abs().sum() > 0
    torch.testing.assert_close(fine_feats.grad, dense_feats.grad, atol=1e-12, rtol=0)


def test_coarse_layout_is_sorted_and_packed_per_sample() -> None:
    lengths = [1, 90, 3, 240]
    batch = random_batch(lengths, seed=2)
    coarse, index = patchify(batch, 2)
    expected = sorted({(b, x // 2, y // 2, z // 2) for b, x, y, z in batch.coords.tolist()})
    assert coarse.coords.tolist() == [list(c) for c in expected]  # unique, sorted by (b, x, y, z)
    assert coarse.coords.dtype == batch.coords.dtype and coarse.offsets.dtype == torch.int64
    counts = [sum(1 for c in expected if c[0] == b) for b in range(len(lengths))]
    assert coarse.lengths.tolist() == counts
    for b, (start, end) in enumerate(zip(coarse.offsets.tolist(), coarse.offsets.tolist()[1:])):
        assert (coarse.coords[start:end, 0] == b).all()
    # The index points every fine voxel at its own parent and at the slot of its position inside it.
    for m, (b, x, y, z) in enumerate(batch.coords.tolist()):
        assert coarse.coords[index.coarse_row[m]].tolist() == [b, x // 2, y // 2, z // 2]
        assert int(index.child_slot[m]) == (x % 2) * 4 + (y % 2) * 2 + z % 2


def test_unpatchify_routes_new_channels_to_each_child() -> None:
    batch = random_batch([40, 70], seed=3)
    coarse, index = patchify(batch, 2)
    # Coarse row r, slot s carries the pair (r, s) in two output channels.
    rows = torch.arange(index.num_coarse, dtype=torch.float64)[:, None].expand(-1, 8)
    slots = torch.arange(8, dtype=torch.float64)[None, :].expand(index.num_coarse, -1)
    fine = unpatchify(torch.stack([rows, slots], dim=2).reshape(index.num_coarse, 16), index)
    assert fine.shape == (len(batch.coords), 2)
    assert torch.equal(fine[:, 0].long(), index.coarse_row) and torch.equal(fine[:, 1].long(), index.child_slot)


def test_inactive_children_are_zero() -> None:
    coords = torch.tensor([[0, 0, 0], [1, 1, 1], [4, 4, 5]])
    batch = SparseBatch.from_list([coords], [torch.ones(3, 2)])
    coarse, _ = patchify(batch, 2)
    assert coarse.coords.tolist() == [[0, 0, 0, 0], [0, 2, 2, 2]]
    slots = coarse.feats.reshape(2, 8, 2)[:, :, 0]
    assert slots.tolist() == [[1, 0, 0, 0, 0, 0, 0, 1], [0, 1, 0, 0, 0, 0, 0, 0]]


def test_patchify_rejects_bad_input() -> None:
    dup = SparseBatch.from_list([torch.tensor([[1, 2, 3], [1, 2, 3]])], [torch.zeros(2, 1)])
    with pytest.raises(ValueError, match="same"):
        patchify(dup)
    neg = SparseBatch.from_list([torch.tensor([[-1, 2, 3]])], [torch.zeros(1, 1)])
    with pytest.raises(ValueError, match="non-negative"):
        patchify(neg)
    coarse, index = patchify(random_batch([10]))
    with pytest.raises(ValueError, match="coarse feats"):
        unpatchify(coarse.feats[:, :-1], index)

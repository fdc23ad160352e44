"""N-axis RoPE and MARoPE: the rotation against explicit FLUX-convention 2x2 matrices, the properties RoPE must
have (norm preservation, relative-position invariance, one band per axis), where MARoPE puts each modality and
what that does to attention scores, and the sinusoidal absolute embedding of the ablation."""

from __future__ import annotations

import pytest
import torch

from flux3d.models.rope import (
    RotaryEmbedding,
    SinusoidalPositionEmbedding,
    apply_rotary,
    marope_positions,
    rope_axes,
)

AXES = [6, 4, 8]  # deliberately unequal bands, D = 18
BANDS = [range(0, 6), range(6, 10), range(10, 18)]


def rotated(x_THD: torch.Tensor, pos_TA: torch.Tensor, axes=AXES, theta: float = 10000.0) -> torch.Tensor:
    return apply_rotary(x_THD, RotaryEmbedding(axes, theta)(pos_TA))


def random_inputs(T: int = 12, H: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, H, sum(AXES), generator=g, dtype=torch.float64), 20 * torch.rand(T, 3, generator=g)


def test_matches_explicit_rotation_matrices() -> None:
    x, pos = random_inputs()
    theta = 500.0
    # FLUX's rope(): per axis, omega = 1 / theta^(arange(0, d, 2) / d) and the matrix [[cos, -sin], [sin, cos]]
    # acting on each adjacent pair (x[2i], x[2i + 1]); bands concatenated in axis order.
    angles = torch.cat([pos[:, a, None].double() / theta ** (torch.arange(0, d, 2).double() / d)
                        for a, d in enumerate(AXES)], dim=1)
    c, s = angles.cos(), angles.sin()
    mats_TF22 = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    pairs_THF2 = x.reshape(*x.shape[:2], -1, 2)
    expected = torch.einsum("tfij,thfj->thfi", mats_TF22, pairs_THF2).reshape(x.shape)
    torch.testing.assert_close(rotated(x, pos, theta=theta), expected, atol=1e-5, rtol=1e-5)


def test_rotation_preserves_every_pair_norm() -> None:
    x, pos = random_inputs()
    pair_norm = lambda t: t.reshape(*t.shape[:2], -1, 2).norm(dim=-1)  # noqa: E731
    torch.testing.assert_close(pair_norm(rotated(x, pos)), pair_norm(x), atol=1e-12, rtol=1e-6)


def scores(q_THD: torch.Tensor, k_THD: torch.Tensor, pos_TA: torch.Tensor) -> torch.Tensor:
    """(H, T, T) dot products of rotated queries and keys."""
    return torch.einsum("thd,uhd->htu", rotated(q_THD, pos_TA), rotated(k_THD, pos_TA))


@pytest.mark.parametrize("axis", [0, 1, 2, None])
def test_scores_depend_on_relative_position_only(axis: int | None) -> None:
    q, pos = random_inputs(seed=1)
    k, _ = random_inputs(seed=2)
    shift = torch.zeros(3)
    if axis is None:
        shift = torch.tensor([3.7, -11.2, 25.1])
    else:
        shift[axis] = 17.3
    base = scores(q, k, pos)
    torch.testing.assert_close(scores(q, k, pos + shift), base, atol=2e-4, rtol=1e-4)
    # A shift of one token alone does change its scores: the invariance is not a vacuous identity.
    moved = pos.clone()
    moved[0] += shift
    assert (scores(q, k, moved)[:, 0, 1:] - base[:, 0, 1:]).abs().max() > 1e-2


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_each_axis_rotates_only_its_own_band(axis: int) -> None:
    x, pos = random_inputs()
    moved = pos.clone()
    moved[:, axis] += 2.5
    delta = (rotated(x, moved) - rotated(x, pos)).abs().amax(dim=(0, 1))
    inside = torch.zeros(sum(AXES), dtype=torch.bool)
    inside[list(BANDS[axis])] = True
    assert (delta[~inside] == 0).all()
    assert (delta[inside] > 1e-3).all()


def test_half_precision_is_rotated_in_float32() -> None:
    x, pos = random_inputs()
    rot = RotaryEmbedding(AXES)(pos)
    out = apply_rotary(x.to(torch.bfloat16), rot)
    assert out.dtype == torch.bfloat16 and rot.dtype == torch.complex64
    assert torch.equal(out, apply_rotary(x.to(torch.bfloat16).float(), rot).to(torch.bfloat16))
    assert apply_rotary(x, rot).dtype == torch.float64


def test_strided_views_of_a_fused_qkv_are_rotated_like_dense_copies() -> None:
    x, pos = random_inputs()
    rot = RotaryEmbedding(AXES)(pos)
    qkv_T3HD = torch.stack([x, 2 * x, 3 * x], dim=1).float()
    for i, view in enumerate(qkv_T3HD.unbind(1)):
        assert not view.is_contiguous()
        assert torch.equal(apply_rotary(view, rot), apply_rotary(view.contiguous(), rot))
        assert i == 0 or not torch.equal(apply_rotary(view, rot), apply_rotary(qkv_T3HD[:, 0], rot))


def test_rotary_validation_and_no_parameters() -> None:
    rope = RotaryEmbedding(AXES)
    assert list(rope.parameters()) == [] and rope.state_dict() == {} and rope.head_dim == 18
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding([6, 3])
    with pytest.raises(ValueError, match=r"\(T, 3\)"):
        rope(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="rotation must be"):
        apply_rotary(torch.zeros(4, 2, 16), rope(torch.zeros(4, 3)))


def test_rope_axes_split_the_head_dim_into_even_bands() -> None:
    assert rope_axes(64) == [22, 22, 20]
    assert rope_axes(72) == [24, 24, 24]
    for head_dim in (6, 32, 48, 128):
        axes = rope_axes(head_dim)
        assert sum(axes) == head_dim and all(d % 2 == 0 for d in axes) and max(axes) - min(axes) <= 2
    with pytest.raises(ValueError):
        rope_axes(63)


def test_marope_positions_place_voxels_inside_and_image_on_the_plane() -> None:
    voxels = torch.tensor([[0, 5, 7], [3, 3, 3], [7, 0, 6]])
    pos = marope_positions(voxels, (2, 3), grid=8)
    assert pos.shape == (3 + 6, 3) and pos.dtype == torch.float32
    assert torch.equal(pos[:3], voxels.float())
    assert pos[3:].tolist() == [[0, 0, 8], [0, 1, 8], [0, 2, 8], [1, 0, 8], [1, 1, 8], [1, 2, 8]]  # row-major
    stretched = marope_positions(voxels, (2, 4), grid=8, image_scale=None)[3:]
    assert stretched[:, 0].unique().tolist() == [0, 4] and stretched[:, 1].unique().tolist() == [0, 2, 4, 6]
    assert marope_positions(voxels[:0], (4, 4), grid=8).shape == (16, 3)
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        marope_positions(torch.tensor([[0, 0, 8]]), (2, 2), grid=8)


@pytest.mark.parametrize(("image_hw", "image_scale", "step"), [((8, 8), 1.0, 1), ((4, 4), None, 2)])
def test_image_token_favours_the_voxels_beneath_it(image_hw, image_scale, step) -> None:
    """With identical content everywhere, score(image token, voxel) = sum over pairs of cos(omega * delta), maximal
    at zero offset per axis. So on the voxel layer next to the plane each image token (i, j) scores highest on the
    voxel at (i * s, j * s), and down that voxel column the score falls with depth while omega * depth < pi for
    every frequency (depths 1..3). Misplaced planes (z = 0, transposed rows) fail this."""
    grid = 8
    x, y, z = torch.meshgrid(torch.arange(grid), torch.arange(grid), torch.arange(grid), indexing="ij")
    voxels = torch.stack([x, y, z], -1).reshape(-1, 3)
    pos = marope_positions(voxels, image_hw, grid, image_scale=image_scale)
    rope = RotaryEmbedding(rope_axes(24))
    content = torch.zeros(len(pos), 1, 24)
    content[..., 0::2] = 1.0  # every pair (1, 0): the same vector for every token
    rotated_T1D = apply_rotary(content, rope(pos))
    n = len(voxels)
    score_PN = rotated_T1D[n:, 0] @ rotated_T1D[:n, 0].T
    top = voxels[:, 2] == grid - 1
    best = voxels[top][score_PN[:, top].argmax(dim=1)]
    h, w = image_hw
    i, j = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    assert torch.equal(best[:, :2], torch.stack([i.flatten() * step, j.flatten() * step], 1))
    column = (voxels[:, 0] == 0) & (voxels[:, 1] == 0)  # beneath image token (0, 0), ordered by z
    by_depth = score_PN[0, column].flip(0)  # depth 1 (z = grid - 1), 2, 3, ...
    assert by_depth[0] > by_depth[1] > by_depth[2]


def test_sinusoidal_embedding_values_and_relative_structure() -> None:
    ape = SinusoidalPositionEmbedding(64, num_axes=3)  # 64 = 6 * 10 + 4: the last 4 channels stay zero
    pos = torch.tensor([[1.0, 2.0, 3.0], [0.5, 7.0, 2.0]])
    emb = ape(pos)
    assert emb.shape == (2, 64) and (emb[:, 60:] == 0).all()
    omega = 10000.0 ** -(torch.arange(10) / 10)
    torch.testing.assert_close(emb[0, 20:30], torch.sin(2.0 * omega))  # axis y, sine half
    torch.testing.assert_close(emb[0, 30:40], torch.cos(2.0 * omega))
    # <E(p), E(p')> = sum cos(omega (p - p')): a common shift of both positions leaves it unchanged.
    g = torch.Generator().manual_seed(0)
    a, b, shift = 30 * torch.rand(5, 3, generator=g), 30 * torch.rand(5, 3, generator=g), torch.tensor([4., -9., 13.])
    torch.testing.assert_close(ape(a) @ ape(b).T, ape(a + shift) @ ape(b + shift).T, atol=1e-4, rtol=1e-4)
    assert len(set(map(tuple, ape(torch.tensor([[0., 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])).tolist()))) == 4
    with pytest.raises(ValueError):
        SinusoidalPositionEmbedding(4, num_axes=3)

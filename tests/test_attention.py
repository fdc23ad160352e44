"""Packed variable-length attention and 3D window attention against independent references: a per-sequence
loop of plain SDPA, and dense attention under an explicit same-asset-same-window mask (forward and gradients)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flux3d.models.attention import (
    flash_attn_available,
    resolve_backend,
    varlen_attention,
    varlen_attn_available,
    window_partition,
    windowed_attention,
)

CPU_BACKENDS = ("nested", "bucketed", "padded")
# Very different lengths, a singleton, and several runs of similar length so "bucketed" forms masked and unmasked runs.
LENGTHS = [37, 1, 5, 64, 2, 60, 64, 33]
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


def cu_of(lengths: list[int], device: str = "cpu") -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=device)


def qkv(T: int, dtype: torch.dtype, device: str = "cpu", H: int = 2, D: int = 8, seed: int = 0):
    g = torch.Generator(device).manual_seed(seed)
    return [torch.randn(T, H, D, dtype=dtype, device=device, generator=g).requires_grad_() for _ in range(3)]


def loop_reference(q_THD, k_THD, v_THD, cu_seqlens, scale=None) -> torch.Tensor:
    bounds = cu_seqlens.tolist()
    outs = [F.scaled_dot_product_attention(*(x[s:e].transpose(0, 1) for x in (q_THD, k_THD, v_THD)),
                                           scale=scale).transpose(0, 1) for s, e in zip(bounds, bounds[1:])]
    return torch.cat(outs)


def assert_matches(out, ref, inputs, tol: float) -> None:
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad_out)
    ref_grads = torch.autograd.grad(ref, inputs, grad_out)
    for name, g, r in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(g, r, atol=tol, rtol=tol, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_matches_per_sequence_sdpa(backend: str, dtype: torch.dtype) -> None:
    cu = cu_of(LENGTHS)
    q, k, v = qkv(int(cu[-1]), dtype)
    out = varlen_attention(q, k, v, cu, max(LENGTHS), backend=backend)
    assert out.shape == q.shape and out.dtype == dtype
    assert_matches(out, loop_reference(q, k, v, cu), (q, k, v), TOL[dtype])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_custom_scale_int32_offsets_and_empty_sequence(backend: str) -> None:
    lengths = [7, 0, 12, 3]
    cu = cu_of(lengths).to(torch.int32)
    q, k, v = qkv(int(cu[-1]), torch.float64)
    out = varlen_attention(q, k, v, cu, 12, backend=backend, scale=0.3)
    assert_matches(out, loop_reference(q, k, v, cu, scale=0.3), (q, k, v), 1e-10)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_strided_views_of_a_fused_qkv(backend: str) -> None:
    cu = cu_of([5, 9, 1])
    qkv_T3HD = torch.randn(15, 3, 2, 8, dtype=torch.float64, requires_grad=True)
    q, k, v = qkv_T3HD.unbind(1)  # what a fused qkv Linear gives: non-contiguous views
    out = varlen_attention(q, k, v, cu, 9, backend=backend)
    ref = loop_reference(q, k, v, cu)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    grad_out = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, qkv_T3HD, grad_out)[0],
                               torch.autograd.grad(ref, qkv_T3HD, grad_out)[0], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sequences_do_not_see_each_other(backend: str) -> None:
    lengths = [9, 14, 6]
    cu = cu_of(lengths)
    q, k, v = (x.detach() for x in qkv(int(cu[-1]), torch.float64))
    out = varlen_attention(q, k, v, cu, 14, backend=backend)
    second = slice(9, 23)
    k2, v2 = k.clone(), v.clone()
    k2[second] += 5 * torch.randn_like(k2[second])
    v2[second] += 5 * torch.randn_like(v2[second])
    out2 = varlen_attention(q, k2, v2, cu, 14, backend=backend)
    torch.testing.assert_close(out2[:9], out[:9], atol=1e-12, rtol=0)
    torch.testing.assert_close(out2[23:], out[23:], atol=1e-12, rtol=0)
    assert (out2[second] - out[second]).abs().max() > 0.1  # the perturbation is visible where it should be


def test_auto_backend_choice() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_backend("auto", cpu, torch.float32) == "bucketed"
    assert resolve_backend("auto", cpu, torch.bfloat16) == "bucketed"
    assert resolve_backend("auto", cuda, torch.float32) == "nested"
    expected_half = "flash" if flash_attn_available() else "varlen" if varlen_attn_available() else "nested"
    assert resolve_backend("auto", cuda, torch.bfloat16) == expected_half
    with pytest.raises(ValueError, match="CUDA fp16/bf16"):
        resolve_backend("varlen", cpu, torch.bfloat16)
    with pytest.raises(ValueError, match="CUDA fp16/bf16"):
        resolve_backend("flash", cuda, torch.float32)
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("xformers", cpu, torch.float32)


@pytest.mark.parametrize(("cu", "max_seqlen", "match"), [
    ([1, 4, 10], 6, "start at 0"),
    ([0, 6, 4, 10], 6, "non-decreasing"),
    ([0, 4, 9], 5, "end at T"),
    ([0, 4, 10], 5, "longest sequence"),
])
def test_rejects_bad_boundaries(cu: list[int], max_seqlen: int, match: str) -> None:
    q, k, v = qkv(10, torch.float32)
    with pytest.raises(ValueError, match=match):
        varlen_attention(q, k, v, torch.tensor(cu), max_seqlen, backend="padded")


def test_rejects_bad_shapes_and_dtypes() -> None:
    q, k, v = qkv(10, torch.float32)
    cu = torch.tensor([0, 10])
    with pytest.raises(ValueError, match="int32/int64"):
        varlen_attention(q, k, v, cu.float(), 10)
    with pytest.raises(ValueError, match=r"\(T, H, D\)"):
        varlen_attention(q, k[:9], v, cu, 10)
    with pytest.raises(ValueError, match=r"\(T, H, D\)"):
        varlen_attention(q[:, 0], k[:, 0], v[:, 0], cu, 10)
    with pytest.raises(ValueError, match="differ in dtype"):
        varlen_attention(q, k.double(), v, cu, 10)


def random_coords(lengths: list[int], extent: int, seed: int = 0) -> torch.Tensor:
    """Distinct random voxels per asset in [0, extent)^3, packed as [batch, x, y, z]."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for b, n in enumerate(lengths):
        flat = torch.randperm(extent**3, generator=g)[:n]
        xyz = torch.stack([flat // extent**2, flat // extent % extent, flat % extent], dim=1)
        parts.append(torch.cat([torch.full((n, 1), b), xyz], dim=1))
    return torch.cat(parts).to(torch.int32)


def window_mask(coords_T4: torch.Tensor, window: int, shift: int) -> torch.Tensor:
    """(T, T) True where two tokens share an asset and every shifted window index (computed column by column)."""
    same = coords_T4[:, None, 0] == coords_T4[None, :, 0]
    for axis in (1, 2, 3):
        cell = (coords_T4[:, axis] + shift) // window
        same &= cell[:, None] == cell[None, :]
    return same


@pytest.mark.parametrize("shift", [0, 2])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_windowed_attention_equals_masked_dense_attention(backend: str, shift: int) -> None:
    coords = random_coords([60, 1, 45], extent=9, seed=shift)
    part = window_partition(coords, window=4, shift=shift)
    q, k, v = qkv(len(coords), torch.float64, seed=1)
    out = windowed_attention(q, k, v, part, backend=backend)
    mask_11TT = window_mask(coords, 4, shift)[None, None]
    ref = F.scaled_dot_product_attention(*(x.transpose(0, 1)[None] for x in (q, k, v)), attn_mask=mask_11TT)
    assert_matches(out, ref[0].transpose(0, 1), (q, k, v), 1e-10)


def test_partition_is_a_stable_grouping_by_asset_and_window() -> None:
    coords = random_coords([80, 30], extent=10, seed=3)
    part = window_partition(coords, window=4, shift=1)
    T = len(coords)
    assert torch.equal(torch.sort(part.perm).values, torch.arange(T))
    assert torch.equal(part.perm[part.inverse], torch.arange(T))
    assert part.cu_seqlens.dtype == torch.int32 and int(part.cu_seqlens[-1]) == T
    keys = torch.cat([coords[:, :1], (coords[:, 1:] + 1) // 4], dim=1)[part.perm]
    bounds = part.cu_seqlens.tolist()
    seen = []
    for s, e in zip(bounds, bounds[1:]):
        assert (keys[s:e] == keys[s]).all()  # one asset, one window
        assert (part.perm[s + 1:e] > part.perm[s:e - 1]).all()  # stable: original order inside a window
        seen.append(tuple(keys[s].tolist()))
    assert seen == sorted(set(seen))  # each window exactly once, in (batch, x, y, z) window order
    assert part.max_seqlen == max(e - s for s, e in zip(bounds, bounds[1:]))


def test_shift_moves_window_boundaries_and_windows_never_mix_assets() -> None:
    # x = 3, 4 share window [0, 8) unshifted but straddle the boundary at x + 4 = 8 when shifted by 4;
    # x = 7, 8 do the opposite. The same voxels in asset 1 form their own windows.
    xyz = torch.tensor([[3, 0, 0], [4, 0, 0], [7, 0, 0], [8, 0, 0]])
    coords = torch.cat([torch.cat([torch.full((4, 1), b), xyz], 1) for b in (0, 1)]).to(torch.int32)

    def groups(shift: int) -> set[frozenset[int]]:
        part = window_partition(coords, window=8, shift=shift)
        b = part.cu_seqlens.tolist()
        return {frozenset(part.perm[s:e].tolist()) for s, e in zip(b, b[1:])}

    assert groups(0) == {frozenset({0, 1, 2}), frozenset({3}), frozenset({4, 5, 6}), frozenset({7})}
    assert groups(4) == {frozenset({0}), frozenset({1, 2, 3}), frozenset({4}), frozenset({5, 6, 7})}


def test_window_partition_rejects_bad_input() -> None:
    coords = random_coords([5], extent=4)
    with pytest.raises(ValueError, match="shift < window"):
        window_partition(coords, window=4, shift=4)
    with pytest.raises(ValueError, match="integer"):
        window_partition(coords.float(), window=4)
    with pytest.raises(ValueError, match="tokens"):
        windowed_attention(*qkv(4, torch.float32), window_partition(coords, 4))


def gpu_backends() -> list[str]:
    return ["varlen", *(["flash"] if flash_attn_available() else [])]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("lengths", [LENGTHS, [3000, 17, 1200, 1, 640]])
def test_gpu_kernels_match_nested_in_bf16(lengths: list[int]) -> None:
    cu = cu_of(lengths, "cuda")
    gen = torch.Generator("cuda").manual_seed(0)
    qkv_T3HD = torch.randn(int(cu[-1]), 3, 4, 64, dtype=torch.bfloat16, device="cuda", generator=gen)
    qkv_T3HD.requires_grad_()
    q, k, v = qkv_T3HD.unbind(1)  # strided views, as from a fused qkv projection
    grad_out = torch.randn_like(q)
    scale = 0.2  # not 1/sqrt(D): exercises how each kernel is told the scale
    ref = varlen_attention(q, k, v, cu, max(lengths), backend="nested", scale=scale)
    (ref_grad,) = torch.autograd.grad(ref, qkv_T3HD, grad_out)
    exact = loop_reference(*(x.double() for x in (q, k, v)), cu, scale=scale)
    for backend in gpu_backends():
        out = varlen_attention(q, k, v, cu, max(lengths), backend=backend, scale=scale)
        torch.testing.assert_close(out.double(), exact, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
        for g, r in zip(torch.autograd.grad(out, qkv_T3HD, grad_out)[0].unbind(1), ref_grad.unbind(1)):
            torch.testing.assert_close(g, r, atol=5e-2, rtol=5e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["nested", "bucketed", "auto"])
def test_gpu_fp32_and_windows_match_reference(backend: str) -> None:
    coords = random_coords([400, 1, 250], extent=16).cuda()
    part = window_partition(coords, window=8, shift=4)
    q, k, v = qkv(len(coords), torch.float32, "cuda", H=4, D=32)
    out = windowed_attention(q, k, v, part, backend=backend)
    mask_11TT = window_mask(coords, 8, 4)[None, None]
    ref = F.scaled_dot_product_attention(*(x.transpose(0, 1)[None] for x in (q, k, v)), attn_mask=mask_11TT)
    assert_matches(out, ref[0].transpose(0, 1), (q, k, v), 1e-4)

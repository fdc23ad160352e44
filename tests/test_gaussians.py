"""Gaussian activation (TRELLIS parameterisation) and the 3DGS .ply round trip."""

from __future__ import annotations

import math
import os
import stat

import numpy as np
import pytest
import torch

from flux3d.models.gaussians import (
    PLY_FRAME_COMMENT,
    PLY_PROPERTIES,
    RAW_CHANNELS,
    SH_C0,
    GaussianConfig,
    Gaussians,
    gaussians_from_raw,
    load_ply,
    save_ply,
)

CFG = GaussianConfig(per_voxel=8, resolution=16)


def _radical_inverse(base: int, n: int) -> float:
    # Written out independently of scipy: TRELLIS's definition of the Hammersley coordinates.
    val, f = 0.0, 1.0 / base
    while n:
        val += (n % base) * f
        n //= base
        f /= base
    return val


def _coords(m: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    coords = torch.randint(0, CFG.resolution, (m, 3), generator=gen)
    coords[0] = 0
    coords[1] = CFG.resolution - 1
    return coords


def _centres(coords: torch.Tensor) -> torch.Tensor:
    return ((coords.double() + 0.5) / CFG.resolution - 0.5).repeat_interleave(CFG.per_voxel, 0)


def test_means_stay_within_offset_range_of_their_voxel_for_any_raw() -> None:
    coords = _coords(50)
    raw = torch.randn(50, CFG.per_voxel, RAW_CHANNELS, generator=torch.Generator().manual_seed(1)) * 20
    raw[:10] = 1e4
    raw[10:20] = -1e4
    g = gaussians_from_raw(raw, coords, CFG)
    offset_voxels = (g.means.double() - _centres(coords)) * CFG.resolution
    bound = CFG.offset_range / 2
    assert offset_voxels.abs().max() <= bound + 1e-5
    # The bound is tight: saturated raw values reach it (so the test above is not vacuous).
    assert torch.allclose(offset_voxels[: 10 * CFG.per_voxel], torch.tensor(bound, dtype=torch.float64), atol=1e-5)


def test_zero_raw_gives_trellis_initial_state() -> None:
    coords = _coords(3)
    g = gaussians_from_raw(torch.zeros(3, CFG.raw_channels), coords, CFG)
    k = CFG.per_voxel
    hammersley = torch.tensor([[i / k, _radical_inverse(2, i), _radical_inverse(3, i)] for i in range(k)]) - 0.5
    expected = _centres(coords) + hammersley.double().repeat(3, 1) / CFG.resolution
    assert torch.allclose(g.means.double(), expected, atol=1e-6)
    offsets = (g.means.double() - _centres(coords)) * CFG.resolution
    assert offsets.abs().max() <= 0.5 + 1e-5  # inside the voxel itself
    assert len(torch.unique(offsets[:k], dim=0)) == k  # spread, not stacked
    assert torch.allclose(g.scales, torch.full_like(g.scales, math.hypot(CFG.scale_bias, CFG.filter_3d)), rtol=1e-5)
    assert torch.allclose(g.opacities, torch.full_like(g.opacities, CFG.opacity_bias), rtol=1e-5)
    assert torch.equal(g.quats, torch.tensor([[1.0, 0, 0, 0]]).expand(3 * k, 4))
    assert torch.allclose(g.colors, torch.full_like(g.colors, 0.5))

    unperturbed = GaussianConfig(per_voxel=8, resolution=16, perturb_offsets=False)
    g0 = gaussians_from_raw(torch.zeros(3, CFG.raw_channels), coords, unperturbed)
    assert torch.allclose(g0.means.double(), _centres(coords), atol=1e-7)


def test_activations_ranges_and_layouts() -> None:
    coords = _coords(20)
    raw = torch.randn(20, CFG.per_voxel, RAW_CHANNELS, generator=torch.Generator().manual_seed(2)) * 3
    g = gaussians_from_raw(raw, coords, CFG)
    assert torch.allclose(g.quats.norm(dim=-1), torch.ones(len(g)), atol=1e-6)
    assert (g.scales >= CFG.filter_3d).all() and (g.opacities > 0).all() and (g.opacities < 1).all()
    assert torch.equal(g.sh0, raw[..., 3:6].reshape(-1, 3))
    flat = gaussians_from_raw(raw.reshape(20, -1), coords, CFG)
    assert torch.equal(flat.means, g.means) and torch.equal(flat.scales, g.scales)

    both = Gaussians.cat([g, flat.detach()])
    assert len(both) == 2 * len(g) and torch.equal(both.opacities[len(g):], g.opacities)
    g64 = gaussians_from_raw(raw.double(), coords, CFG)
    gbf = gaussians_from_raw(raw.bfloat16(), coords, CFG)
    assert g64.means.dtype == torch.float64 and gbf.means.dtype == torch.float32
    assert torch.allclose(g64.scales.float(), g.scales, rtol=1e-6)
    with pytest.raises(ValueError, match="raw must be"):
        gaussians_from_raw(raw[:, :3], coords, CFG)
    with pytest.raises(ValueError, match="coords must be integer"):
        gaussians_from_raw(raw, coords.float(), CFG)
    with pytest.raises(ValueError, match="offset_range"):
        GaussianConfig(offset_range=1.0)


def test_every_raw_channel_gets_a_gradient() -> None:
    raw = (0.5 * torch.randn(4, CFG.per_voxel, RAW_CHANNELS, generator=torch.Generator().manual_seed(3)))
    raw.requires_grad_()
    g = gaussians_from_raw(raw, _coords(4), CFG)
    weights = torch.Generator().manual_seed(4)
    loss = sum((t * torch.randn(t.shape, generator=weights)).sum() for t in (g.means, g.quats, g.scales,
                                                                             g.opacities, g.sh0))
    loss.backward()
    assert torch.isfinite(raw.grad).all()
    assert (raw.grad.abs().amax(dim=(0, 1)) > 0).all()


def _random_gaussians(n: int) -> Gaussians:
    gen = torch.Generator().manual_seed(5)
    return Gaussians(means=torch.randn(n, 3, generator=gen), quats=torch.nn.functional.normalize(
        torch.randn(n, 4, generator=gen), dim=-1), scales=torch.rand(n, 3, generator=gen) * 0.1 + 1e-3,
        opacities=torch.rand(n, generator=gen) * 0.98 + 0.01, sh0=torch.randn(n, 3, generator=gen))


def _covariances(q_N4: np.ndarray, s_N3: np.ndarray) -> np.ndarray:
    """R diag(s^2) R^T from wxyz quaternions, by the textbook formula (independent of the code under test)."""
    w, x, y, z = (q_N4 / np.linalg.norm(q_N4, axis=-1, keepdims=True)).T
    R = np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
                  2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
                  2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1).reshape(-1, 3, 3)
    return R @ (s_N3[:, :, None] ** 2 * R.transpose(0, 2, 1))


def test_ply_is_written_with_the_users_umask(tmp_path) -> None:
    old = os.umask(0o022)
    try:
        save_ply(_random_gaussians(3), tmp_path / "shared.ply")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "shared.ply").stat().st_mode) == 0o644


def test_ply_round_trip_and_viewer_layout(tmp_path) -> None:
    g = _random_gaussians(100)
    path = tmp_path / "scene.ply"
    save_ply(g, path)
    back = load_ply(path)
    for name in ("means", "quats", "scales", "opacities", "sh0"):
        assert torch.allclose(getattr(back, name), getattr(g, name), rtol=1e-5, atol=1e-6), name

    # Read the file the way a 3DGS viewer does: the header lines, then float32 records, pre-activation values.
    data = path.read_bytes()
    header, body = data.split(b"end_header\n", 1)
    assert header.decode().splitlines() == ["ply", "format binary_little_endian 1.0", PLY_FRAME_COMMENT,
                                            "element vertex 100", *(f"property float {p}" for p in PLY_PROPERTIES)]
    assert PLY_PROPERTIES[6:10] == ("f_dc_0", "f_dc_1", "f_dc_2", "opacity") and PLY_PROPERTIES[-4:] == (
        "rot_0", "rot_1", "rot_2", "rot_3")
    rec = np.frombuffer(body, dtype=np.dtype([(p, "<f4") for p in PLY_PROPERTIES]))
    p = g.opacities.double().numpy()
    np.testing.assert_allclose(rec["opacity"], np.log(p / (1 - p)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rec["scale_1"], np.log(g.scales[:, 1].numpy()), rtol=1e-5)
    # The 3DGS frame (y down), as INRIA and TRELLIS write it: positions (x, y, z) -> (x, -z, y), and each Gaussian's
    # covariance turned the same way (Sigma_file = T Sigma T^T), read through the file's own wxyz quaternion.
    T = np.array([[1.0, 0, 0], [0, 0, -1], [0, 1, 0]])
    means = g.means.double().numpy()
    np.testing.assert_allclose(np.stack([rec["x"], rec["y"], rec["z"]], -1), means @ T.T, atol=1e-6)
    q_file = np.stack([rec[f"rot_{i}"] for i in range(4)], -1).astype(np.float64)
    scales = g.scales.double().numpy()
    cov_world = _covariances(g.quats.double().numpy(), scales)
    np.testing.assert_allclose(_covariances(q_file, scales), T @ cov_world @ T.T, atol=1e-6)
    np.testing.assert_allclose(np.maximum(0.5 + SH_C0 * rec["f_dc_2"], 0), g.colors[:, 2].numpy(), atol=1e-6)
    assert not rec["nx"].any()
    assert sorted(q.name for q in tmp_path.iterdir()) == ["scene.ply"]  # no temporary file left


BAD_PLY = {
    "truncated": lambda good: good[:-5],
    "trailing bytes": lambda good: good + b"\0" * 68,
    "ascii format": lambda good: good.replace(b"binary_little_endian", b"ascii"),
    "missing property": lambda good: good.replace(b"property float rot_3\n", b""),
    "renamed property": lambda good: good.replace(b"property float opacity", b"property float alpha__"),
    "double property": lambda good: good.replace(b"property float x\n", b"property double x\n"),
    "extra element": lambda good: good.replace(b"end_header", b"element face 0\nend_header"),
    "no magic": lambda good: b"PLY\n" + good[4:],
}


@pytest.mark.parametrize("case", sorted(BAD_PLY))
def test_ply_rejects_bad_files(tmp_path, case: str) -> None:
    path = tmp_path / "g.ply"
    save_ply(_random_gaussians(10), path)
    path.write_bytes(BAD_PLY[case](path.read_bytes()))
    with pytest.raises(ValueError):
        load_ply(path)


def test_ply_write_is_atomic(tmp_path) -> None:
    target = tmp_path / "dir_in_the_way.ply"
    target.mkdir()
    with pytest.raises(OSError):
        save_ply(_random_gaussians(3), target)
    assert sorted(q.name for q in tmp_path.iterdir()) == ["dir_in_the_way.ply"]  # the temp file was removed

"""The sampler's conventions pinned analytically: a velocity field whose exact solution is known must be
integrated exactly, and classifier-free guidance must reduce to the unconditional (w = 0) and conditional (w = 1)
fields and combine them linearly in between.

The field: for a target x, v(z, t) = (z - x) / t is the rectified-flow velocity of the straight path
z_t = (1 - t) x + t eps that passes through z at time t. Along it z_t - x shrinks in proportion to t, so one Euler
step from t to t' lands exactly on the path (z_t' - x = (z_t - x) t' / t) on any time grid, and the sampler must
end at x. A wrong step sign, a grid that does not end at t = 0, or a missing de-normalisation all miss x.
"""

from __future__ import annotations

import pytest
import torch

from flux3d.config.training import SMDiTConfig
from flux3d.models.flow_matching import SamplerConfig, normalize, sample, time_grid
from flux3d.models.smdit import SMDiT


class KnownField(SMDiT):
    """An SMDiT whose velocity is the exact field towards `cond_target` (normalised latents), or towards
    `null_target` for the samples whose condition is dropped: the sampler's input with a known answer."""

    def __init__(self, cond_target: torch.Tensor, null_target: torch.Tensor) -> None:
        super().__init__(SMDiTConfig(width=32, heads=2, double_blocks=1, single_blocks=1, grid=16))
        self.cond_target, self.null_target = cond_target, null_target

    def forward(self, x_MC, coords_M4, offsets, t_B, cond_BCHW, drop_B=None, layout=None):  # noqa: ANN001, ANN201
        t_M1 = t_B[coords_M4[:, 0].long()][:, None]
        drop_M1 = drop_B[coords_M4[:, 0].long()][:, None]
        return (x_MC - torch.where(drop_M1, self.null_target, self.cond_target)) / t_M1


def _setup(seed: int = 0) -> tuple[KnownField, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    coords = torch.cat([torch.tensor([[0]] * 5 + [[1]] * 3), torch.randint(0, 16, (8, 3), generator=g)], 1)
    offsets = torch.tensor([0, 5, 8])
    x_cond, x_null = torch.randn(8, 16, generator=g) * 2 + 1, torch.randn(8, 16, generator=g)  # de-normalised
    model = KnownField(torch.zeros(8, 16), torch.zeros(8, 16))
    model.set_latent_stats((torch.rand(16, generator=g) - 0.5).tolist(), (torch.rand(16, generator=g) + 0.5).tolist())
    model.cond_target, model.null_target = normalize(model, x_cond), normalize(model, x_null)
    cond = torch.zeros(2, 16, 4, 4)
    return model, coords.int(), offsets, cond, x_cond, x_null


@pytest.mark.parametrize("steps,rescale_t", [(1, 1.0), (7, 1.0), (25, 3.0), (50, 0.5)])
def test_the_sampler_integrates_a_known_field_exactly(steps, rescale_t):
    model, coords, offsets, cond, x_cond, _ = _setup()
    grid = time_grid(SamplerConfig(steps=steps, rescale_t=rescale_t), torch.device("cpu"))
    assert grid[0] == 1 and grid[-1] == 0 and bool((grid[1:] < grid[:-1]).all())  # noise to data, monotone
    z = sample(model, coords, offsets, cond, SamplerConfig(steps=steps, rescale_t=rescale_t, guidance=1.0),
               torch.Generator().manual_seed(1))
    torch.testing.assert_close(z, x_cond, rtol=0, atol=1e-5)


def test_the_time_grid_puts_more_steps_near_the_noise_end_for_rescale_above_one():
    grid = time_grid(SamplerConfig(steps=10, rescale_t=3.0), torch.device("cpu"))
    steps = grid[:-1] - grid[1:]
    assert steps[0] < steps[-1]  # short steps at t = 1 (noise), long ones at t = 0 (data)


@pytest.mark.parametrize("w", [0.0, 1.0, 2.5])
def test_guidance_is_linear_between_the_unconditional_and_conditional_fields(w):
    """v = v_null + w (v_cond - v_null) everywhere (interval [0, 1]): the field then points at
    x_null + w (x_cond - x_null), which the sampler must reach; w = 0 is the unconditional model, w = 1 the
    conditional one."""
    model, coords, offsets, cond, x_cond, x_null = _setup(3)
    z = sample(model, coords, offsets, cond, SamplerConfig(steps=12, guidance=w, cfg_interval=(0.0, 1.0)),
               torch.Generator().manual_seed(2))
    torch.testing.assert_close(z, x_null + w * (x_cond - x_null), rtol=0, atol=1e-4)


def test_only_the_image_tells_assets_with_one_layout_apart():
    """Two assets on the same voxels, told apart by their conditioning images alone: a tiny SMDiT trained with
    flow matching must sample each asset's latents from its own image (a model that ignored the image could only
    return their mean). With different layouts per asset that check would pass without the image.
    Measured: cosine 0.95 to its own latents after 240 steps (0.87 after 100), a few seconds on 2 cores."""
    from flux3d.models.flow_matching import flow_matching_loss

    g = torch.Generator().manual_seed(0)
    xyz = torch.unique(torch.randint(0, 16, (48, 3), generator=g), dim=0)
    n = len(xyz)
    coords = torch.cat([torch.cat([torch.full((n, 1), b), xyz], 1) for b in (0, 1)]).int()
    offsets = torch.tensor([0, n, 2 * n])
    pattern = torch.randn(1, 16, generator=g).expand(n, 16)
    latents = torch.cat([pattern, -pattern])  # asset 0 and asset 1: opposite latents on one layout
    images = torch.stack([torch.randn(16, 4, 4, generator=g), torch.randn(16, 4, 4, generator=g)])
    torch.manual_seed(0)
    model = SMDiT(SMDiTConfig(width=64, heads=4, double_blocks=1, single_blocks=1, grid=16))
    optim = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(240):
        t = torch.rand(2, generator=g)
        eps = torch.randn(latents.shape, generator=g)
        loss = flow_matching_loss(model, latents, coords, offsets, images, t, eps, torch.zeros(2, dtype=torch.bool))
        optim.zero_grad()
        loss.backward()
        optim.step()
    model.eval()
    for b in (0, 1):
        z = sample(model, coords[:n] * torch.tensor([0, 1, 1, 1], dtype=torch.int32), offsets[:2], images[b:b + 1],
                   SamplerConfig(steps=20, guidance=1.0), torch.Generator().manual_seed(b))
        own, other = (torch.nn.functional.cosine_similarity(z.flatten(), x.flatten(), dim=0)
                      for x in (latents[:n] * (1 - 2 * b), latents[:n] * (2 * b - 1)))
        print(f"asset {b}: cosine {float(own):.3f} to its own latents, {float(other):.3f} to the other's")
        assert own > 0.9 and other < -0.9, (b, float(own), float(other))

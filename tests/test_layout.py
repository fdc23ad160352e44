"""The per-batch layouts the loader builds for the models (issue 18): a model given its layout computes the same
bits as a model building it itself, with no host sync left in its forward and backward, and a training step on a
loader batch (layout built in the loader) equals the step on the same batch without it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from flux3d.config.recipes import train_recipe as recipe
from flux3d.config.training import apply_overrides
from flux3d.models.configs import DecoderConfig, GaussianConfig, SMDiTConfig
from flux3d.models.decoder import GaussianDecoder, decoder_layout
from flux3d.models.flow_matching import flow_matching_loss
from flux3d.models.smdit import SMDiT, smdit_layout
from flux3d.models.sparse import SparseBatch
from flux3d.training.syncs import HostSyncs


def _batch(sizes=(300, 120, 45), grid=16, seed=0) -> SparseBatch:
    g = torch.Generator().manual_seed(seed)
    flat = [torch.randperm(grid ** 3, generator=g)[:n] for n in sizes]
    xyz = [torch.stack([c // grid ** 2, (c // grid) % grid, c % grid], 1) for c in flat]
    return SparseBatch.from_list(xyz, [torch.randn(n, 16, generator=g) for n in sizes])


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(1)
    for p in model.parameters():  # zero-initialised outputs and adaLN gates: make every path carry signal
        p.data.add_(0.05 * torch.randn_like(p))
    return model


def _grads(model: torch.nn.Module) -> list[torch.Tensor | None]:
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


def _same(a: list[torch.Tensor | None], b: list[torch.Tensor | None]) -> bool:
    return len(a) == len(b) and all(x is y is None or (x is not None and y is not None and torch.equal(x, y))
                                    for x, y in zip(a, b))


@pytest.mark.parametrize("sets", [{}, {"position": "ape"},
                                  {"arch": "dit", "double_blocks": 2, "single_blocks": 0}])
def test_smdit_with_its_layout_is_bit_identical_and_never_syncs(sets):
    model = _perturbed(SMDiT(SMDiTConfig(**{"width": 32, "heads": 2, "double_blocks": 1, "single_blocks": 1,
                                            "grid": 16, **sets})))
    b = _batch()
    g = torch.Generator().manual_seed(0)
    cond, t, eps = torch.randn(3, 16, 4, 4, generator=g), torch.rand(3, generator=g), torch.randn(b.feats.shape)
    drop = torch.tensor([False, True, False])
    runs = []
    for layout in (None, smdit_layout(b.coords, b.offsets)):
        with HostSyncs() as syncs:
            loss = flow_matching_loss(model, b.feats, b.coords, b.offsets, cond, t, eps, drop, layout)
            loss.backward()
        runs.append((loss.detach(), _grads(model), syncs))
    (loss0, grads0, syncs0), (loss1, grads1, syncs1) = runs
    assert torch.equal(loss0, loss1) and _same(grads0, grads1)
    assert syncs1.total == 0, syncs1.counts
    # Without the layout the same step syncs (torch.unique, bincount, tolist, ...): the counter does see them.
    assert syncs0.counts["_unique2"] >= 1 and syncs0.total >= 4, syncs0.counts
    img_tokens = 4
    assert model.flops(b.coords, b.offsets, img_tokens) == model.flops(b.coords, b.offsets, img_tokens,
                                                                        smdit_layout(b.coords, b.offsets))


@pytest.mark.parametrize("sets", [{"window": 4}, {"window": 0, "position": "rope", "qk_norm": True},
                                  {"window": 4, "latent_channels": 8, "encoder_depth": 1}])
def test_decoder_with_its_layout_is_bit_identical_and_never_syncs(sets):
    cfg = DecoderConfig(**{"width": 32, "depth": 2, "heads": 2, **sets},
                        gaussians=GaussianConfig(resolution=16, per_voxel=4))
    model = _perturbed(GaussianDecoder(cfg)).train()
    b = _batch()
    sigma = torch.rand(b.feats.shape, generator=torch.Generator().manual_seed(2))
    runs = []
    for layout in (None, decoder_layout(cfg, b.coords, b.offsets)):
        with HostSyncs() as syncs:
            out = model(b.feats, b.coords, b.offsets, sigma_MC=sigma, generator=torch.Generator().manual_seed(3),
                        layout=layout)
            loss = out.raw.square().mean() + (out.kl if out.kl is not None else 0)
            loss.backward()
        gaussians = model.to_gaussians(out.raw.detach(), b.coords, b.offsets, layout)
        runs.append((out.raw.detach(), _grads(model), syncs, gaussians))
    (raw0, grads0, syncs0, g0), (raw1, grads1, syncs1, g1) = runs
    assert torch.equal(raw0, raw1) and _same(grads0, grads1)
    assert [len(g) for g in g0] == [len(g) for g in g1] == [n * 4 for n in (300, 120, 45)]
    assert all(torch.equal(a.means, c.means) for a, c in zip(g0, g1))
    assert syncs1.total == 0, syncs1.counts
    assert syncs0.total >= 1, syncs0.counts  # window partitions (unique, tolist) or the offsets' tolist
    layout = decoder_layout(cfg, b.coords, b.offsets)
    assert model.flops(b.coords, b.offsets) == model.flops(b.coords, b.offsets, layout)
    # Windows alternate shift 0 / window // 2 when there is more than one block; whole assets without windows.
    assert len(layout.groups) == (2 if cfg.window else 1) and layout.bounds == tuple(b.offsets.tolist())


def test_a_layout_of_another_batch_is_refused():
    cfg = DecoderConfig(width=32, depth=2, heads=2, window=4, gaussians=GaussianConfig(resolution=16, per_voxel=4))
    decoder, smdit = GaussianDecoder(cfg), SMDiT(SMDiTConfig(width=32, heads=2, double_blocks=1, single_blocks=1,
                                                             grid=16))
    b, other = _batch(), _batch((10, 20))
    with pytest.raises(ValueError, match="layout"):
        decoder(b.feats, b.coords, b.offsets, layout=decoder_layout(cfg, other.coords, other.offsets))
    with pytest.raises(ValueError, match="layout"):
        smdit(b.feats, b.coords, b.offsets, torch.rand(3), torch.randn(3, 16, 4, 4),
              layout=smdit_layout(other.coords, other.offsets))


@pytest.fixture(scope="module")
def demo_ds(synthetic_shards):
    return synthetic_shards(2, views=8, resolution=32, voxels=16, supervision_views=8, cond_views=2,
                            cond_resolution=32)


@pytest.mark.parametrize("kind", ["decoder", "smdit"])
def test_a_training_step_on_a_loader_batch_equals_the_step_without_its_layout(demo_ds, tmp_path, kind):
    """The real Step and loader: the loader attaches the model's layout (built from the batch's own voxels), and the
    step's loss and gradients are the same bits with it and with the model building it; the step syncs less."""
    from flux3d.training.decoder_step import DecoderStep
    from flux3d.training.smdit_step import SMDiTStep

    sets = {"data.shards": demo_ds.version_dir, "run.out": str(tmp_path), "data.batch_size": 2}
    if kind == "smdit":
        sets |= {"flow.encoder": demo_ds.encoder, "flow.encoder_location": demo_ds.encoder_location,
                 "flow.cond_resolution": 32, "smdit.grid": 16}
    else:
        sets |= {"decoder.gaussians.resolution": 16}
    cfg = apply_overrides(recipe(kind, "debug"), sets)
    step = (DecoderStep if kind == "decoder" else SMDiTStep)(cfg, torch.device("cpu"))
    torch.manual_seed(0)
    model = _perturbed(step.build_model()).train()
    batch = next(iter(step.loader(0, 1, 0))).to("cpu", non_blocking=True)
    # The loader attached this model's layout of this batch's voxels.
    assert batch.layout is not None
    assert batch.layout.bounds == step.layout_fn()(batch.voxels.coords, batch.voxels.offsets).bounds
    step.step(model, batch, torch.Generator().manual_seed(5))  # first use loads the condition encoder: not a step
    runs = []
    # As scale.deterministic trains: the CPU rasterizer's threaded accumulation varies in its last bits otherwise.
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        for b in (batch, dataclasses.replace(batch, layout=None)):
            with HostSyncs() as syncs:
                loss, _ = step.step(model, b, torch.Generator().manual_seed(5))
                loss.backward()
            runs.append((loss.detach(), _grads(model), syncs.total, step.work(model, b)))
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
    (loss0, grads0, syncs0, work0), (loss1, grads1, syncs1, work1) = runs
    print(f"{kind}: host syncs per step {syncs1} -> {syncs0} with the loader's layout")
    assert torch.equal(loss0, loss1) and _same(grads0, grads1) and work0 == work1
    assert syncs0 < syncs1


def test_the_loader_workers_attach_the_layout_of_each_batch(demo_ds):
    """Fixed-size and token-budget batching, in this process and in a DataLoader worker process (the layout crosses
    the process boundary with the batch): every batch carries its model's layout of its own voxels."""
    from functools import partial

    from flux3d.training.data import make_dataset, make_loader, shard_urls

    cfg = DecoderConfig(width=32, depth=2, heads=2, window=4, gaussians=GaussianConfig(resolution=16))
    fn = partial(decoder_layout, cfg)
    urls = shard_urls(demo_ds.version_dir, "train")
    common = {"batch_size": 2, "shuffle_buffer": 0, "cond": False, "layout": fn}
    for batches in (make_dataset(urls, **common), make_dataset(urls, token_budget=10**6, **common),
                    make_loader(urls, num_workers=1, token_budget=10**6, **common)):
        batches = [b.to("cpu", non_blocking=True) for b in batches]
        assert batches
        for batch in batches:
            expect = fn(batch.voxels.coords, batch.voxels.offsets)
            assert batch.layout.bounds == expect.bounds == tuple(batch.voxels.offsets.tolist())
            assert len(batch.layout.groups) == len(expect.groups) == 2
            for got, want in zip(batch.layout.groups, expect.groups):
                assert torch.equal(got.perm, want.perm) and torch.equal(got.cu_seqlens, want.cu_seqlens)
                assert got.bounds == want.bounds and got.max_seqlen == want.max_seqlen
    assert next(iter(make_dataset(urls, batch_size=2, shuffle_buffer=0, cond=False))).layout is None

"""The shard loader and the packed sparse batch, on tiny shards written here with webdataset's TarWriter: every
asset arrives once per epoch with bit-exact arrays and the image and camera of the view it claims, randomness is
reproducible per seed, resampled epochs have the requested size across workers, and bad data is skipped."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds

from flux3d.models.sparse import SparseBatch
from flux3d.shards.format import encode_image, encode_sample
from flux3d.shards.writer import member_ranges, tar_bytes
from flux3d.training.data import Batch, make_dataset, make_loader, shard_urls

RES, COND_RES, VIEWS, CONDS = 32, 16, 3, 2


@dataclass
class Asset:
    key: str
    coords: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray
    views: list[np.ndarray]
    cond_images: list[np.ndarray]
    cameras: dict
    cond_latents: np.ndarray | None = None

    def sample(self) -> dict:
        return encode_sample(
            self.key, self.coords, self.mu, self.sigma, [encode_image(v, 100) for v in self.views], self.cameras,
            {"sha256": self.key}, cond_images=None if self.cond_latents is not None else
            [encode_image(c, 100) for c in self.cond_images], cond_latents=self.cond_latents)


def _asset(i: int, latents: bool = False) -> Asset:
    rng = np.random.default_rng(i)
    n = 7 + 3 * i  # every asset a different voxel count
    flat = np.sort(rng.choice(64**3, n, replace=False))
    coords = np.stack(np.unravel_index(flat, (64, 64, 64)), 1).astype(np.uint8)

    def camera(j: int) -> dict:
        K = [[30.0 + i + j, 0.0, 16.0], [0.0, 31.0 + j, 16.5], [0.0, 0.0, 1.0]]
        w2c = np.eye(4, dtype=np.float32)
        w2c[:3] = rng.standard_normal((3, 4)).astype(np.float32)
        return {"K": K, "w2c": w2c.tolist()}

    return Asset(
        key=hashlib.sha256(f"asset-{i}".encode()).hexdigest(), coords=coords,
        mu=rng.standard_normal((n, 16)).astype(np.float16),
        sigma=np.abs(rng.standard_normal((n, 16))).astype(np.float16),
        views=[rng.integers(0, 256, (RES, RES, 4), dtype=np.uint8) for _ in range(VIEWS)],
        cond_images=[rng.integers(0, 256, (COND_RES, COND_RES, 4), dtype=np.uint8) for _ in range(CONDS)],
        cameras={"views": [camera(j) for j in range(VIEWS)], "cond": [camera(10 + j) for j in range(CONDS)],
                 "resolution": RES, "cond_resolution": COND_RES},
        cond_latents=rng.standard_normal((CONDS, 16, 4, 4)).astype(np.float16) if latents else None)


def _write_shard(path: Path, samples: list[dict], member_table: bool = True) -> None:
    """A tar of `samples` and, as `flux3d shard` writes it, its member table (`parts/<shard>.json`), which the
    default reader (`read="ranges"`) reads from; without one that reader streams the shard."""
    with wds.TarWriter(str(path), mtime=0) as writer:
        for sample in samples:
            writer.write(sample)
    if member_table:
        rows, offset = [], 0
        for sample in samples:
            rows.append({"key": sample["__key__"], "members": member_ranges(sample, offset)})
            offset += tar_bytes(sample)
        (path.parent / "parts").mkdir(exist_ok=True)
        (path.parent / "parts" / f"{path.stem}.json").write_text(json.dumps({"rows": rows}))


def _write_index(version_dir: Path, rows: list[tuple[str, str, str, int]]) -> None:
    pq.write_table(pa.table({
        "key": [r[0] for r in rows], "shard": [r[1] for r in rows], "split": [r[2] for r in rows],
        "num_voxels": pa.array([r[3] for r in rows], pa.int64()), "bytes": pa.array([0] * len(rows), pa.int64()),
        "source": ["test"] * len(rows)}), version_dir / "index.parquet")


@dataclass
class Dataset:
    dir: Path
    train: list[str]  # shard paths
    train_keys: list[str]
    val_keys: list[str]
    assets: dict[str, Asset]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Dataset:
    version_dir = tmp_path_factory.mktemp("root") / "shards" / "v1"
    version_dir.mkdir(parents=True)
    layout = {"train-000000.tar": range(5), "train-000001.tar": range(5, 10), "val-000000.tar": range(10, 12)}
    assets, rows = {}, []
    for shard, ids in layout.items():
        shard_assets = [_asset(i) for i in ids]
        _write_shard(version_dir / shard, [a.sample() for a in shard_assets])
        for a in shard_assets:
            assets[a.key] = a
            rows.append((a.key, shard, shard.split("-")[0], len(a.coords)))
    _write_index(version_dir, rows[::-1])  # index order is not shard order
    keys = {split: sorted(r[0] for r in rows if r[2] == split) for split in ("train", "val")}
    return Dataset(version_dir, [str(version_dir / s) for s in layout if s.startswith("train")], keys["train"],
                   keys["val"], assets)


def _composite(rgba: np.ndarray, background: float) -> np.ndarray:
    x = rgba.astype(np.float32) / 255
    return (x[..., :3] * x[..., 3:] + background * (1 - x[..., 3:])).transpose(2, 0, 1)


def _check(batch: Batch, assets: dict[str, Asset], views: int = 1, cond: str | None = "images") -> None:
    """Every sample of the batch against the arrays and images it was written from."""
    B = len(batch.keys)
    lengths = [len(assets[k].coords) for k in batch.keys]
    vox = batch.voxels
    assert vox.batch_size == B and vox.coords.dtype == torch.int32 and vox.feats.dtype == torch.float32
    assert vox.offsets.tolist() == np.concatenate([[0], np.cumsum(lengths)]).tolist()
    assert vox.coords.shape == (sum(lengths), 4) and batch.sigma.shape == (sum(lengths), 16)  # no padding
    assert vox.coords[:, 0].tolist() == np.repeat(np.arange(B), lengths).tolist()
    assert batch.images.shape == (B, views, 3, RES, RES) and batch.K.shape == (B, views, 3, 3)
    assert batch.w2c.shape == (B, views, 4, 4) and batch.view_index.shape == (B, views)
    for b, key in enumerate(batch.keys):
        a, rows = assets[key], slice(vox.offsets[b], vox.offsets[b + 1])
        assert np.array_equal(vox.coords[rows, 1:].numpy(), a.coords.astype(np.int32))
        assert np.array_equal(vox.feats[rows].numpy(), a.mu.astype(np.float32))
        assert np.array_equal(batch.sigma[rows].numpy(), a.sigma.astype(np.float32))
        bg = float(batch.background[b, 0])
        assert bg in (0.0, 1.0) and batch.background[b].tolist() == [bg] * 3
        index = batch.view_index[b].tolist()
        assert len(set(index)) == views
        for v, j in enumerate(index):
            np.testing.assert_allclose(batch.images[b, v].numpy(), _composite(a.views[j], bg), rtol=0, atol=1e-6)
            assert np.array_equal(batch.K[b, v].numpy(), np.float32(a.cameras["views"][j]["K"]))
            assert np.array_equal(batch.w2c[b, v].numpy(), np.float32(a.cameras["views"][j]["w2c"]))
        if cond is None:
            assert batch.cond is None and batch.cond_index is None
            continue
        c = int(batch.cond_index[b])
        if cond == "images":
            np.testing.assert_allclose(batch.cond[b].numpy(), _composite(a.cond_images[c], bg), rtol=0, atol=1e-6)
        else:
            assert np.array_equal(batch.cond[b].numpy(), a.cond_latents[c].astype(np.float32))


def _keys(batches: list[Batch]) -> list[str]:
    return [k for b in batches for k in b.keys]


def test_shard_urls_lists_one_split(dataset):
    assert shard_urls(str(dataset.dir), "train") == dataset.train
    assert shard_urls(str(dataset.dir) + "/", "val") == [str(dataset.dir / "val-000000.tar")]
    with pytest.raises(ValueError, match="no 'test' shards.*'train', 'val'"):
        shard_urls(str(dataset.dir), "test")


@pytest.mark.parametrize("read", ["ranges", "stream"])
def test_fsspec_urls_are_read_through_fsspec(dataset, read):
    fs, base = fsspec.filesystem("memory"), "memory://flux3d-test/shards/v1"
    try:
        for name in ("index.parquet", "val-000000.tar", "parts/val-000000.json"):
            fs.pipe(f"{base}/{name}", (dataset.dir / name).read_bytes())
        urls = shard_urls(base, "val")
        assert urls == [f"{base}/val-000000.tar"]
        batches = list(make_dataset(urls, batch_size=4, read=read))
        assert sorted(_keys(batches)) == dataset.val_keys
        _check(batches[0], dataset.assets)
    finally:
        fs.rm("/flux3d-test", recursive=True)


def test_an_epoch_over_two_workers_yields_every_asset_once_exactly(dataset):
    loader = make_loader(dataset.train, batch_size=3, num_workers=2, views_per_sample=2)
    epochs = [list(loader) for _ in range(2)]
    for batches in epochs:
        assert sorted(_keys(batches)) == dataset.train_keys  # each once
        assert sorted(len(b.keys) for b in batches) == [2, 2, 3, 3]  # one shard per worker: 3 + 2 each
        for batch in batches:
            _check(batch, dataset.assets, views=2)
    # Persistent workers keep their epoch count: the second epoch is another order and other views.
    assert _keys(epochs[0]) != _keys(epochs[1])
    views = [{k: v.tolist() for b in batches for k, v in zip(b.keys, b.view_index)} for batches in epochs]
    assert views[0] != views[1]
    assert {float(b.background[i, 0]) for b in epochs[0] for i in range(len(b.keys))} == {0.0, 1.0}


def test_a_seed_fixes_order_views_and_backgrounds(dataset):
    def run(seed: int, workers: int = 0) -> list[tuple[str, list[int], float]]:
        batches = list(make_loader(dataset.train, batch_size=2, num_workers=workers, seed=seed, views_per_sample=2))
        return [(k, b.view_index[i].tolist(), float(b.background[i, 0])) for b in batches
                for i, k in enumerate(b.keys)]

    first = run(0)
    assert run(0) == first
    assert [k for k, _, _ in run(1)] != [k for k, _, _ in first]
    # The view and background of an asset depend on (seed, epoch, key), not on how the stream is split.
    assert sorted(run(0, workers=2)) == sorted(first)


def test_resampled_epochs_have_epoch_samples_across_workers(dataset):
    loader = make_loader(dataset.train, batch_size=2, num_workers=2, resampled=True, epoch_samples=7)
    for _ in range(2):
        batches = list(loader)
        assert sum(len(b.keys) for b in batches) == 7  # 4 + 3 over two workers, not 7 per worker
        assert set(_keys(batches)) <= set(dataset.train_keys)
        for batch in batches:
            _check(batch, dataset.assets)
    assert sum(len(b.keys) for b in make_dataset(dataset.train, batch_size=4, resampled=True, epoch_samples=10)) == 10


def test_bad_samples_and_a_truncated_shard_are_skipped(tmp_path, caplog):
    assets = [_asset(20 + i) for i in range(6)]
    samples = [a.sample() for a in assets]
    samples[1]["coords.npy"] = samples[1]["coords.npy"][:-5]  # truncated array
    del samples[2]["mu.npy"]  # missing field
    samples[3]["view_001.webp"] = b"RIFF not a webp"  # undecodable image (views_per_sample=3 picks every view)
    _write_shard(tmp_path / "a.tar", samples)
    cut = [_asset(30 + i) for i in range(4)]
    _write_shard(tmp_path / "b.tar", [a.sample() for a in cut])
    data = (tmp_path / "b.tar").read_bytes()
    (tmp_path / "b.tar").write_bytes(data[:len(data) // 2])  # cut mid-shard
    by_key = {a.key: a for a in assets + cut}
    with caplog.at_level(logging.WARNING, logger="flux3d.training.data"):
        batches = list(make_dataset([str(tmp_path / "a.tar"), str(tmp_path / "b.tar")], batch_size=2,
                                    views_per_sample=3))
    keys = _keys(batches)
    assert {assets[i].key for i in (0, 4, 5)} <= set(keys)
    assert not {assets[i].key for i in (1, 2, 3)} & set(keys)
    assert len(keys) == len(set(keys)) and 3 < len(keys) < 7  # some of the cut shard's samples, not all
    for batch in batches:
        _check(batch, by_key, views=3)
    warned = "\n".join(r.getMessage() for r in caplog.records)
    assert all(assets[i].key in warned for i in (1, 2, 3))


def test_cond_latents_fixed_background_and_no_cond(tmp_path):
    assets = {a.key: a for a in (_asset(40 + i, latents=True) for i in range(3))}
    _write_shard(tmp_path / "lat.tar", [a.sample() for a in assets.values()])
    (batch,) = make_dataset(str(tmp_path / "lat.tar"), batch_size=3, background="white")
    assert batch.cond.shape == (3, 16, 4, 4) and batch.cond.dtype == torch.float32
    assert batch.background.eq(1).all()
    _check(batch, assets, cond="latents")
    (batch,) = make_dataset(str(tmp_path / "lat.tar"), batch_size=3, background="black", cond=False)
    assert batch.background.eq(0).all()
    _check(batch.to("cpu"), assets, cond=None)


def test_sparse_batch_packs_unbinds_and_replaces():
    rng = np.random.default_rng(0)
    coords = [rng.integers(0, 64, (n, 3)).astype(np.uint8) for n in (5, 0, 9)]
    feats = [rng.standard_normal((n, 8)).astype(np.float16) for n in (5, 0, 9)]
    sb = SparseBatch.from_list(coords, feats, dtype=torch.float32)
    assert sb.batch_size == 3 and sb.max_length == 9 and sb.lengths.tolist() == [5, 0, 9]
    assert sb.offsets.tolist() == [0, 5, 5, 14] and sb.cu_seqlens.dtype == torch.int32
    assert sb.coords.dtype == torch.int32 and sb.feats.dtype == torch.float32
    assert sb.coords[:, 0].tolist() == [0] * 5 + [2] * 9
    for (c, f), c0, f0 in zip(sb.unbind(), coords, feats):
        assert np.array_equal(c.numpy(), c0.astype(np.int32)) and np.array_equal(f.numpy(), f0.astype(np.float32))
    # torch inputs, dtype kept when not asked to cast
    tb = SparseBatch.from_list([torch.from_numpy(c) for c in coords], [torch.from_numpy(f) for f in feats])
    assert tb.feats.dtype == torch.float16 and torch.equal(tb.coords, sb.coords)
    new = sb.replace(feats=torch.ones(14, 2))
    assert new.coords is sb.coords and new.offsets is sb.offsets and new.unbind()[2][1].shape == (9, 2)
    assert torch.equal(sb.to("cpu").feats, sb.feats)
    with pytest.raises(ValueError, match="13 rows"):
        sb.replace(feats=torch.ones(13, 2))
    with pytest.raises(ValueError):
        SparseBatch.from_list(coords, feats[:2])
    with pytest.raises(ValueError):
        SparseBatch.from_list([coords[0]], [feats[2]])


def test_a_version_written_by_the_shard_builder_loads_exactly(synthetic_shards):
    """The synthetic dataset the trainer and evaluation tests train on, as the shard builder wrote it from stage
    outputs: index and stats agree with the shards, and the loader returns every asset's voxels, latents, views and
    cameras as the stage files hold them (so those tests train on what they think they do)."""
    import json

    from PIL import Image

    ds = synthetic_shards(2, views=8, resolution=32, voxels=16, supervision_views=8, cond_views=2, cond_resolution=32)
    data = ds.root / "data"
    index = pq.read_table(f"{ds.version_dir}/index.parquet").to_pylist()
    keys = sorted(p.stem for p in (data / "voxels").glob("*.npy"))
    assert sorted(r["key"] for r in index) == keys and {r["split"] for r in index} == {"train"}
    stats = json.loads(Path(ds.version_dir, "stats.json").read_text())
    assert stats["assets"] == {"train": 2, "val": 0} and stats["voxel_resolution"] == 16
    features = {k: np.load(next((data / "features").rglob(f"{k}.npz"))) for k in keys}
    assert stats["voxels"] == sum(r["num_voxels"] for r in index) == sum(len(f["coords"]) for f in features.values())
    mu = np.concatenate([f["mu"].astype(np.float64) for f in features.values()])
    np.testing.assert_allclose(stats["mu_mean"], mu.mean(0), rtol=1e-6, atol=1e-9)
    (batch,) = make_dataset(shard_urls(ds.version_dir, "train"), batch_size=2, views_per_sample=8,
                            background="black")
    assert sorted(batch.keys) == keys and batch.images.shape == (2, 8, 3, 32, 32) and batch.cond.shape[-1] == 32
    for b, key in enumerate(batch.keys):
        rows = slice(batch.voxels.offsets[b], batch.voxels.offsets[b + 1])
        coords = np.load(data / "voxels" / f"{key}.npy")
        assert coords.max() < 16 and np.array_equal(batch.voxels.coords[rows, 1:].numpy(), coords.astype(np.int32))
        assert np.array_equal(batch.voxels.feats[rows].numpy(), features[key]["mu"].astype(np.float32))
        folder = next((data / "renders" / key).glob("views*"))  # the main view set: all 8 views are in the shards
        frames = json.loads((folder / "transforms.json").read_text())["frames"]
        for v, j in enumerate(batch.view_index[b].tolist()):
            assert np.array_equal(batch.K[b, v].numpy(), np.float32(frames[j]["K"]))
            assert np.array_equal(batch.w2c[b, v].numpy(), np.float32(frames[j]["w2c"]))
            png = np.asarray(Image.open(folder / frames[j]["file_path"]).convert("RGBA"))
            np.testing.assert_allclose(batch.images[b, v].numpy(), _composite(png, 0.0), rtol=0, atol=1e-6)
        assert batch.images[b].amax() > 0  # the asset is in view


def test_token_budget_packs_batches_that_never_pass_it(dataset):
    """Batches hold at most `token_budget` voxels and `batch_size` assets, each closed only when the next sample
    would not fit; every asset arrives once, exact."""
    sizes = {k: len(a.coords) for k, a in dataset.assets.items()}
    budget = 40  # the assets have 7..34 voxels: one to three fit a batch
    batches = list(make_dataset(dataset.train, batch_size=3, token_budget=budget, shuffle_buffer=0))
    assert sorted(_keys(batches)) == dataset.train_keys
    for batch, following in zip(batches, [*batches[1:], None]):
        _check(batch, dataset.assets)
        tokens = sum(sizes[k] for k in batch.keys)
        assert tokens <= budget and len(batch.keys) <= 3
        if following is not None:  # packed, not merely bounded: the next asset would not have fit
            assert len(batch.keys) == 3 or tokens + sizes[following.keys[0]] > budget
    assert len(batches) < len(dataset.train_keys)  # several assets share a batch


def test_an_asset_over_the_token_budget_is_skipped_with_its_reason(dataset):
    sizes = {k: len(a.coords) for k, a in dataset.assets.items()}
    seen: list[str] = []
    batches = list(make_dataset(dataset.train, batch_size=4, token_budget=20, shuffle_buffer=0,
                                handler=lambda e: seen.append(str(e)) or True))
    assert sorted(_keys(batches)) == sorted(k for k in dataset.train_keys if sizes[k] <= 20)
    over = sorted(k for k in dataset.train_keys if sizes[k] > 20)
    assert over and sorted(m.split()[1].rstrip(":") for m in seen) == over
    assert all("token_budget = 20" in m for m in seen)

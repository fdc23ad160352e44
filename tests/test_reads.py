"""Reads that match use: the `ranges` reader (member tables + byte ranges) gives the batches the `stream` reader
gives, reads within 2x of what a step uses where streaming reads 3x or more, and the writer's member table is where
the tar really holds each member."""

from __future__ import annotations

import importlib.util
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from flux3d.shards.format import encode_image, encode_sample
from flux3d.training.data import make_dataset, make_loader
from flux3d.training.samples import Want
from tests.test_loader import _asset, _write_shard, dataset  # noqa: F401 - `dataset` is a fixture

_spec = importlib.util.spec_from_file_location("benchmark_shards",
                                               Path(__file__).parents[1] / "benchmarks" / "shards.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _same(a, b) -> None:  # noqa: ANN001 - two Batches
    assert a.keys == b.keys and a.view_index.tolist() == b.view_index.tolist()
    for x, y in ((a.voxels.coords, b.voxels.coords), (a.voxels.feats, b.voxels.feats), (a.images, b.images),
                 (a.background, b.background), (a.K, b.K), (a.w2c, b.w2c), (a.cond, b.cond), (a.sigma, b.sigma)):
        assert (x is None and y is None) or torch.equal(x, y)


@pytest.mark.parametrize("kw", [{"views_per_sample": 2}, {"resampled": True, "epoch_samples": 7, "skip_batches": 1},
                                {"views_per_sample": 0, "sigma": False}])
def test_ranges_and_stream_give_the_same_batches(dataset, kw):  # noqa: F811 - the imported fixture
    """Two workers, two epochs: the same samples, views, backgrounds and conditioning images in the same order."""
    epochs = {}
    for read in ("ranges", "stream"):
        loader = make_loader(dataset.train, batch_size=3, num_workers=2, seed=5, read=read, **kw)
        epochs[read] = [list(loader) for _ in range(2)]
    for ranges, stream in zip(epochs["ranges"], epochs["stream"]):
        assert len(ranges) == len(stream) > 1
        for a, b in zip(ranges, stream):
            _same(a, b)
    batch = epochs["ranges"][0][0]
    assert batch.images.shape[1] == kw.get("views_per_sample", 1) and (batch.sigma is None) == ("sigma" in kw)


def test_a_shard_without_member_table_is_streamed(tmp_path, caplog):
    assets = [_asset(50 + i) for i in range(4)]
    _write_shard(tmp_path / "old.tar", [a.sample() for a in assets], member_table=False)
    _write_shard(tmp_path / "new.tar", [a.sample() for a in assets])
    old, new = (list(make_dataset(str(tmp_path / name), batch_size=4, seed=1)) for name in ("old.tar", "new.tar"))
    _same(old[0], new[0])
    assert "no member table" in caplog.text


def test_the_member_table_is_where_the_tar_holds_each_member(synthetic_shards):
    """As `flux3d shard` writes them: every member of every sample at the offset and size its table says."""
    ds = synthetic_shards(2, views=8, resolution=32, voxels=16, supervision_views=8, cond_views=2, cond_resolution=32)
    parts = sorted(Path(ds.version_dir, "parts").glob("*.json"))
    assert parts
    for path in parts:
        rows = json.loads(path.read_text())["rows"]
        with tarfile.open(Path(ds.version_dir, f"{path.stem}.tar")) as tar:
            where = {m.name: [m.offset_data, m.size] for m in tar.getmembers()}
        assert {f"{r['key']}.{field}": span for r in rows for field, span in r["members"].items()} == where


@pytest.fixture(scope="module")
def sized(tmp_path_factory):
    """Samples with paper-like proportions at a small scale: 4,000 voxels (mu and sigma 125 KiB each), 40 views and
    12 conditioning views of random RGBA (lossless WebP, ~16 KiB and ~4 KiB each)."""
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("sized")
    samples = []
    for i in range(6):
        n = 4000
        flat = np.sort(rng.choice(64 ** 3, n, replace=False))
        coords = np.stack(np.unravel_index(flat, (64, 64, 64)), 1).astype(np.uint8)
        cam = {"K": np.eye(3).tolist(), "w2c": np.eye(4).tolist()}
        views = [encode_image(rng.integers(0, 256, (64, 64, 4), dtype=np.uint8), 100) for _ in range(40)]
        cond = [encode_image(rng.integers(0, 256, (32, 32, 4), dtype=np.uint8), 100) for _ in range(12)]
        samples.append(encode_sample(f"{i:064x}", coords, rng.standard_normal((n, 16)).astype(np.float16),
                                     rng.random((n, 16)).astype(np.float16), views,
                                     {"views": [cam] * 40, "cond": [cam] * 12, "resolution": 64,
                                      "cond_resolution": 32}, {"sha256": f"{i:064x}"}, cond_images=cond))
    _write_shard(folder / "train-000000.tar", samples)
    return folder, {s["__key__"]: s for s in samples}


@pytest.mark.parametrize("step", ["decoder", "smdit"])
def test_ranges_read_at_most_twice_what_a_step_uses(sized, step):
    folder, by_key = sized
    want = {"decoder": Want(views=1, sigma=True, cond=False), "smdit": Want(views=0, sigma=False, cond=True)}[step]
    urls = [f"countfile://{folder}/train-000000.tar"]
    ranges, used, _ = bench.read_cost(urls, by_key, want, "ranges")
    stream, _, _ = bench.read_cost(urls, by_key, want, "stream")
    assert ranges <= 2 * used and stream > 3 * used, (ranges / used, stream / used)
    part = json.loads((folder / "parts" / "train-000000.json").read_text())
    assert len(part["rows"]) == len(by_key)


def test_reading_no_view_keeps_the_backgrounds_and_conditioning_of_one(dataset):  # noqa: F811
    """The SMDiT reads no view, yet its stream of backgrounds and conditioning images is that of a step reading one
    (so a run from before it stopped reading views resumes exactly)."""
    one, none = (list(make_dataset(dataset.train, batch_size=5, seed=2, views_per_sample=v)) for v in (1, 0))
    for a, b in zip(one, none):
        assert a.keys == b.keys and torch.equal(a.background, b.background) and torch.equal(a.cond, b.cond)
        assert a.images.shape[1] == 1 and b.images.shape[1] == 0

"""The shard loader: a dataset version's webdataset shards -> batches of packed voxels, views and conditioning.

Stages, one copy per DataLoader worker:

    shard URLs -> ResampledShards (resampled) | per-epoch shuffled list, split by node then by worker
      -> read="ranges": each shard's member table, then per sample only the members its pick needs (fsspec ranges)
         read="stream": the whole tar (fsspec) -> tar members -> samples -> pick the views (drop the rest)
      -> shuffle buffer -> decode + composite the picked images -> [epoch share] -> batch -> `Batch`

The two readers (`training.samples`) give the same samples in the same order. Views are picked before the
shuffle buffer so the buffer holds one sample's arrays plus a few compressed images,
not every view of every asset; images are decoded after it so decoded floats are never buffered.

Randomness is a function of `seed`, the epoch and (for shard and buffer order) the node and worker, never of the
clock, so a run is reproducible for a given seed and worker count. The view and background choice of an asset
depends on (seed, epoch, key) only, so it does not change with the worker count either. Every stage counts its
own epochs, which needs the pipeline copies to survive between epochs: `make_loader` uses persistent workers
(with non-persistent ones every epoch would restart from a fresh copy and repeat epoch 0's order).
"""

from __future__ import annotations

import itertools
import logging
import math
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import fsspec
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import webdataset as wds
from webdataset.utils import pytorch_worker_info

from flux3d.models.sparse import SparseBatch
from flux3d.training.samples import (Background, EpochStage, PickViews, Read, ReadRanges, Sample, Want,
                                     decode_images, stream_samples)

log = logging.getLogger(__name__)

# (coords (M, 4), offsets (B + 1,)) -> the model's per-batch layout, e.g. models.smdit.smdit_layout.
LayoutFn = Callable[[torch.Tensor, torch.Tensor], Any]


def skip_bad_sample(exn: Exception) -> bool:
    """webdataset error handler: log and go on, so one bad asset or shard never stops a training run.
    (wds.warn_and_continue goes through `warnings`, which hides repeats, and sleeps 0.5 s per error.)"""
    log.warning("skipping bad shard data: %s", exn)
    return True


def shard_urls(version_dir: str, split: str) -> list[str]:
    """Sorted, unique URLs of one split's shards, from `<version_dir>/index.parquet` (a local path or any
    fsspec URL); the URLs are `version_dir` joined with the index's relative shard names."""
    base = version_dir.rstrip("/")
    index = f"{base}/index.parquet"
    with fsspec.open(index, "rb") as f:
        table = pq.read_table(f, columns=["shard", "split"])
    names = pc.unique(table.filter(pc.equal(table["split"], split))["shard"]).to_pylist()
    if not names:
        present = sorted(pc.unique(table["split"]).to_pylist())
        raise ValueError(f"{index} lists no {split!r} shards (splits present: {present})")
    return [f"{base}/{name}" for name in sorted(names)]


@dataclass
class Batch:
    """B samples, V = views_per_sample views each; M = total voxels of the batch (no padding).

    keys        list[str] (B)           asset sha256
    voxels      SparseBatch             coords (M, 4) int32 [b, x, y, z]; feats (M, C) float32 = mu; offsets (B+1,)
    sigma       (M, C) float32 | None   latent std, rows as voxels.feats (None when the step does not use it)
    images      (B, V, 3, H, W) float32 supervision views (V = 0 when the step uses none) in [0, 1], composited onto `background`
    background  (B, 3) float32          0 (black) or 1 (white) per sample
    K           (B, V, 3, 3) float32    pixel intrinsics of each view at H x W (OpenCV)
    w2c         (B, V, 4, 4) float32    world-to-camera (OpenCV)
    view_index  (B, V) int64            which stored view_XXX each image is
    cond        (B, 3, Hc, Wc) float32 conditioning image (same background) | (B, 16, h, w) float32 latents | None
    cond_index  (B,) int64 | None       which stored conditioning view
    layout      model layout | None     what the model derives from the voxel coordinates alone (its patchify or
                                        window partitions, models/smdit.py `smdit_layout`, models/decoder.py
                                        `decoder_layout`), built here on the host so the step reads nothing back
    """

    keys: list[str]
    voxels: SparseBatch
    sigma: torch.Tensor | None
    images: torch.Tensor
    background: torch.Tensor
    K: torch.Tensor
    w2c: torch.Tensor
    view_index: torch.Tensor
    cond: torch.Tensor | None
    cond_index: torch.Tensor | None
    layout: Any = None

    def _map(self, f: Callable[[Any], Any]) -> Batch:
        # A layout has .to and .pin_memory too, so it moves with the batch (non_blocking included).
        return Batch(self.keys, f(self.voxels), *(None if t is None else f(t) for t in (
            self.sigma, self.images, self.background, self.K, self.w2c, self.view_index, self.cond, self.cond_index,
            self.layout)))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        # DataLoader(pin_memory=True) calls this on custom batch types.
        return self._map(lambda t: t.pin_memory())


class _ShardOrder(EpochStage):
    """All shards in a per-epoch order that every node and worker agree on, so the node and worker splits that
    follow partition it (each shard read exactly once per epoch)."""

    def __init__(self, urls: list[str], seed: int, start_epoch: int) -> None:
        super().__init__(seed, start_epoch)
        self.urls = urls

    def stage(self) -> Iterator[Sample]:
        urls = list(self.urls)
        random.Random(f"{self.seed}:{self.epoch}").shuffle(urls)
        return ({"url": url} for url in urls)


class _Shuffle(EpochStage):
    """A sample shuffle buffer seeded per (seed, epoch, node, worker)."""

    def __init__(self, seed: int, start_epoch: int, bufsize: int) -> None:
        super().__init__(seed, start_epoch)
        self.bufsize = bufsize

    def stage(self, src: Iterable[Sample]) -> Iterator[Sample]:
        if self.bufsize <= 1:
            return iter(src)
        rank, _, worker, _ = pytorch_worker_info()
        rng = random.Random(f"{self.seed}:{self.epoch}:{rank}:{worker}")
        return wds.shuffle(self.bufsize, initial=min(self.bufsize, 100), rng=rng)(src)


class _SkipBatches(EpochStage):
    """A resume's seek: in `start_epoch`, mark the samples of this worker's first batches so that `_decode_images`
    and `collate` pass them over and `_drop_skipped` drops them after the epoch share has counted them.

    Batch boundaries are replayed from the voxel counts alone (`batch_size` and `token_budget` by the rule of
    `pack_to_budget`), so the first batch after the seek is exactly the one the uninterrupted run saw, while the
    skipped samples' images are never decoded. Shard reads, the shuffle and the small arrays still run: they are
    what positions the stream. Limits: a sample whose images would have failed to decode inside the skipped part
    is counted as if it had not (the stream then shifts by that sample), and with several DataLoader workers the
    skipped batches are split round-robin, as the DataLoader hands them out while no worker has run dry."""

    def __init__(self, seed: int, start_epoch: int, skip_batches: int, batch_size: int, token_budget: int) -> None:
        super().__init__(seed, start_epoch)
        self.start_epoch, self.skip_batches = start_epoch, skip_batches
        self.batch_size, self.token_budget = batch_size, token_budget

    def stage(self, src: Iterable[Sample]) -> Iterator[Sample]:
        _, _, worker, num_workers = pytorch_worker_info()
        todo = len(range(worker, self.skip_batches, num_workers)) if self.epoch == self.start_epoch else 0
        budget = self.token_budget or math.inf  # without a budget only the sample count closes a batch
        count, tokens = 0, 0
        for sample in src:
            n = len(sample["coords"])
            if todo and n <= budget:  # pack_to_budget drops a sample over the budget: it takes no place in a batch
                if _closes_batch(count, tokens, n, self.batch_size, budget):
                    todo, count, tokens = todo - 1, 0, 0  # this sample opens the next batch
                if todo:
                    count, tokens = count + 1, tokens + n
                    sample["__skip__"] = True
            yield sample


def _closes_batch(count: int, tokens: int, n: int, batch_size: int, token_budget: float) -> bool:
    """Whether a sample of `n` voxels opens a new batch after `count` samples of `tokens` voxels: the one packing
    rule of `pack_to_budget` and of a resume's seek (`_SkipBatches`), which must agree on every boundary."""
    return count > 0 and (count == batch_size or tokens + n > token_budget)


def _drop_skipped(src: Iterable[Sample]) -> Iterator[Sample]:
    return (sample for sample in src if not sample.get("__skip__"))


def _worker_share(src: Iterable[Sample], total: int) -> Iterator[Sample]:
    # This worker's part of an epoch of `total` samples, so the loader yields exactly `total` whatever the
    # worker count. (DataPipeline.with_epoch(n) would count per pipeline copy, i.e. n per worker, and count
    # batches when applied after batching.) Placed after every stage that can drop a sample, so drops don't count.
    _, _, worker, num_workers = pytorch_worker_info()
    return itertools.islice(src, total // num_workers + (worker < total % num_workers))


def collate(samples: list[Sample], layout: LayoutFn | None = None) -> Batch:
    """Pack decoded samples into a `Batch` (voxels concatenated, everything else stacked); `layout` adds the model's
    layout of the voxels, computed here, in the loader's worker, on the CPU (a GPU step would sync to build it)."""
    cond = [s["cond"] for s in samples]
    voxels = SparseBatch.from_list([s["coords"] for s in samples], [s["mu"] for s in samples], torch.float32)
    return Batch(
        keys=[s["__key__"] for s in samples],
        voxels=voxels,
        sigma=None if samples[0]["sigma"] is None else torch.from_numpy(
            np.concatenate([s["sigma"] for s in samples]).astype(np.float32)),
        images=torch.stack([s["images"] for s in samples]),
        background=torch.tensor([[s["background"]] * 3 for s in samples], dtype=torch.float32),
        K=torch.from_numpy(np.stack([s["K"] for s in samples])),
        w2c=torch.from_numpy(np.stack([s["w2c"] for s in samples])),
        view_index=torch.tensor([s["view_index"] for s in samples], dtype=torch.int64),
        cond=None if cond[0] is None else torch.stack(cond),
        cond_index=None if cond[0] is None else torch.tensor([s["cond_index"] for s in samples], dtype=torch.int64),
        layout=None if layout is None else layout(voxels.coords, voxels.offsets),
    )


def pack_to_budget(src: Iterable[Sample], batch_size: int, token_budget: int,
                   handler: Callable[[Exception], bool] = skip_bad_sample,
                   layout: LayoutFn | None = None) -> Iterator[Batch]:
    """Batches in stream order of at most `batch_size` samples and `token_budget` voxels in all: a batch is closed
    when the next sample would pass either. Activation memory grows with the voxels of a batch, not its asset count,
    so a budget bounds a step's memory where a fixed batch size cannot (TRELLIS balances by voxel count too). A sample
    larger than the whole budget could never fit: it goes to `handler` (the dataset version's shard.max_voxels
    should have kept it out)."""
    batch: list[Sample] = []
    tokens = 0
    for sample in src:
        n = len(sample["coords"])
        if n > token_budget:
            if handler(ValueError(f"sample {sample['__key__']}: {n} voxels, more than data.token_budget = "
                                  f"{token_budget}; set shard.max_voxels to keep such assets out")):
                continue
            break
        if _closes_batch(len(batch), tokens, n, batch_size, token_budget):
            yield collate(batch, layout)
            batch, tokens = [], 0
        batch.append(sample)
        tokens += n
    if batch:
        yield collate(batch, layout)


def make_dataset(urls: str | Sequence[str], *, batch_size: int, shuffle_buffer: int = 256, resampled: bool = False,
                 seed: int = 0, background: Background = "random", cond: bool = True, views_per_sample: int = 1,
                 epoch_samples: int | None = None, start_epoch: int = 0, token_budget: int = 0,
                 skip_batches: int = 0, handler: Callable[[Exception], bool] = skip_bad_sample,
                 layout: LayoutFn | None = None, sigma: bool = True, read: Read = "ranges") -> wds.DataPipeline:
    """An iterable of `Batch`es over the shards at `urls` (local paths or fsspec URLs; see `shard_urls`).

    resampled=False: each epoch reads every shard once, split across nodes (RANK/WORLD_SIZE or torch.distributed)
    and then DataLoader workers, so a worker or rank with no shard yields nothing and ranks can get different
    batch counts; fine for one node and for evaluation. resampled=True: every worker draws shards with
    replacement, an endless stream, so use it with `epoch_samples` for multi-node training (equal epochs per rank).
    epoch_samples: samples per epoch of this process's loader, across all its workers (per rank); the last
    batch of a worker may be partial. shuffle_buffer: samples per worker (about one asset's arrays each); <= 1
    turns shuffling off. background: "random" = black or white per sample, as TRELLIS trains its decoder.
    start_epoch: the first epoch this pipeline yields (every epoch's stream is a function of the seed and its
    number), so a resumed training run continues the stream it stopped in instead of replaying epoch 0.
    token_budget: > 0 packs batches to at most this many voxels (and `batch_size` samples; `pack_to_budget`).
    skip_batches: batches of `start_epoch` (this process's, across its workers) to seek past without decoding
    their images (`_SkipBatches`): a resumed run's stream then equals the uninterrupted run's from that batch on.
    Bad samples and shards are passed to `handler` (default: log and skip).
    layout: builds `Batch.layout` from each batch's voxels in the workers (a model's layout function).
    views_per_sample, sigma, cond: what the step uses (0 views: none); read="ranges" reads only that
    (`training.samples`), read="stream" every byte of every shard; both give the same batches.
    """
    url_list = [urls] if isinstance(urls, str) else list(urls)
    if not url_list:
        raise ValueError("no shard URLs")
    if background not in ("random", "white", "black"):
        raise ValueError(f"background must be random, white or black, not {background!r}")
    if batch_size < 1 or views_per_sample < 0 or token_budget < 0 or skip_batches < 0:
        raise ValueError(f"batch_size ({batch_size}) must be >= 1, views_per_sample ({views_per_sample}), "
                         f"token_budget ({token_budget}) and skip_batches ({skip_batches}) >= 0")
    if read not in ("ranges", "stream"):
        raise ValueError(f"read must be ranges or stream, not {read!r}")
    want = Want(views=views_per_sample, sigma=sigma, cond=cond, background=background)
    readers = ([ReadRanges(seed, start_epoch, want, handler)] if read == "ranges" else
               [partial(stream_samples, handler=handler), PickViews(seed, start_epoch, want, handler)])
    if resampled:
        resampler = wds.ResampledShards(url_list, seed=seed, deterministic=True)
        resampler.epoch = start_epoch - 1  # it counts its own epochs the same way (+1 per iteration)
        shards: list[Any] = [resampler]
    else:
        shards = [_ShardOrder(url_list, seed, start_epoch), wds.split_by_node, wds.split_by_worker]
    return wds.DataPipeline(
        *shards,
        *readers,
        _Shuffle(seed, start_epoch, shuffle_buffer),
        _SkipBatches(seed, start_epoch, skip_batches, batch_size, token_budget) if skip_batches else None,
        wds.map(decode_images, handler=handler),
        None if epoch_samples is None else partial(_worker_share, total=epoch_samples),
        _drop_skipped if skip_batches else None,
        partial(pack_to_budget, batch_size=batch_size, token_budget=token_budget, handler=handler, layout=layout)
        if token_budget else wds.batched(batch_size, collation_fn=partial(collate, layout=layout), partial=True),
    )


def every_sample(urls: Sequence[str], batch_size: int) -> wds.DataPipeline:
    """Every sample of `urls` once, in shard order, with voxels only (no views, sigma or conditioning), the same in
    every process: no split by rank or worker, for figures all ranks must agree on (the Enc-Dec latent
    statistics)."""
    want = Want(views=0, sigma=False, cond=False, background="black")
    return wds.DataPipeline(wds.SimpleShardList(list(urls)), ReadRanges(0, 0, want, skip_bad_sample),
                            wds.map(decode_images, handler=skip_bad_sample),
                            wds.batched(batch_size, collation_fn=collate, partial=True))


def make_loader(urls: str | Sequence[str], *, batch_size: int, num_workers: int, pin_memory: bool = False,
                prefetch_factor: int = 2, **dataset_kw: Any) -> wds.WebLoader:
    """A DataLoader over `make_dataset(urls, batch_size=..., **dataset_kw)`; it yields the dataset's batches as
    they are (batch_size=None). Workers are persistent so each keeps its epoch count (see the module docstring)."""
    dataset = make_dataset(urls, batch_size=batch_size, **dataset_kw)
    extra = {"persistent_workers": True, "prefetch_factor": prefetch_factor} if num_workers > 0 else {}
    return wds.WebLoader(dataset, batch_size=None, shuffle=False, num_workers=num_workers, pin_memory=pin_memory,
                         **extra)

"""Reading shard samples for training: whole tars streamed, or only the members a step uses, by byte range.

Two readers yield the same samples (`Sample`: arrays, the picked views' compressed bytes, cameras) in the same
order, so everything after them in `training.data`'s pipeline is shared:

- `stream` (webdataset's tar expansion): reads every byte of every shard. A decoder step uses mu, sigma and one of
  the 150 views, ~28% of a sample at paper settings; an SMDiT step ~16% (docs/shards.md).
- `ranges`: reads each shard's member table (`parts/<shard>.json`, written with the shard) and then, per sample,
  only the members this epoch's pick needs, with fsspec's `cat_ranges` (adjacent members merged into one request;
  object stores get concurrent range GETs). Bytes read stay within a few percent of bytes used
  (`benchmarks/shards.py --reads`). Shards written before member tables existed are streamed instead.

What is picked (views, background, conditioning view) is a function of (seed, epoch, key) and the sample's view
counts, never of the reader, the worker count or the stream position.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import fsspec
import numpy as np
import torch
import webdataset as wds
from fsspec.utils import merge_offset_ranges
from webdataset.tariterators import group_by_keys, tar_file_expander

from flux3d.features.vae import over_background
from flux3d.shards.format import cond_field, decode_image, read_npy, view_field

log = logging.getLogger(__name__)

Background = Literal["random", "white", "black"]
Read = Literal["ranges", "stream"]
Sample = dict[str, Any]
Handler = Callable[[Exception], bool]
MERGE_GAP = 64 << 10
"""Members closer than this in a tar are read in one request: a request costs more than 64 KiB of transfer."""


class EpochStage(wds.PipelineStage):
    """A stage that counts its runs: a pipeline copy runs each stage once per epoch."""

    def __init__(self, seed: int, start_epoch: int = 0) -> None:
        self.seed = seed
        self.epoch = start_epoch - 1

    def run(self, *src: Iterable[Any]) -> Iterator[Any]:
        self.epoch += 1
        return self.stage(*src)

    def stage(self, *src: Iterable[Any]) -> Iterator[Any]:
        raise NotImplementedError


@dataclass(frozen=True)
class Want:
    """What a step uses of a sample: `views` supervision views (0: none), sigma, one conditioning view."""

    views: int = 1
    sigma: bool = True
    cond: bool = True
    background: Background = "random"


def _choose(seed: int, epoch: int, key: str, n_views: int, n_cond: int, want: Want) -> tuple[list[int], float,
                                                                                              int | None]:
    """This epoch's views, background and conditioning view of one asset. Keyed by asset, not stream position, so
    the same whatever the reader, worker count or shard order."""
    if n_views < want.views:
        raise ValueError(f"{n_views} views, {want.views} needed")
    rng = random.Random(f"{seed}:{epoch}:{key}")
    # At least one view is drawn even when none is read (the SMDiT's step), so the background and conditioning
    # draws after it are those of a step that reads one view: the SMDiT sees the same stream as before it stopped
    # reading views, and a run started then resumes exactly.
    index = rng.sample(range(n_views), max(want.views, min(n_views, 1)))[:want.views]
    background = float(rng.random() < 0.5) if want.background == "random" else float(want.background == "white")
    if not want.cond:
        return index, background, None
    if n_cond == 0:
        raise ValueError("no conditioning views or latents")
    return index, background, rng.randrange(n_cond)


def _assemble(fields: dict[str, bytes], key: str, choice: tuple[list[int], float, int | None], want: Want) -> Sample:
    """The sample a batch is made of, from the raw members (at least the chosen ones), validated."""
    index, background, cond_index = choice
    coords, mu = read_npy(fields["coords.npy"]), read_npy(fields["mu.npy"])
    sigma = read_npy(fields["sigma.npy"]) if want.sigma else None
    if coords.dtype != np.uint8 or coords.ndim != 2 or coords.shape[1] != 3:
        raise ValueError(f"coords are {coords.dtype} {coords.shape}, not uint8 (N, 3)")
    # The channel count is the dataset's (stats.json "channels"), checked against the model when the step starts.
    if mu.ndim != 2 or len(mu) != len(coords) or (sigma is not None and sigma.shape != mu.shape):
        raise ValueError(f"mu {mu.shape} / sigma {None if sigma is None else sigma.shape} do not match "
                         f"{len(coords)} voxels")
    cameras = json.loads(fields["cameras.json"])
    views = cameras["views"]
    out: Sample = {
        "__key__": key, "coords": coords, "mu": mu, "sigma": sigma, "background": background,
        "views": [fields[view_field(i)] for i in index], "view_index": index,
        "K": np.asarray([views[i]["K"] for i in index], np.float32).reshape(-1, 3, 3),
        "w2c": np.asarray([views[i]["w2c"] for i in index], np.float32).reshape(-1, 4, 4),
        "resolution": cameras.get("resolution"), "cond": None, "cond_index": cond_index,
    }
    if cond_index is not None:
        out["cond"] = read_npy(fields["cond.npy"])[cond_index] if "cond.npy" in fields else fields[cond_field(cond_index)]
    return out


def _counts(names: Iterable[str]) -> tuple[int, int]:
    names = list(names)
    return sum(n.startswith("view_") for n in names), sum(n.startswith("cond_") for n in names)


class PickViews(EpochStage):
    """The `stream` reader's second half: whole raw samples (tar members) -> this epoch's picked `Sample`s."""

    def __init__(self, seed: int, start_epoch: int, want: Want, handler: Handler) -> None:
        super().__init__(seed, start_epoch)
        self.want, self.handler = want, handler

    def stage(self, src: Iterable[Sample]) -> Iterator[Sample]:
        for raw in src:
            try:
                yield self.pick(raw)
            except Exception as exn:  # noqa: BLE001 - whatever a corrupt sample raises, the handler decides
                if not self.handler(ValueError(f"sample {raw.get('__key__')} in {raw.get('__url__')}: {exn!r}")):
                    break

    def pick(self, raw: Sample) -> Sample:
        n_views, n_cond = _counts(raw)
        if "cond.npy" in raw:
            n_cond = len(read_npy(raw["cond.npy"]))
        cameras = json.loads(raw["cameras.json"])
        if len(cameras["views"]) != n_views:
            raise ValueError(f"{n_views} views, {len(cameras['views'])} cameras")
        choice = _choose(self.seed, self.epoch, raw["__key__"], n_views, n_cond, self.want)
        return _assemble(raw, raw["__key__"], choice, self.want)


def stream_samples(src: Iterable[Sample], handler: Handler) -> Iterator[Sample]:
    """The `stream` reader's first half: shard URLs -> raw samples (every member of every sample)."""
    return group_by_keys(tar_file_expander(_open_shards(src, handler), handler=handler), handler=handler)


def _open_shards(src: Iterable[Sample], handler: Handler) -> Iterator[Sample]:
    # webdataset's own opener (gopen) knows local files and a few CLI-backed schemes (curl, gsutil, ais); fsspec
    # covers local paths, file://, s3://, gs://, hf://, ... in one code path with the same URLs as the index.
    for shard in src:
        url = shard["url"]
        try:
            stream = fsspec.open(url, "rb").open()
        except Exception as exn:  # noqa: BLE001 - any filesystem's failure; the handler decides
            if handler(ValueError(f"cannot open shard {url}: {exn!r}")):
                continue
            break
        try:
            yield {**shard, "stream": stream}
        finally:
            stream.close()  # resumed only after the tar reader has consumed the whole stream


def member_table_url(shard_url: str) -> str:
    """`<version>/train-000001.tar` -> `<version>/parts/train-000001.json` (the shard's rows and member ranges)."""
    base, name = shard_url.rsplit("/", 1)
    return f"{base}/parts/{name.removesuffix('.tar')}.json"


class ReadRanges(EpochStage):
    """The `ranges` reader: shard URLs -> picked `Sample`s, reading only the members the pick needs."""

    def __init__(self, seed: int, start_epoch: int, want: Want, handler: Handler) -> None:
        super().__init__(seed, start_epoch)
        self.want, self.handler = want, handler
        self.streamed = PickViews(seed, start_epoch, want, handler)  # shards that have no member table

    def stage(self, src: Iterable[Sample]) -> Iterator[Sample]:
        self.streamed.epoch = self.epoch
        for shard in src:
            url = shard["url"]
            try:
                fs, path = fsspec.core.url_to_fs(url)
                rows = json.loads(fs.cat_file(member_table_url(path)))["rows"]
            except FileNotFoundError:
                rows = []
            except Exception as exn:  # noqa: BLE001 - any filesystem's failure; the handler decides
                if self.handler(ValueError(f"cannot read the member table of {url}: {exn!r}")):
                    continue
                break
            if not rows or not all("members" in r for r in rows):
                log.warning("%s has no member table (a shard written before they existed, or a copy without its "
                            "parts/): streaming all of it", url)
                yield from self.streamed.stage(stream_samples([shard], self.handler))
                continue
            for row in rows:
                try:
                    yield self.read(fs, path, row)
                except Exception as exn:  # noqa: BLE001 - a damaged sample or a failed read; the handler decides
                    if not self.handler(ValueError(f"sample {row.get('key')} in {url}: {exn!r}")):
                        return

    def read(self, fs: Any, path: str, row: dict[str, Any]) -> Sample:
        members: dict[str, list[int]] = row["members"]
        n_views, n_cond = _counts(members)
        names = ["cameras.json", "coords.npy", "mu.npy", *(["sigma.npy"] if self.want.sigma else [])]
        if "cond.npy" in members and self.want.cond:
            # Conditioning latents are one array of every view, read whole: its length is the choice's range
            # (shard.cond = latents trades reads and storage for the encoder's GPU time; docs/shards.md).
            fields = _fetch(fs, path, members, [*names, "cond.npy"])
            choice = _choose(self.seed, self.epoch, row["key"], n_views, len(read_npy(fields["cond.npy"])), self.want)
            fields.update(_fetch(fs, path, members, [view_field(i) for i in choice[0]]))
        else:  # the choice needs only the counts: one request for everything
            choice = _choose(self.seed, self.epoch, row["key"], n_views, n_cond, self.want)
            picked = [view_field(i) for i in choice[0]] + ([] if choice[2] is None else [cond_field(choice[2])])
            fields = _fetch(fs, path, members, names + picked)
        if len(json.loads(fields["cameras.json"])["views"]) != n_views:
            raise ValueError(f"{n_views} views in the member table, not as many cameras")
        return _assemble(fields, row["key"], choice, self.want)


def _fetch(fs: Any, path: str, members: dict[str, list[int]], names: list[str]) -> dict[str, bytes]:
    """The named members' bytes, adjacent ones merged into one range request."""
    missing = [n for n in names if n not in members]
    if missing:
        raise ValueError(f"no member {missing} in the member table")
    starts = [members[n][0] for n in names]
    ends = [members[n][0] + members[n][1] for n in names]
    paths, m_starts, m_ends = merge_offset_ranges([path] * len(names), starts, ends, max_gap=MERGE_GAP, sort=True)
    blocks = fs.cat_ranges(paths, m_starts, m_ends)
    out = {}
    for name, start, end in zip(names, starts, ends):
        for block, b_start, b_end in zip(blocks, m_starts, m_ends):
            if b_start <= start and end <= b_end:
                if isinstance(block, Exception):
                    raise block
                data = bytes(block[start - b_start:end - b_start])
                if len(data) != end - start:
                    raise ValueError(f"member {name}: {len(data)} of {end - start} bytes (truncated shard)")
                out[name] = data
                break
    return out


def _rgb(rgba: np.ndarray, background: float) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1]: straight-alpha RGBA over a uniform background."""
    return torch.from_numpy(over_background(rgba, background))


def decode_images(sample: Sample) -> Sample:
    """Decode the picked views and conditioning image onto the sample's background (after the shuffle buffer, so
    decoded floats are never buffered)."""
    if sample.get("__skip__"):
        return sample  # a resume's seek passes over it (data._SkipBatches)
    try:
        images = [_rgb(decode_image(data), sample["background"]) for data in sample.pop("views")]
        res = sample["resolution"]
        if res is not None and any(tuple(im.shape[1:]) != (res, res) for im in images):
            raise ValueError(f"view sizes {[tuple(im.shape[1:]) for im in images]}, cameras say {res}")
        sample["images"] = torch.stack(images) if images else torch.zeros(0, 3, res or 0, res or 0)
        cond = sample["cond"]
        if isinstance(cond, bytes):
            sample["cond"] = _rgb(decode_image(cond), sample["background"])
        elif cond is not None:
            sample["cond"] = torch.from_numpy(cond.astype(np.float32))
    except Exception as exn:
        raise ValueError(f"sample {sample['__key__']}: {exn!r}") from exn
    return sample

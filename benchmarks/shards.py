"""Shard-stage and loader cost on this machine, on synthetic assets of realistic size.

    python benchmarks/shards.py [--assets 64] [--voxels 20000] [--views 150] [--view-res 512] [--cond-views 24]
                                [--cond-res 1024] [--workers 2] [--max-mb 256] [--epochs 3] [--quick]

Assets: ~`--voxels` voxels each (0.5x to 1.5x, uniform), float16 random mu/sigma, `--views` supervision views at
`--view-res` and `--cond-views` conditioning views at `--cond-res`, stored as WebP q95 (ShardConfig's defaults) of
render-like RGBA images (benchmarks/encode.py's `rgba_view`), and the render's real camera records. The images
are a pool encoded once and shared between assets, so setup stays short; sizes and decode costs are those of
distinct images. `--quick` (a run under a minute) shrinks every default.

Figures: WebP encode ms per view (paid by `make_item` for every asset: shard building's main CPU cost); shard
write MB/s through `ShardSet.write` into a temporary folder (page cache, no fsync: the writer's own overhead,
not a disk's; shards of `--max-mb` or less, so that every loader worker gets at least two); total bytes and bytes per asset by field from `finish`'s stats.json; loader samples/s and voxels/s
through `make_loader` (batch 8, one view and one conditioning image decoded per sample) with `--workers` worker
processes and with none, timed over `--epochs` epochs after a warm-up batch.

Reads (`--reads`, issue: bytes read at most 2x the bytes a step uses): for the decoder's step (mu, sigma, one view)
and the SMDiT's (mu, one conditioning view), each reader (`ranges`: member tables and byte ranges; `stream`:
whole tars) and each root (a local folder; `memory://`, an fsspec object store in this process), one epoch with no
worker processes through a filesystem that counts the bytes its reads return: bytes read per sample against the
bytes of the members the step uses, and samples/s.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import math
import tempfile
import time
from pathlib import Path

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from flux3d.config.pipeline import Config
from flux3d.pipeline.shard import finish
from flux3d.shards.build import _field_bytes
from flux3d.shards.format import decode_image, encode_image, encode_sample
from flux3d.shards.writer import Item, ShardSet, Sums, tar_bytes
from flux3d.stages.cameras import intrinsics, view_set_cameras, w2c_opencv
from flux3d.storage import Storage
from flux3d.training.data import make_dataset, make_loader, shard_urls
from flux3d.training.samples import Want

# benchmarks/ is not a package; load the sibling script by path so this works however it is started.
_spec = importlib.util.spec_from_file_location("benchmark_encode", Path(__file__).with_name("encode.py"))
_encode = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_encode)
rgba_view, timed = _encode.rgba_view, _encode.timed

DEFAULTS = {"assets": 64, "voxels": 20000, "views": 150, "view_res": 512, "cond_views": 24, "cond_res": 1024}
QUICK = {"assets": 48, "voxels": 10000, "views": 40, "view_res": 256, "cond_views": 24, "cond_res": 512}
POOL = 12  # distinct images per set: enough that neighbouring views differ, few enough to encode quickly
QUALITY = Config().shard.image_quality


def webp_pool(res: int, seed: int) -> tuple[list[bytes], float]:
    """POOL WebP views at `res` and the encode milliseconds per view."""
    images = [rgba_view(res, seed + i) for i in range(POOL)]
    t0 = time.perf_counter()
    data = [encode_image(im, QUALITY) for im in images]
    return data, 1000 * (time.perf_counter() - t0) / POOL


def cameras(key: str, folder: str, n: int, res: int) -> list[dict]:
    K = intrinsics(math.radians(40), res, res).tolist()
    return [{"K": K, "w2c": w2c_opencv(c).tolist()} for c in view_set_cameras(key, folder, n, 2.0)]


def make_items(a: argparse.Namespace, views: list[bytes], cond: list[bytes]) -> list[Item]:
    """Assets as `make_item` builds them (same sample fields, meta keys, sums and field bytes)."""
    items = []
    for i in range(a.assets):
        rng = np.random.default_rng(i)
        n = int(a.voxels * rng.uniform(0.5, 1.5))
        flat = np.sort(rng.choice(64 ** 3, n, replace=False))  # sorted flat index = sorted (x, y, z)
        coords = np.stack(np.unravel_index(flat, (64, 64, 64)), -1).astype(np.uint8)
        mu = rng.standard_normal((n, 16), np.float32).astype(np.float16)
        sigma = (np.abs(rng.standard_normal((n, 16), np.float32)) * 0.05).astype(np.float16)
        key = hashlib.sha256(f"benchmark-{i}".encode()).hexdigest()
        cams = {"views": cameras(key, f"views{a.views}", a.views, a.view_res),
                "cond": cameras(key, f"cond{a.cond_views}", a.cond_views, a.cond_res),
                "resolution": a.view_res, "cond_resolution": a.cond_res}
        meta = {"sha256": key, "source": "benchmark", "uid": f"benchmark/{i}", "license": "CC-BY-4.0",
                "attribution": "synthetic", "num_voxels": n, "split": "train", "encoder": "flux_vae",
                "dataset_version": "benchmark"}
        sample = encode_sample(key, coords, mu, sigma, [views[(i + 5 * v) % POOL] for v in range(a.views)], cams,
                               meta, cond_images=[cond[(i + c) % POOL] for c in range(a.cond_views)])
        m = mu.astype(np.float64)
        sums = Sums(voxels=n, mu=m.sum(0).tolist(), mu_sq=(m * m).sum(0).tolist(),
                    sigma=sigma.astype(np.float64).sum(0).tolist(), field_bytes=_field_bytes(sample))
        items.append(Item(sample, {"key": key, "split": "train", "num_voxels": n, "source": "benchmark",
                                   "license": "CC-BY-4.0"}, sums))
    return items


def loader_rate(urls: list[str], workers: int, a: argparse.Namespace) -> tuple[float, float, float]:
    """(seconds to the first batch, samples/s, voxels/s) over `a.epochs` epochs after that warm-up batch."""
    # A small shuffle buffer: with a few dozen assets the default (256, filled to 100 before the first sample)
    # would hold a worker's whole share, so each epoch would start with a stall a real dataset never has.
    loader = make_loader(urls, batch_size=a.batch_size, num_workers=workers, shuffle_buffer=a.shuffle_buffer)
    t0 = time.perf_counter()
    it = iter(loader)
    next(it)  # worker start-up, first shard open, buffer fill
    first = time.perf_counter() - t0
    samples = voxels = 0
    t0 = time.perf_counter()
    for epoch in range(a.epochs):
        for batch in it if epoch == 0 else loader:  # epoch 0: what the warm-up batch left
            samples += len(batch.keys)
            voxels += batch.voxels.coords.shape[0]
    s = time.perf_counter() - t0
    del it, loader  # ends the persistent workers before the next measurement
    return first, samples / s, voxels / s


class _CountedFile:
    """An fsspec file whose reads add to its filesystem's byte count."""

    def __init__(self, f, fs) -> None:  # noqa: ANN001 - any fsspec file and filesystem
        self._f, self._fs = f, fs

    def read(self, *args):  # noqa: ANN002, ANN201
        data = self._f.read(*args)
        type(self._fs).bytes_read += len(data)
        return data

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self._f, name)

    def __enter__(self) -> _CountedFile:
        return self

    def __exit__(self, *exc) -> None:  # noqa: ANN002
        self._f.close()

    def __iter__(self):  # noqa: ANN204
        return iter(self._f)


class _Counting:
    """Counts the bytes read through `_open`; `cat_file` goes through `_open` too, so each byte counts once."""

    bytes_read = 0

    def _open(self, path, mode="rb", **kw):  # noqa: ANN001, ANN003, ANN202
        return _CountedFile(super()._open(path, mode, **kw), self)

    def cat_file(self, path, start=None, end=None, **kw):  # noqa: ANN001, ANN003, ANN201
        with self._open(self._strip_protocol(path), "rb") as f:
            f.seek(start or 0)
            return f.read(-1 if end is None else end - (start or 0))


class CountingLocal(_Counting, LocalFileSystem):
    protocol = "countfile"


class CountingMemory(_Counting, MemoryFileSystem):
    protocol = "countmem"
    store: dict = {}  # its own store: MemoryFileSystem's is shared by every subclass
    pseudo_dirs = [""]


fsspec.register_implementation("countfile", CountingLocal, clobber=True)
fsspec.register_implementation("countmem", CountingMemory, clobber=True)


def used_bytes(sample: dict, want: Want, view_index: list[int], cond_index: int | None) -> int:
    """Bytes of the members a step uses: coords, mu, cameras, sigma (decoder), its views, its conditioning view."""
    names = ["coords.npy", "mu.npy", "cameras.json", *(["sigma.npy"] if want.sigma else []),
             *(f"view_{i:03d}.webp" for i in view_index), *([] if cond_index is None else [f"cond_{cond_index:03d}.webp"])]
    return sum(len(sample[n]) for n in names)


def read_cost(urls: list[str], items: dict[str, dict], want: Want, read: str) -> tuple[float, float, float]:
    """(bytes read per sample, bytes used per sample, samples/s) of one epoch, no worker processes."""
    counter = CountingLocal if urls[0].startswith("countfile") else CountingMemory
    counter.bytes_read = 0
    used = samples = 0
    t0 = time.perf_counter()
    for batch in make_dataset(urls, batch_size=8, shuffle_buffer=1, read=read, views_per_sample=want.views,
                              sigma=want.sigma, cond=want.cond):
        for b, key in enumerate(batch.keys):
            cond = None if batch.cond_index is None else int(batch.cond_index[b])
            used += used_bytes(items[key], want, batch.view_index[b].tolist(), cond)
        samples += len(batch.keys)
    s = time.perf_counter() - t0
    return counter.bytes_read / samples, used / samples, samples / s


def print_reads(version_dir: Path, items: list[Item]) -> None:
    by_key = {it.sample["__key__"]: it.sample for it in items}
    memory = "countmem://benchmark"
    for path in version_dir.rglob("*"):
        if path.is_file():
            fsspec.filesystem("countmem").pipe(f"{memory}/{path.relative_to(version_dir)}", path.read_bytes())
    steps = {"decoder": Want(views=1, sigma=True, cond=False), "smdit": Want(views=0, sigma=False, cond=True)}
    print("reads per sample (one epoch, no workers): read / used by the step")
    for root in (f"countfile://{version_dir}", memory):
        urls = shard_urls(root, "train")
        for step, want in steps.items():
            for read in ("ranges", "stream"):
                got, used, rate = read_cost(urls, by_key, want, read)
                print(f"  {root.split(':')[0]:<9} {step:<7} {read:<6}: {got / 2 ** 10:8,.0f} KiB read, "
                      f"{used / 2 ** 10:7,.0f} KiB used = {got / used:5.2f}x, {rate:6.1f} samples/s")


def main() -> None:
    ap = argparse.ArgumentParser()
    for name in DEFAULTS:
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--max-mb", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--shuffle-buffer", type=int, default=16)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reads", action="store_true", help="also bytes read vs used per sample, both readers")
    a = ap.parse_args()
    for name, value in (QUICK if a.quick else DEFAULTS).items():
        if getattr(a, name) is None:
            setattr(a, name, value)

    t0 = time.perf_counter()
    views, view_ms = webp_pool(a.view_res, 0)
    cond, cond_ms = webp_pool(a.cond_res, 1000)
    decode_ms = 1000 * min(timed(lambda: decode_image(views[0])) for _ in range(5))
    print(f"WebP q{QUALITY} encode: {view_ms:.1f} ms per {a.view_res}-px view, {cond_ms:.1f} ms per "
          f"{a.cond_res}-px view -> {(a.views * view_ms + a.cond_views * cond_ms) / 1000:.2f} s per asset in "
          f"make_item ({a.views} + {a.cond_views} views); decode {decode_ms:.1f} ms per {a.view_res}-px view")
    items = make_items(a, views, cond)
    total = sum(tar_bytes(it.sample) for it in items)
    print(f"{a.assets} assets built in {time.perf_counter() - t0:.1f} s: {total / 2 ** 20:.1f} MiB of samples")

    with tempfile.TemporaryDirectory(prefix="flux3d-shards-") as tmp:
        # At least two shards per worker, or a worker of a split-by-worker epoch would idle.
        max_bytes = min(a.max_mb << 20, max(total // (2 * max(a.workers, 1)), 1 << 20))
        shards = ShardSet(Storage(tmp), "shards/benchmark", max_bytes)
        t0 = time.perf_counter()
        parts = list(shards.write("train", items))
        s = time.perf_counter() - t0
        written = sum(p.stat().st_size for p in Path(tmp, "shards", "benchmark").glob("*.tar"))
        print(f"write: {len(parts)} shards of <= {max_bytes / 2 ** 20:.0f} MiB, {written / 2 ** 20:.1f} MiB in "
              f"{s:.2f} s = {written / 2 ** 20 / s:.0f} MiB/s ({a.assets / s:.1f} assets/s)")
        stats = finish(shards, Config(), "benchmark", failed=0)
        per = stats["bytes_per_asset"]
        print(f"bytes per asset: {sum(per.values()) / 2 ** 10:,.0f} KiB =  " + "  ".join(
            f"{k} {v / 2 ** 10:,.0f} ({100 * v / sum(per.values()):.0f} %)"
            for k, v in sorted(per.items(), key=lambda kv: -kv[1])))
        if a.reads:
            print_reads(Path(tmp, "shards", "benchmark"), items)
        urls = shard_urls(str(Path(tmp, "shards", "benchmark")), "train")
        for workers in dict.fromkeys((a.workers, 0)):  # --workers 0 measures once
            first, rate, vrate = loader_rate(urls, workers, a)
            print(f"loader, {workers} workers: first batch {first:.2f} s, then {rate:.1f} samples/s, "
                  f"{vrate / 1e6:.2f} M voxels/s (batch {a.batch_size}, {a.epochs} epochs)")


if __name__ == "__main__":
    main()

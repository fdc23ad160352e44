"""Size-bounded webdataset shards of one dataset version, written so that a crash loses at most one shard.

Layout under `shards/<version>/`:

    train-000000.tar ...     samples in sha256 order (the loader shuffles shards and samples)
    val-000000.tar ...
    parts/train-000000.json  what one finished shard holds: its rows (with each member's byte range in the tar)
                             and its feature-statistics sums
    index.parquet            all parts' rows: key, shard, split, num_voxels, bytes, source, license
    stats.json               per-channel statistics and totals; written last, so it marks the version complete

A shard is written to a hidden temporary sibling and renamed into place when closed; its part file follows. A
killed writer therefore leaves finished shards (with parts), at most one hidden temporary file (swept by
`Storage.sweep_tmp`), and nothing visible that is partial. A re-run skips the keys in the parts and numbers new
shards after them. Given the same inputs the bytes are the same: samples in a fixed order, tar headers with a
fixed owner and mtime 0, deterministic image encoding.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from flux3d.storage import Storage

TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK  # tarfile pads the archive to whole records
PART_RE = re.compile(r"^(train|val)-(\d{6})\.json$")  # parts/<split>-<index>.json


def tar_bytes(sample: dict[str, Any]) -> int:
    """Bytes a sample adds to a tar: one header block per field plus the data padded to whole blocks."""
    return sum(TAR_BLOCK + -(-len(v) // TAR_BLOCK) * TAR_BLOCK for k, v in sample.items() if not k.startswith("_"))


def member_ranges(sample: dict[str, Any], start: int) -> dict[str, list[int]]:
    """Where each field's data lies in the tar, {field: [offset, size]}, for a sample whose first header is at
    byte `start`: what lets the loader read only the members a step uses (HTTP/object-store range reads).
    It follows webdataset's TarWriter: fields in sorted order, each one 512-byte header and then its data padded to
    whole blocks. That holds while a member's name fits the header's 100 bytes (longer ones get extension
    headers); sample keys are sha256s, so names are ~80 bytes, and a longer one is refused here, not mis-indexed."""
    out, pos = {}, start
    for k in sorted(k for k in sample if not k.startswith("_")):
        if len(f"{sample['__key__']}.{k}") > 100:
            raise ValueError(f"tar member name {sample['__key__']}.{k} is longer than 100 bytes")
        size = len(sample[k])
        out[k] = [pos + TAR_BLOCK, size]
        pos += TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK
    return out


@dataclass
class Sums:
    """Running sums for per-channel statistics and bytes per field, mergeable across shards and runs."""

    voxels: int = 0
    mu: list[float] = field(default_factory=list)
    mu_sq: list[float] = field(default_factory=list)
    sigma: list[float] = field(default_factory=list)
    field_bytes: dict[str, int] = field(default_factory=dict)

    def add(self, other: Sums) -> None:
        self.voxels += other.voxels
        self.mu, self.mu_sq, self.sigma = (_vsum(a, b) for a, b in ((self.mu, other.mu), (self.mu_sq, other.mu_sq),
                                                                    (self.sigma, other.sigma)))
        for k, v in other.field_bytes.items():
            self.field_bytes[k] = self.field_bytes.get(k, 0) + v


def _vsum(a: list[float], b: list[float]) -> list[float]:
    return [x + y for x, y in zip(a, b, strict=True)] if a and b else list(a or b)


def tar_file_bytes(payload: int) -> int:
    """Size on disk of a tar whose members take `payload` bytes: two zero end blocks, padded to whole records."""
    return -(-(payload + 2 * TAR_BLOCK) // TAR_RECORD) * TAR_RECORD


@dataclass
class Item:
    """One asset ready to write: the webdataset sample, its index row and its statistics."""

    sample: dict[str, Any]
    row: dict[str, Any]
    sums: Sums


class ShardSet:
    """The shards of one dataset version under `rel`."""

    def __init__(self, storage: Storage, rel: str, max_bytes: int) -> None:
        self.storage, self.rel, self.max_bytes = storage, rel, max_bytes

    def parts(self) -> dict[str, dict[str, Any]]:
        """Finished shards: shard file name -> its part record."""
        out = {}
        for name in sorted(self.storage.list(f"{self.rel}/parts", ".json")):
            base = name.rsplit("/", 1)[-1]
            if PART_RE.match(base):
                out[base.removesuffix(".json") + ".tar"] = json.loads(self.storage.read_bytes(f"{self.rel}/parts/{base}"))
        return out

    def write(self, split: str, items: Iterable[Item]) -> Iterator[dict[str, Any]]:
        """Write `items` into new shards of `split`; yields each part record once its shard is in place."""
        import webdataset as wds

        taken = [int(n.removesuffix(".tar").split("-")[1]) for n in self.parts() if n.startswith(f"{split}-")]
        index = max(taken, default=-1) + 1
        open_cm = tw = None
        size, rows, sums = 0, [], Sums()
        try:
            for item in items:
                need = tar_bytes(item.sample)
                if tw is not None and rows and tar_file_bytes(size + need) > self.max_bytes:
                    yield self._close(open_cm, tw, split, index, rows, sums)
                    open_cm = tw = None
                    index += 1
                if tw is None:
                    open_cm = self.storage.open_atomic(f"{self.rel}/{split}-{index:06d}.tar", durable=True)
                    tw = wds.TarWriter(open_cm.__enter__(), user="flux3d", group="flux3d", mtime=0, encoder=False)
                    size, rows, sums = 0, [], Sums()
                tw.write(item.sample)
                rows.append({**item.row, "shard": f"{split}-{index:06d}.tar", "bytes": need,
                             "members": member_ranges(item.sample, size)})
                size += need
                sums.add(item.sums)
            if tw is not None:
                yield self._close(open_cm, tw, split, index, rows, sums)
                open_cm = None
        except BaseException as exc:
            if open_cm is not None:  # drop the temporary file of the shard being written
                open_cm.__exit__(type(exc), exc, exc.__traceback__)
            raise

    def _close(self, open_cm: Any, tw: Any, split: str, index: int, rows: list[dict[str, Any]],
               sums: Sums) -> dict[str, Any]:
        tw.close()  # writes the end-of-archive blocks; the file object stays ours
        open_cm.__exit__(None, None, None)  # renames it into place
        part = {"shard": f"{split}-{index:06d}.tar", "split": split, "rows": rows, "sums": sums.__dict__}
        self.storage.write_bytes(f"{self.rel}/parts/{split}-{index:06d}.json",
                                 json.dumps(part, sort_keys=True).encode())
        return part

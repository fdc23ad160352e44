"""`flux3d shard`: the kept, encoded assets into the webdataset shards of one dataset version.

The version is a hash of the settings and the kept-asset list (`shards.build.dataset_version`), so the same
catalog gives the same version and a run over a finished version does nothing. An interrupted run resumes after
its last finished shard (`shards.writer.ShardSet`). Every asset's outcome goes to the catalog's `shard` stage
with the version as its params: ok with its shard, or failed with a reason (bad_features, bad_render, over_voxel_cap).
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from flux3d.catalog import Catalog, first_per_sha
from flux3d.config.pipeline import Config, section_params
from flux3d.executors.local import ordered_map
from flux3d.features.encode import encode_params
from flux3d.records import FAILED, OK, StageResult
from flux3d.shards.build import SampleError, dataset_version, make_item, split_of
from flux3d.shards.writer import Item, ShardSet, Sums
from flux3d.storage import Storage

SHARD_COLUMNS = pa.schema([("shard", pa.string()), ("split", pa.string())])
INDEX_SCHEMA = pa.schema([("key", pa.string()), ("shard", pa.string()), ("split", pa.string()),
                          ("num_voxels", pa.int64()), ("bytes", pa.int64()), ("source", pa.string()),
                          ("license", pa.string())])
UPSTREAM = ("render", "curate", "voxelize", "encode")
MapFn = Callable[[Callable[[Any], Any], Iterable[Any]], Iterator[Any]]


@dataclass
class ShardSummary:
    version: str
    path: str
    up_to_date: bool = False
    written: dict[str, int] = field(default_factory=dict)
    """Assets written this run, per split."""
    reasons: dict[str, int] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def kept_rows(cfg: Config, catalog: Catalog) -> list[dict[str, Any]]:
    """Assets whose render, curation, voxels and features (with the current encode settings) are all ok."""
    table = catalog.table(list(UPSTREAM), result_columns=("state", "params", "render_dir", "features_path"),
                          asset_columns=("sha256", "source", "file_identifier", "license", "attribution",
                                         "metadata"))
    if any(f"{s}_state" not in table.column_names for s in UPSTREAM):
        return []
    mask = pc.equal(table["encode_params"], encode_params(cfg))
    for stage in UPSTREAM:
        mask = pc.and_(mask, pc.equal(table[f"{stage}_state"], OK))
    rows = first_per_sha(table.filter(pc.fill_null(mask, False))).to_pylist()
    return sorted(rows, key=lambda r: r["sha256"])


def run_shard(cfg: Config, storage: Storage, catalog: Catalog, map_fn: MapFn | None = None,
              mark_latest: bool = True) -> ShardSummary:
    """`map_fn(fn, items)` prepares samples in input order (threads here; the flows pass a Ray fan-out).
    `mark_latest=False` leaves shards/LATEST alone (a study's side versions are not the pipeline's newest)."""
    t0 = time.perf_counter()
    rows = kept_rows(cfg, catalog)
    if not rows:
        raise ValueError("no asset is ready to shard: run render, curate, voxelize and encode first")
    version = dataset_version(cfg, [r["sha256"] for r in rows])
    rel = f"shards/{version}"
    run = ShardSummary(version, storage.path(rel))
    if storage.exists(f"{rel}/stats.json"):
        run.up_to_date = True
        run.stats = json.loads(storage.read_bytes(f"{rel}/stats.json"))
        return run
    shards = ShardSet(storage, rel, cfg.shard.max_bytes)
    done = {r["key"] for part in shards.parts().values() for r in part["rows"]}
    failures: list[StageResult] = []

    def prepare(row: dict[str, Any]) -> Item | StageResult:
        try:
            return make_item(row, cfg, storage, version)
        except SampleError as e:
            return StageResult(row["sha256"], FAILED, e.reason, str(e))

    def items(todo: list[dict[str, Any]]):  # noqa: ANN202 - the ready items, failures set aside
        mapped = map_fn(prepare, todo) if map_fn else ordered_map(prepare, todo, cfg.shard.workers)
        for out in mapped:
            if isinstance(out, StageResult):
                failures.append(out)
            else:
                yield out

    for split in ("train", "val"):
        todo = [r for r in rows if r["sha256"] not in done
                and split_of(r["sha256"], cfg.shard.val_fraction, cfg.shard.split_seed) == split]
        for part in shards.write(split, items(todo)):
            catalog.write_results("shard", version, [
                StageResult(r["key"], OK, columns={"shard": part["shard"], "split": split}) for r in part["rows"]],
                SHARD_COLUMNS)
            run.written[split] = run.written.get(split, 0) + len(part["rows"])
    catalog.write_results("shard", version, failures, SHARD_COLUMNS)
    for f in failures:
        run.reasons[f"failed:{f.reason}"] = run.reasons.get(f"failed:{f.reason}", 0) + 1
    run.stats = finish(shards, cfg, version, failed=len(failures))
    if mark_latest:
        storage.write_bytes("shards/LATEST", version.encode())
    run.seconds = time.perf_counter() - t0
    return run


def finish(shards: ShardSet, cfg: Config, version: str, failed: int) -> dict[str, Any]:
    """index.parquet, then stats.json (the completion marker). Channel statistics come from the train split only:
    the normalisation the diffusion model learns with must not have seen validation assets."""
    parts = shards.parts()
    rows = [r for part in parts.values() for r in part["rows"]]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=INDEX_SCHEMA), buf)
    shards.storage.write_bytes(f"{shards.rel}/index.parquet", buf.getvalue())
    sums, train = Sums(), Sums()
    for part in parts.values():
        s = Sums(**part["sums"])
        sums.add(s)
        if part["split"] == "train":
            train.add(s)
    basis = train if train.voxels else sums  # a tiny set may have no train voxels at all
    n = max(basis.voxels, 1)
    mean = np.array(basis.mu) / n
    std = np.sqrt(np.maximum(np.array(basis.mu_sq) / n - mean ** 2, 0.0))
    assets = {s: sum(1 for r in rows if r["split"] == s) for s in ("train", "val")}
    stats = {
        "version": version, "assets": assets, "failed": failed, "voxels": sums.voxels,
        "stats_split": "train" if train.voxels else "all",
        "mu_mean": mean.tolist(), "mu_std": std.tolist(), "sigma_mean": (np.array(basis.sigma) / n).tolist(),
        "shards": {s: sum(1 for p in parts.values() if p["split"] == s) for s in ("train", "val")},
        "bytes": sum(r["bytes"] for r in rows),
        "bytes_per_asset": {k: v / max(len(rows), 1) for k, v in sorted(sums.field_bytes.items())},
        "shard_config": section_params(cfg.shard), "encoder": cfg.encode.encoder, "channels": len(mean),
        "voxel_resolution": cfg.voxelize.resolution,
    }
    shards.storage.write_bytes(f"{shards.rel}/stats.json", json.dumps(stats, indent=2, sort_keys=True).encode())
    return stats

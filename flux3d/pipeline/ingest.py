"""`flux3d ingest`: list sources into the catalog, then download and inspect every asset not yet done.

Resumable by construction: every step asks the catalog what is already final for the current params, commits
results in batches of `ingest.batch_size`, and writes every file atomically. A killed run loses at most the batches
in flight; the next run picks up after the last committed one and changes nothing that was finished.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import pyarrow.compute as pc
import requests

from flux3d.catalog import Catalog, as_record
from flux3d.config.pipeline import Config
from flux3d.executors.local import run_local
from flux3d.pipeline.stage import Stage, StageSummary
from flux3d.records import StageResult, params_hash
from flux3d.sources import list_source, parse_spec
from flux3d.stages.download import DOWNLOAD_COLUMNS, download_asset, download_params
from flux3d.stages.inspect import INSPECT_COLUMNS, INSPECT_VERSION, inspect_asset
from flux3d.storage import Storage

log = logging.getLogger(__name__)


@dataclass(slots=True)
class IngestSummary:
    listed: dict[str, int] = field(default_factory=dict)
    """New or changed catalog rows per source spec."""
    stages: list[StageSummary] = field(default_factory=list)
    seconds: float = 0.0


def inspect_params(cfg: Config) -> str:
    # Only what changes an outcome; workers and timeouts do not make finished results stale.
    policy = {k: getattr(cfg.inspect, k) for k in ("reject_untextured", "geometry_only_formats", "max_faces")}
    return params_hash("inspect", INSPECT_VERSION, policy)


def list_sources(cfg: Config, catalog: Catalog, specs: Sequence[str]) -> dict[str, int]:
    """Add what the sources list and the catalog lacks (or, for local files, what changed since)."""
    parsed = [parse_spec(s) for s in specs]  # all specs validated before any work
    current = catalog.assets(["source", "file_identifier", "bytes", "sha256", "metadata"])
    known_ids = set(current["asset_id"].to_pylist())
    known_local = {}
    for row in current.filter(pc.equal(current["source"], "local")).to_pylist():
        known_local[row["file_identifier"]] = (row["bytes"], json.loads(row["metadata"]).get("mtime_ns"),
                                               row["sha256"])
    counts = {}
    for spec, text in zip(parsed, specs):
        limit = spec.limit if spec.limit is not None else cfg.ingest.limit
        records = itertools.islice(list_source(spec, cfg, known_local), limit)
        new = 0
        while batch := list(itertools.islice(records, cfg.ingest.batch_size * 16)):
            fresh = [r for r in batch if r.asset_id not in known_ids
                     or (r.source == "local" and known_local.get(r.file_identifier)
                         != (r.bytes, r.metadata.get("mtime_ns"), r.sha256))]
            catalog.add_assets(fresh)
            new += len(fresh)
        counts[text] = new
    return counts


def download_stage(cfg: Config, storage: Storage, catalog: Catalog) -> Stage:
    def setup() -> requests.Session:  # one connection pool per worker, shared by its threads
        session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_maxsize=cfg.download.workers)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        return session

    params = download_params(cfg)
    return Stage(name="download", params=params, columns=DOWNLOAD_COLUMNS, setup=setup,
                 plan=lambda: catalog.todo("download", params),
                 apply=lambda session, row: download_asset(as_record(row), cfg, storage, session),
                 workers=cfg.download.workers, cpus=0.25, sweep=("raw", "tmp"))  # I/O bound: many downloads share a core


def inspect_stage(cfg: Config, storage: Storage, catalog: Catalog) -> Stage:
    params = inspect_params(cfg)

    def one(_: None, row: dict) -> StageResult:
        return inspect_asset(storage.local_copy(row["local_path"]), row["format"], row["sha256"], cfg.inspect)

    return Stage(name="inspect", params=params, columns=INSPECT_COLUMNS, apply=one,
                 plan=lambda: catalog.todo("inspect", params, after=["download"],
                                           result_columns=("state", "local_path"),
                                           asset_columns=("source", "file_identifier", "sha256", "format")),
                 workers=cfg.inspect.workers, timeout_s=cfg.inspect.timeout_s * 2 + 60)


def run_download(cfg: Config, storage: Storage, catalog: Catalog) -> StageSummary:
    return run_local(download_stage(cfg, storage, catalog), catalog, batch_size=cfg.ingest.batch_size)


def run_inspect(cfg: Config, storage: Storage, catalog: Catalog) -> StageSummary:
    return run_local(inspect_stage(cfg, storage, catalog), catalog, batch_size=cfg.ingest.batch_size)


def ingest(cfg: Config, specs: Sequence[str]) -> IngestSummary:
    t0 = time.perf_counter()
    storage = Storage(cfg.storage.root)
    catalog = Catalog(storage)
    storage.sweep_tmp("catalog")  # the stages sweep their own folders (Stage.sweep)
    summary = IngestSummary(listed=list_sources(cfg, catalog, specs))
    summary.stages.append(run_download(cfg, storage, catalog))
    summary.stages.append(run_inspect(cfg, storage, catalog))
    summary.seconds = time.perf_counter() - t0
    return summary

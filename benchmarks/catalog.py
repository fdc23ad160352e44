"""Catalog and ingest figures.

    python benchmarks/catalog.py [--rows 1000000] [--parts 500] [--assets ../shared/assets]

1. ingest + inspect throughput (assets/s) on a folder of real assets (the shared set when present, else the
   procedural demo assets), cold, then the re-run (which must do no work);
2. `flux3d status` on a synthetic catalog of --rows assets written as --parts part files per stage, the shape a
   500K-asset run leaves behind: wall time and peak memory (target: < 5 s, < 2 GB), measured in a fresh
   process so the figure is what a user waits for.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from flux3d.catalog import ASSET_SCHEMA, result_schema
from flux3d.stages.download import DOWNLOAD_COLUMNS
from flux3d.stages.inspect import INSPECT_COLUMNS

REPO = Path(__file__).resolve().parents[1]


def bench_ingest(assets: str) -> None:
    from flux3d.config.load import load_config
    from flux3d.pipeline.ingest import ingest

    with tempfile.TemporaryDirectory() as root:
        cfg = load_config(overrides={"storage.root": root})
        first = ingest(cfg, [f"local:{assets}"])
        again = ingest(cfg, [f"local:{assets}"])
    inspect = first.stages[1]
    print(f"ingest+inspect: {inspect.processed} assets from {assets}")
    print(f"  cold run   {first.seconds:6.2f} s  -> {inspect.processed / first.seconds:6.2f} assets/s overall, "
          f"inspect stage {inspect.per_second:.2f} assets/s with {cfg.inspect.workers} workers")
    print(f"  re-run     {again.seconds:6.2f} s  (work done: {[s.processed for s in again.stages]})")


def _synthetic(root: str, rows: int, parts: int) -> None:
    rng = np.random.default_rng(0)
    ids = np.array([f"{i:032x}" for i in range(rows)])
    shas = np.array([f"{i:064x}" for i in rng.permutation(rows)])
    now = pa.scalar(time.time_ns() // 1000, pa.timestamp("us", tz="UTC"))
    sources = np.array(["objaverse-xl:github", "objaverse-xl:sketchfab", "manifest:ABO", "manifest:HSSD"])
    states = np.array(["ok"] * 8 + ["failed", "rejected"])
    reasons = {"ok": "", "failed": "http_404", "rejected": "untextured"}
    for stage, folder in (("assets", "assets"), ("download", "download"), ("inspect", "inspect")):
        os.makedirs(f"{root}/catalog/{folder}", exist_ok=True)
        for p, sl in enumerate(np.array_split(np.arange(rows), parts)):
            n = len(sl)
            if stage == "assets":
                cols = {"asset_id": ids[sl], "source": sources[sl % 4], "file_identifier": ids[sl], "format": ["glb"] * n,
                        "sha256": shas[sl], "url": ["https://x/" + i for i in ids[sl]], "license": ["CC-BY-4.0"] * n,
                        "attribution": [""] * n, "bytes": np.full(n, 1000), "metadata": ["{}"] * n,
                        "listed_at": pa.array([now.value] * n, pa.timestamp("us", tz="UTC"))}
                table = pa.table(cols, schema=ASSET_SCHEMA)
            else:
                st = states[rng.integers(0, len(states), n)]
                key = {"asset_id": ids[sl]} if stage == "download" else {"sha256": shas[sl]}
                schema = result_schema(stage, DOWNLOAD_COLUMNS if stage == "download" else INSPECT_COLUMNS)
                cols = {**key, "state": st, "reason": [reasons[s] for s in st], "message": [""] * n,
                        "params": ["p"] * n, "seconds": np.ones(n), "retryable": np.zeros(n, bool),
                        "finished_at": pa.array([now.value] * n, pa.timestamp("us", tz="UTC"))}
                if stage == "download":
                    cols.update(sha256=shas[sl], bytes=np.full(n, 1000), local_path=["/x"] * n,
                                source_outcome=["found"] * n)
                table = pa.table({f.name: cols.get(f.name, pa.nulls(n, f.type)) for f in schema}, schema=schema)
            pq.write_table(table, f"{root}/catalog/{folder}/part-{p:05d}.parquet", compression="zstd")


def bench_status(rows: int, parts: int) -> None:
    root = tempfile.mkdtemp(prefix="flux3d-bench-")
    try:
        t0 = time.perf_counter()
        _synthetic(root, rows, parts)
        print(f"status: synthetic catalog of {rows:,} assets x 3 tables in {parts} parts each "
              f"(written in {time.perf_counter() - t0:.1f} s)")
        code = ("import json, resource, sys, time; t0 = time.perf_counter();"
                "from flux3d.catalog import Catalog; from flux3d.storage import Storage;"
                f"s = Catalog(Storage({root!r})).status(); dt = time.perf_counter() - t0;"
                "print(json.dumps({'seconds': dt, 'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss"
                " / 1024, 'assets': s['assets'], 'inspect': s['stages']['inspect']['states']}))")
        for run in range(2):
            out = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                            text=True).stdout)
            print(f"  run {run + 1}: {out['seconds']:.2f} s, peak RSS {out['peak_rss_mb']:.0f} MB "
                  f"(process incl. imports), {out['assets']:,} assets, inspect {out['inspect']}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--parts", type=int, default=500)
    parser.add_argument("--assets", default=str(REPO.parent / "shared" / "assets"))
    parser.add_argument("--skip-ingest", action="store_true")
    args = parser.parse_args()
    if not args.skip_ingest:
        assets = args.assets
        if not os.path.isdir(assets):
            from flux3d.demo import make_demo_assets

            assets = tempfile.mkdtemp(prefix="flux3d-demo-assets-")
            make_demo_assets(assets)
        bench_ingest(assets)
    bench_status(args.rows, args.parts)


if __name__ == "__main__":
    main()

"""What Prefect + Ray cost on top of the work: the data flow's stage machinery vs a plain loop over the same assets.

1. Overhead at per-asset costs from 0.5 s to 5 s (a render is ~90 GPU-s per asset, an encode a few seconds):
   the same stage function over the same assets, (a) called in a plain Python loop, (b) as a stage sub-flow
   (plan -> manifests -> Prefect batch tasks -> Ray tasks -> journal -> catalog). Ray gets one CPU so both run
   one asset at a time: the difference is orchestration alone.
2. Scheduling cost: 10,000 no-op assets through the same sub-flow (20 Prefect tasks of 500, 10,000 Ray tasks,
   catalog commits), per asset.

The stage is a real `Stage` whose work is a wait of the given length (the driver's view of a Blender child or a
GPU kernel: nothing to do but wait). Prefect and Ray are started before timing: a long run pays that once.

    .venv/bin/python benchmarks/orchestration.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import pyarrow as pa

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def wait_stage(cfg, storage, catalog, cost=0.0, n=0):
    from flux3d.pipeline.stage import Stage
    from flux3d.records import OK, StageResult

    def apply(_, row):
        if cost:
            time.sleep(cost)
        return StageResult(row["sha256"], OK)

    keys = [f"{i:064x}" for i in range(n)]
    params = f"bench-{cost}"

    def plan() -> pa.Table:
        done = catalog.done_keys("bench", params)
        return pa.table({"sha256": [k for k in keys if k not in done]})

    return Stage(name="bench", params=params, columns=None, plan=plan, apply=apply, timeout_s=600.0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer assets and costs (about a minute)")
    args = ap.parse_args()

    from flux3d.catalog import Catalog
    from flux3d.config.load import load_config
    from flux3d.executors.local import run_local
    from flux3d.executors.ray import connect
    from flux3d.flows import stage
    from flux3d.pipeline import registry
    from flux3d.storage import Storage

    connect(None, num_cpus=1, dashboard=False)

    def flow_run(cost: float, n: int, batch: int, concurrent: int = 1) -> tuple[float, float]:
        """Seconds of (plain loop, stage sub-flow) over the same `n` assets."""
        with tempfile.TemporaryDirectory() as root:
            cfg = load_config(None, {"storage.root": root, "flow.batch_size": batch,
                                     "flow.concurrent_batches": concurrent, "flow.commit_every": 64})
            registry.STAGES["bench"] = registry.Node(lambda c, s, cat: wait_stage(c, s, cat, cost, n), lambda c: "", None)
            loop_catalog = Catalog(Storage(root + "/loop"))
            t0 = time.perf_counter()
            run_local(wait_stage(cfg, None, loop_catalog, cost, n), loop_catalog, batch_size=64)
            loop = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = stage.run_stage_flow("bench", cfg)
            flow = time.perf_counter() - t0
            assert out["processed"] == n and Catalog(Storage(root)).results("bench").num_rows == n
        return loop, flow

    flow_run(0.0, 4, 4)  # warm Prefect's API and Ray's worker up: a long run pays that once
    n = 8 if args.quick else 16
    print(f"1. Prefect + Ray vs a plain loop: {n} assets in one batch task, one asset at a time (1 Ray CPU)")
    print(f"{'s/asset':>8} {'loop s':>8} {'flow s':>8} {'overhead':>9}")
    for cost in [0.5, 2.0] if args.quick else [0.5, 2.0, 5.0]:
        loop, flow = flow_run(cost, n, n)
        print(f"{cost:>8.1f} {loop:>8.2f} {flow:>8.2f} {100 * (flow / loop - 1):>8.1f}%")

    total = 2000 if args.quick else 10_000
    loop, took = flow_run(0.0, total, 500, concurrent=2)
    print(f"\n2. scheduling {total} no-op assets ({-(-total // 500)} Prefect tasks of 500, a Ray task each): "
          f"{took:.1f} s = {1000 * took / total:.2f} ms per asset ({total / took:.0f} assets/s); the plain loop "
          f"with catalog commits: {loop:.2f} s")
    print("   (the ephemeral API's SQLite can stall task-state writes for seconds under concurrent tasks "
          "(`database is locked`); a cluster runs a Prefect server on Postgres)")


if __name__ == "__main__":
    main()

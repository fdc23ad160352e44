"""One catalog stage as a Prefect sub-flow: plan from the catalog, then one task per batch of assets, run on Ray.

The plan is written as manifests (`runs/<flow run>/<stage>/<n>.parquet`, the catalog rows of each batch) and tasks
get manifest paths, never arrays. A batch task drops what the catalog already has final before it starts, so a
retried task or a re-run flow never redoes finished work, and every result goes through a journal
(`flows.journal`) so a killed driver loses none.
"""

from __future__ import annotations

import io
import time
from dataclasses import asdict
from typing import Any

import pyarrow.parquet as pq
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NONE
from prefect.futures import as_completed
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from flux3d.config.pipeline import Config
from flux3d.executors.journal import Journal, replay
from flux3d.executors.ray import StageSetupError, connect, run_units
from flux3d.flows.artifacts import publish_stage
from flux3d.pipeline.registry import build
from flux3d.pipeline.stage import StageSummary, table_rows, unit_rows


def infra_error(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a batch on what the infrastructure did (storage, network, Ray system errors), never on a bug or a
    model that does not load: those fail the same way every time."""
    import ray

    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            state.result(raise_on_failure=True)
        except BaseException as e:  # noqa: BLE001 - what the state holds is what we classify
            exc = e
    if isinstance(exc, StageSetupError | ray.exceptions.RayTaskError):
        return False
    return isinstance(exc, OSError | TimeoutError | ConnectionError | ray.exceptions.RayError)


@task(name="plan", task_run_name="plan-{name}", cache_policy=NONE)
def plan_stage(name: str, cfg: Config, run_id: str) -> list[str]:
    """Commit journals dead drivers left, sweep their temporary files, and write this run's batch manifests."""
    stage, catalog = build(name, cfg)
    replayed = replay(catalog, stage)
    if replayed:
        get_run_logger().warning("%s: committed %d results a killed run had journalled", name, replayed)
    for folder in stage.sweep:
        catalog.storage.sweep_tmp(folder)
    todo = stage.plan()
    manifests = []
    for i, start in enumerate(range(0, todo.num_rows, cfg.flow.batch_size)):
        rel = f"runs/{run_id}/{name}/{i:05d}.parquet"
        buf = io.BytesIO()
        pq.write_table(todo.slice(start, cfg.flow.batch_size), buf)
        catalog.storage.write_bytes(rel, buf.getvalue())
        manifests.append(rel)
    return manifests


@task(name="batch", task_run_name="{name}-{index:05d}", cache_policy=NONE)
def run_batch(name: str, manifest: str, index: int, cfg: Config) -> dict[str, Any]:
    """Run one manifest's assets on Ray; returns the batch's counts and a few of its outputs for the artifacts."""
    stage, catalog = build(name, cfg)
    connect(cfg.flow.ray_address or None, cfg.flow.ray_num_cpus, cfg.flow.ray_dashboard)
    rows = catalog.drop_done(pq.read_table(io.BytesIO(catalog.storage.read_bytes(manifest))), name, stage.params)
    run, samples = StageSummary(name), []
    journal = Journal(catalog, stage, cfg.flow.commit_every)
    t0 = time.perf_counter()
    try:
        for results in run_units(stage, unit_rows(stage, table_rows(rows)), share=1 / cfg.flow.concurrent_batches):
            journal.add(results)
            run.add(results)
            samples += [r.columns["render_dir"] for r in results if r.state == "ok" and r.columns.get("render_dir")]
    finally:
        journal.commit()
    run.seconds = time.perf_counter() - t0
    return {**asdict(run), "samples": samples[:4]}


@flow(name="stage", flow_run_name="{name}", log_prints=True)
def stage_flow(name: str, cfg: Config) -> dict[str, Any]:
    """All of one stage's pending work: a plan, then its batches side by side, progress and counts as artifacts."""
    logger = get_run_logger()
    run_id = str(flow_run.get_id() or time.strftime("%Y%m%dT%H%M%S"))
    manifests = plan_stage(name, cfg, run_id)
    total, samples = StageSummary(name), []
    if not manifests:
        logger.info("%s: nothing to do", name)
        return {**asdict(total), "samples": samples}
    progress = create_progress_artifact(0.0, key=f"{name}-progress", description=f"{name}: batches finished")
    batch = run_batch.with_options(retries=cfg.flow.retries, retry_delay_seconds=cfg.flow.retry_delay_s,
                                   retry_condition_fn=infra_error, tags=["flux3d", name])
    t0 = time.perf_counter()
    futures = [batch.submit(name, m, i, cfg) for i, m in enumerate(manifests)]
    for k, fut in enumerate(as_completed(futures), 1):
        out = fut.result()
        total.processed += out["processed"]
        for field in ("states", "reasons"):
            for key, n in out[field].items():
                getattr(total, field)[key] = getattr(total, field).get(key, 0) + n
        samples += out["samples"]
        update_progress_artifact(progress, 100.0 * k / len(futures))
        logger.info("%s: batch %d/%d done (%d assets so far)", name, k, len(futures), total.processed)
    total.seconds = time.perf_counter() - t0
    publish_stage(total, cfg, samples[:8])
    return {**asdict(total), "samples": samples[:8]}


def run_stage_flow(name: str, cfg: Config) -> dict[str, Any]:
    """The stage sub-flow with `flow.concurrent_batches` batch tasks in flight."""
    runner = ThreadPoolTaskRunner(max_workers=cfg.flow.concurrent_batches)
    return stage_flow.with_options(task_runner=runner)(name, cfg)

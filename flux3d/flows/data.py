"""The data flow: sources -> download -> inspect -> render -> score -> curate -> voxelize -> encode -> shards.

It only wires: every node is a stage that also runs alone (`flux3d render`, ...), here one Prefect sub-flow per
stage with Ray doing the per-asset work (`flows.stages`). The catalog is the record of progress, so running the
flow again, or after a crash, does only what is not final yet. Returns the dataset version the shards form.
"""

from __future__ import annotations

import functools
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from flux3d.catalog import Catalog
from flux3d.config.load import load_config
from flux3d.config.pipeline import Config
from flux3d.executors.ray import connect, ray_ordered_map
from flux3d.flows.artifacts import publish_curation, publish_reproduction, publish_shards
from flux3d.flows.stage import run_stage_flow
from flux3d.pipeline.registry import STAGES
from flux3d.storage import Storage


def flow_config(root: str, config: str | None, recipe: str | None, ray_address: str | None) -> Config:
    overrides: dict[str, Any] = {"storage.root": root}
    if ray_address is not None:
        overrides["flow.ray_address"] = ray_address
    return load_config(config, overrides, recipe)


@task(name="list-sources", cache_policy=NONE)
def list_task(cfg: Config, sources: list[str]) -> dict[str, int]:
    from flux3d.pipeline.ingest import list_sources

    storage = Storage(cfg.storage.root)
    storage.sweep_tmp("catalog")  # the stages sweep their own folders (Stage.sweep)
    return list_sources(cfg, Catalog(storage), sources)


@task(name="curation-report", cache_policy=NONE)
def curation_report_task(cfg: Config) -> dict[str, Any]:
    from flux3d.curation.policy import effective_rule
    from flux3d.curation.report import write_report
    from flux3d.pipeline.curate import curate_params, curation_table

    storage = Storage(cfg.storage.root)
    summary = write_report(curation_table(Catalog(storage)), cfg, storage, curate_params(cfg),
                           effective_rule(cfg.curate, cfg.vlm.endpoint))
    publish_curation(summary, storage)
    return summary


@task(name="reproduction-report", cache_policy=NONE)
def reproduction_task(cfg: Config) -> dict[str, Any] | None:
    """The per-list reproduction counts, when the catalog holds TRELLIS-500K lists (`trellis:` sources)."""
    from flux3d.pipeline.reproduction import reproduction_report

    report = reproduction_report(Catalog(Storage(cfg.storage.root)))
    if report is not None:
        publish_reproduction(report)
    return report


@task(name="shard", cache_policy=NONE)
def shard_task(cfg: Config) -> dict[str, Any]:
    """Shards of every kept, encoded asset; sample preparation (image encoding) fans out over Ray."""
    from flux3d.pipeline.shard import kept_rows, run_shard

    storage = Storage(cfg.storage.root)
    catalog = Catalog(storage)
    if not kept_rows(cfg, catalog):
        get_run_logger().warning("no asset reached the shard stage: no dataset version this run")
        return {"version": None}
    window = 2 * max(1, cfg.shard.workers)
    r = run_shard(cfg, storage, catalog, map_fn=functools.partial(ray_ordered_map, window=window))
    publish_shards(r.version, r.stats)
    return {"version": r.version, "path": r.path, "up_to_date": r.up_to_date, "stats": r.stats,
            "reasons": r.reasons}


def _has_report(cfg: Config) -> bool:
    return Storage(cfg.storage.root).exists("reports/curation/summary.json")


@flow(name="flux3d-data", log_prints=True)
def data_flow(root: str, sources: list[str] | None = None, config: str | None = None, recipe: str | None = None,
              ray_address: str | None = None) -> dict[str, Any]:
    """List `sources` (same specs as `flux3d ingest`) into the catalog at `root`, then run every data stage over
    what is not done yet and build the shards. `config` is a TOML file; `recipe` a named one (`flux3d.config.recipes`)."""
    cfg = flow_config(root, config, recipe, ray_address)
    dashboard = connect(cfg.flow.ray_address or None, cfg.flow.ray_num_cpus, cfg.flow.ray_dashboard)
    if dashboard:
        get_run_logger().info("Ray dashboard: %s", dashboard)
    listed = list_task(cfg, list(sources or []))
    stages = {}
    for name in STAGES:
        stages[name] = run_stage_flow(name, cfg)
        if name == "curate" and (stages[name]["processed"] or not _has_report(cfg)):
            curation_report_task(cfg)
    reproduction_task(cfg)
    shards = shard_task(cfg)
    return {"root": root, "listed": listed, "stages": stages, "dataset_version": shards["version"],
            "shards": shards}


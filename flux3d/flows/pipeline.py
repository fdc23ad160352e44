"""The whole chain: data -> train decoder -> train SMDiT -> evaluate, and scheduled retraining behind a gate.

Each node is a sub-flow that also runs alone (`flux3d data`, `flux3d train`, `flux3d evaluate`), handed the
dataset version the data flow built; every node resumes or skips what a previous run finished.
"""

from __future__ import annotations

import json
import time
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from flux3d.config.pipeline import Config
from flux3d.flows.data import data_flow, flow_config
from flux3d.storage import Storage

PROMOTED = "models/promoted.json"
PROMOTIONS = "models/promotions.jsonl"


def gate(candidate: dict[str, float] | None, current: dict[str, float] | None, directions: dict[str, str],
         tolerance: float) -> tuple[bool, str]:
    """Promote `candidate` unless a gated metric is worse than the promoted model's by more than `tolerance`."""
    if candidate is None:
        return False, "no candidate: no evaluation ran (no dataset version)"
    missing = sorted(set(directions) - set(candidate))
    if missing:
        return False, f"candidate lacks gated metrics {missing}"
    if current is None:
        return True, "first model: nothing to compare against"
    worse = []
    for name, direction in sorted(directions.items()):
        if name not in current:
            continue
        delta = candidate[name] - current[name]
        if (delta < -tolerance) if direction == "max" else (delta > tolerance):
            worse.append(f"{name} {candidate[name]:.4g} vs {current[name]:.4g}")
    return (False, "regressed: " + ", ".join(worse)) if worse else (True, "no gated metric regressed")


@task(name="promotion-gate", cache_policy=NONE)
def promote_task(cfg: Config, version: str | None, evaluation: dict[str, Any] | None) -> dict[str, Any]:
    """Decide, record the decision (models/promotions.jsonl, an artifact) and move models/promoted.json if it
    passes. The record is appended even when nothing is promoted: a skipped promotion is a decision too."""
    storage = Storage(cfg.storage.root)
    current = json.loads(storage.read_bytes(PROMOTED)) if storage.exists(PROMOTED) else None
    candidate = (evaluation or {}).get("metrics")
    ok, why = gate(candidate, current and current["metrics"], cfg.flow.promote_metrics, cfg.flow.promote_tolerance)
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "dataset_version": version,
              "promoted": ok, "reason": why, "candidate": candidate,
              "current": current and current["metrics"], "model": (evaluation or {}).get("model")}
    log = storage.read_bytes(PROMOTIONS) if storage.exists(PROMOTIONS) else b""
    storage.write_bytes(PROMOTIONS, log + json.dumps(record).encode() + b"\n")
    if ok:
        storage.write_bytes(PROMOTED, json.dumps({"metrics": candidate, "model": record["model"],
                                                   "report": (evaluation or {}).get("report"),
                                                   "dataset_version": version, "time": record["time"]}).encode())
    create_markdown_artifact(f"### Promotion: {'promoted' if ok else 'not promoted'}\n\n{why}\n\n"
                             f"dataset version `{version}`", key="promotion", description="promotion gate")
    get_run_logger().info("promotion gate: %s (%s)", "promoted" if ok else "kept current model", why)
    return record


@flow(name="flux3d-pipeline", log_prints=True)
def pipeline_flow(root: str, sources: list[str] | None = None, config: str | None = None, recipe: str | None = None,
                  ray_address: str | None = None) -> dict[str, Any]:
    """The data flow, then training and evaluation on the dataset version it built."""
    from flux3d.flows.evaluate import evaluate_flow
    from flux3d.flows.train import train_flow

    data = data_flow(root, sources, config, recipe, ray_address)
    version = data["dataset_version"]
    results: dict[str, Any] = {"data": data, "dataset_version": version}
    if version is not None:
        results["train"] = train_flow(root, version, config, recipe, ray_address)
        results["evaluate"] = evaluate_flow(root, version, config, recipe, ray_address)
    return results


@flow(name="flux3d-retrain", log_prints=True)
def retrain_flow(root: str, sources: list[str] | None = None, config: str | None = None, recipe: str | None = None,
                 ray_address: str | None = None) -> dict[str, Any]:
    """Scheduled retraining: new assets -> a new dataset version -> models -> evaluation -> the promotion gate."""
    results = pipeline_flow(root, sources, config, recipe, ray_address)
    cfg = flow_config(root, config, recipe, ray_address)
    results["promotion"] = promote_task(cfg, results["dataset_version"], results.get("evaluate"))
    return results

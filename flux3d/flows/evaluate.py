"""The evaluate flow: the protocols of `flux3d.evaluation` on a dataset version's models, the report written to
<root>/models/<version>/eval, and its tables and image grid published as Prefect artifacts. Its metrics feed the
retraining gate (flows/pipeline.py), compared against the promoted model's report."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from flux3d.config.pipeline import Config
from flux3d.flows.data import flow_config
from flux3d.storage import Storage


@task(name="evaluate-models", cache_policy=NONE)
def evaluate_task(cfg: Config, version: str) -> dict[str, Any]:
    from flux3d.config.recipes import eval_config
    from flux3d.evaluation.evaluate import evaluate
    from flux3d.flows.artifacts import thumbnail
    from flux3d.training import checkpoint as ckpt_io

    storage = Storage(cfg.storage.root)
    run = storage.path(cfg.train.runs, version)
    out = f"{run}/eval"
    ecfg = eval_config(cfg.evaluate.recipe, changes=cfg.evaluate.changes)
    structure = f"{run}/structure_flow" if cfg.train.structure else None
    kinds = ("decoder", "smdit", "structure") if structure else ("decoder", "smdit")
    if Storage(out).exists("report.json"):  # the same models and settings evaluated already: nothing to redo
        done = json.loads(Storage(out).read_bytes("report.json"))
        steps = [ckpt_io.resolve(f"{run}/{k}")[1].step for k in ("decoder", "smdit")]
        steps += [ckpt_io.resolve(structure)[1].step] if structure else []
        if done["config"] == dataclasses.asdict(ecfg) and [done.get(f"{k}_step") for k in kinds] == steps:
            get_run_logger().info("evaluation of %s is up to date: %s/report.md", version, out)
            return {"metrics": done["metrics"], "model": run, "report": out}
    previous = None
    promoted = "models/promoted.json"
    if storage.exists(promoted):  # the gate's reference: the promoted model's own report
        report = json.loads(storage.read_bytes(promoted)).get("report")
        if report and Storage(report).exists("report.json"):
            previous = json.loads(Storage(report).read_bytes("report.json"))
    doc = evaluate(ecfg, f"{run}/decoder", f"{run}/smdit", out, previous, structure)
    md = Storage(out).read_bytes("report.md").decode()
    if Storage(out).exists("grid.png"):
        md = md.split("![")[0] + thumbnail(Storage(run), "eval/grid.png", width=768)
    create_markdown_artifact(md, key="evaluation", description=f"evaluation of dataset version {version}")
    return {"metrics": doc["metrics"], "model": run, "report": out}


@flow(name="flux3d-evaluate", log_prints=True)
def evaluate_flow(root: str, dataset_version: str, config: str | None = None, recipe: str | None = None,
                  ray_address: str | None = None) -> dict[str, Any]:
    """Evaluate the decoder and SMDiT trained on `dataset_version` (models/<version>/), with the structure model when
    the pipeline trains one (Tab. 10), and write the report."""
    return evaluate_task(flow_config(root, config, recipe, ray_address), dataset_version)

"""`flux3d deploy` and `flux3d dashboard`: deployments served from this process, and the Prefect UI.

`deploy` registers three deployments against whatever Prefect API the environment names (PREFECT_API_URL; a
`flux3d dashboard` server on one machine) and then serves them: this process is the worker that runs them. On a
cluster the same deployments come from `infra/prefect/prefect.yaml` into a Kubernetes work pool instead.
"""

from __future__ import annotations

from typing import Any

DEPLOYMENTS = ("data", "pipeline", "retrain")


def deployments(root: str, sources: list[str], config: str | None, recipe: str | None, ray_address: str | None,
                cron: str, timezone: str) -> list[Any]:
    from prefect.schedules import Cron

    from flux3d.flows.data import data_flow
    from flux3d.flows.pipeline import pipeline_flow, retrain_flow

    params = {"root": root, "sources": sources, "config": config, "recipe": recipe, "ray_address": ray_address}
    tags = ["flux3d"]
    return [
        data_flow.to_deployment(name="data", parameters=params, tags=tags,
                                description="The data flow on demand: sources -> shards."),
        pipeline_flow.to_deployment(name="pipeline", parameters=params, tags=tags,
                                    description="Data, training and evaluation on demand."),
        retrain_flow.to_deployment(name="retrain", parameters=params, tags=[*tags, "scheduled"],
                                   schedules=[Cron(cron, timezone=timezone)],
                                   description="Scheduled retraining with the promotion gate."),
    ]


def serve(root: str, sources: list[str], config: str | None, recipe: str | None, ray_address: str | None,
          cron: str, timezone: str) -> None:
    from prefect import serve as prefect_serve

    prefect_serve(*deployments(root, sources, config, recipe, ray_address, cron, timezone))


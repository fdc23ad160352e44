"""Typed configuration of the Prefect flows and the Ray cluster they drive (the `[flow]` section)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(kw_only=True, slots=True)
class FlowConfig:
    batch_size: int = 500
    """Assets per Prefect task. Prefect tracks tasks, Ray tracks assets: 360K assets make ~720 tasks per stage,
    each its own sub-flow run, well under what a Prefect server handles per flow run (~1-2K)."""
    concurrent_batches: int = 2
    """Batch tasks of one stage running side by side; each fills 1/n of the cluster, so one slow asset at the end
    of a batch does not leave the cluster idle."""
    commit_every: int = 64
    """A batch task commits its results to the catalog every this many assets (journalled in between)."""
    ray_address: str = ""
    """"" = a local Ray started by the command; "auto" = the cluster this process runs in (the driver pod);
    "host:port" or "ray://host:10001" = a remote head."""
    ray_num_cpus: int | None = None
    """CPUs of the local Ray (None = every core); ignored when joining a cluster."""
    ray_dashboard: bool = True
    """Start Ray's dashboard with the local Ray (its URL is logged)."""
    retries: int = 2
    """Retries of a batch task on infrastructure errors (storage, Ray system errors); bugs are not retried."""
    retry_delay_s: float = 30.0
    retrain_cron: str = "0 3 * * 0"
    """Schedule of the `retrain` deployment (cron, in `timezone`)."""
    timezone: str = "UTC"
    promote_metrics: dict[str, str] = field(default_factory=lambda: {"psnr": "max", "lpips": "min"})
    """Evaluation metrics the promotion gate compares, and which direction is better."""
    promote_tolerance: float = 0.0
    """How much worse than the promoted model a metric may be and still pass the gate (absolute)."""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.concurrent_batches < 1 or self.commit_every < 1 or self.retries < 0:
            raise ValueError("flow.batch_size, concurrent_batches and commit_every must be >= 1, retries >= 0")
        if set(self.promote_metrics.values()) - {"max", "min"}:
            raise ValueError("flow.promote_metrics values must be \"max\" or \"min\"")
        if len(self.retrain_cron.split()) != 5:
            raise ValueError(f"flow.retrain_cron must be a 5-field cron expression, got {self.retrain_cron!r}")

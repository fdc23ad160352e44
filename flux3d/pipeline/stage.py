"""A catalog stage as data (`Stage`) and what one run of it did (`StageSummary`), apart from what executes it.

A `Stage` says what is left to do (`plan`, from the catalog) and how to do one unit of it (`apply`, with what
`setup` built once per worker), independent of what runs it: `executors.local` in this process, `executors.ray`
on Ray (NeMo Curator's `ProcessingStage` declares the same: resources, setup once per worker, a timeout).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import pyarrow as pa

from flux3d.records import StageResult


@dataclass(slots=True)
class StageSummary:
    """What one stage did in one run: counts per state and reason, and throughput."""

    stage: str
    processed: int = 0
    states: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def add(self, results: Iterable[StageResult]) -> None:
        for r in results:
            self.processed += 1
            self.states[r.state] = self.states.get(r.state, 0) + 1
            if r.reason:
                key = f"{r.state}:{r.reason}"
                self.reasons[key] = self.reasons.get(key, 0) + 1

    @property
    def per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0


@dataclass(slots=True, kw_only=True)
class Stage:
    """One catalog stage, ready to run anywhere.

    `apply(model, unit)` turns one catalog row (a dict) into a `StageResult`; for a batched stage (`batch` > 0) the
    unit is a list of up to `batch` rows and it returns one result per row. `setup()` builds what is expensive
    (a model, an HTTP session) once per worker: once per local run, once per Ray actor. `apply` and `setup` are
    shipped to Ray workers, so they close over config and storage only, never over the catalog's tables.
    """

    name: str
    params: str
    """Hash of what determines the outcome: results carry it and a re-run skips what is final for it."""
    columns: pa.Schema | None
    """The stage's own result columns."""
    plan: Callable[[], pa.Table]
    """Catalog rows still to do (one per sha256 for content stages)."""
    apply: Callable[[object, object], object]
    setup: Callable[[], object] | None = None
    teardown: Callable[[object], None] | None = None
    """Ends what `setup` built (child processes) when a local run is done; a Ray actor's end ends them too."""
    batch: int = 0
    workers: int = 1
    """Units in flight at once per worker (local threads; concurrent calls per Ray actor)."""
    cpus: float = 1.0
    """Ray resources per task, or per actor for a stage with `setup`."""
    gpus: float | None = 0.0
    """None: one GPU where the Ray cluster has GPUs, else none (a device = "auto" model)."""
    sweep: tuple[str, ...] = ()
    """Folders where a killed worker of this stage may leave temporary files, swept before planning."""
    timeout_s: float | None = None
    """Wall-clock limit per unit on Ray, after which its worker is killed and the unit recorded failed:timeout.
    Stages that bound their own child processes (inspect, render) set it above their own limit, as a backstop."""


def gpu_request(device: str) -> float | None:
    """Ray GPUs per worker for a model's `device` setting: cuda needs one, auto takes one where there are any."""
    return {"cuda": 1.0, "cpu": 0.0}.get(device)


def unit_rows(stage: Stage, rows: Iterable[dict]) -> Iterator[object]:
    """The units `stage.apply` takes: rows one by one, or lists of `stage.batch` rows."""
    it = iter(rows)
    if not stage.batch:
        yield from it
        return
    while chunk := list(itertools.islice(it, stage.batch)):
        yield chunk


def table_rows(table: pa.Table) -> Iterator[dict]:
    """Rows of a catalog table as dicts, a batch at a time (a million rows never sit in memory as dicts)."""
    for batch in table.to_batches(max_chunksize=4096):
        yield from batch.to_pylist()

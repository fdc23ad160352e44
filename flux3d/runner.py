"""A catalog stage as data (`Stage`), and its local execution: bounded parallelism, results committed in batches.

A `Stage` says what is left to do (`plan`, from the catalog) and how to do one unit of it (`apply`, with what
`setup` built once per worker), independent of what runs it. `run_local` is the embedded executor (`flux3d render`
and friends on one machine); the Prefect + Ray flows (`flux3d.flows`) run the same `Stage` on Ray. Both commit
results through `Catalog.write_results`, so the catalog is the one record of progress whichever ran the work.
"""

from __future__ import annotations

import collections
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import pyarrow as pa

from flux3d.records import StageResult

if TYPE_CHECKING:
    from flux3d.catalog import Catalog

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")


@dataclass(slots=True)
class StageRun:
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


def run_local(stage: Stage, catalog: Catalog, *, batch_size: int, limit: int | None = None) -> StageRun:
    """Run what `stage` still has to do (at most `limit` assets) in this process; `setup` only if there is work.
    Results are committed every `batch_size` assets (every batch for a batched stage)."""
    def commit(results: list[StageResult]) -> None:
        catalog.write_results(stage.name, stage.params, results, stage.columns)

    for folder in stage.sweep:
        catalog.storage.sweep_tmp(folder)
    todo = stage.plan()
    if limit is not None:
        todo = todo.slice(0, limit)
    if not todo.num_rows:
        return StageRun(stage.name)
    model = stage.setup() if stage.setup is not None else None
    if stage.batch:
        return run_batched(stage.name, lambda rows: stage.apply(model, rows), table_rows(todo),
                           batch_size=stage.batch, commit=commit)
    return run_stage(stage.name, lambda row: stage.apply(model, row), table_rows(todo), workers=stage.workers,
                     batch_size=batch_size, commit=commit)


def _bounded(fn: Callable[[T], StageResult], items: Iterable[T], workers: int) -> Iterator[StageResult]:
    """Results as they complete, with at most 2 x workers items in flight (backpressure on huge listings)."""
    it = iter(items)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="flux3d") as pool:
        pending: set[Future] = set()
        exhausted = False
        while pending or not exhausted:
            while not exhausted and len(pending) < 2 * workers:
                try:
                    pending.add(pool.submit(fn, next(it)))
                except StopIteration:
                    exhausted = True
            if not pending:
                break
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                yield fut.result()


def run_stage(stage: str, fn: Callable[[T], StageResult], items: Iterable[T], *, workers: int, batch_size: int,
              commit: Callable[[list[StageResult]], object]) -> StageRun:
    """Apply `fn` to every item; call `commit` with every `batch_size` results (and the rest at the end).

    `fn` must turn every per-asset failure into a result; an exception escaping it is a bug and stops the run
    (the batches committed so far stay committed, and a re-run resumes after them).
    """
    run = StageRun(stage)
    t0 = time.perf_counter()
    buffer: list[StageResult] = []
    for result in _bounded(fn, items, workers):
        buffer.append(result)
        if len(buffer) >= batch_size:
            commit(buffer)
            run.add(buffer)
            log.info("%s: %d done", stage, run.processed)
            buffer = []
    if buffer:
        commit(buffer)
        run.add(buffer)
    run.seconds = time.perf_counter() - t0
    return run


def run_batched(stage: str, fn: Callable[[list[T]], list[StageResult]], items: Iterable[T], *, batch_size: int,
                commit: Callable[[list[StageResult]], object]) -> StageRun:
    """Like `run_stage` for work that is batched by nature (a model's forward pass over many assets): `fn` takes
    `batch_size` items and returns one result per item; each batch is committed as it completes."""
    run = StageRun(stage)
    t0 = time.perf_counter()
    it = iter(items)
    while batch := list(itertools.islice(it, batch_size)):
        results = fn(batch)
        assert len(results) == len(batch), "a batched stage returns one result per item"
        commit(results)
        run.add(results)
        log.info("%s: %d done", stage, run.processed)
    run.seconds = time.perf_counter() - t0
    return run


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """`fn` over `items` in `workers` threads, results in input order, at most 2 x workers in flight (so a long
    listing never holds more than a few finished results in memory)."""
    it = iter(items)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="flux3d") as pool:
        window: collections.deque[Future] = collections.deque(
            pool.submit(fn, x) for x in itertools.islice(it, 2 * workers))
        while window:
            result = window.popleft().result()
            for x in itertools.islice(it, 1):
                window.append(pool.submit(fn, x))
            yield result

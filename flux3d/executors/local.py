"""The local executor: a `pipeline.stage.Stage` run in this process with bounded parallelism, results committed
in batches.

`run_local` is the embedded executor (`flux3d render` and friends on one machine); `executors.ray` runs the same
`Stage` on Ray under the Prefect flows. Both commit results through `Catalog.write_results`, so the catalog is the
one record of progress whichever ran the work.
"""

from __future__ import annotations

import collections
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, TypeVar

from flux3d.pipeline.stage import Stage, StageSummary, table_rows
from flux3d.records import StageResult

if TYPE_CHECKING:
    from flux3d.catalog import Catalog

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")


def run_local(stage: Stage, catalog: Catalog, *, batch_size: int, limit: int | None = None) -> StageSummary:
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
        return StageSummary(stage.name)
    model = stage.setup() if stage.setup is not None else None
    try:
        if stage.batch:
            return run_batched(stage.name, lambda rows: stage.apply(model, rows), table_rows(todo),
                               batch_size=stage.batch, commit=commit)
        return run_stage(stage.name, lambda row: stage.apply(model, row), table_rows(todo), workers=stage.workers,
                         batch_size=batch_size, commit=commit)
    finally:
        if stage.teardown is not None:
            stage.teardown(model)


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
              commit: Callable[[list[StageResult]], object]) -> StageSummary:
    """Apply `fn` to every item; call `commit` with every `batch_size` results (and the rest at the end).

    `fn` must turn every per-asset failure into a result; an exception escaping it is a bug and stops the run
    (the batches committed so far stay committed, and a re-run resumes after them).
    """
    run = StageSummary(stage)
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
                commit: Callable[[list[StageResult]], object]) -> StageSummary:
    """Like `run_stage` for work that is batched by nature (a model's forward pass over many assets): `fn` takes
    `batch_size` items and returns one result per item; each batch is committed as it completes."""
    run = StageSummary(stage)
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

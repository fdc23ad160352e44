"""Local execution of a stage over many assets: bounded parallelism, results committed in batches.

This is the embedded executor (`flux3d ingest` on one machine). The Prefect + Ray flows hand the same stage
functions batches of records instead; both commit results through `Catalog.write_results`, so the catalog is the
one record of progress whichever ran the work.
"""

from __future__ import annotations

import collections
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TypeVar

from flux3d.records import StageResult

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

"""A `Stage` on Ray: declared resources, models loaded once per actor, bounded in-flight work, per-unit timeouts.

Prefect hands a batch task a few hundred assets; this module runs them. Work is only submitted while a slot is
free (a slot = one Ray task, or one concurrent call of a ready actor), so nothing waits in Ray's queues: a timeout
measures the unit's own run time, and a listing of a million assets never becomes a million pending tasks.

What can go wrong, and what becomes of it:
- the unit runs past `stage.timeout_s`: its task is cancelled (or its actor killed and replaced), `failed:timeout`;
- the stage function raises (a bug, since stages return failures as results): `failed:stage_error`, with the trace;
- the worker or its node dies (OOM killer, preemption): the unit is tried once more elsewhere, then
  `failed:worker_lost` marked retryable, so the next run tries it again;
- an actor cannot even be built (model files missing): `StageSetupError`, the batch fails with the cause.
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import ray

from flux3d.catalog import stage_key
from flux3d.pipeline.stage import Stage
from flux3d.records import FAILED, StageResult

log = logging.getLogger(__name__)


class StageSetupError(RuntimeError):
    """A stage's worker could not be set up (its model did not load): every unit would fail the same way."""


def connect(address: str | None = None, num_cpus: int | None = None, dashboard: bool = True) -> str | None:
    """Join the Ray cluster at `address` ("auto", "host:port", "ray://..."), or start a local one when None.

    Returns the Ray dashboard URL when there is one. Idempotent within a process."""
    global _dashboard
    if not ray.is_initialized():
        if address is None:
            # A local Ray needs no token; without this it writes ~/.ray/auth_token on first start.
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            ctx = ray.init(num_cpus=num_cpus, include_dashboard=dashboard, logging_level=logging.WARNING,
                           object_store_memory=min(2 * 1024**3, _memory_bytes() // 8), log_to_driver=False)
        else:
            ctx = ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        url = getattr(ctx, "dashboard_url", None)
        _dashboard = f"http://{url}" if url else None
    return _dashboard


_dashboard: str | None = None


def _memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def capacity(stage: Stage) -> tuple[int, float]:
    """How many of this stage's workers the cluster holds at once, and the GPUs each takes."""
    res = ray.cluster_resources()
    gpus = stage.gpus if stage.gpus is not None else (1.0 if res.get("GPU", 0) >= 1 else 0.0)
    if gpus:
        return max(1, int(res.get("GPU", 0) // gpus)), gpus
    return max(1, int(res.get("CPU", 1) // max(stage.cpus, 1e-3))), 0.0


@ray.remote
def _run_unit(apply: Any, unit: Any) -> Any:
    return apply(None, unit)


@ray.remote
class _StageWorker:
    """Holds what `stage.setup` built (the model) for the actor's lifetime: loaded once, used for every unit."""

    def __init__(self, setup: Any, apply: Any) -> None:
        self.model, self.apply = setup(), apply

    def ready(self) -> bool:
        return True

    def run(self, unit: Any) -> Any:
        return self.apply(self.model, unit)


@dataclass
class _Flight:
    unit: Any
    deadline: float
    worker: Any = None
    attempt: int = 1


def _failed(stage: Stage, unit: Any, reason: str, message: str, retryable: bool = False) -> list[StageResult]:
    rows = unit if stage.batch else [unit]
    key = stage_key(stage.name)
    return [StageResult(r[key], FAILED, reason, message, retryable=retryable) for r in rows]


def _as_list(stage: Stage, out: Any) -> list[StageResult]:
    return list(out) if stage.batch else [out]


def run_units(stage: Stage, units: Iterable[Any], *, share: float = 1.0) -> Iterator[list[StageResult]]:
    """Run `units` of `stage` on the connected Ray cluster; yields each unit's results as they complete.

    `share` is the fraction of the cluster this call may fill (batches of one stage running side by side split it).
    """
    n, gpus = capacity(stage)
    slots_total = max(1, math.floor(n * share))
    timeout = stage.timeout_s if stage.timeout_s is not None else math.inf
    todo = iter(units)
    retry: list[_Flight] = []
    flights: dict[Any, _Flight] = {}
    use_actors = stage.setup is not None
    apply_ref = ray.put(stage.apply)

    # Actors: `slots_total` of them, each taking `stage.workers` calls at once once it is ready.
    starting: dict[Any, Any] = {}  # ready() ref -> actor
    free: dict[Any, int] = {}  # ready actor -> free call slots

    def start_actor() -> None:
        actor = _StageWorker.options(num_cpus=stage.cpus, num_gpus=gpus, max_concurrency=stage.workers,
                                     max_restarts=0).remote(stage.setup, apply_ref)
        starting[actor.ready.remote()] = actor

    if use_actors:
        for _ in range(slots_total):
            start_actor()
    task = _run_unit.options(num_cpus=stage.cpus, num_gpus=gpus, max_retries=0)

    def submit(f: _Flight) -> bool:
        if use_actors:
            actor = next((a for a, k in free.items() if k > 0), None)
            if actor is None:
                return False
            free[actor] -= 1
            f.worker, ref = actor, actor.run.remote(f.unit)
        else:
            if len(flights) >= slots_total:
                return False
            ref = task.remote(apply_ref, f.unit)
        f.deadline = time.monotonic() + timeout
        flights[ref] = f
        return True

    def release(f: _Flight) -> None:
        if use_actors and f.worker in free:
            free[f.worker] += 1

    def drop_actor(actor: Any) -> None:
        """Kill `actor`, put its other units back in the queue, start a replacement."""
        free.pop(actor, None)
        ray.kill(actor, no_restart=True)
        for ref, other in list(flights.items()):
            if other.worker is actor:
                del flights[ref]
                retry.append(other)
        start_actor()

    exhausted = False
    while True:
        while retry and submit(retry[-1]):
            retry.pop()
        while not retry and not exhausted:
            try:
                f = _Flight(next(todo), 0.0)
            except StopIteration:
                exhausted = True
                break
            if not submit(f):
                retry.append(f)
                break
        if exhausted and not retry and not flights:
            for actor in [*free, *starting.values()]:
                ray.kill(actor, no_restart=True)
            return
        waiting = [*flights, *starting]
        next_deadline = min((f.deadline for f in flights.values()), default=math.inf)
        wait_s = max(0.0, next_deadline - time.monotonic()) if next_deadline < math.inf else None
        done, _ = ray.wait(waiting, num_returns=1, timeout=wait_s)
        for ref in done:
            if ref in starting:
                actor = starting.pop(ref)
                try:
                    ray.get(ref)
                except ray.exceptions.RayError as e:
                    raise StageSetupError(f"{stage.name}: worker setup failed: {e}") from e
                free[actor] = stage.workers
                continue
            f = flights.pop(ref)
            try:
                out = ray.get(ref)
            except ray.exceptions.RayTaskError as e:  # the stage function raised: a bug, recorded per asset
                release(f)
                yield _failed(stage, f.unit, "stage_error", str(e)[-4000:])
                continue
            except ray.exceptions.RayError as e:  # the worker died under the unit
                if use_actors:
                    drop_actor(f.worker)
                if f.attempt < 2:
                    f.attempt += 1
                    retry.append(f)
                else:
                    yield _failed(stage, f.unit, "worker_lost", f"{type(e).__name__}: {e}"[-4000:], retryable=True)
                continue
            release(f)
            yield _as_list(stage, out)
        now = time.monotonic()
        for ref, f in list(flights.items()):
            if f.deadline <= now and ref in flights:
                del flights[ref]
                if use_actors:
                    drop_actor(f.worker)
                else:
                    ray.cancel(ref, force=True)
                yield _failed(stage, f.unit, "timeout", f"no result after {timeout:.0f} s; worker killed")


def ray_ordered_map(fn: Any, items: Iterable[Any], window: int, cpus: float = 1.0) -> Iterator[Any]:
    """`fn` over `items` as Ray tasks, results in input order, at most `window` in flight (the shard writer's
    sample preparation: encoding images is the costly part of writing shards, and it fans out across the cluster)."""
    remote = ray.remote(num_cpus=cpus, max_retries=2)(fn)
    it = iter(items)
    pending = collections.deque(remote.remote(x) for x in itertools.islice(it, window))
    while pending:
        ref = pending.popleft()
        pending.extend(remote.remote(x) for x in itertools.islice(it, 1))
        yield ray.get(ref)

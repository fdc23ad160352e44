"""The Ray executor, the result journal and the promotion gate, on a real local Ray.

The stage functions here are small test functions (ok, raise, hang, die) run through the real executor: they
stand for assets that misbehave, which is what the executor exists to contain.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import pytest

from flux3d.catalog import Catalog
from flux3d.flows.pipeline import gate
from flux3d.pipeline.stage import Stage
from flux3d.records import OK, StageResult
from flux3d.storage import Storage

pytestmark = pytest.mark.integration


def behave(model, row):
    what = row["sha256"].split("-")[0]
    if what == "hang":
        time.sleep(600)
    if what == "boom":
        raise ValueError("a bug in the stage")
    if what == "die":
        os.kill(os.getpid(), signal.SIGKILL)  # the worker process dies under the asset (OOM killer, segfault)
    return StageResult(row["sha256"], OK, columns={"model": model, "pid": os.getpid()})


def behave_batch(model, rows):
    return [behave(model, r) for r in rows]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from flux3d.executors.ray import connect

    connect(None, num_cpus=2, dashboard=False)
    yield ray
    ray.shutdown()


def _stage(**kw) -> Stage:
    return Stage(name="encode", params="p", columns=None, plan=lambda: None, apply=behave, **kw)


def _run(stage: Stage, keys: list[str]) -> dict[str, StageResult]:
    from flux3d.executors.ray import run_units
    from flux3d.pipeline.stage import unit_rows

    out = {}
    for results in run_units(stage, unit_rows(stage, [{"sha256": k} for k in keys])):
        for r in results:
            assert r.key not in out, f"{r.key} reported twice"
            out[r.key] = r
    assert set(out) == set(keys)
    return out


@pytest.mark.parametrize("actors", [False, True], ids=["tasks", "actors"])
def test_misbehaving_assets_are_contained(ray_local, actors):
    keys = ["ok-1", "hang-1", "boom-1", "ok-2", "die-1", "ok-3", "ok-4"]
    # One call at a time per actor: a dying asset takes down only itself (with concurrent calls, its neighbours on
    # the same actor are lost too; they are retried, but a neighbour of two deaths would be recorded lost).
    # 20 s: far above an ok unit's run (milliseconds, plus a worker's start-up after die-1) even on 2 busy cores,
    # and the hang costs the test that long.
    stage = _stage(setup=(lambda: "model") if actors else None, timeout_s=20.0)
    t0 = time.monotonic()
    out = _run(stage, keys)
    assert time.monotonic() - t0 < 120
    assert {k: (r.state, r.reason) for k, r in out.items()} == {
        "ok-1": ("ok", ""), "ok-2": ("ok", ""), "ok-3": ("ok", ""), "ok-4": ("ok", ""),
        "hang-1": ("failed", "timeout"), "boom-1": ("failed", "stage_error"), "die-1": ("failed", "worker_lost")}
    assert "a bug in the stage" in out["boom-1"].message
    assert out["die-1"].retryable and not out["hang-1"].retryable and not out["boom-1"].retryable
    if actors:
        # The model is built once per actor, not per asset: the ok assets ran in at most a couple of actors.
        assert {r.columns["model"] for k, r in out.items() if k.startswith("ok")} == {"model"}


def test_batched_stage_and_setup_failure(ray_local):
    from flux3d.executors.ray import StageSetupError

    stage = Stage(name="score", params="p", columns=None, plan=lambda: None, apply=behave_batch,
                  setup=lambda: "scorer", batch=3, timeout_s=60.0)
    out = _run(stage, [f"ok-{i}" for i in range(7)])
    assert all(r.state == OK and r.columns["model"] == "scorer" for r in out.values())

    def no_weights():
        raise FileNotFoundError("weights.safetensors")

    with pytest.raises(StageSetupError, match="weights.safetensors"):
        _run(_stage(setup=no_weights), ["ok-1"])


def test_backpressure_never_exceeds_cluster_slots(ray_local):
    """2 CPUs and 1-CPU tasks: never more than 2 units submitted at once, however long the listing."""
    from flux3d.executors.ray import run_units

    submitted = []

    def rows():
        for i in range(12):
            submitted.append(i)
            yield {"sha256": f"ok-{i}"}

    seen = 0
    for results in run_units(_stage(timeout_s=60.0), rows()):
        seen += len(results)
        assert len(submitted) - seen <= 2 + 1  # in flight, plus the one pulled while no slot was free
    assert seen == 12


def test_ray_ordered_map_keeps_order_and_every_item(ray_local):
    from flux3d.executors.ray import ray_ordered_map

    assert list(ray_ordered_map(lambda x: x * x, range(11), window=3)) == [x * x for x in range(11)]


def _journal_then_die(root: str, keys: list[str], commit_first: int) -> None:
    from flux3d.executors.journal import Journal

    journal = Journal(Catalog(Storage(root)), _stage(), commit_every=commit_first)
    journal.add([StageResult(k, OK, columns={}) for k in keys])
    os.kill(os.getpid(), signal.SIGKILL)


def test_journal_replays_a_killed_writers_results_exactly_once(tmp_path):
    from flux3d.executors.journal import Journal, replay

    root = str(tmp_path / "root")
    catalog = Catalog(Storage(root))
    ctx = multiprocessing.get_context("spawn")
    p = ctx.Process(target=_journal_then_die, args=(root, ["a", "b", "c"], 1000))
    p.start()
    p.join()
    assert p.exitcode == -signal.SIGKILL
    assert catalog.results("encode") is None  # nothing committed before the kill
    live = Journal(catalog, _stage(), commit_every=1000)  # a live writer's journal must not be taken
    live.add([StageResult("d", OK)])
    assert replay(catalog, _stage()) == 3
    assert sorted(catalog.results("encode", dedupe=False)["sha256"].to_pylist()) == ["a", "b", "c"]
    assert replay(catalog, _stage()) == 0  # replayed once only
    live.commit()
    assert sorted(catalog.results("encode", dedupe=False)["sha256"].to_pylist()) == ["a", "b", "c", "d"]

    # Killed after its chunk reached the catalog but before the journal was deleted: no second copy.
    journal = Journal(catalog, _stage(), commit_every=1000)
    journal.add([StageResult("e", OK)])
    path = journal._file.name
    journal.catalog.write_results("encode", "p", journal.pending, None, part=f"j{journal.id}-000000")
    journal._file.close()
    assert os.path.exists(path)
    assert replay(catalog, _stage()) == 0 and not os.path.exists(path)
    assert catalog.results("encode", dedupe=False)["sha256"].to_pylist().count("e") == 1


def test_promotion_gate():
    directions = {"psnr": "max", "lpips": "min"}
    assert gate(None, None, directions, 0.0) == (False, "no candidate: no evaluation ran (no dataset version)")
    assert gate({"psnr": 30.0, "lpips": 0.1}, None, directions, 0.0)[0]
    assert gate({"psnr": 30.0, "lpips": 0.1}, {"psnr": 29.0, "lpips": 0.1}, directions, 0.0)[0]
    ok, why = gate({"psnr": 28.9, "lpips": 0.1}, {"psnr": 29.0, "lpips": 0.1}, directions, 0.0)
    assert not ok and why.startswith("regressed: psnr")
    assert gate({"psnr": 28.9, "lpips": 0.1}, {"psnr": 29.0, "lpips": 0.1}, directions, 0.2)[0]
    ok, why = gate({"psnr": 31.0, "lpips": 0.2}, {"psnr": 29.0, "lpips": 0.1}, directions, 0.0)
    assert not ok and "lpips" in why
    assert not gate({"psnr": 31.0}, None, directions, 0.0)[0]  # a gated metric missing

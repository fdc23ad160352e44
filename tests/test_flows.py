"""The Prefect + Ray flows end to end: real Prefect (ephemeral API, and a real `prefect server`), real local Ray
(started by the flow, and a `ray start` cluster joined by address), real Blender renders at toy sizes, and the
tiny demo models. Each flow runs as the `flux3d` command in its own process, as a user or a scheduler runs it."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flux3d.catalog import Catalog
from flux3d.demo import write_demo_config
from flux3d.storage import TMP_MARK, Storage
from tests.conftest import ASSETS as SHARED

STAGES = ("download", "inspect", "render", "score", "curate", "voxelize", "encode")
# Whole flows with Blender renders: minutes each on 2 cores (the suite's 300 s default is for single stages).
# The two long runs that tests here only read, the pipeline and the deployment's cluster run, are session fixtures
# (tests/flow_runs.py) that start with the suite's first test and go on in the background.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200), pytest.mark.usefixtures("pipeline_run",
                                                                                          "cluster_run")]


@pytest.fixture(scope="module")
def env(prefect_server):
    return prefect_server


def cli(env: dict, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "flux3d.cli", *args], capture_output=True, text=True, env=env, check=False,
                       timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return p


def once_per_key(root: str) -> None:
    """Every asset was finished once per stage: no stage committed a second result for any key."""
    catalog = Catalog(Storage(root))
    for stage in STAGES:
        res = catalog.results(stage, dedupe=False)
        keys = res[res.column_names[0]].to_pylist() if res is not None else []
        assert len(keys) == len(set(keys)), f"{stage}: an asset was completed twice"


def tree_digest(root: Path, *folders: str) -> dict[str, str]:
    out = {}
    for folder in folders:
        for p in sorted((root / folder).rglob("*")):
            if p.is_file() and TMP_MARK not in str(p):
                out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def summary_rows(out: str) -> dict[str, list[str]]:
    """The body rows of the command's `this run` table: stage -> its cells (ok, skipped, rejected, failed, ...)."""
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if cells and cells[0] in STAGES:
            rows[cells[0]] = cells[1:]
    return rows


def test_sigkill_mid_stage_then_rerun_matches_an_uninterrupted_run(tmp_path, env, demo, pipeline_run):
    config = write_demo_config(str(tmp_path / "run.toml"), str(demo / "models"),
                               {"flow": {"batch_size": 1, "commit_every": 1, "concurrent_batches": 2}})
    source = f"local:{demo / 'assets'}"
    root = tmp_path / "killed"
    args = [sys.executable, "-m", "flux3d.cli", "data", "--root", str(root), "--source", source, "--config", config]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    renders = root / "catalog" / "render"
    deadline = time.monotonic() + 400
    try:
        while not (renders.is_dir() and any(renders.glob("*.parquet"))):  # the first render committed
            assert proc.poll() is None, "the flow ended before it could be killed mid-render"
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver, its local Ray and every worker and Blender child
        proc.wait()
    rendered_before = Catalog(Storage(str(root))).results("render").num_rows
    assert 1 <= rendered_before < 3, "killed mid-stage: some but not all renders done"

    out = cli(env, "data", "--root", str(root), "--source", source, "--config", config).stdout
    assert "dataset version" in out
    once_per_key(str(root))
    assert summary_rows(out)["render"][-2] == str(3 - rendered_before)  # processed: only what was left

    # The same data, uninterrupted, in another root: the same bytes. The reference is the pipeline run's root (the
    # same assets and models, one batch of four assets per task instead of one: batching never changes an asset's
    # bytes). Not the plain stage commands: their encoder runs with every core, a Ray worker with its one CPU, and
    # float sums in another order round differently.
    pipeline_run.output()  # it runs beside this test: wait for it
    a, b = (tree_digest(r, "shards", "features", "voxels") for r in (root, pipeline_run.root))
    assert a == b and any(k.endswith(".tar") for k in a)
    # Nothing partial under a final name: every shard reads back (the loader checks every sample).
    from flux3d.training.data import make_loader, shard_urls

    version = (root / "shards" / "LATEST").read_text()
    urls = shard_urls(str(root / "shards" / version), "train") + shard_urls(str(root / "shards" / version), "val")
    assert sum(len(b.keys) for b in make_loader(urls, batch_size=2, num_workers=0)) == 3


def test_pipeline_trains_evaluates_and_a_rerun_redoes_nothing(pipeline_run, demo):
    """`flux3d pipeline` (the demo's main job): data flow, the decoder and SMDiT as Ray Train jobs, the evaluation
    report; a second run changes no file; the retrain flow's gate promotes the first model and records why."""
    root, config, env, out = pipeline_run.root, pipeline_run.config, pipeline_run.env, pipeline_run.output()
    assert "preparing Prefect's database" in out  # a brand-new Prefect home: its database is created on this run
    rows = summary_rows(out)
    assert list(rows) == list(STAGES)
    # The demo assets: 7 listed; inspect passes 3 (two textured, one STL), rejects the untextured cone and fails
    # the truncated, empty and not-a-mesh files; everything after inspect gets the 3.
    assert rows["download"][:5] == ["7", "0", "0", "0", "7"]
    assert rows["inspect"][:5] == ["3", "0", "1", "3", "7"]
    for stage in STAGES[2:]:
        assert rows[stage][:5] == ["3", "0", "0", "0", "3"], (stage, rows[stage])
    version = (root / "shards" / "LATEST").read_text()
    models = root / "models" / version
    for kind in ("decoder", "smdit", "structure_vae", "structure_flow"):
        meta = json.loads(next((models / kind / "checkpoints").glob("step_0000040/meta.json")).read_text())
        assert meta["kind"] == kind and meta["config"]["data"]["shards"] == str(root / "shards" / version)
    # The structure flow diffuses this pipeline's VAE's latent, on that latent's grid.
    assert meta["config"]["flow"]["latents"] == str(models / "structure_vae") and meta["config"]["smdit"]["grid"] == 8
    report = json.loads((models / "eval" / "report.json").read_text())
    assert report["count"] == 3 and {"recon_psnr", "gen_psnr", "gen_clip", "mv_psnr_mean", "pgen_psnr", "pgen_clip",
                                     "layout_iou"} <= set(report["summary"])
    assert 0.0 <= report["summary"]["layout_iou"] <= 1.0 and report["structure_step"] == 40
    assert "Full pipeline with predicted layouts (paper Tab. 10)" in (models / "eval" / "report.md").read_text()
    assert f"report {models}/eval/report.md" in out
    # `flux3d retrain` (the cron deployment's run): the pipeline again, then the promotion gate. Trained and
    # evaluated already: nothing is redone, and the gate promotes the first model and records why.
    gate_files = {"models/promoted.json", "models/promotions.jsonl"}
    before = tree_digest(root, "models", "shards")
    out = cli(env, "retrain", "--root", str(root), "--source", f"local:{demo / 'assets'}", "--config", config).stdout
    after = tree_digest(root, "models", "shards")
    assert {k: v for k, v in after.items() if k not in gate_files} == before and gate_files <= set(after)
    assert "preparing Prefect's database" not in out  # once per Prefect home
    rows = summary_rows(out)
    assert list(rows) == list(STAGES) and all(r[:5] == ["0"] * 5 for r in rows.values()), rows  # nothing to do
    assert "promotion gate: promoted (first model: nothing to compare against)" in out
    promoted = json.loads((root / "models" / "promoted.json").read_text())
    assert promoted["model"] == str(models) and promoted["metrics"]["psnr"] == report["metrics"]["psnr"]
    (decision,) = [json.loads(line) for line in (root / "models" / "promotions.jsonl").read_text().splitlines()]
    assert decision["promoted"] and decision["reason"] == "first model: nothing to compare against"


def test_deployment_with_cron_runs_on_a_ray_cluster_joined_by_address(cluster_run, env):
    """The deployments (the retrain one on its cron, with the cluster's address) and the triggered data run: it
    completes on the cluster, publishes its artifacts, and builds a dataset version."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    root, ray_port, names = cluster_run.root, cluster_run.ray_port, cluster_run.deployments
    retrain = names["retrain"]
    assert [s.schedule.cron for s in retrain.schedules] == ["0 4 * * 1"] and retrain.schedules[0].active
    assert not names["data"].schedules
    assert retrain.parameters["ray_address"] == f"127.0.0.1:{ray_port}"
    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
        deadline = time.monotonic() + 900
        while not (state := client.read_flow_run(cluster_run.run.id).state).is_final():
            assert time.monotonic() < deadline, "the triggered run did not finish"
            time.sleep(2)
        assert state.is_completed(), state.message
        # The server is the module's: only artifacts made since this run was created are this run's.
        artifacts = {a.key for a in client.read_artifacts() if a.key and a.created >= cluster_run.run.created}
    assert {"render-counts", "render-summary", "curation-report", "shards"} <= artifacts
    version = Path(root, "shards", "LATEST").read_text()
    assert Path(root, "shards", version, "stats.json").is_file()
    once_per_key(root)
    if SHARED.is_dir():
        good_reach_shards_bad_recorded(root)
    import ray

    ray.init(address=f"127.0.0.1:{ray_port}", logging_level="WARNING")
    try:  # the flow's driver joined this cluster (it is in the cluster's job table beside this test)
        assert len(ray._private.state.jobs()) >= 2
    finally:
        ray.shutdown()


def good_reach_shards_bad_recorded(root: str) -> None:
    """../shared/assets run through the data flow: every good asset is in the shards, every bad one was stopped
    by some stage with a reason and is not."""
    table = Catalog(Storage(root)).table([*STAGES, "shard"])
    rows = {Path(r["file_identifier"]).relative_to(SHARED).as_posix(): r for r in table.to_pylist()}
    good = {k: r for k, r in rows.items() if k.startswith("good/")}
    bad = {k: r for k, r in rows.items() if k.startswith("bad/")}
    assert len(good) >= 8 and len(bad) >= 8
    for name, r in good.items():
        assert r["shard_state"] == "ok", (name, {s: (r[f"{s}_state"], r[f"{s}_reason"]) for s in STAGES})
    for name, r in bad.items():
        stopped = [s for s in STAGES if r[f"{s}_state"] not in (None, "ok")]
        assert stopped and r[f"{stopped[0]}_reason"], (name, "a bad asset must be stopped with a reason")
        assert r["shard_state"] is None

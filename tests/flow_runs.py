"""The two long flow runs that tests/test_flows.py checks: `flux3d pipeline` on the demo assets and a data run
triggered through `flux3d deploy`'s deployments on a `ray start` cluster.

Each is a `flux3d` command in its own process group that starts with the first flow test and goes on in the
background while the module's other tests run (a flow run keeps 2 cores less than busy: Prefect API round trips,
process and Ray worker start-ups); the tests that read them wait for their results.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from flux3d.demo import make_demo_assets, write_demo_config
from flux3d.isolation import stop_process_group
from tests.conftest import ASSETS as SHARED
from tests.conftest import free_port, prefect_env


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """Procedural assets and the tiny models, shared by the runs below (same paths: same dataset version)."""
    base = tmp_path_factory.mktemp("demo")
    make_demo_assets(str(base / "assets"))
    return base


@dataclass
class PipelineRun:
    """A `flux3d pipeline` command running in the background; `output()` waits for it and returns its stdout."""

    root: Path
    config: str
    env: dict
    proc: subprocess.Popen
    logs: Path  # its stdout and stderr go to files: a pipe nobody reads yet could fill and stall it

    def output(self, timeout: float = 1200) -> str:
        self.proc.wait(timeout=timeout)
        out, err = ((self.logs / name).read_text() for name in ("stdout", "stderr"))
        assert self.proc.returncode == 0, out[-3000:] + err[-5000:]
        return out


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory, demo) -> Iterator[PipelineRun]:
    """One `flux3d pipeline` run on the demo assets in a brand-new Prefect home (its database is created on this
    run): the pipeline test checks it, the kill test compares its own data with this run's bytes.

    It starts with the module and runs in the background (see `pytestmark`); `output()` waits for it."""
    tmp = tmp_path_factory.mktemp("pipeline")
    env = {**prefect_env(tmp / "prefect"), "COLUMNS": "40"}  # a narrow terminal must keep the summary's counts
    config = write_demo_config(str(tmp / "run.toml"), str(demo / "models"))
    root = tmp / "root"
    assert not Path(env["PREFECT_HOME"]).exists()
    with open(tmp / "stdout", "w") as out, open(tmp / "stderr", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "flux3d.cli", "pipeline", "--root", str(root), "--source",
                                 f"local:{demo / 'assets'}", "--config", config], env=env, stdout=out, stderr=err,
                                start_new_session=True)
    yield PipelineRun(root, config, env, proc, tmp)
    if proc.poll() is None:  # a test failed before waiting for it
        stop_process_group(proc, grace_s=5)


def start_ray_cluster(env: dict, port: int, temp_dir: str) -> subprocess.Popen:
    """`ray start --head --block` as the leader of a new process group: the GCS, raylet and every worker it forks
    share that group, so the test can end exactly this cluster. Returns once the cluster answers."""
    ray_bin = str(Path(sys.executable).with_name("ray"))
    proc = subprocess.Popen([ray_bin, "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                             "--include-dashboard=false", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while subprocess.run([ray_bin, "status", f"--address=127.0.0.1:{port}"], env=env, capture_output=True,
                         timeout=60, check=False).returncode != 0:
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process_group(proc)
            raise RuntimeError(f"ray start --head on port {port} did not come up")
        time.sleep(1)
    return proc


@dataclass
class ClusterRun:
    """A data run triggered through the API of `flux3d deploy`'s deployments, on a `ray start` cluster."""

    root: str
    ray_port: int
    deployments: dict
    run: Any  # the triggered flow run


@pytest.fixture(scope="session")
def cluster_run(tmp_path_factory, prefect_server, demo) -> Iterator[ClusterRun]:
    """`flux3d deploy` serving the deployments against the module's Prefect server, and a data run triggered
    through the API, executed on a Ray cluster started with `ray start` (the cluster path: address mode). The run
    goes on in the background while the module's other tests run; its test waits for it.

    Its sources are the real assets of ../shared when it is there (the demo assets otherwise): every good asset
    must reach the shards and every bad one be stopped with a reason, as a cluster run sees them."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    env = prefect_server
    tmp = tmp_path_factory.mktemp("cluster")
    sources = ([f"local:{SHARED / 'good'}", f"local:{SHARED / 'bad'}"] if SHARED.is_dir()
               else [f"local:{demo / 'assets'}"])
    config = write_demo_config(str(tmp / "run.toml"), str(demo / "models"), {"flow": {"batch_size": 8}})
    root = str(tmp / "root")
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    ray_port = free_port()
    cluster = start_ray_cluster(env, ray_port, ray_tmp)
    serving = subprocess.Popen([sys.executable, "-m", "flux3d.cli", "deploy", "--root", root,
                                *(a for spec in sources for a in ("--source", spec)), "--config", config,
                                "--ray-address", f"127.0.0.1:{ray_port}", "--cron", "0 4 * * 1"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
            deadline = time.monotonic() + 120
            while True:
                names = {d.name: d for d in client.read_deployments()}
                if {"data", "pipeline", "retrain"} <= set(names):
                    break
                assert serving.poll() is None, serving.stderr.read().decode()[-3000:]
                assert time.monotonic() < deadline, "deployments not registered"
                time.sleep(1)
            run = client.create_flow_run_from_deployment(names["data"].id)
        yield ClusterRun(root, ray_port, names, run)
    finally:  # their own process groups only: no machine-wide Ray shutdown. Nothing of theirs is read after this,
        # so a short grace: a Ray node's processes can take a minute to go on SIGTERM alone.
        stop_process_group(serving, grace_s=10)
        stop_process_group(cluster, grace_s=5)
        shutil.rmtree(ray_tmp, ignore_errors=True)



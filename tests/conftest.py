"""Shared paths and fixtures of the test suite.

../shared (beside the repository) holds the real assets and weights; tests that need it skip when it is absent:
mark them `shared_assets`, or ask for the `shared_assets` / `taef1` fixtures. `prefect_server` is one real
`prefect server` for the session's flow runs. `synthetic_shards` writes tiny valid dataset versions without Blender
(tests/datasets.py), once per set of arguments per session. `pipeline_run` and `cluster_run` (tests/flow_runs.py)
are the two long flow runs test_flows.py checks, going on in the background while its tests run.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
ASSETS = SHARED / "assets"
WEIGHTS = SHARED / "weights"
TAEF1 = WEIGHTS / "taef1_encoder.safetensors"


# Files whose tests take a minute or more, longest first: under `make test`'s `-n 2 --dist loadfile` they go out
# first, so no worker is left with one long file at the end while the other idles.
LONG_FILES = ("test_flows.py", "test_smdit.py", "test_curate_run.py", "test_evaluation.py", "test_decoder.py",
              "test_executor.py", "test_checkpoint_world_size.py", "test_ingest.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))  # stable: file order otherwise kept


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("shared_assets") and not ASSETS.is_dir():
        pytest.skip(f"needs {ASSETS}")


@pytest.fixture(scope="session")
def shared_assets() -> Path:
    """../shared/assets (good/ and bad/), or a skip."""
    if not ASSETS.is_dir():
        pytest.skip(f"needs {ASSETS}")
    return ASSETS


@pytest.fixture(scope="session")
def taef1() -> Path:
    """The TAEF1 encoder weights in ../shared/weights, or a skip."""
    if not TAEF1.is_file():
        pytest.skip(f"needs {TAEF1}")
    return TAEF1


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory):
    """`synthetic_shards(assets, **kwargs)` -> a `tests.datasets.Dataset` from `synthetic_dataset`, built once per
    argument set and shared by the session (treat it as read-only)."""
    from tests.datasets import synthetic_dataset

    built: dict = {}
    models: dict = {}

    def make(assets: int, **kwargs):
        key = (assets, json.dumps(kwargs, sort_keys=True, default=str))  # kwargs may hold dicts (`encode`)
        if key not in built:
            if "encode" not in kwargs and not models:
                from flux3d.demo import make_demo_models

                models.update(make_demo_models(str(tmp_path_factory.mktemp("demo_models"))))
            kwargs.setdefault("encode", models.get("encode"))
            built[key] = synthetic_dataset(tmp_path_factory.mktemp("synthetic"), assets, **kwargs)
        return built[key]

    return make


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prefect_env(home: Path) -> dict[str, str]:
    """The environment of a `flux3d` flow command with its own Prefect home (ephemeral API, quiet logs)."""
    return {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "RAY_AUTH_MODE": "disabled", "PREFECT_LOGGING_LEVEL": "WARNING"}


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory) -> Iterator[dict[str, str]]:
    """An environment whose PREFECT_API_URL is one real `prefect server` (what `flux3d dashboard` starts), for the
    session's flow runs. A process using Prefect's ephemeral API starts its own server (~7 s on 2 cores, plus
    ~11 s of database migrations in a new Prefect home); that path is what a newcomer takes, and the pipeline
    test checks it on its own brand-new home; the other runs use this one."""
    from flux3d.flows.prefect_api import start_server, stop_server

    home = tmp_path_factory.mktemp("prefect-server")
    with mock.patch.dict(os.environ, {"PREFECT_HOME": str(home)}):
        server, api = start_server(port=free_port(), log=str(home / "server.log"))
    yield {**prefect_env(home), "PREFECT_API_URL": api}
    stop_server(server)


from tests.flow_runs import cluster_run, demo, pipeline_run  # noqa: F401 - fixtures; they import this module

"""The Prefect API flux3d's commands talk to: the ephemeral one (prepared before it starts) or `prefect server`.

Why a first run needs preparing: with no PREFECT_API_URL a flow starts Prefect's temporary API server in a child
process and waits for it `server.ephemeral.startup_timeout_seconds` (20 s by default). That server creates its
SQLite database on first start by running every Alembic migration (Prefect 3.8: 114 of them, most rebuilding a
table; measured 11.6 s on 2 cores), then registers block types (~1.5 s), on top of its own ~8 s start. On a new
PREFECT_HOME the sum passes 20 s and the flow dies before doing any work ("Timed out while attempting to connect to
ephemeral Prefect API server"); every later start is fast because the database exists.

So the migrations run here, in this process, once per Prefect home and Prefect version, under a file lock (two
commands started together must not migrate one SQLite file at the same time), and the user is told what the wait
is. The server then finds its schema current. The start-up wait is also raised (a warm start on a machine busy with
Ray and Blender can take twice the idle figure); a user's own setting wins.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from flux3d.storage import Storage

STARTUP_TIMEOUT_S = "120"
"""Default for PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS when the user has not set it."""
_READY = "flux3d-database-ready"
"""Marker in PREFECT_HOME: the database it names was migrated to the Prefect version it names."""


def prefect_env_defaults() -> None:
    """Settings every flux3d process that talks to Prefect uses unless the user set them."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # else telemetry errors are logged offline
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", STARTUP_TIMEOUT_S)


def prepare_local_database(echo: Callable[[str], object] = print) -> float:
    """Create or upgrade the Prefect database of this process's settings unless a server owns it (PREFECT_API_URL
    set) or it is already current. Returns the seconds spent migrating (0.0 when there was nothing to do)."""
    prefect_env_defaults()
    if os.environ.get("PREFECT_API_URL"):
        return 0.0
    import prefect
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL, PREFECT_HOME

    home = Path(PREFECT_HOME.value()).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    url = PREFECT_API_DATABASE_CONNECTION_URL.value()
    stamp = f"{prefect.__version__} {url}\n"
    marker = home / _READY
    if _read(marker) == stamp:
        return 0.0
    with open(home / f"{_READY}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if _read(marker) == stamp:  # another command migrated it while this one waited
            return 0.0
        echo(f"preparing Prefect's database in {home} (once per Prefect home and version; ~15 s on 2 cores)")
        t0 = time.monotonic()
        _migrate()
        seconds = time.monotonic() - t0
        Storage(str(home)).write_bytes(_READY, stamp.encode())
    return seconds


def _migrate() -> None:
    import asyncio

    from prefect.server.database import provide_database_interface

    asyncio.run(provide_database_interface().create_db())  # Alembic upgrade to head: no-op when current


def _read(path: Path) -> str | None:
    with contextlib.suppress(FileNotFoundError):
        return path.read_text()
    return None


def start_server(host: str = "127.0.0.1", port: int = 4200, wait_s: float = 120.0,
                 log: str | None = None) -> tuple[subprocess.Popen, str]:
    """`prefect server start` in a child process; returns it and the API URL once the server answers.

    The server's own log goes to `log` (default: inherited stderr). Never a pipe nobody reads: a long-running
    dashboard would fill it and block."""
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}  # it migrates a new database itself
    err = open(log, "ab") if log else None  # noqa: SIM115 - handed to the child, closed below
    try:
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port",
                                 str(port)], env=env, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)  # its own group: `stop_server` ends all it started
    finally:
        if err:
            err.close()
    api = f"http://{host}:{port}/api"
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with code {proc.returncode}" + (f"; its log: {log}" if log
                                                                                        else ""))
        try:
            if httpx.get(f"{api}/health", timeout=1.0).status_code == 200:
                return proc, api
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"prefect server did not answer on {api} within {wait_s:.0f} s")



def stop_server(proc: subprocess.Popen) -> None:
    """End a `start_server` server and whatever it started (its process group), nothing else."""
    from flux3d.isolation import stop_process_group

    stop_process_group(proc)

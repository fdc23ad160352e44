"""Where a first `flux3d` flow run's start-up goes on a new Prefect home, and what a warm start costs.

Prints, each from a fresh process on a fresh PREFECT_HOME (as a new user's first command):
- the database migrations alone (`prepare_local_database`, what flux3d now does before the server starts);
- a two-task flow on that prepared home (the server's own start: import, block registration, health);
- the same flow again (a warm home, every later run);
- the same flow on an unprepared home with Prefect's stock 20 s start-up wait, to show whether it still times out.

    .venv/bin/python benchmarks/prefect_start.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

FLOW = """
from prefect import flow, task

@task
def add(x):
    return x + 1

@flow
def two_tasks():
    return add(add(0))

assert two_tasks() == 2
"""
PREPARE = "from flux3d.flows.prefect_api import prepare_local_database; prepare_local_database()"


def timed(code: str, home: str, **env: str) -> tuple[float, bool]:
    full = {**os.environ, "PREFECT_HOME": home, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOGGING_LEVEL": "WARNING", **env}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, check=False)
    return time.perf_counter() - t0, p.returncode == 0


def main() -> None:
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        rows = [("migrate a new home (flux3d's prepare step)", *timed(PREPARE, a)),
                ("first flow on the prepared home", *timed(FLOW, a)),
                ("flow on a warm home", *timed(FLOW, a)),
                ("first flow, unprepared home, stock 20 s wait",
                 *timed(FLOW, b, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="20"))]
    print(f"{'step (fresh process each)':<48} {'seconds':>8}  ok")
    for name, seconds, ok in rows:
        print(f"{name:<48} {seconds:8.1f}  {'yes' if ok else 'NO (timed out)'}")


if __name__ == "__main__":
    main()

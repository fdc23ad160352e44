"""`flux3d ingest` end to end: the CLI over procedurally made assets, re-runs, a SIGKILL mid-way, the shared set."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flux3d.catalog import Catalog
from flux3d.demo import make_demo_assets
from flux3d.storage import TMP_MARK, Storage
from tests.conftest import ASSETS as SHARED_ASSETS

DEMO_EXPECTED = {  # file -> inspect (state, reason)
    "checker_box.glb": ("ok", ""),
    "striped_sphere.obj": ("ok", ""),
    "ring.stl": ("ok", ""),
    "plain_cone.glb": ("rejected", "untextured"),
    "truncated_box.glb": ("failed", "truncated"),
    "empty.glb": ("failed", "empty_file"),
    "notes_not_a_mesh.glb": ("failed", "bad_magic"),
}


def flux3d(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flux3d.cli", *args], capture_output=True, text=True, check=check,
                          timeout=600)


def catalog_rows(root: str) -> dict[str, tuple]:
    table = Catalog(Storage(root)).table()
    rows = {}
    for r in table.to_pylist():
        rows[os.path.basename(r["file_identifier"])] = (r["inspect_state"], r["inspect_reason"])
    assert len(rows) == table.num_rows == len(set(table["asset_id"].to_pylist()))
    return rows


def snapshot(root: str) -> dict[str, tuple[int, int]]:
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            st = os.stat(os.path.join(d, f))
            out[os.path.relpath(os.path.join(d, f), root)] = (st.st_size, st.st_mtime_ns)
    return out


def test_cli_ingest_status_catalog_and_idempotent_rerun(tmp_path):
    assets, root = str(tmp_path / "assets"), str(tmp_path / "root")
    make_demo_assets(assets)
    flux3d("ingest", "--root", root, "--source", f"local:{assets}")
    assert catalog_rows(root) == DEMO_EXPECTED
    status = json.loads(flux3d("status", "--root", root, "--json").stdout)
    assert status["assets"] == 7
    assert status["stages"]["download"]["states"] == {"ok": 7}
    assert status["stages"]["inspect"]["states"] == {"failed": 3, "ok": 3, "rejected": 1}
    assert status["stages"]["inspect"]["reasons"]["failed:truncated"] == 1

    before = snapshot(root)
    t0 = time.perf_counter()
    flux3d("ingest", "--root", root, "--source", f"local:{assets}")
    assert time.perf_counter() - t0 < 30  # nothing to do: listing stats files, the catalog says the rest is final
    assert snapshot(root) == before  # and not one byte of output changed

    out = tmp_path / "catalog.parquet"
    flux3d("catalog", "--root", root, "--out", str(out))
    table = pq.read_table(out)
    assert table.num_rows == 7
    for col in ("sha256", "source", "file_identifier", "license", "attribution", "bytes", "format",
                "inspect_state", "inspect_reason", "inspect_params", "inspect_seconds", "vertices", "has_texture"):
        assert col in table.column_names
    box = [r for r in table.to_pylist() if r["file_identifier"].endswith("checker_box.glb")][0]
    assert box["faces"] == 12 and box["has_texture"] is True


def test_bad_spec_is_a_clear_error(tmp_path):
    res = flux3d("ingest", "--root", str(tmp_path), "--source", "ftp:somewhere", check=False)
    assert res.returncode != 0 and "bad source spec" in res.stderr


@pytest.mark.timeout(600)  # 127 assets inspected one at a time, twice over: past 300 s on a loaded 2-core machine
def test_sigkill_midway_then_rerun_completes_without_duplicates(tmp_path):
    assets, root = tmp_path / "assets", str(tmp_path / "root")
    make_demo_assets(str(assets))
    # Many distinct files so the run is still going when it is killed: copies with a distinguishing tail.
    src = (assets / "ring.stl").read_bytes()
    for i in range(120):
        (assets / f"ring_{i:03d}.stl").write_bytes(src + f"\n{i}".encode())
    args = [sys.executable, "-m", "flux3d.cli", "ingest", "--root", root, "--source", f"local:{assets}"]
    cfg = tmp_path / "small-batches.toml"
    cfg.write_text("[ingest]\nbatch_size = 4\n[inspect]\nworkers = 1\n")
    proc = subprocess.Popen(args + ["--config", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    inspect_dir = Path(root) / "catalog" / "inspect"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(inspect_dir.glob("part-*.parquet"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = Catalog(Storage(root)).results("inspect").num_rows
    assert 0 < done_before < 127, "the kill must land mid-way for this test to mean anything"

    subprocess.run(args + ["--config", str(cfg)], check=True, capture_output=True, timeout=600)
    rows = catalog_rows(root)
    assert len(rows) == 127
    assert all(state is not None for state, _ in rows.values())
    assert {k: v for k, v in rows.items() if k in DEMO_EXPECTED} == DEMO_EXPECTED
    assert not [p for p in snapshot(root) if TMP_MARK in p or p.endswith(".part")]
    # The resumed run redid nothing that was committed before the kill.
    res = Catalog(Storage(root))._read_folder("inspect")
    assert res.num_rows == len(set(res["sha256"].to_pylist())) == 127


@pytest.mark.shared_assets
def test_shared_assets_good_ok_bad_rejected(tmp_path):
    if not SHARED_ASSETS.is_dir():
        pytest.skip("../shared/assets not present")
    root = str(tmp_path / "root")
    flux3d("ingest", "--root", root, "--source", f"local:{SHARED_ASSETS}")
    table = Catalog(Storage(root)).table()
    for row in table.to_pylist():
        rel = os.path.relpath(row["file_identifier"], SHARED_ASSETS)
        if rel.startswith("good"):
            assert (row["download_state"], row["inspect_state"]) == ("ok", "ok"), (rel, row["inspect_reason"])
        else:
            assert row["inspect_state"] in ("failed", "rejected") and row["inspect_reason"], rel
    shutil.rmtree(root)


def test_cli_logging_wins_over_a_library_that_configured_the_root_logger_first():
    """open_clip calls the module-level `logging.info`, which runs `basicConfig()` (the demo builds its CLIP before
    the flow starts): the CLI's own format and level must still apply to every later record, Prefect's included."""
    code = ("import logging; logging.info('a library logs first'); from flux3d.cli import _setup_logging; "
            "_setup_logging(False); logging.getLogger('prefect.flow_runs').warning('shown'); "
            "logging.getLogger('flux3d.x').info('hidden')")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    (line,) = p.stderr.splitlines()
    assert line.endswith(" WARNING prefect.flow_runs: shown") and line[:4].isdigit()  # asctime first: our format

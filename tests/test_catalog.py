"""Catalog: union of append-only part files, newest result wins, concurrent writers, any fsspec root."""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import pyarrow as pa
import pytest

from flux3d.catalog import Catalog
from flux3d.records import AssetRecord, StageResult, make_asset_id
from flux3d.storage import TMP_MARK, Storage

COLUMNS = pa.schema([("vertices", pa.int64())])


def _assets(n: int, prefix: str = "a") -> list[AssetRecord]:
    return [AssetRecord(asset_id=make_asset_id("test", f"{prefix}{i}"), source="test", file_identifier=f"{prefix}{i}",
                        format="glb", sha256=f"{i:064x}", license="CC0-1.0") for i in range(n)]


def _writer(root: str, worker: int, n_batches: int, per_batch: int) -> None:
    cat = Catalog(Storage(root))
    for b in range(n_batches):
        keys = [f"{worker * 10_000 + b * per_batch + i:064x}" for i in range(per_batch)]
        cat.write_results("inspect", "p", [StageResult(k, "ok", columns={"vertices": worker}) for k in keys], COLUMNS)


def test_concurrent_writers_union(tmp_path):
    root = str(tmp_path)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(root, w, 5, 20)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    res = Catalog(Storage(root)).results("inspect")
    assert res.num_rows == 4 * 5 * 20
    assert sorted(set(res["vertices"].to_pylist())) == [0, 1, 2, 3]
    assert len(set(res["sha256"].to_pylist())) == res.num_rows


def test_newest_result_wins_and_retryable_failures_are_not_done(tmp_path):
    cat = Catalog(Storage(str(tmp_path)))
    assets = _assets(3)
    cat.add_assets(assets)
    shas = [a.sha256 for a in assets]
    cat.write_results("inspect", "p1", [StageResult(shas[0], "failed", "timeout", retryable=True),
                                        StageResult(shas[1], "failed", "corrupt"),
                                        StageResult(shas[2], "ok")], COLUMNS)
    time.sleep(0.002)
    cat.write_results("inspect", "p1", [StageResult(shas[1], "ok", columns={"vertices": 8})], COLUMNS)
    table = cat.table()
    by_sha = dict(zip(table["sha256"].to_pylist(), zip(table["inspect_state"].to_pylist(),
                                                          table["vertices"].to_pylist())))
    assert by_sha[shas[1]] == ("ok", 8)
    assert table.num_rows == 3
    assert cat.done_keys("inspect", "p1") == {shas[1], shas[2]}  # the timeout is retried on the next run
    assert cat.done_keys("inspect", "p2") == set()  # new params: everything is redone


def test_status_counts_states_reasons_and_blocked(tmp_path):
    cat = Catalog(Storage(str(tmp_path)))
    assets = _assets(4)
    cat.add_assets(assets)
    cat.write_results("download", "d", [StageResult(a.asset_id, "ok") for a in assets[:3]]
                      + [StageResult(assets[3].asset_id, "failed", "http_404")])
    cat.write_results("inspect", "i", [StageResult(assets[0].sha256, "rejected", "untextured"),
                                       StageResult(assets[1].sha256, "ok")], COLUMNS)
    st = cat.status()
    assert st["assets"] == 4 and st["sources"] == {"test": 4}
    assert st["stages"]["download"] == {"states": {"ok": 3, "failed": 1}, "reasons": {"failed:http_404": 1}}
    assert st["stages"]["inspect"]["states"] == {"blocked": 1, "ok": 1, "pending": 1, "rejected": 1}
    assert st["stages"]["inspect"]["reasons"] == {"rejected:untextured": 1}


def test_download_sha_supersedes_listed_sha(tmp_path):
    cat = Catalog(Storage(str(tmp_path)))
    (a,) = _assets(1)
    a.sha256 = None  # e.g. Objaverse 1.0: no hash before download
    cat.add_assets([a])
    real = "f" * 64
    cat.write_results("download", "d", [StageResult(a.asset_id, "ok", columns={"sha256": real})],
                      pa.schema([("sha256", pa.string())]))
    cat.write_results("inspect", "i", [StageResult(real, "ok", columns={"vertices": 3})], COLUMNS)
    row = cat.table().to_pylist()[0]
    assert (row["sha256"], row["inspect_state"], row["vertices"]) == (real, "ok", 3)
    # Later stages ask for content stages only; the downloaded hash must still link the asset to them.
    row = cat.table(["inspect"]).to_pylist()[0]
    assert (row["sha256"], row["inspect_state"]) == (real, "ok")
    assert cat.todo("render", "r", after=["inspect"])["sha256"].to_pylist() == [real]


def test_readers_ignore_partial_files_and_sweep_removes_stale_ones(tmp_path):
    storage = Storage(str(tmp_path))
    cat = Catalog(storage)
    cat.add_assets(_assets(2))
    folder = tmp_path / "catalog" / "assets"
    stale = folder / f"{TMP_MARK}dead-part.parquet"
    stale.write_bytes(b"PAR1 half a file")  # what a writer killed mid-write leaves behind
    assert cat.assets().num_rows == 2
    assert storage.sweep_tmp("catalog") == 0  # young: may belong to a live writer
    old = time.time() - 7200
    os.utime(stale, (old, old))
    assert storage.sweep_tmp("catalog") == 1 and not stale.exists()
    # A folder a killed writer left (half-extracted archive, unfinished render) goes whole.
    half = tmp_path / "raw" / "archives" / f"abc{TMP_MARK}1234"
    (half / "repo" / "models").mkdir(parents=True)
    (half / "repo" / "models" / "a.stl").write_bytes(b"x")
    for p in (half, half / "repo", half / "repo" / "models", half / "repo" / "models" / "a.stl"):
        os.utime(p, (old, old))
    assert storage.sweep_tmp("raw") == 1 and not half.exists()
    assert (tmp_path / "raw" / "archives").is_dir()


def test_catalog_on_an_fsspec_url():
    pytest.importorskip("fsspec.implementations.memory")
    storage = Storage("memory://flux3d-test-catalog")
    assert not storage.local
    cat = Catalog(storage)
    assets = _assets(5)
    cat.add_assets(assets)
    cat.write_results("inspect", "i", [StageResult(a.sha256, "ok", columns={"vertices": 1}) for a in assets], COLUMNS)
    assert cat.status()["stages"]["inspect"]["states"] == {"ok": 5}
    storage.write_bytes("raw/x.bin", b"abc")
    assert storage.read_bytes("raw/x.bin") == b"abc"
    assert not [p for p in storage.fs.find(storage.root) if TMP_MARK in p]


def test_undeclared_result_columns_are_refused(tmp_path):
    cat = Catalog(Storage(str(tmp_path)))
    with pytest.raises(ValueError, match="undeclared"):
        cat.write_results("inspect", "i", [StageResult("a" * 64, "ok", columns={"typo": 1})], COLUMNS)

"""Download stage against a real HTTP server on loopback: retries, hashes, resume, dedupe, safe archives."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import zipfile

import pytest

from flux3d.config.load import load_config
from flux3d.records import AssetRecord, make_asset_id
from flux3d.stages.download import download_asset
from flux3d.storage import Storage
from tests.http_server import Route, serve

BODY = os.urandom(300_000)
SHA = hashlib.sha256(BODY).hexdigest()


@pytest.fixture
def cfg(tmp_path):
    return load_config(overrides={"storage.root": str(tmp_path / "root"), "download.backoff_s": 0.01,
                                  "download.backoff_max_s": 0.05, "download.read_timeout_s": 0.5,
                                  "download.max_attempts": 4})


def record(url: str, sha: str | None = SHA, fmt: str = "glb", **metadata: str) -> AssetRecord:
    return AssetRecord(asset_id=make_asset_id("test", url), source="test", file_identifier=url, format=fmt,
                       sha256=sha, url=url, metadata=dict(metadata))


def files_under(path) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs)


def test_download_verifies_and_stores_content_addressed(cfg):
    storage = Storage(cfg.storage.root)
    with serve({"/a.glb": Route(BODY)}) as srv:
        res = download_asset(record(srv.url + "/a.glb"), cfg, storage)
    assert (res.state, res.columns["sha256"], res.columns["source_outcome"]) == ("ok", SHA, "found")
    assert res.columns["local_path"] == storage.path(f"raw/{SHA}.glb")
    with open(res.columns["local_path"], "rb") as f:
        assert f.read() == BODY
    assert files_under(cfg.storage.root) == [f"raw/{SHA}.glb"]  # no temporary or partial file left behind


def test_hash_mismatch_is_recorded_and_nothing_stored(cfg):
    storage = Storage(cfg.storage.root)
    with serve({"/a.glb": Route(BODY)}) as srv:
        res = download_asset(record(srv.url + "/a.glb", sha="0" * 64), cfg, storage)
    assert (res.state, res.reason, res.retryable) == ("failed", "hash_mismatch", False)
    assert files_under(cfg.storage.root) == []


def test_retries_transient_errors_then_succeeds(cfg):
    with serve({"/a.glb": Route(BODY, script=["503", "429", "500"])}) as srv:
        res = download_asset(record(srv.url + "/a.glb"), cfg, Storage(cfg.storage.root))
        assert len(srv.requests) == 4
    assert res.state == "ok"


def test_no_retry_on_404(cfg):
    with serve({}) as srv:
        res = download_asset(record(srv.url + "/gone.glb"), cfg, Storage(cfg.storage.root))
        assert len(srv.requests) == 1
    assert (res.state, res.reason, res.retryable, res.columns["source_outcome"]) == ("failed", "http_404", False,
                                                                                     "missing")


def test_transient_errors_exhausted_are_retryable_failures(cfg):
    with serve({"/a.glb": Route(BODY, script=["503"] * 10)}) as srv:
        res = download_asset(record(srv.url + "/a.glb"), cfg, Storage(cfg.storage.root))
        assert len(srv.requests) == cfg.download.max_attempts
    assert (res.state, res.reason, res.retryable) == ("failed", "http_503", True)


def test_cut_connection_resumes_with_range_request(cfg):
    with serve({"/a.glb": Route(BODY, script=["cut"])}) as srv:
        res = download_asset(record(srv.url + "/a.glb"), cfg, Storage(cfg.storage.root))
        ranges = [h.get("Range") for _, h in srv.requests]
    assert res.state == "ok" and res.columns["sha256"] == SHA
    # The second request continues from the bytes already on disk instead of starting over.
    assert ranges[0] is None and 0 < int(ranges[1].removeprefix("bytes=").rstrip("-")) <= len(BODY) // 2


def test_resume_without_range_support_starts_over(cfg):
    with serve({"/a.glb": Route(BODY, script=["cut"], support_range=False)}) as srv:
        res = download_asset(record(srv.url + "/a.glb"), cfg, Storage(cfg.storage.root))
    assert res.state == "ok" and res.columns["sha256"] == SHA


def test_stalled_server_times_out_and_is_retried(cfg):
    with serve({"/a.glb": Route(BODY, script=["stall"])}) as srv:
        srv.stall_s = 1.5
        res = download_asset(record(srv.url + "/a.glb"), cfg, Storage(cfg.storage.root))
        assert len(srv.requests) == 2
    assert res.state == "ok"


def test_identical_content_is_stored_once(cfg):
    storage = Storage(cfg.storage.root)
    with serve({"/a.glb": Route(BODY), "/mirror/a.glb": Route(BODY)}) as srv:
        r1 = download_asset(record(srv.url + "/a.glb"), cfg, storage)
        r2 = download_asset(record(srv.url + "/mirror/a.glb", sha=None), cfg, storage)
    assert r1.columns["local_path"] == r2.columns["local_path"]
    assert files_under(cfg.storage.root) == [f"raw/{SHA}.glb"]


def test_unknown_format_and_missing_local_file(cfg, tmp_path):
    storage = Storage(cfg.storage.root)
    bad = download_asset(record("http://127.0.0.1:9/x.txt", fmt="txt"), cfg, storage)
    assert (bad.state, bad.reason) == ("failed", "unsupported_format")
    local = AssetRecord(asset_id="x", source="manifest:m", file_identifier=str(tmp_path / "nope.glb"), format="glb")
    res = download_asset(local, cfg, storage)
    assert (res.state, res.reason) == ("failed", "missing_file")


# -- archives (Objaverse-XL GitHub repositories) ---------------------------------------------------------------
def _tar_gz(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tf.addfile(info)
    return buf.getvalue()


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_archive_member_download_fetches_repo_once(cfg):
    storage = Storage(cfg.storage.root)
    mesh_a, mesh_b = b"solid a\nendsolid a\n", b"solid b\nendsolid b\n"
    archive = _tar_gz({"repo-c0ffee/models/a.stl": mesh_a, "repo-c0ffee/models/b.stl": mesh_b})
    with serve({"/repo.tar.gz": Route(archive)}) as srv:
        url = srv.url + "/repo.tar.gz"
        results = [download_asset(record(url, sha=hashlib.sha256(data).hexdigest(), fmt="stl",
                                         archive_member=f"models/{name}", archive_root="repo-c0ffee"), cfg, storage)
                   for name, data in (("a.stl", mesh_a), ("b.stl", mesh_b))]
        assert len(srv.requests) == 1
        missing = download_asset(record(url, sha=None, fmt="stl", archive_member="models/zzz.stl",
                                        archive_root="repo-c0ffee"), cfg, storage)
    assert [r.state for r in results] == ["ok", "ok"]
    with open(results[1].columns["local_path"], "rb") as f:
        assert f.read() == mesh_b
    assert (missing.state, missing.reason, missing.columns["source_outcome"]) == ("failed", "missing_member",
                                                                                  "missing")


@pytest.mark.parametrize("payload, reason", [
    (lambda: _tar_gz({"repo/ok.stl": b"x", "repo/../../evil.stl": b"pwned"}), "archive_unsafe_path"),
    (lambda: _tar_gz({"/etc/evil.stl": b"pwned"}), "archive_unsafe_path"),
    (lambda: _tar_gz({"repo/ok.stl": b"x"}, links={"repo/link.stl": "../../../etc/passwd"}), "archive_link_escape"),
    (lambda: _zip({"repo/ok.stl": b"x", "../evil.stl": b"pwned"}), "archive_unsafe_path"),
    (lambda: _zip({"repo/bomb.stl": b"\0" * 50_000_000}), "archive_bomb"),
    (lambda: b"PK\x03\x04 not really a zip" * 10, "archive_corrupt"),
])
def test_unsafe_archives_are_refused_and_write_nothing(cfg, payload, reason):
    storage = Storage(cfg.storage.root)
    with serve({"/repo.tar.gz": Route(payload())}) as srv:
        res = download_asset(record(srv.url + "/repo.tar.gz", sha=None, fmt="stl", archive_member="ok.stl",
                                    archive_root="repo"), cfg, storage)
    assert (res.state, res.reason) == ("failed", reason)
    assert not os.path.exists(os.path.join(cfg.storage.root, "raw", "archives"))
    assert not os.path.exists(os.path.join(os.path.dirname(cfg.storage.root), "evil.stl"))

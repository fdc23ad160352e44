"""Objaverse 1.0 and Objaverse-XL sources, against a cache laid out exactly as the `objaverse` package writes it.

The real package code reads the cache; the only thing replaced is the socket layer, so that any attempt of the
package to reach the network fails at once (instead of hanging) and the tests prove listing is fully offline.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import socket

import objaverse
import pandas as pd
import pytest

from flux3d.config.pipeline import Config, SourcesConfig
from flux3d.sources import list_source, parse_spec
from flux3d.sources.objaverse import list_objaverse, objaverse_cache
from flux3d.sources.objaverse_xl import (
    list_objaverse_xl,
    objaverse_xl_outcome,
    parse_github_identifier,
    thingiverse_ids,
)

# uid -> metadata shard; two shards so shard-major order and per-shard reads are exercised.
UIDS = {
    "f0a1": "000-001", "0b2c": "000-001", "c3d4": "000-000", "8e5f": "000-000", "5a6b": "000-000",
}
LVIS = {"chair": ["c3d4", "0b2c"], "car_(automobile)": ["8e5f"], "Christmas_tree": ["f0a1", "c3d4"]}
SHA = {name: f"{i:064x}" for i, name in enumerate(["gh1", "gh2", "sk1", "sk2", "sm1", "th1"], start=1)}
GH_COMMIT = "ead0bed6a76012452273bbe18d12e4d68a881956"


class NetworkUsed(RuntimeError):
    pass


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Make every connection attempt (urllib, requests, fsspec http) raise NetworkUsed immediately."""
    def refuse(*args, **kwargs):
        raise NetworkUsed(f"network access attempted: {args[:2]}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def _gz_json(path: str, data: object) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        json.dump(data, f)


def _annotation(uid: str) -> dict:
    """A Sketchfab annotation with the fields Objaverse 1.0's metadata shards carry (trimmed)."""
    return {
        "uri": f"https://api.sketchfab.com/v3/models/{uid}", "uid": uid, "name": f"Model {uid}",
        "viewerUrl": f"https://sketchfab.com/3d-models/{uid}", "animationCount": 1 if uid == "8e5f" else 0,
        "faceCount": 1200, "vertexCount": 640, "tags": [], "categories": [],
        "user": {"uid": "u1", "username": f"artist_{uid}", "displayName": f"Artist {uid}",
                 "profileUrl": f"https://sketchfab.com/artist_{uid}"},
        "license": "by-nc" if uid == "5a6b" else "by",
    }


@pytest.fixture
def objaverse_dir(tmp_path) -> str:
    root = tmp_path / "objaverse"
    v1 = root / "hf-objaverse-v1"
    _gz_json(str(v1 / "object-paths.json.gz"), {uid: f"glbs/{shard}/{uid}.glb" for uid, shard in UIDS.items()})
    for shard in sorted(set(UIDS.values())):
        _gz_json(str(v1 / "metadata" / f"{shard}.json.gz"),
                 {uid: _annotation(uid) for uid, s in UIDS.items() if s == shard})
    _gz_json(str(v1 / "lvis-annotations.json.gz"), LVIS)
    return str(root)


@pytest.fixture
def xl_dir(tmp_path) -> str:
    """The four parquets objaverse.xl's downloaders read: <dir>/<sub>/<sub>.parquet."""
    root = tmp_path / "objaverse-xl"
    gh = f"https://github.com/acme/robots/blob/{GH_COMMIT}"
    rows = {
        "github": [
            (f"{gh}/models/arm v2.OBJ", "MIT License", "OBJ", SHA["gh1"], '{"stars": 3}'),
            (f"{gh}/base.glb", None, "glb", SHA["gh2"], "{}"),
        ],
        "sketchfab": [
            ("https://sketchfab.com/3d-models/c3d4", "by", "glb", SHA["sk1"], None),
            ("https://sketchfab.com/3d-models/0b2c", "by-sa", "glb", SHA["sk2"], None),
        ],
        "smithsonian": [
            ("https://3d-api.si.edu/content/document/3d_package:abc/model.glb", "CC0", "glb", SHA["sm1"], "{}"),
        ],
        "thingiverse": [
            ("https://www.thingiverse.com/thing:1234/files?fileId=5678", "Creative Commons - Attribution", "stl",
             SHA["th1"], "{}"),
        ],
    }
    for sub, items in rows.items():
        df = pd.DataFrame(items, columns=["fileIdentifier", "license", "fileType", "sha256", "metadata"])
        df.insert(1, "source", sub)
        if sub == "sketchfab":
            df = df.drop(columns="metadata")  # the downloader adds metadata="{}" itself
        os.makedirs(root / sub, exist_ok=True)
        df.to_parquet(root / sub / f"{sub}.parquet")
    return str(root)


def _cfg(objaverse_dir: str, xl_dir: str = "/nonexistent") -> SourcesConfig:
    return SourcesConfig(objaverse_dir=objaverse_dir, objaverse_xl_dir=xl_dir,
                         objaverse_base_url="https://hf.example/objaverse/",
                         github_archive_url="https://codeload.example/{org}/{repo}/tar.gz/{commit}")


def _objaverse(spec: str, cfg: SourcesConfig) -> list:
    return list(list_objaverse(parse_spec(spec), cfg))


def _xl(spec: str, cfg: SourcesConfig) -> list:
    return list(list_objaverse_xl(parse_spec(spec), cfg))


# --- Objaverse 1.0 -------------------------------------------------------------------------------------------


def test_objaverse_lists_every_uid_with_license_attribution_and_url(objaverse_dir):
    saved = (objaverse.BASE_PATH, objaverse._VERSIONED_PATH, objaverse._load_object_paths)
    recs = _objaverse("objaverse:", _cfg(objaverse_dir))
    # Shard-major, then uid: the order object paths sort in.
    assert [r.file_identifier for r in recs] == ["5a6b", "8e5f", "c3d4", "0b2c", "f0a1"]
    assert recs == _objaverse("objaverse:", _cfg(objaverse_dir))  # deterministic
    by_uid = {r.file_identifier: r for r in recs}
    r = by_uid["c3d4"]
    assert (r.source, r.format, r.sha256) == ("objaverse", "glb", None)
    assert r.url == "https://hf.example/objaverse/glbs/000-000/c3d4.glb"
    assert r.license == "by" and by_uid["5a6b"].license == "by-nc"
    assert r.attribution == "Model c3d4 by artist_c3d4 (https://sketchfab.com/3d-models/c3d4)"
    assert r.metadata["name"] == "Model c3d4"
    assert r.metadata["lvis"] == ["Christmas_tree", "chair"]
    assert "lvis" not in by_uid["5a6b"].metadata
    assert by_uid["8e5f"].metadata["animation_count"] == 1
    assert len({r.asset_id for r in recs}) == len(recs)
    # The package's module globals are back where they were.
    assert (objaverse.BASE_PATH, objaverse._VERSIONED_PATH, objaverse._load_object_paths) == saved


def test_objaverse_lvis_filter_and_limit(objaverse_dir):
    cfg = _cfg(objaverse_dir)
    assert [r.file_identifier for r in _objaverse("objaverse:lvis=chair", cfg)] == ["c3d4", "0b2c"]
    assert [r.file_identifier for r in _objaverse("objaverse:lvis=chair, car_(automobile)", cfg)] == \
        ["8e5f", "c3d4", "0b2c"]
    assert [r.file_identifier for r in _objaverse("objaverse:lvis=chair,Christmas_tree;limit=2", cfg)] == \
        ["c3d4", "0b2c"]
    assert [r.file_identifier for r in _objaverse("objaverse:limit=2", cfg)] == ["5a6b", "8e5f"]
    assert _objaverse("objaverse:limit=0", cfg) == []
    with pytest.raises(ValueError, match="close matches.*chair"):
        _objaverse("objaverse:lvis=chairs", cfg)
    with pytest.raises(ValueError, match="unknown objaverse option"):
        _objaverse("objaverse:sources=github", cfg)


def test_objaverse_limit_reads_only_the_shards_it_needs(objaverse_dir):
    os.remove(os.path.join(objaverse_dir, "hf-objaverse-v1", "metadata", "000-001.json.gz"))
    assert len(_objaverse("objaverse:limit=3", _cfg(objaverse_dir))) == 3
    with pytest.raises(ValueError, match=r"metadata/000-001\.json\.gz"):
        _objaverse("objaverse:", _cfg(objaverse_dir))


def test_objaverse_missing_cache_files_raise_instead_of_downloading(tmp_path, objaverse_dir):
    empty = str(tmp_path / "empty")
    # What we guard against: the package itself reaches for the network when a cache file is missing
    # (urllib without a timeout: a hang on a bad connection).
    with objaverse_cache(empty), pytest.raises(NetworkUsed):
        objaverse.load_uids()
    with pytest.raises(ValueError, match="object-paths.json.gz"):
        _objaverse("objaverse:", _cfg(empty))
    os.remove(os.path.join(objaverse_dir, "hf-objaverse-v1", "lvis-annotations.json.gz"))
    with pytest.raises(ValueError, match="lvis-annotations.json.gz"):
        _objaverse("objaverse:lvis=chair", _cfg(objaverse_dir))
    assert len(_objaverse("objaverse:", _cfg(objaverse_dir))) == 5  # lvis file only needed for lvis=
    with pytest.raises(ValueError, match="local folder"):
        _objaverse("objaverse:", _cfg("s3://bucket/objaverse"))


def test_list_source_dispatches_to_objaverse(objaverse_dir, xl_dir):
    cfg = Config(sources=_cfg(objaverse_dir, xl_dir))
    assert [r.file_identifier for r in list_source(parse_spec("objaverse:lvis=chair;limit=1"), cfg)] == ["c3d4"]
    xl = list(list_source(parse_spec("objaverse-xl:sources=smithsonian"), cfg))
    assert [r.source for r in xl] == ["objaverse-xl:smithsonian"]


# --- Objaverse-XL --------------------------------------------------------------------------------------------


def test_xl_records_per_subsource(objaverse_dir, xl_dir):
    recs = {r.file_identifier: r for r in _xl("objaverse-xl:", _cfg(objaverse_dir, xl_dir))}
    assert len(recs) == 6

    gh = recs[f"https://github.com/acme/robots/blob/{GH_COMMIT}/models/arm v2.OBJ"]
    assert (gh.source, gh.format, gh.sha256, gh.license) == ("objaverse-xl:github", "obj", SHA["gh1"], "MIT License")
    assert gh.url == f"https://codeload.example/acme/robots/tar.gz/{GH_COMMIT}"
    assert gh.metadata["archive_member"] == "models/arm v2.OBJ"
    assert gh.metadata["archive_root"] == f"robots-{GH_COMMIT}"
    assert gh.metadata["xl_source"] == "github" and gh.metadata["xl_metadata"] == {"stars": 3}
    assert "acme/robots" in gh.attribution and GH_COMMIT in gh.attribution
    assert recs[f"https://github.com/acme/robots/blob/{GH_COMMIT}/base.glb"].license is None

    sk = recs["https://sketchfab.com/3d-models/c3d4"]
    assert sk.url == "https://hf.example/objaverse/glbs/000-000/c3d4.glb"
    assert (sk.format, sk.sha256, sk.license) == ("glb", SHA["sk1"], "by")
    assert "https://sketchfab.com/3d-models/c3d4" in sk.attribution and "xl_metadata" not in sk.metadata

    sm = recs["https://3d-api.si.edu/content/document/3d_package:abc/model.glb"]
    assert sm.url == sm.file_identifier and sm.license == "CC0" and sm.metadata["xl_source"] == "smithsonian"

    th = recs["https://www.thingiverse.com/thing:1234/files?fileId=5678"]
    assert th.url == "https://www.thingiverse.com/download:5678"
    assert (th.format, th.metadata["thing_id"], th.metadata["file_id"]) == ("stl", "1234", "5678")
    assert th.license == "Creative Commons - Attribution" and "thing:1234" in th.attribution


def test_xl_sources_filter_order_and_limit(objaverse_dir, xl_dir):
    cfg = _cfg(objaverse_dir, xl_dir)
    recs = _xl("objaverse-xl:", cfg)
    assert recs == _xl("objaverse-xl:", cfg)
    assert [r.source.split(":")[1] for r in recs] == \
        ["github", "github", "sketchfab", "sketchfab", "smithsonian", "thingiverse"]
    ids = [r.file_identifier for r in recs]
    assert ids[:2] == sorted(ids[:2]) and ids[2:4] == sorted(ids[2:4])

    picked = _xl("objaverse-xl:sources=thingiverse, smithsonian", cfg)
    assert [r.source for r in picked] == ["objaverse-xl:smithsonian", "objaverse-xl:thingiverse"]
    assert [r.file_identifier for r in _xl("objaverse-xl:limit=3", cfg)] == ids[:3]  # limit spans sub-sources
    with pytest.raises(ValueError, match="sources="):
        _xl("objaverse-xl:sources=github,objaverse", cfg)
    with pytest.raises(ValueError, match="unknown objaverse-xl option"):
        _xl("objaverse-xl:lvis=chair", cfg)


def test_xl_missing_cache_files_raise(tmp_path, objaverse_dir, xl_dir):
    # No object-paths mapping: sketchfab cannot get URLs, and the check fails before anything is listed.
    no_v1 = _cfg(str(tmp_path / "no-objaverse"), xl_dir)
    with pytest.raises(ValueError, match="object-paths.json.gz"):
        _xl("objaverse-xl:sources=github,sketchfab", no_v1)
    assert len(_xl("objaverse-xl:sources=github", no_v1)) == 2  # not needed without sketchfab

    os.remove(os.path.join(xl_dir, "thingiverse", "thingiverse.parquet"))
    with pytest.raises(ValueError, match=r"thingiverse/thingiverse\.parquet"):
        _xl("objaverse-xl:", _cfg(objaverse_dir, xl_dir))
    # The package would have fetched it (requests.get, no timeout) - the network guard shows the attempt.
    from objaverse.xl import downloaders

    with pytest.raises(NetworkUsed):
        downloaders["thingiverse"].get_annotations(download_dir=xl_dir)


def test_xl_sketchfab_uid_not_in_objaverse_is_skipped_with_a_warning(objaverse_dir, xl_dir, caplog):
    path = os.path.join(xl_dir, "sketchfab", "sketchfab.parquet")
    df = pd.read_parquet(path)
    df.loc[len(df)] = ["https://sketchfab.com/3d-models/ffff", "sketchfab", "by", "glb", "e" * 64]
    df.to_parquet(path)
    with caplog.at_level(logging.WARNING):
        recs = _xl("objaverse-xl:sources=sketchfab", _cfg(objaverse_dir, xl_dir))
    assert [r.file_identifier.rsplit("/", 1)[1] for r in recs] == ["0b2c", "c3d4"]
    assert "1 object(s) are not in Objaverse 1.0" in caplog.text


def test_identifier_parsers():
    assert parse_github_identifier(f"https://github.com/o/r/blob/{GH_COMMIT}/a/b/c.glb") == \
        ("o", "r", GH_COMMIT, "a/b/c.glb")
    for bad in ("https://github.com/o/r/tree/c/x.glb", "https://gitlab.com/o/r/blob/c/x.glb",
                f"https://github.com/o/r/blob/{GH_COMMIT}/"):
        with pytest.raises(ValueError, match="GitHub blob URL"):
            parse_github_identifier(bad)
    assert thingiverse_ids("https://www.thingiverse.com/thing:42/files?fileId=7") == ("42", "7")
    with pytest.raises(ValueError, match="Thingiverse"):
        thingiverse_ids("https://www.thingiverse.com/thing:42")


def test_objaverse_xl_outcome():
    a, b = "ab" * 32, "cd" * 32
    assert objaverse_xl_outcome(a, a, 200) == "found"
    assert objaverse_xl_outcome(a, a.upper(), None) == "found"  # hex case is not a difference
    assert objaverse_xl_outcome(None, a, 200) == "found"  # nothing published to contradict
    assert objaverse_xl_outcome(a, b, 200) == "modified"
    assert objaverse_xl_outcome(a, None, 404) == "missing"
    assert objaverse_xl_outcome(a, None, 200) == "missing"  # archive fetched, member absent
    assert objaverse_xl_outcome(a, None, None) == "missing"
    with pytest.raises(ValueError, match="contradictory"):
        objaverse_xl_outcome(a, a, 404)

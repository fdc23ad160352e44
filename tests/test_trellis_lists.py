"""TRELLIS-500K's six published lists through listing, download and inspect, in the published column layout
(sha256, file_identifier, aesthetic_score, captions as a JSON list), against the real layouts: a loopback server
holding Objaverse 1.0 object paths and GitHub repository archives at commits, and hand-unpacked dataset roots."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile

import pandas as pd
import pytest
import trimesh

from flux3d.catalog import Catalog
from flux3d.config.load import load_config
from flux3d.demo import _checker, _sphere_obj, _textured_box_glb
from flux3d.pipeline.ingest import ingest, list_sources, run_download
from flux3d.storage import Storage
from tests.http_server import Route, serve
from tests.test_ingest import flux3d
from tests.test_inspect import MAKE_BLEND
from tests.test_sources_objaverse import _gz_json

C1, C2 = "ead0bed6a76012452273bbe18d12e4d68a881956", "0123456789abcdef0123456789abcdef01234567"
UID_OK, UID_BAD, UID_GONE = "0a1b2c3d4e5f60718293a4b5c6d7e8f9", "ffeeddccbbaa99887766554433221100", "1" * 32
BOX = _textured_box_glb()
CONE = trimesh.creation.cone(radius=0.4, height=1.0).export(file_type="glb")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_list(path: str, rows: list[tuple[str, str, float]]) -> str:
    """A list in TRELLIS-500K's layout; captions are a JSON list per row, as published."""
    pd.DataFrame([{"sha256": s, "file_identifier": fid, "aesthetic_score": score,
                   "captions": json.dumps([f"a {os.path.basename(fid)}", "an object"])} for s, fid, score in rows]
                 ).to_csv(path, index=False)
    return path


def repo_zip(root: str, members: dict[str, bytes]) -> bytes:
    """A repository archive as GitHub serves it at a commit: every path under one <repo>-<commit>/ folder."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(f"{root}/{name}", data)
    return buf.getvalue()


def rows_of(cfg) -> dict[str, dict]:
    return {r["file_identifier"]: r for r in Catalog(Storage(cfg.storage.root)).table().to_pylist()}


def test_objaverse_xl_lists_resolve_fetch_verify_and_inspect(tmp_path):
    cache = str(tmp_path / "objaverse")
    _gz_json(os.path.join(cache, "hf-objaverse-v1", "object-paths.json.gz"),
             {u: f"glbs/000-012/{u}.glb" for u in (UID_OK, UID_BAD)})
    page = "https://sketchfab.com/3d-models/"
    sketchfab = write_list(str(tmp_path / "ObjaverseXL_sketchfab.csv"), [
        (sha(BOX), f"{page}wooden-chair-{UID_OK}", 6.1),
        (sha(BOX), f"{page}broken-lamp-{UID_BAD}", 5.9),  # the hub serves other bytes than listed
        ("2" * 64, f"{page}gone-{UID_GONE}", 5.6),  # not hosted by Objaverse 1.0
        ("3" * 64, f"{page}no-uid-here", 5.6)])
    blob = "https://github.com/acme/robots/blob"
    github = write_list(str(tmp_path / "ObjaverseXL_github.csv"), [
        (sha(BOX), f"{blob}/{C1}/models/box.glb", 6.0),
        (sha(CONE), f"{blob}/{C1}/models/cone.glb", 5.7),
        ("4" * 64, f"{blob}/{C1}/models/changed.glb", 5.8),
        ("5" * 64, f"{blob}/{C1}/models/gone.glb", 5.8),
        (sha(CONE), f"{blob}/{C2}/cone v2.glb", 5.5)])  # another commit: another archive
    routes = {f"/glbs/000-012/{UID_OK}.glb": Route(BOX), f"/glbs/000-012/{UID_BAD}.glb": Route(CONE),
              f"/acme/robots/archive/{C1}.zip": Route(repo_zip(f"robots-{C1}", {
                  "models/box.glb": BOX, "models/cone.glb": CONE, "models/changed.glb": BOX, "README.md": b"hi"})),
              f"/acme/robots/archive/{C2}.zip": Route(repo_zip(f"robots-{C2}", {"cone v2.glb": CONE}))}
    with serve(routes) as srv:
        cfg = load_config(overrides={"storage.root": str(tmp_path / "root"), "sources.objaverse_dir": cache,
                                     "sources.objaverse_base_url": srv.url + "/",
                                     "sources.github_archive_url": srv.url + "/{org}/{repo}/archive/{commit}.zip"})
        summary = ingest(cfg, [f"trellis:{sketchfab}", f"trellis:{github}"])
        fetched = [path for path, _ in srv.requests]
    assert summary.listed == {f"trellis:{sketchfab}": 4, f"trellis:{github}": 5}
    assert sorted(fetched) == sorted(routes)  # each glb once, each repo@commit archive exactly once
    rows = rows_of(cfg)
    ok = rows[f"{page}wooden-chair-{UID_OK}"]
    assert (ok["source"], ok["download_state"], ok["source_outcome"], ok["inspect_state"]) == \
        ("trellis:ObjaverseXL_sketchfab", "ok", "found", "ok")
    meta = json.loads(ok["metadata"])
    assert (meta["uid"], meta["aesthetic_score"], meta["captions"]) == (UID_OK, 6.1, [f"a wooden-chair-{UID_OK}",
                                                                                      "an object"])
    assert (rows[f"{page}broken-lamp-{UID_BAD}"]["download_reason"]) == "hash_mismatch"
    for fid in (f"{page}gone-{UID_GONE}", f"{page}no-uid-here"):
        assert (rows[fid]["download_state"], rows[fid]["download_reason"]) == ("failed", "unresolved")
    assert "object-paths" in rows[f"{page}gone-{UID_GONE}"]["download_message"]
    box, cone = rows[f"{blob}/{C1}/models/box.glb"], rows[f"{blob}/{C1}/models/cone.glb"]
    assert (box["sha256"], box["source_outcome"], box["inspect_state"]) == (sha(BOX), "found", "ok")
    assert (cone["inspect_state"], cone["inspect_reason"]) == ("rejected", "untextured")
    assert rows[f"{blob}/{C1}/models/changed.glb"]["download_reason"] == "hash_mismatch"
    assert rows[f"{blob}/{C1}/models/gone.glb"]["download_reason"] == "missing_member"
    assert rows[f"{blob}/{C2}/cone v2.glb"]["download_state"] == "ok"

    status = flux3d("status", "--root", cfg.storage.root, "--json")
    lists = json.loads(status.stdout)["reproduction"]["lists"]
    assert lists["ObjaverseXL_sketchfab"] == {"listed": 4, "resolved": 2, "downloaded": 1, "sha256_matched": 1,
                                              "inspected_ok": 1, "rendered": 0, "kept": 0,
                                              "trellis_published": 168_307}
    assert lists["ObjaverseXL_github"] == {"listed": 5, "resolved": 5, "downloaded": 3, "sha256_matched": 3,
                                           "inspected_ok": 1, "rendered": 0, "kept": 0,
                                           "trellis_published": 311_843}
    text = flux3d("status", "--root", cfg.storage.root).stdout
    assert "| ObjaverseXL_github | 5 | 5 | 3 | 3 | 1 | 0 | 0 | 311,843 |" in text and "360,000" in text


def test_a_repo_archive_listed_1000_times_is_fetched_once(tmp_path):
    files = {f"parts/p{i:04d}.stl": f"solid p{i}\nendsolid p{i}\n".encode() for i in range(1000)}
    listed = write_list(str(tmp_path / "ObjaverseXL_github.csv"),
                        [(sha(data), f"https://github.com/acme/big/blob/{C1}/{name}", 5.5)
                         for name, data in files.items()])
    with serve({f"/acme/big/archive/{C1}.zip": Route(repo_zip(f"big-{C1}", files))}) as srv:
        cfg = load_config(overrides={"storage.root": str(tmp_path / "root"), "ingest.batch_size": 500,
                                     "sources.github_archive_url": srv.url + "/{org}/{repo}/archive/{commit}.zip"})
        storage = Storage(cfg.storage.root)
        catalog = Catalog(storage)
        list_sources(cfg, catalog, [f"trellis:{listed}"])
        run = run_download(cfg, storage, catalog)
        assert len(srv.requests) == 1
    assert run.processed == 1000
    table = catalog.table().to_pylist()
    assert {(r["download_state"], r["source_outcome"]) for r in table} == {("ok", "found")}


def _local_roots(tmp_path) -> dict[str, str]:
    """Each dataset unpacked as its official archive unpacks."""
    abo = tmp_path / "abo" / "3dmodels" / "original" / "B"
    abo.mkdir(parents=True)
    (abo / "B07B4DBBVX.glb").write_bytes(BOX)
    (abo / "B000000000.glb").write_bytes(CONE)
    future = tmp_path / "future" / "3D-FUTURE-model" / "0a1b-chair"
    future.mkdir(parents=True)
    _sphere_obj(str(future))
    os.rename(future / "striped_sphere.obj", future / "raw_model.obj")
    _checker(seed=3).save(future / "image.jpg")
    hssd = tmp_path / "hssd" / "objects" / "1"
    hssd.mkdir(parents=True)
    (hssd / "1a2b.glb").write_bytes(BOX)
    toys = tmp_path / "toys4k" / "toys4k_blend_files" / "airplane" / "airplane_000"
    toys.mkdir(parents=True)
    subprocess.run([sys.executable, "-c", MAKE_BLEND, str(toys / "airplane_000.blend"), str(tmp_path / "ran")],
                   check=True, capture_output=True, timeout=120)
    return {"abo_dir": str(tmp_path / "abo"), "future3d_dir": str(tmp_path / "future"),
            "hssd_dir": str(tmp_path / "hssd"), "toys4k_dir": str(tmp_path / "toys4k")}


@pytest.mark.integration
def test_hand_downloaded_datasets_resolve_under_their_roots(tmp_path):
    roots = _local_roots(tmp_path)
    future = os.path.join(roots["future3d_dir"], "3D-FUTURE-model", "0a1b-chair")
    with open(os.path.join(future, "image.jpg"), "rb") as f:
        image_sha = sha(f.read())
    blend = os.path.join(roots["toys4k_dir"], "toys4k_blend_files", "airplane", "airplane_000", "airplane_000.blend")
    with open(blend, "rb") as f:
        blend_sha = sha(f.read())
    lists = {
        "ABO": [(sha(BOX), "B/B07B4DBBVX.glb", 4.9), ("6" * 64, "B/B000000000.glb", 4.6),
                ("7" * 64, "../../../etc/passwd.glb", 4.6)],
        "3D-FUTURE": [(image_sha, "3D-FUTURE-model/0a1b-chair", 5.0)],  # TRELLIS hashes the image beside the mesh
        "HSSD": [(sha(BOX), "objects/1/1a2b.glb", 4.7), ("8" * 64, "objects/9/absent.glb", 4.7)],
        "Toys4k": [(blend_sha, "airplane/airplane_000/airplane_000.blend", 4.8)],
    }
    specs = [f"trellis:{write_list(str(tmp_path / f'{name}.csv'), rows)}" for name, rows in lists.items()]
    cfg = load_config(overrides={"storage.root": str(tmp_path / "root"),
                                 **{f"sources.{k}": v for k, v in roots.items()}})
    ingest(cfg, specs)
    rows = rows_of(cfg)
    abo = rows["B/B07B4DBBVX.glb"]
    assert (abo["source"], abo["download_state"], abo["inspect_state"]) == ("trellis:ABO", "ok", "ok")
    assert abo["local_path"] == os.path.join(roots["abo_dir"], "3dmodels", "original", "B", "B07B4DBBVX.glb")
    assert rows["B/B000000000.glb"]["download_reason"] == "hash_mismatch"
    assert rows["../../../etc/passwd.glb"]["download_reason"] == "unresolved"
    chair = rows["3D-FUTURE-model/0a1b-chair"]
    assert (chair["download_state"], chair["source_outcome"], chair["inspect_state"]) == ("ok", "found", "ok")
    assert chair["local_path"].endswith("0a1b-chair/raw_model.obj") and chair["format"] == "obj"
    assert chair["sha256"] == image_sha  # keyed as the list keys it, so later stages join on the listed hash
    assert rows["objects/1/1a2b.glb"]["inspect_state"] == "ok"
    absent = rows["objects/9/absent.glb"]
    assert (absent["download_reason"], absent["download_retryable"]) == ("missing_file", True)  # still unpacking?
    toy = rows["airplane/airplane_000/airplane_000.blend"]
    assert (toy["download_state"], toy["format"], toy["inspect_state"], toy["inspect_reason"]) == \
        ("ok", "blend", "rejected", "untextured")


def test_missing_roots_and_unknown_lists_say_what_to_do(tmp_path):
    listed = write_list(str(tmp_path / "3D-FUTURE.csv"), [("0" * 64, "3D-FUTURE-model/x", 5.0)])
    cfg = load_config(overrides={"storage.root": str(tmp_path / "root")})
    with pytest.raises(ValueError, match=r"3D-FUTURE-model\.zip.*sources\.future3d_dir"):
        ingest(cfg, [f"trellis:{listed}"])
    cfg = load_config(overrides={"storage.root": str(tmp_path / "root"), "sources.future3d_dir": str(tmp_path)})
    with pytest.raises(ValueError, match=r"3D-FUTURE-model does not exist"):
        ingest(cfg, [f"trellis:{listed}"])
    other = write_list(str(tmp_path / "my_list.csv"), [("0" * 64, "x.glb", 5.0)])
    with pytest.raises(ValueError, match=r"ObjaverseXL_github\.csv"):
        ingest(cfg, [f"trellis:{other}"])
    with pytest.raises(ValueError, match="unknown key"):
        load_config(overrides={"sources.abo_root": "/x"})

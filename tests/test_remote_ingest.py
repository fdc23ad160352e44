"""Remote sources through the whole ingest (Objaverse 1.0, Objaverse-XL GitHub, URL manifests): listing from the
objaverse package's cache layout, a loopback HTTP server standing in for the hub, GitHub and dataset hosts, then
download + inspect for real."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile

import pandas as pd
import trimesh

from flux3d.catalog import Catalog
from flux3d.config.load import load_config
from flux3d.demo import _textured_box_glb
from flux3d.pipeline.ingest import ingest
from flux3d.storage import Storage
from tests.http_server import Route, serve
from tests.test_sources_objaverse import _annotation, _gz_json

COMMIT = "ead0bed6a76012452273bbe18d12e4d68a881956"


def _objaverse_cache(root: str, uids: dict[str, str]) -> None:
    v1 = os.path.join(root, "hf-objaverse-v1")
    _gz_json(os.path.join(v1, "object-paths.json.gz"), {uid: f"glbs/000-000/{uid}.glb" for uid in uids})
    _gz_json(os.path.join(v1, "metadata", "000-000.json.gz"), {uid: _annotation(uid) for uid in uids})
    _gz_json(os.path.join(v1, "lvis-annotations.json.gz"), {"box": list(uids)})


def test_objaverse_1_0_listing_download_inspect(tmp_path):
    glb = _textured_box_glb()
    cone = trimesh.creation.cone(radius=0.4, height=1.0).export(file_type="glb")
    cache = str(tmp_path / "objaverse")
    _objaverse_cache(cache, {"aa11": "", "bb22": "", "cc33": ""})
    routes = {"/glbs/000-000/aa11.glb": Route(glb, script=["503"]),  # transient: retried
              "/glbs/000-000/bb22.glb": Route(cone)}  # cc33: 404 upstream
    with serve(routes) as srv:
        cfg = load_config(overrides={"storage.root": str(tmp_path / "root"), "sources.objaverse_dir": cache,
                                     "sources.objaverse_base_url": srv.url, "download.backoff_s": 0.01,
                                     "download.backoff_max_s": 0.02})
        summary = ingest(cfg, ["objaverse:lvis=box"])
    assert summary.listed == {"objaverse:lvis=box": 3}
    rows = {r["file_identifier"]: r for r in Catalog(Storage(cfg.storage.root)).table().to_pylist()}
    assert rows["aa11"]["sha256"] == hashlib.sha256(glb).hexdigest()  # hash established by the download
    assert (rows["aa11"]["inspect_state"], rows["aa11"]["license"]) == ("ok", "by")
    assert (rows["bb22"]["inspect_state"], rows["bb22"]["inspect_reason"]) == ("rejected", "untextured")
    assert (rows["cc33"]["download_state"], rows["cc33"]["download_reason"]) == ("failed", "http_404")
    assert rows["cc33"]["source_outcome"] == "missing"


def test_objaverse_xl_github_archive_found_modified_missing(tmp_path):
    good = _textured_box_glb()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in ((f"robots-{COMMIT}/models/box.glb", good), (f"robots-{COMMIT}/models/old.glb", good)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    xl = tmp_path / "xl"
    (xl / "github").mkdir(parents=True)
    blob = f"https://github.com/acme/robots/blob/{COMMIT}/models"
    pd.DataFrame([(f"{blob}/box.glb", "github", "MIT", "glb", hashlib.sha256(good).hexdigest(), "{}"),
                  (f"{blob}/old.glb", "github", "MIT", "glb", "0" * 64, "{}"),  # the repo changed since
                  (f"{blob}/gone.glb", "github", "MIT", "glb", "1" * 64, "{}")],
                 columns=["fileIdentifier", "source", "license", "fileType", "sha256", "metadata"]
                 ).to_parquet(xl / "github" / "github.parquet")
    with serve({f"/acme/robots/{COMMIT}.tar.gz": Route(buf.getvalue())}) as srv:
        cfg = load_config(overrides={"storage.root": str(tmp_path / "root"), "sources.objaverse_xl_dir": str(xl),
                                     "sources.github_archive_url": srv.url + "/{org}/{repo}/{commit}.tar.gz"})
        ingest(cfg, ["objaverse-xl:sources=github"])
        assert len(srv.requests) == 1  # one archive download serves every object of the repository
    rows = {os.path.basename(r["file_identifier"]): r for r in Catalog(Storage(cfg.storage.root)).table().to_pylist()}
    assert (rows["box.glb"]["source_outcome"], rows["box.glb"]["inspect_state"]) == ("found", "ok")
    assert (rows["old.glb"]["download_state"], rows["old.glb"]["download_reason"],
            rows["old.glb"]["source_outcome"]) == ("failed", "hash_mismatch", "modified")
    assert (rows["gone.glb"]["download_reason"], rows["gone.glb"]["source_outcome"]) == ("missing_member", "missing")


def test_manifest_urls_and_paths_through_ingest(tmp_path):
    glb = _textured_box_glb()
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "box.glb").write_bytes(glb)
    with serve({"/ABO/box.glb": Route(glb, script=["500"]), "/ABO/evil.glb": Route(b"not what the list says")}) as srv:
        manifest = tmp_path / "ABO.csv"
        sha = hashlib.sha256(glb).hexdigest()
        manifest.write_text("sha256,file_identifier,license,aesthetic_score\n"
                            f"{sha},{srv.url}/ABO/box.glb,CC-BY-4.0,5.0\n"
                            f"{sha},local/box.glb,CC-BY-4.0,5.0\n"
                            f"{'2' * 64},{srv.url}/ABO/evil.glb,CC-BY-4.0,3.0\n"
                            f"{'3' * 64},{srv.url}/ABO/gone.glb,CC-BY-4.0,3.0\n")
        cfg = load_config(overrides={"storage.root": str(tmp_path / "root"), "download.backoff_s": 0.01,
                                     "download.backoff_max_s": 0.02})
        summary = ingest(cfg, [f"manifest:{manifest}"])
    rows = {r["file_identifier"].rsplit("/", 1)[-1] + ("@url" if r["url"] else ""): r
            for r in Catalog(Storage(cfg.storage.root)).table().to_pylist()}
    assert rows["box.glb@url"]["inspect_state"] == rows["box.glb"]["inspect_state"] == "ok"
    assert rows["box.glb@url"]["source"] == "manifest:ABO" and rows["box.glb@url"]["license"] == "CC-BY-4.0"
    assert rows["evil.glb@url"]["download_reason"] == "hash_mismatch"
    assert rows["gone.glb@url"]["download_reason"] == "http_404"
    # Two listings of one file: one inspection serves both rows.
    assert summary.stages[1].processed == 1

"""`trellis:FILE`: the lists TRELLIS-500K publishes (hf://datasets/JeffreyXiang/TRELLIS-500K), ingested as published.

The file's stem names the list: ObjaverseXL_sketchfab, ObjaverseXL_github, ABO, 3D-FUTURE, HSSD or Toys4k (.csv,
.csv.gz or .parquet). Columns: sha256, file_identifier, aesthetic_score, captions (a JSON list of strings). Each
identifier is resolved the way its dataset is really fetched:

    ObjaverseXL_sketchfab  https://sketchfab.com/3d-models/<slug>-<uid>, a web page: the asset is the Objaverse 1.0
                           glb of <uid>, <objaverse_base_url>/<its path in object-paths.json.gz>
    ObjaverseXL_github     https://github.com/<org>/<repo>/blob/<commit>/<path>, a web page: the asset is member
                           <path> of the repository archive at <commit>, fetched once per repo@commit
    ABO                    <abo_dir>/3dmodels/original/<file_identifier>
    3D-FUTURE              <future3d_dir>/<file_identifier>/raw_model.obj; the listed sha256 is that of image.jpg
                           beside it, which is the file TRELLIS hashes, and stays the asset's key as in TRELLIS
    HSSD                   <hssd_dir>/<file_identifier>
    Toys4k                 <toys4k_dir>/toys4k_blend_files/<file_identifier>

The four archive datasets are downloaded by hand once (some behind a licence form); a list whose folder is not
configured or not unpacked fails at once with what to download and where to put it. A row that cannot be resolved
(a malformed identifier, a uid Objaverse 1.0 does not host) is still listed, with the reason in metadata
`unresolved`, so the download stage records it (`failed:unresolved`) and the reproduction report counts it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from flux3d.config.pipeline import SourcesConfig
from flux3d.records import AssetRecord, make_asset_id
from flux3d.sources import ASSET_EXTENSIONS
from flux3d.sources.manifest import clean_cell, read_manifest
from flux3d.sources.objaverse import load_object_paths
from flux3d.sources.objaverse_xl import github_location

SKETCHFAB, GITHUB = "ObjaverseXL_sketchfab", "ObjaverseXL_github"
# Objects per list after TRELLIS's aesthetic threshold (5.5 Objaverse-XL, 4.5 the others), from its DATASET.md:
# 500,777 for training, plus Toys4k's 3,229 for evaluation. The paper curates ~360K from the same lists.
PUBLISHED_COUNTS = {SKETCHFAB: 168_307, GITHUB: 311_843, "ABO": 4_485, "3D-FUTURE": 9_472, "HSSD": 6_670,
                    "Toys4k": 3_229}
PAPER_CURATED = 360_000
_UID = re.compile(r"([0-9a-f]{32})/?$")


@dataclass(frozen=True, slots=True)
class LocalDataset:
    """Where a hand-downloaded dataset's files lie once its official archive is unpacked under a root folder."""

    root_field: str
    """The `[sources]` field holding the root."""
    marker: str
    """Folder that exists under the root once the archive is unpacked (checked before listing)."""
    asset: str
    """The asset's path under the root; {id} is the list's file_identifier."""
    hashed: str
    """The file whose sha256 the list carries."""
    fetch: str
    """What to download and from where (quoted in the error when the root is missing)."""


LOCAL_DATASETS = {
    "ABO": LocalDataset("abo_dir", "3dmodels/original", "3dmodels/original/{id}", "3dmodels/original/{id}",
                        "abo-3dmodels.tar from https://amazon-berkeley-objects.s3.amazonaws.com/archives/"
                        "abo-3dmodels.tar (tar -xf it in the folder)"),
    "3D-FUTURE": LocalDataset("future3d_dir", "3D-FUTURE-model", "{id}/raw_model.obj", "{id}/image.jpg",
                              "3D-FUTURE-model.zip, after the licence form at https://tianchi.aliyun.com/"
                              "specials/promotion/alibaba-3d-future (unzip it in the folder)"),
    "HSSD": LocalDataset("hssd_dir", "objects", "{id}", "{id}",
                         "the Hugging Face dataset hssd/hssd-models, after accepting its terms (huggingface-cli "
                         "download hssd/hssd-models --repo-type dataset --local-dir FOLDER)"),
    "Toys4k": LocalDataset("toys4k_dir", "toys4k_blend_files", "toys4k_blend_files/{id}", "toys4k_blend_files/{id}",
                           "toys4k_blend_files.zip, linked from https://github.com/rehg-lab/lowshot-shapebias/tree/"
                           "main/toys4k (unzip it in the folder)"),
}
LISTS = (SKETCHFAB, GITHUB, *LOCAL_DATASETS)


def list_name(path: str) -> str:
    name = os.path.basename(path).split(".")[0]
    if name not in LISTS:
        raise ValueError(f"trellis list {path!r}: the file name must be one of TRELLIS-500K's lists "
                         f"{[f'{n}.csv' for n in LISTS]} (it decides how identifiers are resolved)")
    return name


def dataset_root(name: str, cfg: SourcesConfig) -> str:
    """The unpacked dataset's folder; ValueError naming what to download and where when it is not there."""
    ds = LOCAL_DATASETS[name]
    root = getattr(cfg, ds.root_field)
    where = os.path.abspath(os.path.expanduser(root)) if root else ""
    if not where or not os.path.isdir(os.path.join(where, ds.marker)):
        found = f"{where}/{ds.marker} does not exist" if where else f"sources.{ds.root_field} is not set"
        raise ValueError(f"{name}.csv names files inside {name}'s official archive, which is downloaded by hand "
                         f"({found}). Download {ds.fetch}, so that FOLDER/{ds.marker}/ exists, then set "
                         f"sources.{ds.root_field} = \"FOLDER\" in the run's TOML config ([sources] section).")
    return where


def parse_captions(value: Any) -> list[str] | None:
    """The captions cell: a JSON list of strings; None when absent or not such a list (the raw text is kept)."""
    if isinstance(value, list):
        return [str(c) for c in value]
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        return None
    return [str(c) for c in parsed] if isinstance(parsed, list) else None


def sketchfab_uid(identifier: str) -> str:
    """The Objaverse uid of a Sketchfab model page: the trailing 32 hex characters of its slug."""
    m = _UID.search(identifier.lower())
    if not identifier.startswith("https://sketchfab.com/") or m is None:
        raise ValueError(f"not a Sketchfab model URL ending in a 32-hex uid: {identifier!r}")
    return m.group(1)


def _resolve(name: str, fid: str, cfg: SourcesConfig, object_paths: dict[str, str] | None, root: str | None
             ) -> tuple[str | None, str, str | None, dict[str, Any]]:
    """(url, format, attribution, extra metadata) of one row; ValueError when the identifier cannot be resolved."""
    if name == SKETCHFAB:
        assert object_paths is not None
        uid = sketchfab_uid(fid)
        if uid not in object_paths:
            raise ValueError(f"uid {uid} is not in Objaverse 1.0's object-paths.json.gz")
        url = f"{cfg.objaverse_base_url.rstrip('/')}/{object_paths[uid]}"
        return url, "glb", f"Sketchfab model {fid}", {"uid": uid, "object_path": object_paths[uid]}
    if name == GITHUB:
        url, attribution, extra = github_location(fid, cfg)
        return url, _format(extra["archive_member"]), attribution, extra
    assert root is not None
    ds = LOCAL_DATASETS[name]
    path = os.path.normpath(os.path.join(root, ds.asset.format(id=fid)))
    if not path.startswith(root + os.sep):
        raise ValueError(f"identifier {fid!r} points outside {root}")
    extra = {"local_file": path}
    if ds.hashed != ds.asset:
        extra["sha256_of"] = os.path.normpath(os.path.join(root, ds.hashed.format(id=fid)))
    return None, _format(path), f"{name} ({fid})", extra


def _format(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    return ASSET_EXTENSIONS.get(ext, ext.lstrip("."))


def list_trellis(path: str, cfg: SourcesConfig) -> Iterator[AssetRecord]:
    """Records of one published list, in its row order; every row becomes a record (see `unresolved`)."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        raise ValueError(f"trellis list {path!r} does not exist")
    name = list_name(path)
    table = read_manifest(path)
    if "sha256" not in table.column_names:
        raise ValueError(f"trellis list {path!r} has no sha256 column (has {table.column_names})")
    # Everything a listing needs is checked before the first record, so a bad setup fails before any work.
    root = dataset_root(name, cfg) if name in LOCAL_DATASETS else None
    object_paths = load_object_paths(cfg.objaverse_dir) if name == SKETCHFAB else None
    source = f"trellis:{name}"
    rows = (row for batch in table.to_batches() for row in batch.to_pylist())  # 300K rows of captions: not at once
    for row in rows:
        row = {k: clean_cell(v) for k, v in row.items()}
        fid = str(row["file_identifier"])
        sha = row.get("sha256")
        metadata: dict[str, Any] = {"trellis_list": name}
        if row.get("aesthetic_score") is not None:
            metadata["aesthetic_score"] = float(row["aesthetic_score"])
        captions = parse_captions(row.get("captions"))
        if captions is not None:
            metadata["captions"] = captions
        elif row.get("captions"):
            metadata["captions_raw"] = str(row["captions"])
        try:
            url, fmt, attribution, extra = _resolve(name, fid, cfg, object_paths, root)
        except ValueError as e:
            fmt = "glb" if name == SKETCHFAB else _format(fid)
            url, attribution, extra = None, None, {"unresolved": str(e)}
        yield AssetRecord(
            asset_id=make_asset_id(source, fid),
            source=source,
            file_identifier=fid,
            format=fmt,
            sha256=sha.lower() if isinstance(sha, str) and sha else None,
            url=url,
            attribution=attribution,
            metadata={**metadata, **extra},
        )

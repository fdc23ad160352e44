"""`objaverse-xl:[sources=a,b][;limit=N]`: Objaverse-XL listed from the `objaverse.xl` annotation parquets.

Each sub-source's downloader reads `<objaverse_xl_dir>/<sub>/<sub>.parquet` (github, sketchfab, smithsonian,
thingiverse) with columns fileIdentifier, source, license, fileType, sha256, metadata. A missing parquet is fetched
by the package with `requests.get` and no timeout, and `objaverse.xl.get_annotations` fetches all four; so this
module checks the selected files exist and calls only the selected sub-sources' `get_annotations`, keeping a
listing offline or failing at once with the file to fetch.

Each record gets the URL the download stage fetches, built the way the package's own downloaders build it:

    sketchfab    Objaverse 1.0 glb: <objaverse_base_url>/<object path of the uid>   (uid = last path part)
    smithsonian  the fileIdentifier itself (a direct glb URL)
    thingiverse  https://www.thingiverse.com/download:<fileId>                      (fileId from ...?fileId=N)
    github       <github_archive_url> of org/repo at the commit (a tar.gz); the file is the archive member
                 <repo>-<commit>/<path>, recorded as metadata archive_root + archive_member
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from typing import Any

import pandas as pd

from flux3d.config.pipeline import SourcesConfig
from flux3d.records import AssetRecord, make_asset_id
from flux3d.sources import SourceSpec
from flux3d.sources.objaverse import OBJECT_PATHS_FILE, cache_dir, load_object_paths, require_cache_files

log = logging.getLogger(__name__)

XL_SOURCES = ("github", "sketchfab", "smithsonian", "thingiverse")
HF_OBJAVERSE_XL_URL = "https://huggingface.co/datasets/allenai/objaverse-xl/resolve/main"
THINGIVERSE_DOWNLOAD_URL = "https://www.thingiverse.com/download:{file_id}"
OPTIONS = frozenset({"sources", "limit"})

# Outcome vocabulary of objaverse.xl's download callbacks (handle_found/modified/missing_object).
FOUND, MODIFIED, MISSING = "found", "modified", "missing"


def parse_github_identifier(file_identifier: str) -> tuple[str, str, str, str]:
    """https://github.com/{org}/{repo}/blob/{commit}/{path} -> (org, repo, commit, path).

    The package builds these by replacing the clone folder with the URL prefix, so `path` is the raw path inside
    the repo (spaces and all, no percent-encoding) and is used as-is.
    """
    parts = file_identifier.split("/", 7)
    if (len(parts) != 8 or parts[:3] != ["https:", "", "github.com"] or parts[5] != "blob"
            or not all(parts[i] for i in (3, 4, 6, 7))):
        raise ValueError(f"not a GitHub blob URL (https://github.com/ORG/REPO/blob/COMMIT/PATH): {file_identifier!r}")
    return parts[3], parts[4], parts[6], parts[7]


def thingiverse_ids(file_identifier: str) -> tuple[str, str]:
    """(thing id, file id) of https://www.thingiverse.com/thing:{thing}/files?fileId={file}.

    Same splits as ThingiverseDownloader.get_thing_id_from_file_identifier / get_file_id_from_file_identifier,
    reimplemented because upstream deleted objaverse/xl/thingiverse.py after 0.1.7 (objaverse-xl #53).
    """
    segment = file_identifier.split("/")[-2] if file_identifier.count("/") >= 1 else ""
    thing = segment.split(":")[1] if segment.startswith("thing:") else ""
    file_id = file_identifier.split("fileId=")[-1] if "fileId=" in file_identifier else ""
    if not thing.isdigit() or not file_id.isdigit():
        raise ValueError(f"not a Thingiverse file identifier (.../thing:N/files?fileId=M): {file_identifier!r}")
    return thing, file_id


def _text(value: Any) -> str | None:
    """A parquet cell as str, with pandas' missing markers (None, NaN, pd.NA: which one depends on the column's
    dtype and the pandas version) as None."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    return str(value)


def _xl_metadata(value: Any) -> Any:
    """The `metadata` column: a JSON string in the published parquets (the sketchfab downloader sets "{}")."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value  # kept verbatim rather than guessed at
    return value if isinstance(value, dict) else None


def _require_parquet(sub: str, download_dir: str) -> None:
    """ValueError naming the file to fetch when a sub-source's parquet is not in the cache (fsspec paths too)."""
    import fsspec

    path = f"{download_dir.rstrip('/')}/{sub}/{sub}.parquet"
    fs, fs_path = fsspec.core.url_to_fs(path)
    if not fs.exists(fs_path):
        raise ValueError(f"Objaverse-XL annotations for {sub!r} are not in the cache ({path}); listing never "
                         f"downloads. Fetch {HF_OBJAVERSE_XL_URL}/{sub}/{sub}.parquet to that path (or run "
                         f"`objaverse.xl.get_annotations(download_dir={download_dir!r})` once, which fetches "
                         f"all four sub-sources).")


def _annotations(sub: str, download_dir: str) -> Any:
    """One sub-source's annotation DataFrame through its objaverse.xl downloader (the file is already cached)."""
    from objaverse.xl import downloaders

    _require_parquet(sub, download_dir)
    return downloaders[sub].get_annotations(download_dir=download_dir)


def _selected_sources(spec: SourceSpec) -> list[str]:
    if "sources" not in spec.options:
        return list(XL_SOURCES)
    chosen = {s.strip() for s in spec.options["sources"].split(",") if s.strip()}
    bad = chosen - set(XL_SOURCES)
    if bad or not chosen:
        raise ValueError(f"objaverse-xl sources= takes a comma list of {list(XL_SOURCES)}, got "
                         f"{spec.options['sources']!r}")
    return sorted(chosen)  # listing order does not depend on how the option was spelled


def github_location(fid: str, cfg: SourcesConfig) -> tuple[str, str, dict[str, Any]]:
    """(archive url, attribution, extra metadata) of a GitHub blob URL: the file is a member of the repository's
    archive at that commit, so every file of one repo@commit shares one URL and the download stage fetches it once.
    """
    org, repo, commit, member = parse_github_identifier(fid)
    url = cfg.github_archive_url.format(org=org, repo=repo, commit=commit)
    # GitHub names an archive's top folder <repo>-<commit> when the ref is a full commit sha, which is what
    # Objaverse-XL identifiers carry.
    extra = {"github_organization": org, "github_repo": repo, "commit": commit,
             "archive_member": member, "archive_root": f"{repo}-{commit}"}
    return url, f"{org}/{repo} at commit {commit} (https://github.com/{org}/{repo})", extra


def _locate(sub: str, fid: str, cfg: SourcesConfig, object_paths: dict[str, str] | None
            ) -> tuple[str, str, dict[str, Any]] | None:
    """(url, attribution, extra metadata) of one object; None for a sketchfab uid Objaverse 1.0 does not host."""
    if sub == "github":
        return github_location(fid, cfg)
    if sub == "sketchfab":
        assert object_paths is not None
        uid = fid.rstrip("/").split("/")[-1]  # SketchfabDownloader.file_identifier_to_uid
        if uid not in object_paths:
            return None
        return (f"{cfg.objaverse_base_url.rstrip('/')}/{object_paths[uid]}", f"Sketchfab model {fid}",
                {"uid": uid, "object_path": object_paths[uid]})
    if sub == "thingiverse":
        thing, file_id = thingiverse_ids(fid)
        return (THINGIVERSE_DOWNLOAD_URL.format(file_id=file_id),
                f"Thingiverse thing:{thing} (https://www.thingiverse.com/thing:{thing})",
                {"thing_id": thing, "file_id": file_id})
    return fid, f"Smithsonian Institution ({fid})", {}


def list_objaverse_xl(spec: SourceSpec, cfg: SourcesConfig) -> Iterator[AssetRecord]:
    """Objaverse-XL records of the selected sub-sources (default all), at most `limit=N` in total.

    Deterministic order: sub-sources by name, then fileIdentifier. Every record carries the published sha256,
    so the download stage can tell found / modified / missing (`objaverse_xl_outcome`).
    """
    unknown = set(spec.options) - OPTIONS
    if unknown:
        raise ValueError(f"unknown objaverse-xl option(s) {sorted(unknown)}; known: {sorted(OPTIONS)}")
    subs = _selected_sources(spec)
    download_dir = cfg.objaverse_xl_dir
    # Check every cache file the listing may read up front, so a missing one fails before anything is listed.
    for sub in subs:
        _require_parquet(sub, download_dir)
    if "sketchfab" in subs:
        require_cache_files(cache_dir(cfg.objaverse_dir), [OBJECT_PATHS_FILE],
                            "to map Objaverse-XL sketchfab uids to Objaverse 1.0 download paths")
    remaining = spec.limit
    for sub in subs:
        if remaining == 0:
            return
        df = _annotations(sub, download_dir).sort_values("fileIdentifier", kind="stable")
        if remaining is not None:
            df = df.head(remaining)
        object_paths = None
        if sub == "sketchfab" and len(df):
            object_paths = load_object_paths(cfg.objaverse_dir)
        unhosted: list[str] = []
        meta_col = df["metadata"] if "metadata" in df.columns else [None] * len(df)
        for fid, lic, ftype, sha, meta in zip(df["fileIdentifier"], df["license"], df["fileType"], df["sha256"],
                                              meta_col):
            fid = str(fid)
            located = _locate(sub, fid, cfg, object_paths)
            if located is None:
                unhosted.append(fid)
                continue
            url, attribution, extra = located
            metadata: dict[str, Any] = {"xl_source": sub, **extra}
            xl_meta = _xl_metadata(meta)
            if xl_meta:
                metadata["xl_metadata"] = xl_meta
            source = f"objaverse-xl:{sub}"
            yield AssetRecord(
                asset_id=make_asset_id(source, fid),
                source=source,
                file_identifier=fid,
                format=(_text(ftype) or "").lower(),
                sha256=(_text(sha) or "").lower() or None,
                url=url,
                license=_text(lic),
                attribution=attribution,
                metadata=metadata,
            )
        if unhosted:
            # objaverse.xl reports these through handle_missing_object at download time; they have no URL, so
            # they cannot become records - say how many so the drop is not silent.
            log.warning("objaverse-xl:sketchfab: %d object(s) are not in Objaverse 1.0's %s and were not listed "
                        "(e.g. %s)", len(unhosted), "object-paths.json.gz", unhosted[:3])
        if remaining is not None:
            remaining -= len(df)


def objaverse_xl_outcome(expected_sha256: str | None, actual_sha256: str | None, http_status: int | None) -> str:
    """The objaverse.xl callback a download corresponds to: "found", "modified" or "missing".

    - missing: nothing was obtained (HTTP 404/410, a repo gone, a member absent from its archive): what
      `handle_missing_object` reports. Any download that ends with no file maps here; whether it is worth
      retrying is the download stage's `retryable`, not this vocabulary.
    - found: the file was obtained and its sha256 equals the published one (`handle_found_object`); also when
      no hash was published (nothing to contradict).
    - modified: obtained, with a different sha256 (`handle_modified_object`); e.g. a GitHub repo whose recorded
      commit is gone, where objaverse.xl falls back to HEAD, or a re-uploaded Smithsonian model.

    `http_status` is the final response status (None when no response came). A file hash together with a
    non-2xx status is contradictory and raises ValueError.
    """
    failed_status = http_status is not None and not 200 <= http_status < 300
    if actual_sha256 is None:
        return MISSING
    if failed_status:
        raise ValueError(f"a file hash ({actual_sha256}) with HTTP status {http_status} is contradictory")
    if expected_sha256 is None or expected_sha256.lower() == actual_sha256.lower():
        return FOUND
    return MODIFIED

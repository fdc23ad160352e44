"""`objaverse:[lvis=CAT,CAT][;limit=N]`: Objaverse 1.0 (the ~800K Sketchfab glbs) listed through the `objaverse`
package's own cache files, never downloading a 3D file.

Cache layout (what `objaverse` 0.1.x writes under its BASE_PATH, here `SourcesConfig.objaverse_dir`):

    hf-objaverse-v1/object-paths.json.gz      {uid: "glbs/000-023/<uid>.glb"}      (needed always)
    hf-objaverse-v1/metadata/000-023.json.gz  {uid: Sketchfab annotation}          (one per glbs/ folder listed)
    hf-objaverse-v1/lvis-annotations.json.gz  {LVIS category: [uid, ...]}         (needed for lvis=)

The package fetches a missing file with `urllib.request.urlretrieve`, which has no timeout (a stalled Hugging Face
connection hangs the caller forever, TRELLIS #233) and, with `uids=None`, pulls all 160 metadata shards. So listing
checks the files it needs first and raises ValueError naming each missing file, its URL and where to put it: a
listing either runs fully offline or fails at once.
"""

from __future__ import annotations

import difflib
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import groupby
from typing import Any

from flux3d.config.pipeline import SourcesConfig
from flux3d.records import AssetRecord, make_asset_id
from flux3d.sources import SourceSpec

log = logging.getLogger(__name__)

HF_OBJAVERSE_URL = "https://huggingface.co/datasets/allenai/objaverse/resolve/main"
"""Where the package itself fetches its cache files from (quoted in error messages)."""
VERSIONED_DIR = "hf-objaverse-v1"
OBJECT_PATHS_FILE = "object-paths.json.gz"
LVIS_FILE = "lvis-annotations.json.gz"
OPTIONS = frozenset({"lvis", "limit"})

# The package keeps its cache location in module globals; they are process-wide, so two threads listing with
# different folders must not interleave their set/restore.
_PACKAGE_GLOBALS_LOCK = threading.RLock()


def cache_dir(path: str) -> str:
    """The local cache folder (the package reads it with plain `os.path`/`gzip.open`, so no fsspec URLs)."""
    if "://" in path:
        raise ValueError(f"sources.objaverse_dir must be a local folder (the objaverse package reads it with "
                         f"os.path), got {path!r}")
    return os.path.abspath(os.path.expanduser(path))


def require_cache_files(root: str, relpaths: list[str], why: str) -> None:
    """Raise ValueError listing every missing cache file (path under `root`/hf-objaverse-v1) with its URL.

    Called before any package function that would otherwise fetch the file itself, without a timeout.
    """
    missing = [p for p in relpaths if not os.path.isfile(os.path.join(root, VERSIONED_DIR, p))]
    if not missing:
        return
    shown = "\n".join(f"  {HF_OBJAVERSE_URL}/{p} -> {os.path.join(root, VERSIONED_DIR, p)}" for p in missing[:10])
    more = f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else ""
    raise ValueError(
        f"Objaverse cache under {root} lacks {len(missing)} file(s) needed {why}; listing never downloads. "
        f"Fetch them first (e.g. `curl -L --create-dirs -o DEST URL`):\n{shown}{more}")


@contextmanager
def objaverse_cache(root: str, object_paths: dict[str, str] | None = None) -> Iterator[None]:
    """Point the `objaverse` package at `root` for the duration of the block, then restore it.

    The package hard-codes BASE_PATH and _VERSIONED_PATH as module globals computed from ~/.objaverse at import
    time and offers no parameter for them, so the only way to use another cache is to rebind them. Doing it in
    a context manager (under a lock) keeps the change from leaking into other code in the process that uses the
    package with its default cache. Blocks are kept short and never span a `yield` of a listing generator, so an
    abandoned generator cannot leave the globals pointed at our folder.

    `object_paths`, when given, is served instead of re-reading object-paths.json.gz: `load_annotations` re-parses
    that 800K-entry file on every call, which would cost minutes over the 160 metadata shards.
    """
    import objaverse

    with _PACKAGE_GLOBALS_LOCK:
        saved = {name: getattr(objaverse, name) for name in ("BASE_PATH", "_VERSIONED_PATH", "_load_object_paths")}
        objaverse.BASE_PATH = root
        objaverse._VERSIONED_PATH = os.path.join(root, VERSIONED_DIR)
        if object_paths is not None:
            objaverse._load_object_paths = lambda: object_paths
        try:
            yield
        finally:
            for name, value in saved.items():
                setattr(objaverse, name, value)


def load_object_paths(objaverse_dir: str) -> dict[str, str]:
    """uid -> path inside the Hugging Face repo (glbs/000-023/<uid>.glb), from the package's cache."""
    import objaverse

    root = cache_dir(objaverse_dir)
    require_cache_files(root, [OBJECT_PATHS_FILE], "to map uids to download paths")
    with objaverse_cache(root):
        return objaverse._load_object_paths()


def _shard(object_path: str) -> str:
    """The metadata shard of an object, derived exactly as `objaverse.load_annotations` does."""
    return object_path.split("/")[1]


def _select_lvis(wanted: str, lvis: dict[str, list[str]]) -> set[str]:
    cats = [c.strip() for c in wanted.split(",") if c.strip()]
    if not cats:
        raise ValueError("objaverse option lvis= needs at least one category name")
    unknown = [c for c in cats if c not in lvis]
    if unknown:
        hints = {c: difflib.get_close_matches(c, lvis.keys(), n=3) for c in unknown}
        raise ValueError(f"unknown LVIS categor(ies) {unknown} (names are case-sensitive; close matches: {hints})")
    return {uid for c in cats for uid in lvis[c]}


def attribution(annotation: dict[str, Any], uid: str) -> str:
    """'<name> by <username> (<viewerUrl>)': title, author and link, what CC BY asks an attribution to carry."""
    name = annotation.get("name") or uid
    user = annotation.get("user") or {}
    author = user.get("username") or user.get("displayName")
    link = annotation.get("viewerUrl") or f"https://sketchfab.com/3d-models/{uid}"
    return f"{name} by {author} ({link})" if author else f"{name} ({link})"


def _record(uid: str, object_path: str, annotation: dict[str, Any] | None, lvis_cats: list[str],
            base_url: str) -> AssetRecord:
    metadata: dict[str, Any] = {"object_path": object_path}
    if annotation is None:
        # The object-paths file lists it but its metadata shard does not: keep the asset (it is downloadable),
        # with no license, so the curation policy - not the lister - decides whether an unlicensed asset goes on.
        metadata["annotation_missing"] = True
    else:
        metadata["name"] = annotation.get("name")
        # Cheap curation hints the Sketchfab annotation already has (animated assets, mesh size).
        for src, dst in (("animationCount", "animation_count"), ("faceCount", "face_count"),
                         ("vertexCount", "vertex_count")):
            if annotation.get(src) is not None:
                metadata[dst] = annotation[src]
    if lvis_cats:
        metadata["lvis"] = lvis_cats
    return AssetRecord(
        asset_id=make_asset_id("objaverse", uid),
        source="objaverse",
        file_identifier=uid,
        format="glb",
        sha256=None,  # Objaverse 1.0 publishes no content hashes; the download stage hashes what it gets
        url=f"{base_url.rstrip('/')}/{object_path}",
        license=annotation.get("license") if annotation else None,
        attribution=attribution(annotation, uid) if annotation else None,
        metadata=metadata,
    )


def list_objaverse(spec: SourceSpec, cfg: SourcesConfig) -> Iterator[AssetRecord]:
    """Objaverse 1.0 records, optionally only those in some LVIS categories, at most `limit=N` of them.

    Order is deterministic: by object path, i.e. metadata shard (glbs/000-000 ...) then uid. Shard-major order
    lets the listing read one metadata shard at a time (a full in-memory annotation dict of all 800K objects
    takes many GB) and makes `limit=N` read only the shards it needs.
    """
    import objaverse

    unknown = set(spec.options) - OPTIONS
    if unknown:
        raise ValueError(f"unknown objaverse option(s) {sorted(unknown)}; known: {sorted(OPTIONS)}")
    root = cache_dir(cfg.objaverse_dir)
    object_paths = load_object_paths(root)

    lvis: dict[str, list[str]] = {}
    if "lvis" in spec.options:
        require_cache_files(root, [LVIS_FILE], "for the lvis= option")
    if os.path.isfile(os.path.join(root, VERSIONED_DIR, LVIS_FILE)):
        # Also read when no filter is asked, so records carry their categories whenever the cache has them.
        with objaverse_cache(root):
            lvis = objaverse.load_lvis_annotations()
    uid_cats: dict[str, list[str]] = {}
    for cat in sorted(lvis):
        for uid in lvis[cat]:
            uid_cats.setdefault(uid, []).append(cat)

    uids: set[str] = set(object_paths)
    if "lvis" in spec.options:
        wanted = _select_lvis(spec.options["lvis"], lvis)
        absent = wanted - uids
        if absent:
            log.warning("objaverse: %d LVIS uid(s) are not in %s and cannot be listed (e.g. %s)",
                        len(absent), OBJECT_PATHS_FILE, sorted(absent)[:3])
        uids = wanted & uids
    chosen = sorted(uids, key=lambda u: (object_paths[u], u))
    if spec.limit is not None:
        chosen = chosen[: spec.limit]

    # Check every shard the listing will read before yielding anything: a half-listed source is worse than
    # an immediate, complete list of what to fetch.
    shards = sorted({_shard(object_paths[u]) for u in chosen})
    require_cache_files(root, [f"metadata/{s}.json.gz" for s in shards], "for the objects' annotations")

    for _, group in groupby(chosen, key=lambda u: _shard(object_paths[u])):
        batch = list(group)
        with objaverse_cache(root, object_paths):
            annotations = objaverse.load_annotations(batch)
        for uid in batch:
            yield _record(uid, object_paths[uid], annotations.get(uid), uid_cats.get(uid, []), cfg.objaverse_base_url)

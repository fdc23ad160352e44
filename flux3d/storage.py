"""The data root: a local folder by default, any fsspec URL on a cluster (s3://, gs://, memory://).

Two rules hold for every write: it is atomic (readers never see a partial file: write a temporary sibling, then
rename), and per-asset outputs are keyed by the content sha256 (DESIGN.md sec. 3):

    raw/<sha>.<ext>            downloaded files
    raw/archives/<sha>/...     extracted archives (GitHub repositories)
    catalog/...                the asset table (see catalog.py)
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import time
import uuid
from collections.abc import Iterator
from typing import IO

import fsspec
from fsspec.implementations.local import LocalFileSystem

TMP_MARK = ".tmp-"


class Storage:
    def __init__(self, root: str) -> None:
        self.url = root
        self.fs, path = fsspec.core.url_to_fs(os.path.expanduser(root))
        self.local = isinstance(self.fs, LocalFileSystem)
        self.root = os.path.abspath(path) if self.local else path.rstrip("/")

    def __repr__(self) -> str:
        return f"Storage({self.url!r})"

    def path(self, *parts: str) -> str:
        """Absolute path (in the filesystem's own terms) of a location under the root."""
        return posixpath.join(self.root, *parts)

    # -- per-asset layout ---------------------------------------------------------------------------------------
    @staticmethod
    def raw_rel(sha256: str, fmt: str) -> str:
        return f"raw/{sha256}.{fmt}"

    @staticmethod
    def archive_rel(sha256: str) -> str:
        return f"raw/archives/{sha256}"

    # -- reads ------------------------------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def list(self, rel: str, suffix: str = "") -> list[str]:
        """Files directly under a folder (absolute paths), sorted, temporary files left out."""
        base = self.path(rel)
        if not self.fs.exists(base):
            return []
        names = self.fs.ls(base, detail=False)
        return sorted(n for n in names if n.endswith(suffix) and TMP_MARK not in posixpath.basename(n))

    # -- atomic writes ------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def open_atomic(self, rel: str, mode: str = "wb", durable: bool = False) -> Iterator[IO]:
        """Open a temporary sibling for writing; it becomes `rel` only when the block exits without error.
        `durable` (local disk): fsync the data before the rename, so that after a power loss the name never points
        at an empty file; worth it for large, expensive files (shards), not for every small part file."""
        final = self.path(rel)
        tmp = self.tmp_sibling(final)
        self.fs.makedirs(posixpath.dirname(final), exist_ok=True)
        try:
            with self.fs.open(tmp, mode) as f:
                yield f
            if durable and self.local:
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            self.commit(tmp, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(tmp)
            raise

    def write_bytes(self, rel: str, data: bytes) -> None:
        with self.open_atomic(rel) as f:
            f.write(data)

    @staticmethod
    def tmp_sibling(final: str) -> str:
        head, tail = posixpath.split(final)
        return posixpath.join(head, f"{TMP_MARK}{uuid.uuid4().hex[:12]}-{tail}")

    def commit(self, tmp: str, final: str) -> None:
        """Move a finished temporary file into place (atomic rename on local disk and POSIX-like stores)."""
        if self.local:
            os.replace(tmp, final)
        else:
            # Object stores publish an object only when its upload completes, so a copy-then-delete never
            # exposes a partial object under the final name.
            self.fs.mv(tmp, final)

    def sweep_tmp(self, rel: str, min_age_s: float = 3600.0) -> int:
        """Remove temporary files and folders (a half-extracted archive, an unfinished render) that a killed writer
        left under a folder. Returns how many were removed.

        Only entries older than `min_age_s` go: a concurrent writer's in-flight temporary must survive.
        """
        base = self.path(rel)
        if not self.fs.exists(base):
            return 0
        now = time.time()
        stale = sorted(p for p, info in self.fs.find(base, withdirs=True, detail=True).items()
                       if TMP_MARK in posixpath.basename(p.rstrip("/")) and now - _mtime(info) >= min_age_s)
        removed = []
        for p in stale:
            if any(p.startswith(r.rstrip("/") + "/") for r in removed):
                continue  # inside a temporary folder already removed
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(p, recursive=True)
            removed.append(p)
        stale = removed
        return len(stale)

    def publish_dir(self, work: str, rel: str, last: str = "") -> None:
        """Put a finished local folder at `rel`, replacing what was there.

        Local disk: one rename (readers see the old folder or the new one, never a mix). Object store: a prefix
        cannot be renamed atomically (a "move" copies every object), so the files are uploaded straight into
        place with `last` (a completion marker such as render.json) uploaded after all others.
        """
        final = self.path(rel)
        if self.local:
            os.makedirs(os.path.dirname(final), exist_ok=True)
            old = None
            if os.path.exists(final):
                old = self.tmp_sibling(final)
                os.replace(final, old)
            os.replace(work, final)
            if old:
                shutil.rmtree(old, ignore_errors=True)
            return
        if self.fs.exists(final):
            self.fs.rm(final, recursive=True)
        files = sorted(os.path.relpath(os.path.join(d, f), work) for d, _, names in os.walk(work) for f in names)
        for name in sorted(files, key=lambda r: r == last):
            self.fs.put_file(os.path.join(work, name), f"{final}/{name}")

    def local_dir(self, rel: str) -> str:
        """A local folder for things that need a real filesystem (archive extraction, Blender).

        On a remote root this is a cache under FLUX3D_LOCAL_CACHE (default /tmp/flux3d-cache) mirroring `rel`.
        """
        if self.local:
            return self.path(rel)
        cache = os.environ.get("FLUX3D_LOCAL_CACHE", "/tmp/flux3d-cache")
        return os.path.join(cache, rel)

    def local_copy(self, path: str) -> str:
        """A local file for `path` (a path under this root): itself on local disk, else a cached download.

        Engines such as Blender and trimesh need real files; on an object-store root they read a cached copy.
        """
        if self.local or os.path.exists(path):
            return path
        rel = posixpath.relpath(path, self.root)
        local = self.local_dir(rel)
        if not os.path.exists(local):
            os.makedirs(os.path.dirname(local), exist_ok=True)
            tmp = self.tmp_sibling(local)
            self.fs.get_file(path, tmp)
            os.replace(tmp, local)
        return local


def _mtime(info: dict) -> float:
    value = info.get("mtime") or info.get("LastModified") or info.get("created") or 0.0
    return value.timestamp() if hasattr(value, "timestamp") else float(value)

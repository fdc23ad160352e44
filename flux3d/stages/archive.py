"""Safe extraction of downloaded archives (GitHub repositories of Objaverse-XL, zipped manifest datasets).

An archive from the internet may try to write outside its folder (`../x`, `/etc/x`), plant symlinks that point
out, or expand to terabytes. We check every member before extracting anything, so a bad archive gets one specific
reason code and writes nothing, then extract into a temporary folder that is renamed into place when complete.
tarfile's `filter="data"` stays on as a second line of defence.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import stat
import tarfile
import uuid
import zipfile
from dataclasses import dataclass

from flux3d.config.pipeline import ArchiveConfig


class ArchiveError(Exception):
    """A refused archive; `reason` is the catalog reason code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(slots=True)
class _Member:
    name: str
    size: int
    is_dir: bool
    link_target: str | None  # symlink / hardlink target, None for plain files and folders
    special: bool  # device, fifo, ...


def _safe_name(name: str) -> str:
    """The member's path relative to the extraction folder, or ArchiveError if it would escape it."""
    norm = name.replace("\\", "/")
    if norm.startswith("/") or (len(norm) > 1 and norm[1] == ":"):
        raise ArchiveError("archive_unsafe_path", f"absolute member path {name!r}")
    clean = posixpath.normpath(norm)
    if clean == ".." or clean.startswith("../"):
        raise ArchiveError("archive_unsafe_path", f"member path escapes the folder: {name!r}")
    return clean


def _members(path: str) -> tuple[str, list[_Member]]:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            out = []
            for info in zf.infolist():
                mode = info.external_attr >> 16
                is_link = stat.S_ISLNK(mode)
                out.append(_Member(info.filename, info.file_size, info.is_dir(),
                                   zf.read(info).decode("utf-8", "replace") if is_link else None, False))
            return "zip", out
    try:
        with tarfile.open(path) as tf:
            return "tar", [_Member(m.name, m.size, m.isdir(), m.linkname if (m.issym() or m.islnk()) else None,
                                   not (m.isfile() or m.isdir() or m.issym() or m.islnk())) for m in tf.getmembers()]
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ArchiveError("archive_corrupt", f"not a readable zip or tar archive: {e}") from e


def check_archive(path: str, cfg: ArchiveConfig) -> tuple[str, list[_Member]]:
    """Validate every member; raises ArchiveError with the first problem found."""
    kind, members = _members(path)
    if len(members) > cfg.max_members:
        raise ArchiveError("archive_too_many_members", f"{len(members)} members > {cfg.max_members}")
    total = 0
    for m in members:
        clean = _safe_name(m.name)
        if m.special:
            raise ArchiveError("archive_special_file", f"device or fifo member {m.name!r}")
        if m.link_target is not None:
            target = m.link_target.replace("\\", "/")
            joined = posixpath.normpath(posixpath.join(posixpath.dirname(clean), target))
            if target.startswith("/") or joined == ".." or joined.startswith("../"):
                raise ArchiveError("archive_link_escape", f"link {m.name!r} -> {m.link_target!r} points outside")
        total += max(m.size, 0)
    if total > cfg.max_total_bytes:
        raise ArchiveError("archive_too_large", f"{total} uncompressed bytes > {cfg.max_total_bytes}")
    compressed = max(os.path.getsize(path), 1)
    if total / compressed > cfg.max_ratio:
        raise ArchiveError("archive_bomb", f"expands {total / compressed:.0f}x (limit {cfg.max_ratio:.0f}x)")
    return kind, members


def extract_archive(path: str, dest: str, cfg: ArchiveConfig) -> None:
    """Check, then extract `path` into `dest` atomically. A `dest` that exists is taken as already extracted."""
    if os.path.isdir(dest):
        return
    kind, members = check_archive(path, cfg)
    tmp = f"{dest}.tmp-{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp)
    try:
        if kind == "zip":
            with zipfile.ZipFile(path) as zf:
                for info, m in zip(zf.infolist(), members):
                    if m.link_target is not None:
                        continue  # zip symlinks are stored as text; checked above, not materialised
                    out = os.path.join(tmp, _safe_name(m.name))
                    if m.is_dir:
                        os.makedirs(out, exist_ok=True)
                        continue
                    os.makedirs(os.path.dirname(out), exist_ok=True)
                    written = 0
                    with zf.open(info) as src, open(out, "wb") as dst:
                        # The header's file_size can lie; count what really comes out.
                        while chunk := src.read(1 << 20):
                            written += len(chunk)
                            if written > cfg.max_total_bytes:
                                raise ArchiveError("archive_too_large", f"{m.name!r} expands beyond its header")
                            dst.write(chunk)
        else:
            with tarfile.open(path) as tf:
                tf.extractall(tmp, filter="data")
        os.rename(tmp, dest)
    except tarfile.FilterError as e:
        raise ArchiveError("archive_unsafe_path", str(e)) from e
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as e:
        raise ArchiveError("archive_corrupt", f"extraction failed: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

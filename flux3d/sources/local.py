"""`local:DIR`: every asset file under a folder, hashed in place (no copy: the folder is read where it is, so
relative texture and buffer references keep working)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

from flux3d.records import AssetRecord, make_asset_id
from flux3d.sources import ASSET_EXTENSIONS

HASH_CHUNK = 1 << 20


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def list_local(folder: str, known: dict[str, tuple[int, int, str]]) -> Iterator[AssetRecord]:
    root = os.path.abspath(os.path.expanduser(folder))
    if not os.path.isdir(root):
        raise ValueError(f"local source {folder!r} is not a folder")
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()  # deterministic listing order
        for name in sorted(filenames):
            fmt = ASSET_EXTENSIONS.get(os.path.splitext(name)[1].lower())
            if fmt is None:
                continue
            path = os.path.join(dirpath, name)
            st = os.stat(path)
            prev = known.get(path)
            sha = prev[2] if prev and prev[0] == st.st_size and prev[1] == st.st_mtime_ns else sha256_file(path)
            yield AssetRecord(
                asset_id=make_asset_id("local", path),
                source="local",
                file_identifier=path,
                format=fmt,
                sha256=sha,
                bytes=st.st_size,
                metadata={"mtime_ns": st.st_mtime_ns},
            )

"""`manifest:FILE`: a CSV or Parquet list of assets by URL or path. TRELLIS-500K's published lists name web pages and
files inside hand-downloaded archives instead; they go through `trellis:` (trellis.py), which reuses this reader.

Columns (only `file_identifier` is required):
    file_identifier   a URL (http/https) or a path; relative paths are relative to the manifest's folder
    sha256            expected content hash (verified by the download stage)
    url               download URL when file_identifier is an id rather than a location
    format            file format when the identifier has no telling extension
    license, attribution
    aesthetic_score, captions, ...   anything else is kept in the record's metadata
The source name is `manifest:<file stem>` (e.g. manifest:3D-FUTURE), so per-source thresholds can tell them apart.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from flux3d.records import AssetRecord, make_asset_id
from flux3d.sources import ASSET_EXTENSIONS

KNOWN_COLUMNS = ("file_identifier", "sha256", "url", "format", "license", "attribution")


def read_manifest(path: str) -> pa.Table:
    if path.endswith(".parquet"):
        table = pq.read_table(path)
    elif path.endswith((".csv", ".csv.gz")):
        # Everything as text: sha256 values that happen to be all digits must not become numbers.
        table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
            column_types={c: pa.string() for c in KNOWN_COLUMNS}))
    else:
        raise ValueError(f"manifest {path!r} must be .csv, .csv.gz or .parquet")
    if "file_identifier" not in table.column_names:
        raise ValueError(f"manifest {path!r} has no file_identifier column (has {table.column_names})")
    return table


def _format_of(identifier: str, explicit: str | None) -> str:
    if explicit:
        return explicit.lower().lstrip(".")
    path = urlparse(identifier).path if "://" in identifier else identifier
    return ASSET_EXTENSIONS.get(os.path.splitext(path)[1].lower(), os.path.splitext(path)[1].lower().lstrip("."))


def clean_cell(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


def list_manifest(path: str) -> Iterator[AssetRecord]:
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        raise ValueError(f"manifest {path!r} does not exist")
    name = os.path.basename(path).split(".")[0]
    source = f"manifest:{name}"
    base = os.path.dirname(path)
    for row in read_manifest(path).to_pylist():
        row = {k: clean_cell(v) for k, v in row.items()}
        ident = str(row["file_identifier"])
        is_url = ident.startswith(("http://", "https://"))
        url = row.get("url") or (ident if is_url else None)
        local = None if url else (ident if os.path.isabs(ident) else os.path.normpath(os.path.join(base, ident)))
        sha = row.get("sha256")
        yield AssetRecord(
            asset_id=make_asset_id(source, ident),
            source=source,
            file_identifier=local or ident,
            format=_format_of(url or ident, row.get("format")),
            sha256=sha.lower() if isinstance(sha, str) and sha else None,
            url=url,
            license=row.get("license"),
            attribution=row.get("attribution"),
            metadata={k: v for k, v in row.items() if k not in KNOWN_COLUMNS and v is not None},
        )

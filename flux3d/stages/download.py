"""Download stage: one asset record in, one content-addressed local file out.

- Streaming HTTP with connect/read timeouts; a stalled server is a transient error, not a hang.
- Retries with exponential backoff and jitter for transient errors only (connection, timeout, 429, 5xx;
  `Retry-After` honoured); 404 and other 4xx fail at once.
- Partial transfers persist as `tmp/downloads/<asset_id>.part` and resume with an HTTP Range request, across
  retries and across a killed process.
- sha256 verified against the source's hash (`failed:hash_mismatch` otherwise); files land at raw/<sha>.<ext>
  by atomic rename, so identical content from two sources is stored once.
- Archives (GitHub repositories) are fetched once per URL, checked and extracted safely (archive.py), and the
  asset is the member file inside.
Records with no URL point at a file already on a reachable filesystem (local folders, manifest paths): it is
hashed and verified in place, not copied, so its relative textures and buffers keep resolving.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
from dataclasses import dataclass

import pyarrow as pa
import requests

from flux3d.config.pipeline import Config, section_params
from flux3d.records import FAILED, OK, AssetRecord, StageResult, Timer, params_hash
from flux3d.sources import ASSET_EXTENSIONS
from flux3d.sources.local import HASH_CHUNK, sha256_file
from flux3d.stages.archive import ArchiveError, extract_archive
from flux3d.storage import Storage

DOWNLOAD_VERSION = 1
DOWNLOAD_COLUMNS = pa.schema([
    ("sha256", pa.string()),
    ("bytes", pa.int64()),
    ("local_path", pa.string()),
    ("source_outcome", pa.string()),  # Objaverse-XL vocabulary: found / modified / missing
])
# Small enough that a dropped connection loses little of what arrived (a chunk is written only when full).
STREAM_CHUNK = 64 * 1024
KNOWN_FORMATS = frozenset(ASSET_EXTENSIONS.values())
_ARCHIVE_LOCKS: dict[str, threading.Lock] = {}
_ARCHIVE_LOCKS_GUARD = threading.Lock()


def download_params(cfg: Config) -> str:
    return params_hash("download", DOWNLOAD_VERSION,
                       {"accept_modified": cfg.download.accept_modified, "archive": section_params(cfg.archive)})


class DownloadError(Exception):
    def __init__(self, reason: str, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.retryable = retryable


@dataclass(slots=True)
class _Transient(Exception):
    reason: str
    message: str
    retry_after: float | None = None


def _backoff(cfg: Config, attempt: int, retry_after: float | None) -> float:
    if retry_after is not None:
        return min(retry_after, cfg.download.backoff_max_s)
    base = min(cfg.download.backoff_s * 2 ** (attempt - 1), cfg.download.backoff_max_s)
    return base * random.uniform(0.5, 1.5)


def _retry_after(resp: requests.Response) -> float | None:
    value = resp.headers.get("Retry-After")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP-date; fall back to our own backoff


def _fetch_once(session: requests.Session, url: str, part: str, cfg: Config) -> None:
    """One HTTP attempt, appending to `part` (Range resume). Raises _Transient or DownloadError."""
    have = os.path.getsize(part) if os.path.exists(part) else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    timeout = (cfg.download.connect_timeout_s, cfg.download.read_timeout_s)
    try:
        with session.get(url, stream=True, timeout=timeout, headers=headers, allow_redirects=True) as resp:
            code = resp.status_code
            if code == 416 and have:  # our partial file is already complete (or the server changed): restart
                os.remove(part)
                raise _Transient("http_416", "range not satisfiable; restarting from zero", 0.0)
            if code == 429 or code >= 500:
                raise _Transient(f"http_{code}", f"HTTP {code} from {url}", _retry_after(resp))
            if code >= 400:
                raise DownloadError(f"http_{code}", f"HTTP {code} from {url}")
            mode = "ab" if code == 206 and have else "wb"  # a 200 to a Range request means: starting over
            length = resp.headers.get("Content-Length")
            total = (have if mode == "ab" else 0) + int(length) if length and length.isdigit() else None
            if total is not None and total > cfg.download.max_file_bytes:
                raise DownloadError("too_large", f"{total} bytes > download.max_file_bytes")
            written = have if mode == "ab" else 0
            with open(part, mode) as f:
                for chunk in resp.iter_content(chunk_size=STREAM_CHUNK):
                    written += len(chunk)
                    if written > cfg.download.max_file_bytes:
                        raise DownloadError("too_large", f"more than {cfg.download.max_file_bytes} bytes")
                    f.write(chunk)
            if total is not None and written < total:
                raise _Transient("incomplete", f"got {written} of {total} bytes")
    except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
        reason = "timeout" if isinstance(e, requests.Timeout) else "connection_error"
        raise _Transient(reason, f"{type(e).__name__}: {e}") from e


def fetch_url(session: requests.Session, url: str, part: str, cfg: Config) -> None:
    """Download `url` into `part` with retries on transient errors; raises DownloadError when out of attempts."""
    os.makedirs(os.path.dirname(part), exist_ok=True)
    for attempt in range(1, cfg.download.max_attempts + 1):
        try:
            _fetch_once(session, url, part, cfg)
            return
        except _Transient as t:
            if attempt == cfg.download.max_attempts:
                raise DownloadError(t.reason, f"{t.message} (after {attempt} attempts)", retryable=True) from None
            time.sleep(_backoff(cfg, attempt, t.retry_after))


def _verify(rec: AssetRecord, sha: str, cfg: Config) -> str:
    """Source outcome in Objaverse-XL's words; raises on a mismatch unless modified files are accepted."""
    if rec.sha256 is None or rec.sha256 == sha:
        return "found"
    if not cfg.download.accept_modified:
        raise DownloadError("hash_mismatch", f"sha256 {sha} != expected {rec.sha256}")
    return "modified"


def _archive_dir(session: requests.Session, rec: AssetRecord, cfg: Config, storage: Storage) -> str:
    """Extracted folder of the record's archive URL, downloading it once per URL (process-wide lock)."""
    assert rec.url is not None
    url_key = hashlib.sha256(rec.url.encode()).hexdigest()[:32]
    index_rel = f"raw/archives/by-url/{url_key}.json"
    with _ARCHIVE_LOCKS_GUARD:
        lock = _ARCHIVE_LOCKS.setdefault(url_key, threading.Lock())
    with lock:
        if storage.exists(index_rel):
            entry = json.loads(storage.read_bytes(index_rel))
        else:
            part = storage.local_dir(f"tmp/downloads/{url_key}.archive.part")
            fetch_url(session, rec.url, part, cfg)
            entry = {"sha256": sha256_file(part), "url": rec.url}
            try:
                extract_archive(part, storage.local_dir(storage.archive_rel(entry["sha256"])), cfg.archive)
            except ArchiveError as e:
                os.remove(part)
                raise DownloadError(e.reason, str(e)) from e
            os.remove(part)
            storage.write_bytes(index_rel, json.dumps(entry).encode())
    return storage.local_dir(storage.archive_rel(entry["sha256"]))


def _result(rec: AssetRecord, path: str, sha: str, outcome: str) -> StageResult:
    return StageResult(rec.asset_id, OK, columns={"sha256": sha, "bytes": os.path.getsize(path), "local_path": path,
                                                   "source_outcome": outcome})


def download_asset(rec: AssetRecord, cfg: Config, storage: Storage,
                   session: requests.Session | None = None) -> StageResult:
    """Fetch (or locate) one asset and verify it. Never raises for a bad asset: failures come back as results."""
    session = session or requests.Session()
    with Timer() as timer:
        try:
            result = _download(rec, cfg, storage, session)
        except DownloadError as e:
            outcome = ("missing" if e.reason in ("http_404", "http_410", "missing_file", "missing_member",
                                                 "unresolved")
                       else "modified" if e.reason == "hash_mismatch" else None)
            result = StageResult(rec.asset_id, FAILED, e.reason, str(e), retryable=e.retryable,
                                 columns={"source_outcome": outcome})
        except OSError as e:  # local disk trouble is the worker's problem, not the asset's: retry later
            result = StageResult(rec.asset_id, FAILED, "io_error", f"{type(e).__name__}: {e}", retryable=True)
    result.seconds = timer.seconds
    return result


def _download(rec: AssetRecord, cfg: Config, storage: Storage, session: requests.Session) -> StageResult:
    if rec.metadata.get("unresolved"):  # listed, but the source found no way to fetch it
        raise DownloadError("unresolved", rec.metadata["unresolved"])
    if rec.format not in KNOWN_FORMATS:
        raise DownloadError("unsupported_format", f"format {rec.format!r} is not a known 3D format")
    if rec.url is None:
        path = rec.metadata.get("local_file") or rec.file_identifier
        # Some lists hash another file of the asset than the one we open (3D-FUTURE: the image beside the mesh).
        # That hash is then the asset's key, as in the list: the later stages join on the listed sha256.
        hashed = rec.metadata.get("sha256_of") or path
        for p in dict.fromkeys((path, hashed)):
            if not os.path.isfile(p):
                # Under a hand-unpacked dataset root the file may still be on its way (an unpack in progress):
                # the next run looks again.
                raise DownloadError("missing_file", f"no file at {p}", retryable="local_file" in rec.metadata)
        # A local listing hashed the file moments ago; anything else (manifest paths) is verified here.
        sha = rec.sha256 if rec.source == "local" and rec.sha256 else sha256_file(hashed)
        return _result(rec, path, sha, _verify(rec, sha, cfg))
    member = rec.metadata.get("archive_member")
    if member:
        folder = _archive_dir(session, rec, cfg, storage)
        root = rec.metadata.get("archive_root", "")
        path = os.path.normpath(os.path.join(folder, root, member))
        if not path.startswith(folder + os.sep) or not os.path.isfile(path):
            raise DownloadError("missing_member", f"{member!r} is not in the archive of {rec.url}")
        sha = sha256_file(path)
        return _result(rec, path, sha, _verify(rec, sha, cfg))
    part = storage.local_dir(f"tmp/downloads/{rec.asset_id}.part")
    fetch_url(session, rec.url, part, cfg)
    sha = sha256_file(part)
    try:
        outcome = _verify(rec, sha, cfg)
    except DownloadError:
        os.remove(part)  # a wrong file must not be resumed from next time
        raise
    final_rel = storage.raw_rel(sha, rec.format)
    if storage.exists(final_rel):
        os.remove(part)  # the same bytes are already stored (another source, an earlier run): dedupe
    elif storage.local:
        os.makedirs(os.path.dirname(storage.path(final_rel)), exist_ok=True)
        os.replace(part, storage.path(final_rel))  # atomic: same filesystem as tmp/
    else:
        with open(part, "rb") as src, storage.open_atomic(final_rel) as dst:
            while chunk := src.read(HASH_CHUNK):
                dst.write(chunk)
        os.remove(part)
    return StageResult(rec.asset_id, OK, columns={"sha256": sha, "bytes": storage.fs.size(storage.path(final_rel)),
                                                   "local_path": storage.path(final_rel), "source_outcome": outcome})

"""The stage contract: what a stage gets (an asset record) and what it returns (a result).

Every stage is a plain function over one asset that returns a `StageResult`. A drop is never silent: anything that
is not `ok` carries a reason code (snake_case, stable, counted by `flux3d status`) and a human message.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

# State vocabulary shared by every stage.
OK = "ok"
SKIPPED = "skipped"  # nothing to do for this asset (e.g. already present); not an error
REJECTED = "rejected"  # the asset is valid input but fails a policy (untextured, low aesthetic score, ...)
FAILED = "failed"  # the asset could not be processed (corrupt, 404, timeout, ...)
STATES = (OK, SKIPPED, REJECTED, FAILED)


@dataclass(slots=True)
class AssetRecord:
    """One asset as a source lists it, plus where the download stage put it."""

    asset_id: str
    """Stable id of (source, file_identifier); the catalog's row key. Content keys are `sha256`."""
    source: str
    """Source name: local, objaverse, objaverse-xl:<sub-source>, manifest:<name>."""
    file_identifier: str
    """The source's own id of the file: a local path, an Objaverse uid, a URL."""
    format: str
    """Lower-case file extension without the dot (glb, obj, ...)."""
    sha256: str | None = None
    """Content hash, when the source knows it before download (verified by the download stage)."""
    url: str | None = None
    """Where the download stage fetches the file from; None for files already on a reachable filesystem."""
    license: str | None = None
    attribution: str | None = None
    bytes: int | None = None
    local_path: str | None = None
    """Path of the downloaded file (set from the download stage's result)."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Source-specific extras (captions, aesthetic_score from a manifest, mtime for local files, ...)."""


def make_asset_id(source: str, file_identifier: str) -> str:
    """A short, stable row key. 32 hex chars of sha256 keeps collisions out of reach at billions of rows."""
    return hashlib.sha256(f"{source}\x00{file_identifier}".encode()).hexdigest()[:32]


@dataclass(slots=True)
class StageResult:
    """The outcome of one stage on one asset; becomes one row of the stage's catalog result files."""

    key: str
    """asset_id for the download stage, sha256 for every content stage."""
    state: str
    reason: str = ""
    """Stable reason code, empty when ok."""
    message: str = ""
    """Human-readable detail (exception text, captured stderr tail)."""
    retryable: bool = False
    """True for transient failures (network, worker lost): a re-run tries them again."""
    seconds: float = 0.0
    columns: dict[str, Any] = field(default_factory=dict)
    """Stage-specific output columns (e.g. vertices, faces for inspect)."""

    def __post_init__(self) -> None:
        if self.state not in STATES:
            raise ValueError(f"unknown state {self.state!r}; expected one of {STATES}")
        if self.state != OK and self.state != SKIPPED and not self.reason:
            raise ValueError(f"a {self.state} result needs a reason code (key {self.key})")


def params_hash(stage: str, version: int, params: Any) -> str:
    """Hash of what determines a stage's output: its code version and its config section.

    A re-run skips an asset whose finished result carries the same hash, and redoes it when either changes.
    """
    blob = json.dumps({"stage": stage, "version": version, "params": params}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Timer:
    """`with Timer() as t: ...; t.seconds` - wall time of a stage call."""

    def __enter__(self) -> "Timer":
        self._t0 = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._t0

"""Results received but not yet in the catalog, kept on the driver's disk so a killed flow loses none of them.

A batch task commits its results to the catalog every `flow.commit_every` assets. Between commits each result is
appended to a journal file as it arrives (one JSON line, flushed). A journal is one chunk: when the chunk is
committed its catalog part gets a name derived from the chunk (`part-j<id>-<seq>.parquet`) and the file is
deleted. A process holds an exclusive `flock` on its open journal, so a journal whose lock can be taken belongs
to a dead process: `replay` commits it (unless its part already exists: killed between commit and delete) and
deletes it. Either way every finished asset reaches the catalog exactly once, and a re-run never redoes it.
"""

from __future__ import annotations

import fcntl
import json
import os
import uuid
from typing import Any

from flux3d.catalog import Catalog
from flux3d.pipeline.stage import Stage
from flux3d.records import StageResult


def _plain(value: Any) -> Any:
    """numpy scalars and arrays as JSON values (stage columns sometimes hold them)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def _dir(catalog: Catalog, stage: str) -> str:
    path = catalog.storage.local_dir(f"journal/{stage}")
    os.makedirs(path, exist_ok=True)
    return path


class Journal:
    """The journal of one batch task of `stage`; `add` as results arrive, `commit` to move them to the catalog."""

    def __init__(self, catalog: Catalog, stage: Stage, commit_every: int) -> None:
        self.catalog, self.stage, self.commit_every = catalog, stage, commit_every
        self.id, self.seq = uuid.uuid4().hex[:12], 0
        self.pending: list[StageResult] = []
        self._file = None

    def _open(self) -> None:
        path = os.path.join(_dir(self.catalog, self.stage.name), f"{self.id}-{self.seq:06d}.jsonl")
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - held open (and locked) across calls
        fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._file.write(json.dumps({"stage": self.stage.name, "params": self.stage.params}) + "\n")

    def add(self, results: list[StageResult]) -> None:
        if self._file is None:
            self._open()
        for r in results:
            self._file.write(json.dumps({"key": r.key, "state": r.state, "reason": r.reason, "message": r.message,
                                         "retryable": r.retryable, "seconds": r.seconds, "columns": r.columns},
                                        default=_plain) + "\n")
        self._file.flush()  # in the page cache: survives the process being killed (not the machine)
        self.pending.extend(results)
        if len(self.pending) >= self.commit_every:
            self.commit()

    def commit(self) -> None:
        if self._file is None:
            return
        self.catalog.write_results(self.stage.name, self.stage.params, self.pending, self.stage.columns,
                                   part=f"j{self.id}-{self.seq:06d}")
        path = self._file.name
        self._file.close()
        os.remove(path)
        self._file, self.pending, self.seq = None, [], self.seq + 1


def replay(catalog: Catalog, stage: Stage) -> int:
    """Commit the journals of `stage` that dead processes left; returns how many results reached the catalog."""
    folder = _dir(catalog, stage.name)
    replayed = 0
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        with open(path, encoding="utf-8") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live batch task's journal
            lines = f.read().split("\n")
        part = f"j{name.removesuffix('.jsonl')}"
        if not catalog.has_part(stage.name, part):
            header, results = None, []
            for line in lines:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the line being written when the process died
                if header is None:
                    header = rec
                else:
                    results.append(StageResult(**rec))
            if header is not None and results:
                catalog.write_results(stage.name, header["params"], results, stage.columns, part=part)
                replayed += len(results)
        os.remove(path)
    return replayed

"""The asset table: Parquet, one row per asset, stage states with reasons.

Concurrent writers never rewrite a shared file. Each writer appends its own immutable part files:

    catalog/assets/part-*.parquet          what the sources listed (key: asset_id)
    catalog/<stage>/part-*.parquet         stage results (key: asset_id for download, sha256 for content stages)

Readers see the union: for every key the newest result wins (by `finished_at`). The merged table has one row per
asset with per-stage columns `<stage>_state`, `<stage>_reason`, `<stage>_message`, `<stage>_params`,
`<stage>_seconds`, plus each stage's own output columns (vertices, has_texture, ...).

Content stages are keyed by sha256, so two listings of the same bytes (a duplicate across sources) share one
inspect/render/... result and the work is done once.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from flux3d.records import FAILED, OK, REJECTED, SKIPPED, AssetRecord, StageResult
from flux3d.storage import Storage

# Known stages in pipeline order; the order of columns and of `status`. Stages not listed come after, sorted.
STAGE_ORDER = ("download", "inspect", "render", "score", "curate", "voxelize", "encode", "shard")
ASSET_KEY_STAGES = ("download",)  # stages keyed by asset_id; all others are keyed by content sha256
RESULT_FIELDS = ("state", "reason", "message", "params", "seconds", "retryable")

ASSET_SCHEMA = pa.schema(
    [
        ("asset_id", pa.string()),
        ("source", pa.string()),
        ("file_identifier", pa.string()),
        ("format", pa.string()),
        ("sha256", pa.string()),
        ("url", pa.string()),
        ("license", pa.string()),
        ("attribution", pa.string()),
        ("bytes", pa.int64()),
        ("metadata", pa.string()),  # JSON
        ("listed_at", pa.timestamp("us", tz="UTC")),
    ]
)


def result_schema(stage: str, columns: pa.Schema | None = None) -> pa.Schema:
    key = "asset_id" if stage in ASSET_KEY_STAGES else "sha256"
    base = [
        (key, pa.string()),
        ("state", pa.string()),
        ("reason", pa.string()),
        ("message", pa.string()),
        ("params", pa.string()),
        ("seconds", pa.float64()),
        ("retryable", pa.bool_()),
        ("finished_at", pa.timestamp("us", tz="UTC")),
    ]
    own = list(columns) if columns is not None else []
    # The merged table prefixes result fields with the stage (render_seconds): a stage column of that name
    # would collide there.
    clash = {f.name for f in own} & {f"{stage}_{name}" for name, _ in base}
    if clash:
        raise ValueError(f"stage {stage} columns {sorted(clash)} collide with the merged table's result fields")
    return pa.schema(base + own)


def stage_key(stage: str) -> str:
    return "asset_id" if stage in ASSET_KEY_STAGES else "sha256"


def _now_us() -> int:
    return time.time_ns() // 1000


def newest_first(table: pa.Table) -> pa.Table:
    """Rows sorted newest first (finished_at, or listed_at for listings); an int64 sort, cheap at 1M rows."""
    order_col = "finished_at" if "finished_at" in table.column_names else "listed_at"
    return table.take(pc.sort_indices(table, sort_keys=[(order_col, "descending")]))


def latest_per_key(table: pa.Table, key: str) -> pa.Table:
    """Keep the newest row of every key, in time order (oldest first)."""
    if table.num_rows == 0:
        return table
    distinct = pc.unique(table[key])
    if len(distinct) == table.num_rows:
        return table  # the common case, every key written once: nothing to drop
    table = newest_first(table)
    # index_in returns the first match, i.e. the newest row of each distinct key.
    keep = pc.index_in(distinct, value_set=table[key])
    return table.take(np.sort(keep.to_numpy())[::-1])  # descending positions in newest-first = oldest first


class Catalog:
    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    # -- writes -------------------------------------------------------------------------------------------------
    def _write_part(self, folder: str, table: pa.Table, name: str | None = None) -> str:
        name = name or f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}"
        rel = f"catalog/{folder}/part-{name}.parquet"
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        self.storage.write_bytes(rel, sink.getvalue().to_pybytes())
        return rel

    def add_assets(self, records: Sequence[AssetRecord]) -> str | None:
        if not records:
            return None
        now = _now_us()
        rows = []
        for r in records:
            d = dataclasses.asdict(r)
            d.pop("local_path")
            d["metadata"] = json.dumps(d["metadata"], sort_keys=True, default=str)
            d["listed_at"] = now
            rows.append(d)
        return self._write_part("assets", pa.Table.from_pylist(rows, schema=ASSET_SCHEMA))

    def write_results(
        self, stage: str, params: str, results: Sequence[StageResult], columns: pa.Schema | None = None,
        part: str | None = None,
    ) -> str | None:
        """Append one part file of results. `columns` declares the stage's own output columns and their types.
        `part` names the file (a journal chunk's id, so that a replay can tell it was already written)."""
        if not results:
            return None
        schema = result_schema(stage, columns)
        key = stage_key(stage)
        now = _now_us()
        rows = []
        for r in results:
            row = {key: r.key, "state": r.state, "reason": r.reason, "message": r.message[-4000:], "params": params,
                   "seconds": r.seconds, "retryable": r.retryable, "finished_at": now}
            extra = set(r.columns) - set(schema.names)
            if extra:
                raise ValueError(f"stage {stage} returned undeclared columns {sorted(extra)}")
            row.update(r.columns)
            rows.append(row)
        return self._write_part(stage, pa.Table.from_pylist(rows, schema=schema), part)

    def has_part(self, stage: str, part: str) -> bool:
        return self.storage.exists(f"catalog/{stage}/part-{part}.parquet")

    # -- reads --------------------------------------------------------------------------------------------------
    def _read_folder(self, folder: str, columns: Iterable[str] | None = None) -> pa.Table | None:
        files = self.storage.list(f"catalog/{folder}", suffix=".parquet")
        if not files:
            return None
        fs = self.storage.fs
        # Part files of one stage may come from different code versions (a column added later): unify schemas.
        schema = pa.unify_schemas([pq.read_schema(f, filesystem=fs) for f in files])
        dataset = ds.dataset(files, schema=schema, format="parquet", filesystem=fs)
        cols = None if columns is None else [c for c in columns if c in schema.names]
        return dataset.to_table(columns=cols)

    def stages(self) -> list[str]:
        base = self.storage.path("catalog")
        if not self.storage.fs.exists(base):
            return []
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.storage.fs.ls(base, detail=False)]
        present = [n for n in names if n != "assets" and self.storage.list(f"catalog/{n}", ".parquet")]
        return [s for s in STAGE_ORDER if s in present] + sorted(s for s in present if s not in STAGE_ORDER)

    def assets(self, columns: Iterable[str] | None = None) -> pa.Table:
        cols = None if columns is None else list(dict.fromkeys(["asset_id", "listed_at", *columns]))
        table = self._read_folder("assets", cols)
        if table is None:
            return ASSET_SCHEMA.empty_table() if cols is None else ASSET_SCHEMA.empty_table().select(cols)
        return latest_per_key(table, "asset_id")

    def results(self, stage: str, columns: Iterable[str] | None = None, dedupe: bool = True) -> pa.Table | None:
        """A stage's results, the newest per key; `dedupe=False` keeps every row, newest first (for joins)."""
        key = stage_key(stage)
        cols = None if columns is None else list(dict.fromkeys([key, "finished_at", *columns]))
        table = self._read_folder(stage, cols)
        if table is None:
            return None
        return latest_per_key(table, key) if dedupe else newest_first(table)

    def table(self, stages: Sequence[str] | None = None, result_columns: Sequence[str] | None = None,
              asset_columns: Sequence[str] | None = None) -> pa.Table:
        """The merged asset table: one row per asset_id, every stage's latest result joined on.

        `result_columns` restricts what is read of each stage (e.g. ("state", "reason") for status); None = all.
        """
        merged = self.assets(asset_columns)
        stages = list(stages if stages is not None else self.stages())
        if "download" not in stages and any(stage_key(s) == "sha256" for s in stages):
            # Content stages are keyed by the downloaded hash; a listing may have none (Objaverse 1.0, bare URLs),
            # so without download's hash those assets would never meet their render, curate or encode results.
            link = self.results("download", ["sha256"], dedupe=False)
            if link is not None and "sha256" in link.column_names and "sha256" in merged.column_names:
                merged = _left_join(merged, link.select(["asset_id", "sha256"]), "asset_id")
        for stage in stages:
            key = stage_key(stage)
            cols = result_columns
            if cols is not None and key == "asset_id":
                cols = (*cols, "sha256")  # the downloaded hash links assets to the content stages after it
            res = self.results(stage, cols, dedupe=False)  # the join below takes the newest match per key
            if res is None:
                continue
            res = res.drop_columns([c for c in ("finished_at",) if c in res.column_names])
            res = res.rename_columns([c if c == key or c not in RESULT_FIELDS else f"{stage}_{c}"
                                      for c in res.column_names])
            if key not in merged.column_names:
                continue
            merged = _left_join(merged, res, key)
        return merged  # in listing order: latest_per_key keeps time order and the joins keep row order

    # -- planning -----------------------------------------------------------------------------------------------
    def done_keys(self, stage: str, params: str) -> set[str]:
        """Keys whose latest result is final for these params (anything but a retryable failure)."""
        res = self.results(stage, ["state", "params", "retryable"])
        if res is None:
            return set()
        final = pc.and_(pc.equal(res["params"], params), pc.invert(pc.fill_null(res["retryable"], False)))
        return set(res.filter(final)[stage_key(stage)].to_pylist())

    def todo(self, stage: str, params: str, after: Sequence[str] = (), result_columns: Sequence[str] = ("state",),
             asset_columns: Sequence[str] | None = None) -> pa.Table:
        """What `stage` still has to do: rows whose `after` stages are all ok and whose `stage` result is not final
        for `params`. Content stages get one row per sha256 (a file listed twice is processed once)."""
        table = self.table(list(after), result_columns=result_columns, asset_columns=asset_columns)
        for up in after:
            if f"{up}_state" not in table.column_names:
                return table.slice(0, 0)
            table = table.filter(pc.fill_null(pc.equal(table[f"{up}_state"], OK), False))
        table = self.drop_done(table, stage, params)
        return first_per_sha(table) if stage_key(stage) == "sha256" else table

    def drop_done(self, table: pa.Table, stage: str, params: str) -> pa.Table:
        """`table`'s rows whose `stage` result is not final for `params` (a planned batch, re-checked when it runs)."""
        done = pa.array(sorted(self.done_keys(stage, params)), pa.string())
        return table.filter(pc.invert(pc.is_in(table[stage_key(stage)], value_set=done)))

    def status(self) -> dict[str, Any]:
        """Counts per stage and state, and per `state:reason` for everything not ok."""
        stages = self.stages()
        t = self.table(stages, result_columns=("state", "reason"), asset_columns=("sha256", "source"))
        out: dict[str, Any] = {"assets": t.num_rows,
                               "unique_sha256": pc.count_distinct(t["sha256"]).as_py() if t.num_rows else 0,
                               "sources": _counts(t["source"]) if t.num_rows else {}, "stages": {}}
        prev_ok = None
        for stage in stages:
            state = t[f"{stage}_state"]
            if prev_ok is not None:
                # Not reached because an earlier stage did not pass: "blocked", not "pending".
                state = pc.if_else(pc.and_(pc.is_null(state), pc.invert(prev_ok)), pa.scalar("blocked"), state)
            state = pc.fill_null(state, "pending")
            not_ok = pc.invert(pc.is_in(state, pa.array([OK, "pending", "blocked"])))
            reasons = pc.binary_join_element_wise(pc.filter(state, not_ok),
                                                  pc.filter(pc.fill_null(t[f"{stage}_reason"], ""), not_ok), ":")
            out["stages"][stage] = {"states": _counts(state), "reasons": _counts(reasons)}
            prev_ok = pc.equal(state, OK)
        return out


def first_per_sha(table: pa.Table) -> pa.Table:
    """The first row of each sha256, in table order (a file listed twice is processed and reported once)."""
    if not table.num_rows:
        return table
    first = pc.index_in(pc.unique(table["sha256"]), value_set=table["sha256"])
    return table.take(np.sort(first.to_numpy()))


def as_record(row: dict[str, Any]) -> AssetRecord:
    """The AssetRecord of one catalog row (a dict of asset and result columns)."""
    values = {k: v for k, v in row.items() if k in AssetRecord.__slots__}
    values["metadata"] = json.loads(row.get("metadata") or "{}")
    return AssetRecord(**values)


def _left_join(left: pa.Table, right: pa.Table, key: str) -> pa.Table:
    """Attach `right`'s columns to every row of `left` by `key`, keeping `left`'s order.

    Where `right` has several rows of a key, the first wins (callers pass results newest first).

    A column both tables have (download's `sha256` and `bytes`) takes `right`'s value where it has one: the
    stage measured what the listing only claimed. Done with index_in + take rather than Table.join, which
    refuses list-typed columns such as bbox_min.
    """
    taken = right.drop_columns([key]).take(pc.index_in(left[key], value_set=right[key]))
    for name in taken.column_names:
        if name in left.column_names:
            i = left.schema.get_field_index(name)
            left = left.set_column(i, name, pc.coalesce(taken[name], left[name]))
        else:
            left = left.append_column(taken.field(name), taken[name])
    return left


def _counts(arr: pa.ChunkedArray | pa.Array) -> dict[str, int]:
    vc = pc.value_counts(arr)
    pairs = sorted(zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist()), key=lambda p: (-p[1], str(p[0])))
    return {str(k): int(v) for k, v in pairs}


__all__ = ["Catalog", "ASSET_SCHEMA", "result_schema", "stage_key", "latest_per_key", "OK", "FAILED", "REJECTED",
           "SKIPPED"]

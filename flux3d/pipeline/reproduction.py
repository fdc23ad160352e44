"""The reproduction report: how far each of TRELLIS-500K's published lists got through the pipeline, beside the
counts TRELLIS published and the paper's ~360K curated set.

Per list (`trellis:<list>` sources): listed (rows in the catalog), resolved (an identifier the source could turn
into a fetchable location), downloaded, sha256-matched (the bytes hash to what the list says), inspected ok,
rendered, kept (curated ok). Read from the catalog alone, so `flux3d status` and the data flow's Prefect artifact
show the same numbers at any point of a run.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from flux3d.catalog import Catalog
from flux3d.records import OK
from flux3d.sources.trellis import LISTS, PAPER_CURATED, PUBLISHED_COUNTS

COLUMNS = ("listed", "resolved", "downloaded", "sha256_matched", "inspected_ok", "rendered", "kept")
EVALUATION_LISTS = ("Toys4k",)  # TRELLIS evaluates on Toys4k; the other five lists are its 500,777 training objects


def _ok(table: pa.Table, stage: str) -> pa.ChunkedArray | pa.Array:
    if f"{stage}_state" not in table.column_names:
        return pa.array([False] * table.num_rows)
    return pc.fill_null(pc.equal(table[f"{stage}_state"], OK), False)


def _count(mask: pa.ChunkedArray | pa.Array) -> int:
    return int(pc.sum(pc.cast(mask, pa.int64())).as_py() or 0)


def reproduction_report(catalog: Catalog) -> dict[str, Any] | None:
    """Counts per published list; None when the catalog holds no `trellis:` source."""
    stages = [s for s in ("download", "inspect", "render", "curate") if s in catalog.stages()]
    table = catalog.table(stages, result_columns=("state", "source_outcome"),
                          asset_columns=("source", "sha256", "metadata"))
    if not table.num_rows:
        return None
    table = table.filter(pc.starts_with(table["source"], "trellis:"))
    if not table.num_rows:
        return None
    # sort_keys JSON escapes quotes inside strings, so this key pattern can only match the key itself.
    resolved = pc.invert(pc.match_substring(table["metadata"], '"unresolved": '))
    matched = _ok(table, "download")
    if "source_outcome" in table.column_names:
        matched = pc.and_(matched, pc.fill_null(pc.equal(table["source_outcome"], "found"), False))
    # Each step counts only rows that passed the one before: a row whose download failed still joins the content
    # stages' results through its listed sha256 when another row brought those bytes.
    downloaded = pc.and_(resolved, _ok(table, "download"))
    inspected = pc.and_(downloaded, _ok(table, "inspect"))
    rendered = pc.and_(inspected, _ok(table, "render"))
    masks = {"resolved": resolved, "downloaded": downloaded, "sha256_matched": pc.and_(downloaded, matched),
             "inspected_ok": inspected, "rendered": rendered, "kept": pc.and_(rendered, _ok(table, "curate"))}
    lists: dict[str, dict[str, int]] = {}
    for name in LISTS:
        mine = pc.equal(table["source"], f"trellis:{name}")
        if not _count(mine):
            continue
        row = {"listed": _count(mine)}
        row.update({k: _count(pc.and_(mine, m)) for k, m in masks.items()})
        lists[name] = {**row, "trellis_published": PUBLISHED_COUNTS[name]}
    training = [r for n, r in lists.items() if n not in EVALUATION_LISTS]
    total = {c: sum(r[c] for r in training) for c in COLUMNS}
    return {"lists": lists, "training_total": {**total, "trellis_published": sum(
        v for n, v in PUBLISHED_COUNTS.items() if n not in EVALUATION_LISTS)}, "paper_curated": PAPER_CURATED}


def reproduction_markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown table (what `flux3d status` prints and the Prefect artifact shows)."""
    head = ["list", *COLUMNS, "TRELLIS published"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = [*report["lists"].items(), ("training total", report["training_total"])]
    for name, r in rows:
        lines.append("| " + " | ".join([name, *(f"{r[c]:,}" for c in (*COLUMNS, "trellis_published"))]) + " |")
    lines += ["", f"TRELLIS published = objects per list after its aesthetic threshold (5.5 Objaverse-XL, 4.5 the "
              f"others); Toys4k is for evaluation. The paper curates ~{report['paper_curated']:,} from the "
              f"training lists; this run keeps {report['training_total']['kept']:,}."]
    return "\n".join(lines)

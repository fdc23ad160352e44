"""What each stage shows in the Prefect UI: counts by state and reason, throughput, and contact sheets.

Images go into markdown artifacts as small inline JPEGs: the UI cannot read files on the workers' disks or in a
bucket, and a thumbnail of a few tens of KB per sheet keeps the Prefect database small.
"""

from __future__ import annotations

import base64
import io
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flux3d.config.pipeline import Config
from flux3d.pipeline.stage import StageSummary
from flux3d.storage import Storage


def counts_table(run: StageSummary) -> list[dict[str, Any]]:
    """One row per state, then one per `state:reason` that is not ok."""
    rows: list[dict[str, Any]] = [{"state": s, "reason": "", "assets": n} for s, n in sorted(run.states.items())]
    for key, n in sorted(run.reasons.items(), key=lambda kv: -kv[1]):
        state, reason = key.split(":", 1)
        rows.append({"state": state, "reason": reason, "assets": n})
    return rows


def thumbnail(storage: Storage, rel_or_path: str, width: int = 384) -> str:
    """Markdown of an image file as an inline JPEG `width` pixels wide."""
    from PIL import Image

    path = rel_or_path if rel_or_path.startswith(storage.root) else storage.path(rel_or_path)
    with storage.fs.open(path, "rb") as f, Image.open(f) as im:
        im = im.convert("RGB")
        im.thumbnail((width, width * 4))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=80)
    return f"![{rel_or_path.rsplit('/', 2)[-2]}](data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()})"


def publish_stage(run: StageSummary, cfg: Config, render_dirs: list[str]) -> None:
    """Counts and throughput of one stage's run; for render, contact sheets of a few of the assets it rendered."""
    create_table_artifact(counts_table(run), key=f"{run.stage}-counts",
                          description=f"{run.stage}: assets by state and reason (this run)")
    per_asset = run.seconds / run.processed if run.processed else 0.0
    lines = [f"### {run.stage}", "", "| assets | wall seconds | assets/s | s per asset |", "|---|---|---|---|",
             f"| {run.processed} | {run.seconds:.1f} | {run.per_second:.2f} | {per_asset:.2f} |"]
    storage = Storage(cfg.storage.root)
    sheets = [f"{d}/contact.png" for d in render_dirs if storage.fs.exists(f"{d}/contact.png")]
    if sheets:
        lines += ["", "#### Contact sheets", ""] + [thumbnail(storage, s) for s in sheets[:4]]
    create_markdown_artifact("\n".join(lines), key=f"{run.stage}-summary",
                             description=f"{run.stage}: throughput" + (" and contact sheets" if sheets else ""))


def publish_curation(summary: dict[str, Any], storage: Storage) -> None:
    """The curation report: kept share, rejections by reason, and each reason's contact sheet."""
    lines = [f"### Curation: {summary['kept']} of {summary['assets']} assets kept", "",
             "| decision | assets |", "|---|---|"]
    lines += [f"| {reason} | {n} |" for reason, n in sorted(summary["by_reason"].items(), key=lambda kv: -kv[1])]
    for reason, sheet in summary.get("contact_sheets", {}).items():
        lines += ["", f"#### Rejected: {reason}", "", thumbnail(storage, f"reports/curation/{sheet}", width=512)]
    create_markdown_artifact("\n".join(lines), key="curation-report", description="curation decisions")


def publish_shards(version: str, stats: dict[str, Any]) -> None:
    rows = [{"split": s, "assets": stats["assets"][s], "shards": stats["shards"][s]} for s in ("train", "val")]
    create_table_artifact(rows, key="shards", description=f"dataset version {version}: "
                          f"{stats['bytes'] / 2**20:.1f} MiB, {stats['failed']} failed")


def publish_reproduction(report: dict[str, Any]) -> None:
    """How far each of TRELLIS-500K's lists got, beside TRELLIS's published counts (as `flux3d status` prints)."""
    from flux3d.pipeline.reproduction import reproduction_markdown

    create_markdown_artifact("### Reproducing TRELLIS-500K's lists\n\n" + reproduction_markdown(report),
                             key="reproduction", description="per published list: listed ... kept")

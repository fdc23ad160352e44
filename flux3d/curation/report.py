"""The curation report: what a person reads before trusting a filter.

`reports/curation/` under the data root (replaced on each run, published like a render folder):

    summary.json             counts by decision, reason and source; thresholds, rule, params; score quantiles
    report.md                the same as tables, with the images below linked in
    aesthetic.png            histogram of mean aesthetic scores, kept vs rejected, thresholds marked
    texture.png              histograms of the magenta and flat fractions, thresholds marked
    rejected_<reason>.png    a seeded sample of rejected assets per reason: one row of curation views each
    score_differences.csv    where a list publishes scores (TRELLIS-500K): every asset that our score and the
                             list's would decide differently at the source's threshold, and which one keeps it
    differ_<kept_by>.png     a sample of them kept by the `published` or the `scorer` score only
"""

from __future__ import annotations

import collections
import datetime
import json
import os
import random
import shutil
import tempfile
from typing import Any

import numpy as np
import pyarrow as pa

from flux3d.config.pipeline import Config
from flux3d.curation.policy import aesthetic_threshold
from flux3d.storage import Storage

TILE = 128
SHEET_VIEWS = 4


def summarize(table: pa.Table, cfg: Config, params: str, rule: str) -> dict[str, Any]:
    rows = table.select(["source", "curate_state", "curate_reason", "aesthetic_score"]).to_pylist()
    by_reason = collections.Counter(f"{r['curate_state']}:{r['curate_reason']}" if r["curate_reason"] else "keep"
                                    for r in rows)
    by_source: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for r in rows:
        by_source[r["source"]]["keep" if r["curate_state"] == "ok" else r["curate_reason"]] += 1
    scores = np.array([r["aesthetic_score"] for r in rows if r["aesthetic_score"] is not None], dtype=np.float64)
    quantiles = {f"p{q}": float(np.percentile(scores, q)) for q in (5, 25, 50, 75, 95)} if len(scores) else {}
    return {
        "generated_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "params": params, "texture_rule": rule, "assets": len(rows),
        "kept": sum(r["curate_state"] == "ok" for r in rows),
        "rejected": sum(r["curate_state"] == "rejected" for r in rows),
        "failed": sum(r["curate_state"] == "failed" for r in rows),
        "by_reason": dict(by_reason.most_common()),
        "by_source": {s: dict(c.most_common()) for s, c in sorted(by_source.items())},
        "thresholds": {"default": cfg.curate.aesthetic_threshold, **cfg.curate.aesthetic_thresholds,
                       "magenta_max": cfg.curate.magenta_max, "flat_max": cfg.curate.flat_max},
        "aesthetic_quantiles": quantiles,
    }


def compare_scores(table: pa.Table, cfg: Config) -> dict[str, Any] | None:
    """Our score against the list's where both exist: Spearman rank correlation, and the assets whose keep/drop
    at the source's threshold would differ (`kept_by`: the score that alone would keep it). None when no asset
    has both."""
    if "published_aesthetic" not in table.column_names:
        return None
    rows = [r for r in table.select(["sha256", "source", "scorer_aesthetic", "published_aesthetic",
                                     "render_dir"]).to_pylist()
            if r["scorer_aesthetic"] is not None and r["published_aesthetic"] is not None]
    if not rows:
        return None
    from scipy.stats import spearmanr

    ours = np.array([r["scorer_aesthetic"] for r in rows])
    listed = np.array([r["published_aesthetic"] for r in rows])
    rho = float(spearmanr(ours, listed).statistic) if len(rows) > 1 else float("nan")
    differ = []
    for r in rows:
        t = aesthetic_threshold(r["source"], cfg.curate)
        if (r["published_aesthetic"] >= t) != (r["scorer_aesthetic"] >= t):
            differ.append({**r, "threshold": t, "kept_by": "published" if r["published_aesthetic"] >= t else "scorer",
                           "label": f"ours {r['scorer_aesthetic']:.2f} list {r['published_aesthetic']:.2f} (>= {t})"})
    return {"assets": len(rows), "spearman": None if np.isnan(rho) else rho, "differ": differ}


def _write_comparison(table: pa.Table, cfg: Config, storage: Storage, work: str) -> dict[str, Any] | None:
    """score_differences.csv (every asset the two scores decide differently) and a contact sheet per side; the
    summary keeps the counts, so it stays small at 500K assets."""
    comparison = compare_scores(table, cfg)
    if comparison is None:
        return None
    differ = comparison.pop("differ")
    import pyarrow.csv as pacsv

    fields = ["sha256", "source", "scorer_aesthetic", "published_aesthetic", "threshold", "kept_by"]
    pacsv.write_csv(pa.Table.from_pylist([{k: r[k] for k in fields} for r in differ]) if differ else
                    pa.table({k: pa.array([], pa.string()) for k in fields}),
                    os.path.join(work, "score_differences.csv"))
    comparison["differences"] = "score_differences.csv"
    for kept_by in ("published", "scorer"):
        rows = [r for r in differ if r["kept_by"] == kept_by]
        comparison[f"kept_by_{kept_by}_only"] = len(rows)
        if rows:
            sample = random.Random(kept_by).sample(rows, min(cfg.curate.report_samples, len(rows)))
            comparison[f"sheet_{kept_by}"] = f"differ_{kept_by}.png"
            _sheet(sample, cfg, storage, os.path.join(work, f"differ_{kept_by}.png"))
    return comparison


def _histograms(table: pa.Table, cfg: Config, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on workers
    import matplotlib.pyplot as plt

    kept = table["curate_state"].to_numpy(zero_copy_only=False) == "ok"
    score = np.array(table["aesthetic_score"].to_pylist(), dtype=np.float64)
    fig, ax = plt.subplots(figsize=(7, 4))
    lines: dict[float, list[str]] = collections.defaultdict(list)  # one dashed line per distinct threshold
    for name, t in {"default": cfg.curate.aesthetic_threshold, **cfg.curate.aesthetic_thresholds}.items():
        lines[t].append(name)
    valid = np.isfinite(score)  # failed decisions may lack a score
    lo, hi = min([*score[valid], *lines]) - 0.5, max([*score[valid], *lines]) + 0.5
    ax.hist([score[valid & kept], score[valid & ~kept]], bins=np.linspace(lo, hi, 41), stacked=True,
            label=["kept", "rejected"])
    for t, names in lines.items():
        ax.axvline(t, linestyle="--", color="k", linewidth=0.8)
        ax.annotate(", ".join(names), (t, ax.get_ylim()[1] * 0.95), rotation=90, fontsize=7, ha="right", va="top")
    ax.set(xlabel="mean aesthetic score (curation views)", ylabel="assets", title="Aesthetic score")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "aesthetic.png"), dpi=100)
    plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, col, limit in zip(axes, ("magenta_fraction", "flat_fraction"), (cfg.curate.magenta_max,
                                                                           cfg.curate.flat_max)):
        values = np.array(table[col].to_pylist(), dtype=np.float64)
        ax.hist(values[~np.isnan(values)], bins=np.linspace(0, 1, 41))
        ax.axvline(limit, linestyle="--", color="r")
        ax.set(xlabel=col.replace("_", " "), ylabel="assets")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "texture.png"), dpi=100)
    plt.close(fig)


def _sheet(rows: list[dict[str, Any]], cfg: Config, storage: Storage, path: str) -> None:
    from PIL import Image, ImageDraw

    from flux3d.stages.render_layout import curation_views

    sheet = Image.new("RGB", (SHEET_VIEWS * TILE, len(rows) * TILE), (128, 128, 128))
    draw = ImageDraw.Draw(sheet)
    for r, row in enumerate(rows):
        try:
            views = curation_views(storage, row["render_dir"], cfg.render, limit=SHEET_VIEWS)
        except (OSError, ValueError, KeyError):
            views = []  # a render deleted since: the row stays grey, labelled
        for c, rgba in enumerate(views):
            im = Image.fromarray(rgba, "RGBA").resize((TILE, TILE), Image.LANCZOS)
            sheet.paste(im, (c * TILE, r * TILE), im)
        score = row.get("aesthetic_score")
        label = row.get("label") or ("" if score is None else f"{score:.2f}")
        draw.text((4, r * TILE + 2), f"{row['sha256'][:10]} {row['source']} {label}", fill=(255, 255, 0))
    sheet.save(path)


def write_report(table: pa.Table, cfg: Config, storage: Storage, params: str, rule: str) -> dict[str, Any]:
    """Write `reports/curation/` from the curation table (`curate_run.curation_table`); returns the summary."""
    summary = summarize(table, cfg, params, rule)
    work = tempfile.mkdtemp(prefix="flux3d-report-")
    try:
        if table.num_rows:
            _histograms(table, cfg, work)
        rejected = [r for r in table.select(["sha256", "source", "curate_state", "curate_reason",
                                             "aesthetic_score", "render_dir"]).to_pylist()
                    if r["curate_state"] == "rejected"]
        by_reason: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
        for r in rejected:
            by_reason[r["curate_reason"]].append(r)
        sheets = {}
        for reason, rows in sorted(by_reason.items()):
            sample = random.Random(reason).sample(rows, min(cfg.curate.report_samples, len(rows)))
            sheets[reason] = f"rejected_{reason}.png"
            _sheet(sample, cfg, storage, os.path.join(work, sheets[reason]))
        summary["contact_sheets"] = sheets
        comparison = _write_comparison(table, cfg, storage, work)
        if comparison is not None:
            summary["score_comparison"] = comparison
        with open(os.path.join(work, "report.md"), "w") as f:
            f.write(_markdown(summary))
        with open(os.path.join(work, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        storage.publish_dir(work, "reports/curation", last="summary.json")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return summary


def _markdown(s: dict[str, Any]) -> str:
    lines = [f"# Curation report ({s['generated_at']})", "",
             f"{s['assets']} assets: **{s['kept']} kept**, {s['rejected']} rejected, {s['failed']} failed. "
             f"Texture rule `{s['texture_rule']}`, params `{s['params']}`.", "",
             "| decision | assets |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in s["by_reason"].items()]
    lines += ["", "| source | " + " | ".join(["keep", "rejected / failed by reason"]) + " |", "|---|---|---|"]
    for source, counts in s["by_source"].items():
        other = ", ".join(f"{k} {v}" for k, v in counts.items() if k != "keep")
        lines.append(f"| {source} | {counts.get('keep', 0)} | {other} |")
    lines += ["", "Thresholds: " + ", ".join(f"{k} {v}" for k, v in s["thresholds"].items()), ""]
    if s["assets"]:
        lines += ["![aesthetic](aesthetic.png)", "", "![texture](texture.png)", ""]
    for reason, name in s.get("contact_sheets", {}).items():
        lines += [f"## Rejected: {reason}", "", f"![{reason}]({name})", ""]
    c = s.get("score_comparison")
    if c:
        rho = "n/a" if c["spearman"] is None else f"{c['spearman']:.3f}"
        lines += ["## Our aesthetic score vs the published one", "",
                  f"{c['assets']} assets have both; Spearman rank correlation {rho}. At each source's threshold, "
                  f"{c['kept_by_published_only']} would be kept by the published score only and "
                  f"{c['kept_by_scorer_only']} by ours only (all listed in [{c['differences']}]"
                  f"({c['differences']})).", ""]
        for kept_by in ("published", "scorer"):
            if c.get(f"sheet_{kept_by}"):
                lines += [f"![kept by {kept_by} only]({c[f'sheet_{kept_by}']})", ""]
    return "\n".join(lines)

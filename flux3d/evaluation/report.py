"""The evaluation report: report.json (every number, per asset, and the config that produced them), report.md and
report.html (tables laid out like the paper's, with the paper's and TRELLIS's published numbers beside ours),
grid.png (input | ours at the input view | ours at another view | ground truth there | reconstruction pairs), and
the comparison against a previous report, which the retraining gate reads.

Published numbers are on Toys4k with the paper's full-size models; ours are on whatever the evaluation assets are,
so the rows sit side by side for orientation, not as a like-for-like comparison (the report says so).
"""

from __future__ import annotations

import html
import io
import json
import time
from typing import Any

import numpy as np

from flux3d.storage import Storage

NAN = float("nan")

# Paper Tab. 2 (reconstruction on Toys4k): SSIM, PSNR, LPIPS.
PAPER_RECON = [("GaussianAnything", 0.9475, 26.73, 0.06397), ("TRELLIS", 0.9719, 31.54, 0.02964),
               ("FLUX3D Enc-Dec (paper)", 0.9779, 33.80, 0.02699), ("FLUX3D Dec-Only (paper)", 0.9783, 34.12, 0.02668)]
# Tab. 3 (generation): SSIM, PSNR, LPIPS, CLIP, FD_incep, KD_incep(%), FD_dinov2, KD_dinov2(%).
PAPER_GEN = [("TRELLIS", 0.9558, 25.48, 0.04389, 97.92, 11.29, 0.047, 63.66, 0.62),
             ("FLUX3D Enc-Dec (paper)", 0.9615, 26.08, 0.03958, 98.40, 8.81, 0.039, 58.43, 0.49),
             ("FLUX3D Dec-Only (paper)", 0.9653, 26.26, 0.03509, 98.37, 8.73, 0.039, 54.92, 0.42)]
# Tab. 10 (the full pipeline, layouts predicted by TRELLIS's stage 1): PSNR, LPIPS, CLIP, FD_incep, FD_dinov2. The
# paper gives no layout quality; ours adds IoU and Chamfer distance against the ground-truth voxels.
PAPER_PREDICTED = [("TRELLIS (TRELLIS stage 1)", 20.32, 0.104, 94.22, 18.71, 129.78, NAN, NAN),
                   ("FLUX3D Dec-Only (TRELLIS stage 1)", 22.32, 0.0715, 95.57, 12.61, 102.04, NAN, NAN)]
# Tab. 12 (multi-view consistency, 24 views over the azimuth): mean PSNR, std.
PAPER_MV = [("TRELLIS", 25.08, 1.76), ("FLUX3D (paper)", 25.96, 1.44)]

def better(name: str) -> str:
    """Which direction improves a summary metric: spreads and distances go down, fidelity and alignment go up."""
    if name.endswith("_std") or any(t in name for t in ("lpips", "fd_", "kd_", "chamfer")):
        return "min"
    return "max"  # psnr, ssim, clip


def gate_metrics(summary: dict[str, float]) -> dict[str, float]:
    """The flat metrics the promotion gate compares: generation's when there is one, else reconstruction's."""
    out = dict(summary)
    prefix = "gen" if "gen_psnr" in summary else "recon"
    for m in ("psnr", "ssim", "lpips"):
        if f"{prefix}_{m}" in summary:
            out[m] = summary[f"{prefix}_{m}"]
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "-" if np.isnan(v) else (f"{v:.4f}" if abs(v) < 1 else f"{v:.2f}")
    return str(v)


def tables(summary: dict[str, float], label: str, previous: dict[str, float] | None) -> list[tuple]:
    """(title, header, rows) of each report table."""
    s = {k: summary.get(k, float("nan")) for k in (
        "recon_ssim", "recon_psnr", "recon_lpips", "gen_ssim", "gen_psnr", "gen_lpips", "gen_clip", "fd_inception",
        "kd_inception", "fd_dinov2", "kd_dinov2", "mv_psnr_mean", "mv_psnr_std", "pgen_psnr", "pgen_lpips",
        "pgen_clip", "fd_inception_pred", "fd_dinov2_pred", "layout_iou", "layout_chamfer")}
    out = []
    if not np.isnan(s["recon_psnr"]):
        out.append(("Reconstruction (paper Tab. 2)", ["method", "SSIM", "PSNR", "LPIPS"],
                    [list(r) for r in PAPER_RECON] + [[label, s["recon_ssim"], s["recon_psnr"], s["recon_lpips"]]]))
    if not np.isnan(s["gen_psnr"]):
        ours = [label, s["gen_ssim"], s["gen_psnr"], s["gen_lpips"], s["gen_clip"], s["fd_inception"],
                100 * s["kd_inception"], s["fd_dinov2"], 100 * s["kd_dinov2"]]
        out.append(("Generation (paper Tab. 3)", ["method", "SSIM", "PSNR", "LPIPS", "CLIP", "FD incep",
                                                  "KD incep (%)", "FD dinov2", "KD dinov2 (%)"],
                    [list(r) for r in PAPER_GEN] + [ours]))
    if not np.isnan(s["layout_iou"]):
        ours = [f"{label}, our stage 1", s["pgen_psnr"], s["pgen_lpips"], s["pgen_clip"], s["fd_inception_pred"],
                s["fd_dinov2_pred"], s["layout_iou"], s["layout_chamfer"]]
        out.append(("Full pipeline with predicted layouts (paper Tab. 10)",
                    ["method", "PSNR", "LPIPS", "CLIP", "FD incep", "FD dinov2", "layout IoU", "layout Chamfer"],
                    [list(r) for r in PAPER_PREDICTED] + [ours]))
    if not np.isnan(s["mv_psnr_mean"]):
        out.append(("Multi-view consistency (paper Tab. 12)", ["method", "mean PSNR", "std"],
                    [list(r) for r in PAPER_MV] + [[label, s["mv_psnr_mean"], s["mv_psnr_std"]]]))
    if previous:
        rows = []
        for k in sorted(set(summary) & set(previous)):
            delta = summary[k] - previous[k]
            good = delta >= 0 if better(k) == "max" else delta <= 0
            rows.append([k, previous[k], summary[k], f"{delta:+.4g}", "better or equal" if good else "worse"])
        out.append(("Against the previous evaluation", ["metric", "previous", "this run", "change", ""], rows))
    return out


def markdown(title: str, notes: list[str], tabs: list[tuple]) -> str:
    lines = [f"# {title}", "", *notes, ""]
    for name, header, rows in tabs:
        lines += [f"## {name}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
        lines.append("")
    lines += ["![input, ours (input view), ours (another view), ground truth there, reconstruction](grid.png)", ""]
    return "\n".join(lines)


def to_html(title: str, notes: list[str], tabs: list[tuple]) -> str:
    parts = [f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:70em}td,th{padding:2px 8px;text-align:right}"
             "td:first-child{text-align:left}table{border-collapse:collapse}tr:last-child{font-weight:bold}</style>",
             f"<h1>{html.escape(title)}</h1>"] + [f"<p>{html.escape(n)}</p>" for n in notes]
    for name, header, rows in tabs:
        parts.append(f"<h2>{html.escape(name)}</h2><table><tr>"
                     + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows]
        parts.append("</table>")
    parts.append('<p><img src="grid.png" alt="input, ours, ground truth"></p>')
    return "\n".join(parts)


def grid_png(results: list[Any], max_assets: int = 8) -> bytes:
    """One row per asset of the report's images, as a PNG."""
    from PIL import Image
    from torchvision.utils import make_grid

    rows = [r.grid for r in results[:max_assets] if r.grid]
    if not rows:
        return b""
    width = max(len(r) for r in rows)
    import torch

    tiles = [t for r in rows for t in (r + [torch.zeros_like(r[0])] * (width - len(r)))]
    grid = make_grid(torch.stack(tiles), nrow=width, padding=2, pad_value=0.5)
    buf = io.BytesIO()
    Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_report(out: str, result: dict[str, Any], info: dict[str, Any],
                 previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the report folder at `out` (local or fsspec); returns the report's JSON document."""
    storage = Storage(out)
    summary = result["summary"]
    doc = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **info, "summary": summary,
           "metrics": gate_metrics(summary), "assets": result["assets"], "count": result["count"],
           "shards": result["shards"], "seconds_per_asset": result["seconds_per_asset"],
           "caveats": result.get("caveats", []),
           "previous": previous and {"time": previous.get("time"), "summary": previous.get("summary")}}
    title = f"FLUX3D evaluation: {result['count']} assets"
    diffuses = f", diffusing the {info['smdit_diffuses']}" if "smdit_diffuses" in info else ""
    structure = (f", stage 1 {info['structure_run']} (step {info['structure_step']})" if "structure_run" in info
                 else "")
    notes = [f"Models ({info.get('variant', 'Dec-Only')}): decoder {info.get('decoder_run')} (step "
             f"{info.get('decoder_step')}), SMDiT {info.get('smdit_run') or '-'} (step {info.get('smdit_step', '-')}"
             f"{diffuses}){structure}. Assets: {result['shards']}.",
             "Published rows are the paper's Toys4k numbers with its full-size models; the last row is this run, on "
             "these assets, for orientation. KD is x100 as in the paper; FD/KD use torchvision's Inception-v3, so "
             "they compare across runs of this code, not with published FIDs.", *result.get("caveats", [])]
    tabs = tables(summary, f"this run ({info.get('variant', 'Dec-Only')})", previous and previous.get("summary"))
    storage.write_bytes("report.json", json.dumps(doc, indent=2, sort_keys=True, default=float).encode())
    storage.write_bytes("report.md", markdown(title, notes, tabs).encode())
    storage.write_bytes("report.html", to_html(title, notes, tabs).encode())
    png = grid_png(result["grids"])
    if png:
        storage.write_bytes("grid.png", png)
    return doc

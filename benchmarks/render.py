"""Render-stage cost on this machine, and what it projects to for the paper's dataset.

    python benchmarks/render.py [--asset PATH] [--views 4] [--resolution 512] [--samples 128] [--device cpu]
                                [--passes depth] [--pass-overhead]

Renders one asset (default: the shared CesiumMan.glb, else a generated textured box) through the real stage
(`render_asset`: isolated child, one Blender session) with `--views` main views at `--resolution` and one view in
each of the other two sets, then prints the split: import + scene setup, seconds per view, seconds per asset.
The projection counts the three sets as 512-px-view equivalents by pixels (150 + 24 x 4 + 10 = 256 per asset;
184 views) and multiplies by 360K assets and the cores Blender used (Cycles uses every core).
`--pass-overhead` renders the asset a second time without the depth/normal passes and prints the ratio.
`--sessions N` instead times the fixed cost per asset: N tiny renders, a child process each vs one Blender session.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from flux3d.config.pipeline import RenderConfig
from flux3d.stages.render import render_asset
from flux3d.storage import Storage

SHARED = Path(__file__).resolve().parents[2] / "shared" / "assets" / "good" / "CesiumMan.glb"
ASSETS = 360_000


def _render(asset: str, cfg: RenderConfig) -> tuple[dict, float]:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = render_asset(asset, Path(asset).suffix[1:].lower(), "0" * 64, cfg, Storage(tmp))
        wall = time.perf_counter() - t0
        if result.state != "ok":
            raise SystemExit(f"render failed: {result.reason}: {result.message}")
        return json.loads(Path(tmp, "renders", "0" * 64, "render.json").read_text()), wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--asset", default=str(SHARED) if SHARED.is_file() else None)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--denoise", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--passes", default="depth", help="comma-separated main-set passes ('' = none)")
    ap.add_argument("--pass-overhead", action="store_true")
    ap.add_argument("--sessions", type=int, default=0, metavar="N",
                    help="instead: N assets at tiny settings, a process each vs one Blender session for all")
    args = ap.parse_args()
    if args.sessions:
        return _sessions(args.asset, args.sessions)
    passes = [p for p in args.passes.split(",") if p]
    with tempfile.TemporaryDirectory() as tmp:
        asset = args.asset
        if asset is None:
            from flux3d.demo import _textured_box_glb

            asset = os.path.join(tmp, "box.glb")
            Path(asset).write_bytes(_textured_box_glb())
        cfg = RenderConfig(views=args.views, resolution=args.resolution, cond_views=1, cond_resolution=8,
                           curation_views=1, curation_resolution=8, samples=args.samples, denoise=args.denoise,
                           device=args.device, timeout_s=3600, memory_mb=None if args.device != "cpu" else 16384,
                           contact_sheet_views=0, passes=passes)
        facts, wall = _render(asset, cfg)
        if args.pass_overhead:
            cfg.passes = []
            bare, _ = _render(asset, cfg)
    main_set = facts["sets"][f"views{args.views}"]
    per_view = main_set["seconds"] / args.views
    setup = facts["setup_s"]
    cores = os.cpu_count() or 1
    equiv = 150 + 24 * (1024 / args.resolution) ** 2 + 10 * (512 / args.resolution) ** 2
    per_asset = setup + per_view * equiv
    print(f"asset {asset}  device {facts['device']}  {args.resolution} px  {args.samples} samples  "
          f"denoise {args.denoise}  cores {cores}")
    print(f"child start + bpy import + asset import + scene setup: {setup:.2f} s")
    print(f"render: {per_view:.2f} s per {args.resolution}-px view ({args.views} views, passes {passes or 'none'})")
    if args.pass_overhead:
        bare_view = bare["sets"][f"views{args.views}"]["seconds"] / args.views
        print(f"without passes: {bare_view:.2f} s per view; passes cost x{per_view / bare_view:.3f}")
    print(f"whole call (isolation, validation, publish): {wall:.2f} s")
    print(f"projected per asset (150 x 512 + 24 x 1024 + 10 x 512 = {equiv:.0f} view equivalents): {per_asset:.0f} s")
    print(f"projected for {ASSETS:,} assets: {per_asset * ASSETS / 3600:,.0f} machine-hours = "
          f"{per_asset * ASSETS * cores / 3600:,.0f} CPU-core-hours on {cores}-core machines")


def _sessions(asset: str | None, n: int) -> None:
    """The fixed cost per asset that one Blender child for many assets saves: N renders of one view at 64 px
    (a few ms of path tracing), each in a fresh child (`render_asset`) vs all in one (`BlenderSessions`)."""
    from flux3d.stages.render import BlenderSessions

    cfg = RenderConfig(views=1, resolution=64, cond_views=1, cond_resolution=8, curation_views=1,
                       curation_resolution=8, samples=1, denoise=False, device="cpu", contact_sheet_views=0)
    with tempfile.TemporaryDirectory() as tmp:
        if asset is None:
            from flux3d.demo import _textured_box_glb

            asset = os.path.join(tmp, "box.glb")
            Path(asset).write_bytes(_textured_box_glb())
        fmt = Path(asset).suffix[1:].lower()
        shas = [f"{i:064x}" for i in range(n)]
        render_asset(asset, fmt, "f" * 64, cfg, Storage(os.path.join(tmp, "warm")))  # starts the forkserver
        t0 = time.perf_counter()
        for sha in shas:
            assert render_asset(asset, fmt, sha, cfg, Storage(os.path.join(tmp, "apart"))).state == "ok"
        apart = (time.perf_counter() - t0) / n
        sessions = BlenderSessions(cfg)
        t0 = time.perf_counter()
        try:
            for sha in shas:
                assert sessions.render(asset, fmt, sha, cfg, Storage(os.path.join(tmp, "together"))).state == "ok"
        finally:
            sessions.close()
        together = (time.perf_counter() - t0) / n
    print(f"{n} assets ({Path(asset).name}, 3 views at 64/8/8 px, 1 sample): a child each {apart:.2f} s per asset, "
          f"one Blender session {together:.2f} s per asset; saved {apart - together:.2f} s per asset "
          f"(x{together / apart:.2f})")


if __name__ == "__main__":
    main()

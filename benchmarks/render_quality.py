"""Render quality against cost: Cycles settings scored against a converged reference, timed in one run.

    python benchmarks/render_quality.py [--assets A.glb B.glb ...] [--views 2] [--cond-views 1]
                                        [--ref-samples 256] [--lpips-vgg vgg16.pth] [--only trellis,paper]

For each asset (default: Avocado, CesiumMan and GlassVaseFlowers from ../shared/assets/good) one Blender session
builds the render stage's own scene (`build_scene`: import, normalisation, TRELLIS's lights, Filmic), then renders
`--views` main-set cameras at 512 px and `--cond-views` conditioning cameras at 1024 px with every setting below,
timing each view in-process (the fixed per-asset costs are the same for every setting and not counted here). A
setting with `crop_to_object` renders inside the stage's own border (`blender_render.set_border`).

The reference is two renders with independent seeds at `--ref-samples` each, no adaptive sampling, no denoiser.
Its own noise would cap every PSNR, so the reported PSNR subtracts it: with the candidate's noise independent of
the reference's, E[MSE(c, (a+b)/2)] = MSE(c, truth) + MSE(a, b)/4 (and MSE(a, b)/4 is the mean's noise). SSIM and
LPIPS are against the mean of the two, uncorrected. Images are compared as the stage stores them (8-bit RGBA PNG,
colour premultiplied by alpha, i.e. over black, alpha as a fourth channel).

Per-asset cost of a setting: 150 + 10 views at its 512-px time and 24 at its 1024-px time (the paper's sets);
`ratio` divides it by TRELLIS's. Without `--lpips-vgg` (a torchvision VGG-16 file, not downloadable here) the
LPIPS column says n/a. The Pareto front is over (seconds per asset, PSNR), all assets pooled.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from flux3d.config.pipeline import RenderConfig
from flux3d.config.recipes import TRELLIS_RENDER
from flux3d.stages.cameras import render_border, view_set_cameras

SHARED = Path(__file__).resolve().parents[2] / "shared" / "assets" / "good"
DEFAULT_ASSETS = ("Avocado.glb", "CesiumMan.glb", "GlassVaseFlowers.glb")
VIEWS_512, VIEWS_1024 = 150 + 10, 24  # main + curation sets at 512 px, conditioning set at 1024 px

# name -> changes to our default RenderConfig (`paper`); `trellis` is the `trellis` recipe's render settings.
LEAN = {"denoise_prefilter": "NONE"}  # the prefilter AUTO picks for an opaque asset, on every asset
FULL_FRAME = {"crop_to_object": False}
SETTINGS: dict[str, dict] = {
    "paper": {},
    "trellis": TRELLIS_RENDER,
    "trellis-cropped": {**TRELLIS_RENDER, "crop_to_object": True},
    "paper-uncropped": FULL_FRAME,  # the defaults before render.crop_to_object
    "paper-tabulated": {"sampling_pattern": "TABULATED_SOBOL"},
    "paper-lean": LEAN,
    "paper-t0.015": {"adaptive_threshold": 0.015},
    "paper-112": {"samples": 112},
    "paper-96": {"samples": 96},
    "64-lean": {**LEAN, "samples": 64},
    "32-fast": {"samples": 32, "denoise_prefilter": "FAST"},
    "trellis-nodenoise": {**TRELLIS_RENDER, "denoise": False},
    "trellis-prefilter-none": {**TRELLIS_RENDER, "denoise_prefilter": "NONE"},
    # Cycles knobs RenderConfig does not expose (scene.cycles attributes set after set_cycles): candidates only.
    "paper-balanced": {"_cycles": {"denoising_quality": "BALANCED"}},
    "paper-splits": {"_cycles": {"debug_use_spatial_splits": True}},
}
# 1024 px is 4x the pixels: fewer settings there.
COND_SETTINGS = ("trellis", "paper", "trellis-cropped", "paper-uncropped", "paper-tabulated", "paper-t0.015",
                 "paper-96")


def render_asset_grid(asset: str, names: list[str], views: int, cond_views: int, ref_samples: int,
                      out: Path) -> dict[tuple[str, str, int], float]:
    """Render every (setting, set, view) of one asset into `out`; returns seconds per render."""
    import bpy
    from mathutils import Matrix

    from flux3d.stages.blender_render import (
        CROP_MARGIN_PX,
        build_scene,
        crop_points,
        scene_triangles,
        set_border,
        set_cycles,
    )

    base = RenderConfig()
    scene, cam, _ = build_scene(bpy, asset, Path(asset).suffix[1:].lower(), base)
    points = crop_points(bpy, scene_triangles(bpy)[0])
    cams = {"views": (view_set_cameras("0" * 64, "views150", views, base.radius), 512),
            "cond": (view_set_cameras("0" * 64, "cond24", cond_views, base.radius), 1024)}
    # TRELLIS's scene with every pixel sampled alike: what its renders (and ours) converge to.
    ref = {**TRELLIS_RENDER, "samples": ref_samples, "adaptive_threshold": 0.0, "denoise": False}
    jobs = [(f"ref{seed}", ref, seed)
            for seed in (1, 2)]
    jobs += [(name, SETTINGS[name], 0) for name in names]
    seconds = {}
    for set_name, (c2ws, res) in cams.items():
        scene.render.resolution_x = scene.render.resolution_y = res
        for i, c2w in enumerate(c2ws):
            cam.matrix_world = Matrix(c2w.tolist())
            # Every setting renders a view before the next view: a load change on the machine hits them alike.
            for name, fields, seed in jobs:
                if set_name == "cond" and not name.startswith("ref") and name not in COND_SETTINGS:
                    continue
                fields = dict(fields)
                raw = fields.pop("_cycles", {})
                cfg = dataclasses.replace(base, **fields)
                set_cycles(bpy, scene, cfg)
                set_border(scene, render_border(points, c2w, math.radians(base.fov_deg), res, CROP_MARGIN_PX)
                           if cfg.crop_to_object and points is not None else None)
                # set_cycles does not touch these attributes: put them back after the render, or they would leak
                # into every setting rendered after this one.
                saved = {attr: getattr(scene.cycles, attr) for attr in raw}
                for attr, value in raw.items():
                    setattr(scene.cycles, attr, value)
                scene.cycles.seed = seed
                scene.render.filepath = str(out / f"{name}_{set_name}_{i}.png")
                t0 = time.perf_counter()
                bpy.ops.render.render(write_still=True)
                seconds[(name, set_name, i)] = time.perf_counter() - t0
                for attr, value in saved.items():
                    setattr(scene.cycles, attr, value)
    return seconds


def _load(path: Path) -> np.ndarray:
    from PIL import Image

    rgba = np.asarray(Image.open(path).convert("RGBA"), dtype=np.float64) / 255.0
    return np.concatenate([rgba[..., :3] * rgba[..., 3:], rgba[..., 3:]], axis=-1)


def score(out: Path, name: str, set_name: str, i: int, lpips_net) -> dict[str, float]:  # noqa: ANN001
    import torch
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    a, b, c = (_load(out / f"{n}_{set_name}_{i}.png") for n in ("ref1", "ref2", name))
    ref = (a + b) / 2
    noise = float(((a - b) ** 2).mean()) / 4
    mse = max(float(((c - ref) ** 2).mean()) - noise, 1e-12)
    t = lambda x: torch.from_numpy(x[..., :3]).permute(2, 0, 1)[None].float()  # noqa: E731
    row = {"psnr": -10 * math.log10(mse), "ref_psnr": -10 * math.log10(max(noise, 1e-12)),
           "ssim": float(ssim(t(c), t(ref), data_range=1.0)), "lpips": float("nan")}
    if lpips_net is not None:
        from flux3d.evaluation.metrics import lpips

        row["lpips"] = float(lpips(t(c), t(ref), lpips_net)[0])
    return row


def pareto(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names not dominated in (cost: lower is better, quality: higher is better), cheapest first."""
    front = [n for n, (cost, q) in points.items()
             if not any(c2 <= cost and q2 >= q and (c2, q2) != (cost, q) for c2, q2 in points.values())]
    return sorted(front, key=lambda n: points[n][0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--assets", nargs="+", default=[str(SHARED / a) for a in DEFAULT_ASSETS])
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--cond-views", type=int, default=1)
    ap.add_argument("--ref-samples", type=int, default=256)
    ap.add_argument("--lpips-vgg", default=None)
    ap.add_argument("--only", default=None, help="comma-separated settings (trellis and paper always run)")
    ap.add_argument("--keep", default=None, help="folder to keep the renders in")
    args = ap.parse_args()
    names = list(SETTINGS) if not args.only else ["trellis", "paper", *[n for n in args.only.split(",")
                                                                         if n not in ("trellis", "paper")]]
    paper = {k: v for k, v in dataclasses.asdict(RenderConfig()).items() if k in TRELLIS_RENDER}
    print(f"{os.cpu_count()} cores; reference: 2 x {args.ref_samples} spp, no denoiser, no adaptive sampling; "
          f"trellis = {TRELLIS_RENDER}; paper (our default) = {paper}")
    rows: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        for asset in args.assets:
            out = Path(args.keep or tmp) / Path(asset).stem
            out.mkdir(parents=True, exist_ok=True)
            seconds = render_asset_grid(asset, names, args.views, args.cond_views, args.ref_samples, out)
            lpips_net = None
            if args.lpips_vgg:
                from flux3d.training.perceptual import load_lpips_vgg

                lpips_net = load_lpips_vgg(args.lpips_vgg)
            for (name, set_name, i), s in seconds.items():
                if name.startswith("ref"):
                    continue
                got = rows[name]
                got.setdefault(f"s_{set_name}", []).append(s)
                for k, v in score(out, name, set_name, i, lpips_net).items():
                    got.setdefault(f"{k}_{set_name}", []).append(v)
            ref_s = np.mean([s for (n, st, _), s in seconds.items() if n.startswith("ref") and st == "views"])
            print(f"{Path(asset).name}: reference {ref_s:.1f} s per 512-px view")
    _report(rows)


def _na(v: float, fmt: str = ".2f") -> str:
    return "n/a" if math.isnan(v) else format(v, fmt)


def _report(rows: dict[str, dict[str, list[float]]]) -> None:
    mean = lambda v: float(np.mean(v)) if v else float("nan")  # noqa: E731
    s512 = {n: mean(r.get("s_views", [])) for n, r in rows.items()}
    s1024 = {n: mean(r.get("s_cond", [])) for n, r in rows.items()}
    # Settings without 1024-px timings cost their 512-px time x 4 there (pixels; measured ratios are ~3.6-4.2).
    per_asset = {n: VIEWS_512 * s512[n] + VIEWS_1024 * (s1024[n] if not math.isnan(s1024[n]) else 4 * s512[n])
                 for n in rows}
    print("\n| setting | s/view 512 | s/view 1024 | s/asset (184 views) | ratio | PSNR 512 | min | SSIM 512 | "
          "LPIPS 512 | PSNR 1024 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n, r in sorted(rows.items(), key=lambda kv: per_asset[kv[0]]):
        print(f"| {n} | {s512[n]:.2f} | {_na(s1024[n])} | {per_asset[n]:.0f} | "
              f"{per_asset[n] / per_asset['trellis']:.2f} | {mean(r['psnr_views']):.2f} | "
              f"{min(r['psnr_views']):.2f} | {mean(r['ssim_views']):.4f} | {_na(mean(r['lpips_views']), '.4f')} | "
              f"{_na(mean(r.get('psnr_cond', [])))} |")
    refs = [v for r in rows.values() for v in r.get("ref_psnr_views", [])]
    print(f"\nreference noise (mean of two seeds) as PSNR: {mean(refs):.2f} dB, subtracted from each MSE")
    front = pareto({n: (per_asset[n], mean(r["psnr_views"])) for n, r in rows.items()})
    print("Pareto front (s/asset, PSNR 512):", ", ".join(f"{n} ({per_asset[n]:.0f} s, "
                                                         f"{mean(rows[n]['psnr_views']):.2f} dB)" for n in front))
    p, t = "paper", "trellis"
    print(f"paper default vs TRELLIS: {per_asset[p] / per_asset[t]:.2f} x the time per asset, PSNR "
          f"{mean(rows[p]['psnr_views']):.2f} vs {mean(rows[t]['psnr_views']):.2f} dB at 512 px, "
          f"{mean(rows[p].get('psnr_cond', [])):.2f} vs {mean(rows[t].get('psnr_cond', [])):.2f} dB at 1024 px")


if __name__ == "__main__":
    main()

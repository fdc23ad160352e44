"""How far lossy WebP ground truth caps the PSNR an evaluation can measure: every main-set view of a pipeline root's
renders, stored as the shards store it (`shard.image_quality`, default 95) and decoded, against the lossless PNG,
both composited over black and white as the evaluation composites them. A model can reach at most this PSNR
against the stored views even when it reproduces the render exactly (docs/evaluation.md).

    .venv/bin/python benchmarks/webp_ceiling.py --root <pipeline root> [--quality 95 90 100] [--limit 20]

The renders must be real ones at the paper's settings (512 px, Cycles with the denoiser): their noise and edges
are what the codec spends its bits on.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from flux3d.evaluation.metrics import psnr
from flux3d.features.vae import over_background
from flux3d.shards.format import decode_image, encode_image


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="a pipeline root with renders/<sha>/views*/")
    p.add_argument("--quality", type=int, nargs="+", default=[95, 90, 100])
    p.add_argument("--limit", type=int, default=0, help="assets at most (0 = all)")
    a = p.parse_args()
    assets = sorted(d for d in Path(a.root, "renders").iterdir() if d.is_dir())[:a.limit or None]
    views = [png for d in assets for folder in sorted(d.glob("views*")) for png in sorted(folder.glob("*.png"))
             if not png.name.endswith("_depth.png")]
    if not views:
        raise SystemExit(f"no main-set views under {a.root}/renders")
    side = Image.open(views[0]).size[0]
    print(f"{len(views)} views of {len(assets)} assets at {side} px")
    print(f"{'quality':>8} {'bytes/view':>11} {'PSNR black':>11} {'PSNR white':>11} {'min':>7} {'median':>7}")
    for quality in a.quality:
        sizes, scores = [], []
        for png in views:
            rgba = np.asarray(Image.open(png).convert("RGBA"))
            data = encode_image(rgba, quality)
            sizes.append(len(data))
            stored = decode_image(data)
            for bg in (0.0, 1.0):
                truth, kept = (torch.from_numpy(over_background(x, bg))[None] for x in (rgba, stored))
                scores.append((bg, float(psnr(kept, truth)[0])))
        per_bg = {bg: np.array([s for b, s in scores if b == bg]) for bg in (0.0, 1.0)}
        both = np.concatenate(list(per_bg.values()))
        finite = both[np.isfinite(both)]
        fmt = (lambda x: "inf" if not np.isfinite(x) else f"{x:.2f}")  # lossless gives inf
        print(f"{quality:>8} {np.mean(sizes):>11,.0f} {fmt(np.mean(per_bg[0.0])):>11} "
              f"{fmt(np.mean(per_bg[1.0])):>11} {fmt(finite.min() if len(finite) else np.inf):>7} "
              f"{fmt(np.median(both)):>7}")


if __name__ == "__main__":
    main()

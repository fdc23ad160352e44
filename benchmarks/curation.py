"""Curation throughput on this machine: the pixel heuristic and the aesthetic scorer, in images per second.

    python benchmarks/curation.py [--resolution 512] [--images 40] [--model ViT-L-14-quickgelu] [--batch 8]

The scorer runs the real architecture (open_clip ViT-L/14, randomly initialised: the pretrained weights cannot be
downloaded here and do not change the cost) through the LAION head (the real file from ../shared/weights when
present, else a random head of the same shape), preprocessing included. Views are synthetic textured spheres at
the curation resolution. On GPU the scorer runs fp16 (`curate.device`).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from flux3d.config.pipeline import CurateConfig
from flux3d.curation.heuristic import texture_fractions

HEAD = Path(__file__).resolve().parents[2] / "shared" / "weights" / "sac+logos+ava1-l14-linearMSE.pth"


def views(n: int, size: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    yy, xx = (np.mgrid[:size, :size] + 0.5) / size * 2 - 1
    r2 = xx ** 2 + yy ** 2
    shade = np.sqrt(np.clip(1 - r2, 0, 1))[..., None]
    out = []
    for _ in range(n):
        tex = rng.uniform(0.3, 1.0, (size // 16, size // 16, 3)).repeat(16, 0).repeat(16, 1)
        rgb = (shade * tex * 255).astype(np.uint8)
        out.append(np.dstack([rgb, np.where(r2 < 0.8, 255, 0).astype(np.uint8)]))
    return out


def rate(fn, n: int) -> float:  # noqa: ANN001
    fn()  # warm-up (allocations, thread pools)
    t0 = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--model", default="ViT-L-14-quickgelu")
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    imgs = views(args.images, args.resolution)
    heuristic = rate(lambda: texture_fractions(imgs), len(imgs))
    import torch

    from flux3d.curation.aesthetic import AestheticScorer, head_module

    with tempfile.TemporaryDirectory() as tmp:
        head = str(HEAD)
        if not HEAD.is_file():
            head = os.path.join(tmp, "head.pth")
            torch.save(head_module().state_dict(), head)
        cfg = CurateConfig(clip_model=args.model, clip_pretrained="", aesthetic_head=head, batch_size=args.batch)
        t0 = time.perf_counter()
        scorer = AestheticScorer.load(cfg)
        load_s = time.perf_counter() - t0
    pil = [Image.fromarray(v, "RGBA") for v in imgs]
    prep = rate(lambda: [scorer.preprocess(im.convert("RGB")) for im in pil], len(pil))
    scored = rate(lambda: scorer.score(pil), len(pil))
    per_asset = 10 / scored + 10 / heuristic
    print(f"device {scorer.device}  threads {torch.get_num_threads()}  {args.resolution} px views  "
          f"model {args.model} (load {load_s:.1f} s)  batch {args.batch}")
    print(f"heuristic (magenta + flat fractions): {heuristic:8.1f} images/s")
    print(f"scorer preprocessing alone:           {prep:8.1f} images/s")
    print(f"scorer end to end (CLIP + head):      {scored:8.1f} images/s  "
          f"(heuristic is x{heuristic / scored:.0f} faster)")
    print(f"per asset (10 curation views): {per_asset:.2f} s -> 360K assets: "
          f"{per_asset * 360_000 / 3600:,.0f} machine-hours on this machine")


if __name__ == "__main__":
    main()

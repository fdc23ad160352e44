"""Seconds per asset of each evaluation protocol, on the models and shards of a pipeline run (by default the demo's:
run `make demo` first), at the debug recipe's sizes unless told otherwise.

Each protocol runs alone over the same assets, so the figures add up to what a full evaluation costs; the first
asset of each run pays for loading the feature networks, reported separately.

    .venv/bin/python benchmarks/evaluation.py [--root data/demo] [--set resolution=512 ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from pathlib import Path

import torch

from flux3d.config.evaluation import EvalConfig
from flux3d.config.recipes import eval_config
from flux3d.evaluation.evaluate import Evaluator, Models
from flux3d.evaluation.protocols import eval_assets, sample_keys
from flux3d.training.checkpoint import load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="data/demo", help="a pipeline root with models/<version>/{decoder,smdit}")
    p.add_argument("--recipe", default="debug")
    p.add_argument("--set", action="append", default=[], help="EvalConfig overrides, e.g. assets=8")
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR)
    runs = sorted(Path(args.root, "models").glob("*/decoder/checkpoints"))
    if not runs:
        raise SystemExit(f"no trained run under {args.root}/models: run `make demo` (or pass --root)")
    run = runs[-1].parent.parent
    sets = list(args.set)
    if Path(args.root, "demo-models", "demo_clip.pt").is_file():  # the demo's tiny CLIP, as the demo evaluates
        models_dir = Path(args.root, "demo-models")
        sets = ["clip_model=demo_clip", f"clip_weights={models_dir / 'demo_clip.pt'}",
                f"clip_model_config={models_dir / 'demo_clip.json'}", *sets]
    base: EvalConfig = eval_config(args.recipe, sets)
    decoder, dcfg = load_model(str(run / "decoder"))
    smdit, scfg = load_model(str(run / "smdit"))
    models = Models(decoder, dcfg, str(run / "decoder"), smdit, scfg, str(run / "smdit"))
    shards = base.shards or dcfg.data.shards
    keys = sample_keys(shards, base.split, base.assets, base.seed)
    print(f"{len(keys)} assets of {shards}, {base.resolution} px, {base.sampler_steps} sampler steps, "
          f"{torch.get_num_threads()} threads")
    print(f"{'protocol':<16} {'setup s':>8} {'s/asset':>8}")
    per_asset: dict[str, float] = {}
    for protocol in ("reconstruction", "generation", "multiview"):
        # multiview renders the generated (else reconstructed) Gaussians; it runs after reconstruction here and
        # its figure is the difference, its own renders and metrics alone.
        protos = ["reconstruction", "multiview"] if protocol == "multiview" else [protocol]
        cfg = dataclasses.replace(base, protocols=protos)
        t0 = time.perf_counter()
        ev = Evaluator(cfg, models, torch.device("cpu"))
        setup = time.perf_counter() - t0
        t0 = time.perf_counter()
        n = sum(1 for a in eval_assets(shards, keys) if ev.asset(a))
        per_asset[protocol] = (time.perf_counter() - t0) / max(n, 1)
        own = per_asset[protocol] - (per_asset["reconstruction"] if protocol == "multiview" else 0.0)
        print(f"{protocol:<16} {setup:>8.1f} {own:>8.2f}")

if __name__ == "__main__":
    main()

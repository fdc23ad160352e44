"""Checkpoint save and load at paper size: the old layout (whole-model safetensors + a pickled optimiser state.pt,
built in rank 0's memory) against torch.distributed.checkpoint (DCP, `training/checkpoint.py`), one process.

Each (model, path) runs in a fresh child process so its peak is its own: host memory is the resident set sampled
every 5 ms by a thread, reported as the peak above the resident set just before the save (or the load), i.e. the
extra copies a checkpoint costs on top of the live model, EMA and AdamW state. Loads read files that were just
written, so they come from the page cache: the times are the CPU side (deserialisation, copies), not the disk's.
DCP's local writer fsyncs its files; the old path did not.

The SMDiT at paper width (1152) with all 12 + 12 blocks holds 13 GB of state in fp32 (weights, EMA, two moments),
and the old path needs as much again: more than this machine's memory. So it is built with `--smdit-blocks`
double and single blocks (default 3 + 3) and both figures are also scaled to the 818.7 M parameters of the paper
model (save and load are linear in the bytes; the `x` column). The decoder runs at its full paper size.

    .venv/bin/python benchmarks/checkpoint.py [--quick] [--smdit-blocks 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import torch

from flux3d.config.recipes import train_recipe
from flux3d.config.training import TrainConfig, apply_overrides
from flux3d.storage import Storage
from flux3d.training import checkpoint as ckpt_io
from flux3d.models.decoder import GaussianDecoder
from flux3d.models.smdit import SMDiT
from flux3d.training.trainer import EMA, _train_state, lr_factor, restore

PAPER_SMDIT_PARAMS = 818.7e6


class PeakRSS:
    """Peak resident set above the one at entry, sampled from /proc (no psutil in the environment)."""

    def __enter__(self) -> PeakRSS:
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def extra_gb(self) -> float:
        return (self.peak - self.base) / 1e9


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _config(kind: str, quick: bool, smdit_blocks: int, out: str) -> TrainConfig:
    cfg = train_recipe(kind, "debug" if quick else "paper")
    if kind == "smdit" and not quick:
        cfg = dataclasses.replace(cfg, smdit=dataclasses.replace(cfg.smdit, double_blocks=smdit_blocks,
                                                                  single_blocks=smdit_blocks))
    return apply_overrides(cfg, {"run.out": out, "scale.num_workers": 1, "scale.grad_checkpointing": False})


def _trained_state(cfg: TrainConfig):  # noqa: ANN202 - model, optim, sched, ema with AdamW moments present
    # The model classes directly (a Step wants a dataset version for its latent statistics); the rest as trainer.build.
    torch.manual_seed(0)
    model = GaussianDecoder(cfg.decoder) if cfg.kind == "decoder" else SMDiT(cfg.smdit)
    optim = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: lr_factor(s, cfg))
    ema = EMA(model, cfg.optim.ema_decay)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optim.step()  # AdamW's exp_avg / exp_avg_sq now exist, as after any training step
    optim.zero_grad(set_to_none=True)
    return model, optim, sched, ema


def _old_save(folder: str, model, optim, sched, ema) -> None:  # noqa: ANN001 - the pre-DCP path, as it was
    from safetensors.torch import save as st_save
    from torch.distributed.checkpoint import state_dict as sd

    opts = sd.StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = sd.get_model_state_dict(model, options=opts)
    optim_state = sd.get_optimizer_state_dict(model, optim, options=opts)
    ema_state = dict(zip(ema.names, ema.shadow))
    for name, state in (("model", weights), ("ema", ema_state)):
        with open(f"{folder}/{name}.safetensors", "wb") as f:
            f.write(st_save({k: v.detach().contiguous().clone() for k, v in state.items()}))
    buf = io.BytesIO()
    torch.save({"optim": optim_state, "sched": sched.state_dict()}, buf)
    with open(f"{folder}/state.pt", "wb") as f:
        f.write(buf.getvalue())


def _old_load(folder: str, model, optim, sched, ema) -> None:  # noqa: ANN001
    from safetensors.torch import load as st_load
    from torch.distributed.checkpoint import state_dict as sd

    opts = sd.StateDictOptions(full_state_dict=True, cpu_offload=True)
    run = Storage(folder)
    state = torch.load(io.BytesIO(run.read_bytes("state.pt")), map_location="cpu", weights_only=True)
    sd.set_model_state_dict(model, st_load(run.read_bytes("model.safetensors")), options=opts)
    sd.set_optimizer_state_dict(model, optim, state["optim"], options=opts)
    sched.load_state_dict(state["sched"])
    ema.load_state_dict(st_load(run.read_bytes("ema.safetensors")))


def one(kind: str, path: str, quick: bool, smdit_blocks: int) -> dict[str, Any]:
    """Child process: build, save, rebuild, load; times and peaks."""
    with tempfile.TemporaryDirectory(prefix="flux3d-bench-ckpt-") as tmp:
        cfg = _config(kind, quick, smdit_blocks, tmp)
        model, optim, sched, ema = _trained_state(cfg)
        params = sum(p.numel() for p in model.parameters())
        with PeakRSS() as mem_save:
            t0 = time.perf_counter()
            if path == "old":
                _old_save(tmp, model, optim, sched, ema)
            else:
                run = Storage(tmp)
                ckpt_io.begin(run, 1)
                ckpt_io.save_shards(run, 1, _train_state(model, optim, ema))
                ckpt_io.finish(run, 1, train_state={"sched": sched.state_dict(), "positions": [[0, 0]]},
                               meta={"config": cfg.to_dict(), "kind": cfg.kind}, keep=1)
            save_s = time.perf_counter() - t0
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tmp) for f in fs)
        # The same process loads into its live state: a resume's case (the state exists, its values are replaced).
        with PeakRSS() as mem_load:
            t0 = time.perf_counter()
            if path == "old":
                _old_load(tmp, model, optim, sched, ema)
            else:
                run = Storage(tmp)
                restore(run, ckpt_io.latest(run), cfg, model, optim, sched, ema, 0, 1)
            load_s = time.perf_counter() - t0
    return {"params": params, "bytes": size, "save_s": save_s, "load_s": load_s,
            "save_gb": mem_save.extra_gb, "load_gb": mem_load.extra_gb, "live_gb": mem_save.base / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the debug models: seconds, for a smoke test")
    ap.add_argument("--smdit-blocks", type=int, default=3, help="double and single blocks of the measured SMDiT")
    ap.add_argument("--one", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(*args.one, args.quick, args.smdit_blocks)))
        return
    rows = []
    for kind in ("decoder", "smdit"):
        for path in ("old", "dcp"):
            cmd = [sys.executable, __file__, "--one", kind, path, "--smdit-blocks", str(args.smdit_blocks)]
            out = subprocess.run(cmd + (["--quick"] if args.quick else []), check=True, capture_output=True,
                                 text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            scale = PAPER_SMDIT_PARAMS / r["params"] if kind == "smdit" and not args.quick else 1.0
            rows.append((kind, path, r, scale))
    print(f"{'model':8} {'path':4} {'params':>8} {'files':>8} {'live':>7} {'save':>8} {'save +RSS':>9} "
          f"{'load':>8} {'load +RSS':>9} {'x':>5} {'save@x':>8} {'+RSS@x':>8} {'load@x':>8} {'+RSS@x':>8}")
    for kind, path, r, x in rows:
        print(f"{kind:8} {path:4} {r['params'] / 1e6:7.1f}M {r['bytes'] / 1e9:6.2f}GB {r['live_gb']:5.2f}GB "
              f"{r['save_s']:7.1f}s {r['save_gb']:7.2f}GB {r['load_s']:7.1f}s {r['load_gb']:7.2f}GB {x:5.2f} "
              f"{r['save_s'] * x:7.1f}s {r['save_gb'] * x:6.2f}GB {r['load_s'] * x:7.1f}s {r['load_gb'] * x:6.2f}GB")


if __name__ == "__main__":
    main()

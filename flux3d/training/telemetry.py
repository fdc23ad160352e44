"""What a training run reports: one line per `log_every` steps (loss parts, throughput, MFU on GPU) to the log,
`metrics.jsonl` in the run directory, and TensorBoard scalars and image grids.

Values are averaged over the logging interval and across workers (one all-reduce per log line, not per step);
throughput counts every worker's samples. MFU = achieved model FLOP/s / (peak bf16 FLOP/s x workers), with the
FLOPs a model step counts (decoder_step.py, smdit_step.py: 6 x parameters x tokens + attention), the usual
convention (PaLM, nanoGPT, torchtitan); it is reported on GPUs whose peak we know, never on CPU.

metrics.jsonl is rewritten whole at each checkpoint (atomic, any fsspec root), so after a crash it holds exactly
the steps up to the checkpoint the run resumes from, and the resumed run appends the same lines again.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist

from flux3d.storage import Storage

log = logging.getLogger(__name__)

# Dense bf16 tensor-core peaks (vendor datasheets), by substring of torch.cuda.get_device_name().
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "4090": 165e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


class Telemetry:
    def __init__(self, run: Storage, cfg: Any, rank: int, resume_step: int, peak: float | None) -> None:
        self.run, self.cfg, self.rank, self.peak = run, cfg, rank, peak
        self.world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.sums: dict[str, torch.Tensor | float] = {}
        self.count = 0
        self.work = {"samples": 0.0, "tokens": 0.0, "flops": 0.0}
        self.t_last = time.perf_counter()
        self.records: list[dict[str, Any]] = []
        self.writer = None
        if rank != 0:
            return
        if resume_step and run.exists("metrics.jsonl"):
            lines = run.read_bytes("metrics.jsonl").decode().splitlines()
            self.records = [r for r in map(json.loads, lines) if r["step"] <= resume_step]
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional at run time; metrics.jsonl always exists
            log.warning("tensorboard is not installed: no TensorBoard logs")
            return
        # TensorBoard writes event files by appending, which object stores cannot do: a remote run logs locally.
        tb_dir = run.path("tensorboard") if run.local else tempfile.mkdtemp(prefix="flux3d-tb-")
        self.writer = SummaryWriter(tb_dir, purge_step=resume_step + 1 if resume_step else None)

    def step(self, step: int, values: dict[str, Any], work: dict[str, float]) -> dict[str, float]:
        """Accumulate one step; on a logging step, reduce, log and return the interval's means (else {}).
        Throughput is over wall time between logging steps (data loading included), measured after the values are
        read back, which waits for the GPU's queue."""
        for k, v in values.items():  # tensors stay on the device: no host sync until a logging step
            self.sums[k] = self.sums.get(k, 0.0) + (v.detach().double() if torch.is_tensor(v) else float(v))
        self.count += 1
        for k in self.work:
            self.work[k] += work.get(k, 0.0)
        if step % self.cfg.run.log_every and step != self.cfg.run.steps:
            return {}
        means = [float(self.sums[k]) / self.count for k in sorted(self.sums)]  # the host sync
        now = time.perf_counter()
        seconds, self.t_last = now - self.t_last, now
        keys = sorted(self.sums)
        t = torch.tensor(means + [self.work[k] for k in self.work] + [seconds], dtype=torch.float64)
        if self.world > 1:
            backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            t = t.to(backend_device)
            dist.all_reduce(t)
            t = t.cpu()
        n = len(keys)
        out = {k: float(t[i]) / self.world for i, k in enumerate(keys)}
        samples, tokens, flops, secs = (float(x) for x in t[n:])
        secs /= self.world  # mean wall time of a worker over the interval
        out["samples_per_s"] = samples / secs
        out["tokens_per_s"] = tokens / secs
        if self.peak:
            out["mfu"] = flops / secs / (self.peak * self.world)
        self.sums, self.count = {}, 0
        self.work = dict.fromkeys(self.work, 0.0)
        if self.rank == 0:
            self.records.append({"step": step, **out})
            mfu = f" mfu {out['mfu']:.1%}" if "mfu" in out else ""
            log.info("step %d loss %.4f %s| %.1f samples/s %.0f tokens/s%s", step, out["loss"],
                     " ".join(f"{k} {v:.4g}" for k, v in out.items() if k not in ("loss", "samples_per_s",
                                                                                    "tokens_per_s", "mfu", "lr")),
                     out["samples_per_s"], out["tokens_per_s"], mfu)
            if self.writer is not None:
                for k, v in out.items():
                    self.writer.add_scalar(k, v, step)
        return out

    def images(self, step: int, grid: torch.Tensor | None) -> None:
        if grid is not None and self.writer is not None:
            self.writer.add_image("render_vs_target", grid.clamp(0, 1).float().cpu(), step)

    def flush(self, step: int) -> None:
        """Write metrics.jsonl (rank 0, at checkpoints and the end)."""
        if self.rank != 0:
            return
        data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.records)
        self.run.write_bytes("metrics.jsonl", data.encode())
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    """The metrics.jsonl records of a run directory (local or fsspec)."""
    run = Storage(run_dir)
    if not run.exists("metrics.jsonl"):
        return []
    return [json.loads(line) for line in run.read_bytes("metrics.jsonl").decode().splitlines() if line]

"""The training loop, shared by the decoder, the SMDiT and the structure stage's two models, run by Ray Train on any
number of workers.

    fit(cfg)  ->  Ray Train TorchTrainer(train_loop, num_workers, GPUs or CPUs)  ->  train_loop on every worker
    fit(cfg, local=True)  ->  train_loop in this process (one worker, no Ray: benchmarks, notebooks)

What differs between the models is a `Step` (step.py; `STEPS` below): how to build the model and what one step's
loss is; everything else lives here once: DDP or FSDP2, AdamW with warm-up, bf16 autocast on CUDA, gradient
clipping, EMA, sharded checkpoints (torch.distributed.checkpoint) with exact resume, metrics (metrics.jsonl +
TensorBoard scalars and image grids), throughput and MFU.

Per-step randomness comes from a generator seeded by (seed, rank, step), so a run resumed from step N draws the
same noise as the uninterrupted run did (see checkpoint.py). The data stream is positioned by (epoch, batches).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from flux3d.config.training import FLOW_KINDS, TrainConfig, from_dict
from flux3d.storage import Storage
from flux3d.training import checkpoint as ckpt_io
from flux3d.training.decoder_step import DecoderStep
from flux3d.training.smdit_step import SMDiTStep
from flux3d.training.step import Step, check_features, read_stats, unwrap
from flux3d.training.structure_step import StructureFlowStep, StructureVAEStep
from flux3d.training.telemetry import Telemetry, peak_flops

log = logging.getLogger(__name__)

STEPS: dict[str, type[Step]] = {"decoder": DecoderStep, "smdit": SMDiTStep, "structure_vae": StructureVAEStep,
                                "structure_flow": StructureFlowStep}


def _dist_info() -> tuple[int, int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    return 0, 1, 0


def _step_seed(seed: int, rank: int, step: int) -> int:
    return (seed * 1_000_003 + rank * 7_919 + step) % (2**63 - 1)


def _wrap(model: nn.Module, cfg: TrainConfig, device: torch.device, world: int) -> nn.Module:
    if world == 1:
        return model
    if cfg.scale.fsdp:
        from torch.distributed.fsdp import fully_shard

        # Each transformer block its own FSDP unit (its parameters gathered just before use), then the root.
        for block in getattr(model, "blocks", []):
            fully_shard(block)
        return fully_shard(model)
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


class EMA:
    """Exponential moving average of the trainable weights, updated in place with one fused foreach op.
    (torch.optim.swa_utils.AveragedModel deep-copies the module, which does not suit FSDP-sharded parameters;
    a list of tensors shaped like the parameters, sharded or not, does.)"""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in model.named_parameters() if p.requires_grad]
        self.shadow = [p.detach().clone().float() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        # The shadows themselves (DTensor shards under FSDP2): DCP saves and loads them in place, unsharded never.
        return dict(zip(self.names, self.shadow))

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, t in zip(self.names, self.shadow):
            if state[name] is not t:
                t.copy_(state[name])


def _state_io():  # noqa: ANN202 - the torch.distributed.checkpoint state_dict helpers
    from torch.distributed.checkpoint import state_dict as sd

    return sd


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """The lr multiplier of optimiser step `step` (0-based): linear warm-up, then constant or a cosine or linear
    decay to `final_lr` at run.steps."""
    o = cfg.optim
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.decay == "constant":
        return 1.0
    progress = min(1.0, (step - o.warmup_steps) / max(1, cfg.run.steps - o.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if o.decay == "cosine" else 1.0 - progress
    return o.final_lr + (1.0 - o.final_lr) * shape


def _no_sync(model: nn.Module, last: bool):  # noqa: ANN202 - a context manager
    """Skip the gradient all-reduce on all but the last batch of an accumulated step (DDP; FSDP2 by its switch)."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    if isinstance(model, nn.parallel.DistributedDataParallel) and not last:
        return model.no_sync()
    return contextlib.nullcontext()


def _add_work(total: dict[str, float], work: dict[str, float]) -> dict[str, float]:
    return {k: total.get(k, 0.0) + v for k, v in work.items()}


def train_loop(config: dict[str, Any]) -> dict[str, Any]:
    """One worker's training (Ray Train calls it on every worker with the same `config`, a TrainConfig dict)."""
    cfg: TrainConfig = from_dict(TrainConfig, config)
    # A process-wide switch: set for this run, then put back (local runs share the caller's process).
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    if cfg.scale.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return _train(cfg)
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def build(cfg: TrainConfig, model_step: Step, device: torch.device,
          world: int) -> tuple[nn.Module, torch.optim.Optimizer, Any, EMA | None]:
    """The model (wrapped for `world` workers), AdamW, its schedule and the EMA, as a fresh run starts them."""
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank (DDP also broadcasts them)
    with device:  # initialise on the training device: 820 M parameters take seconds to initialise on a CPU
        model = model_step.build_model()
    model = _wrap(model, cfg, device, world)
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.optim.lr,
                              betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay,
                              fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: lr_factor(s, cfg))
    ema = EMA(unwrap(model), cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None
    return model, optim, sched, ema


def _train(cfg: TrainConfig) -> dict[str, Any]:
    rank, world, local_rank = _dist_info()
    use_cuda = torch.cuda.is_available() and cfg.scale.use_gpu is not False
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    bf16 = cfg.scale.precision == "bf16" or (cfg.scale.precision == "auto" and device.type == "cuda")
    run = Storage(cfg.run.out)
    model_step: Step = STEPS[cfg.kind](cfg, device)

    model, optim, sched, ema = build(cfg, model_step, device, world)

    step, epoch, skip = 0, 0, 0
    found = ckpt_io.latest(run)
    if found is not None:
        step, epoch, skip = restore(run, found, cfg, model, optim, sched, ema, rank, world)
    elif rank == 0:
        run.write_bytes("config.json", json.dumps(cfg.to_dict(), indent=2, sort_keys=True).encode())

    telemetry = Telemetry(run, cfg, rank, resume_step=step, peak=peak_flops(device) if bf16 else None)
    # The loader seeks past the `skip` batches this epoch already had, without decoding them (data.py).
    loader = model_step.loader(rank, world, start_epoch=epoch, skip_batches=skip)
    params = sum(p.numel() for p in unwrap(model).parameters())
    if rank == 0:
        log.info("%s: %.2f M parameters, %d worker(s), %s%s", cfg.kind, params / 1e6, world, device,
                 " bf16" if bf16 else "")
    last: dict[str, float] = {}
    model.train()
    accum = cfg.optim.grad_accum
    micro, loss_sum, work = 0, None, {}
    while step < cfg.run.steps:
        batches = skip  # the count within this epoch, saved in checkpoints
        for batch in loader:
            batches += 1
            batch = batch.to(device, non_blocking=True)
            # One seed per batch: (step, micro) for accumulated steps, (step) alone without accumulation.
            gen = torch.Generator(device).manual_seed(_step_seed(cfg.run.seed, rank, step * accum + micro))
            autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
            micro += 1
            with _no_sync(model, micro == accum), autocast:
                loss, parts = model_step.step(model, batch, gen)
            (loss / accum if accum > 1 else loss).backward()
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
            work = _add_work(work, model_step.work(model, batch))
            if micro < accum:
                continue
            grad_norm = (nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                         if cfg.optim.grad_clip > 0 else torch.tensor(0.0))
            optim.step()
            sched.step()
            optim.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update()
            step += 1
            values = {"loss": loss_sum / accum, **parts, "grad_norm": grad_norm.detach(),
                      "lr": sched.get_last_lr()[0]}
            logged = telemetry.step(step, values, work)
            micro, loss_sum, work = 0, None, {}
            if logged:  # checked at log steps only: a per-step .item() would stall the GPU queue every step
                last = logged
                if not math.isfinite(last["loss"]):
                    raise FloatingPointError(f"loss {last['loss']} by step {step}: lower optim.lr or check the data")
            # Rank 0 draws the grid; under FSDP every rank must join the forward's parameter all-gathers.
            if cfg.run.image_every and step % cfg.run.image_every == 0 and (rank == 0 or cfg.scale.fsdp):
                with torch.no_grad():
                    telemetry.images(step, model_step.images(unwrap(model), batch))
            if step % cfg.run.ckpt_every == 0 or step == cfg.run.steps:
                _save(run, cfg, model, optim, sched, ema, step, epoch, batches, last, telemetry, rank)
            if step >= cfg.run.steps:
                break
        else:
            if batches == 0:
                raise ValueError(f"the loader yielded no batch in epoch {epoch}: is {cfg.data.shards} empty?")
            epoch, skip = epoch + 1, 0
            continue
        break
    telemetry.close()
    return {"step": step, "metrics": last, "run": run.url}


def _train_state(model: nn.Module, optim: torch.optim.Optimizer, ema: EMA | None) -> dict[str, Any]:
    """What DCP saves and loads: this rank's shards of the weights, the EMA and the optimiser (FSDP2 DTensors stay
    sharded; state_dict's helpers also strip DDP's `module.` and key the optimiser by parameter name)."""
    sd = _state_io()
    state = {"model": sd.get_model_state_dict(model), "optim": sd.get_optimizer_state_dict(model, optim)}
    if ema is not None:
        state["ema"] = ema.state_dict()
    return state


def restore(run: Storage, found: ckpt_io.Checkpoint, cfg: TrainConfig, model: nn.Module,
            optim: torch.optim.Optimizer, sched: Any, ema: EMA | None, rank: int, world: int) -> tuple[int, int, int]:
    """Load checkpoint `found` into this rank's model, optimiser, schedule and EMA (resharded by DCP when the
    world size changed) and return where to go on: (step, epoch, batches to skip in it)."""
    sd = _state_io()
    state = _train_state(model, optim, ema)  # the shapes and shards to read into
    ckpt_io.load_shards(run, found, state)
    sd.set_model_state_dict(model, state["model"])
    sd.set_optimizer_state_dict(model, optim, state["optim"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    train_state = ckpt_io.load_train_state(run, found)
    sched.load_state_dict(train_state["sched"])
    # The optimiser state carries the lr of the run that saved it; this run's schedule (run.steps may have
    # grown, changing a decay) decides the next step's.
    for group, base in zip(optim.param_groups, sched.base_lrs, strict=True):
        group["lr"] = base * lr_factor(found.step, cfg)
    epoch, skip = _position(train_state, rank, world)
    log.info("rank %d: resumed %s at step %d (epoch %d, batch %d)", rank, run.path(found.rel), found.step, epoch,
             skip)
    return found.step, epoch, skip


def _save(run: Storage, cfg: TrainConfig, model: nn.Module, optim: torch.optim.Optimizer, sched: Any,
          ema: EMA | None, step: int, epoch: int, batches: int, metrics: dict[str, float], telemetry: Telemetry,
          rank: int) -> None:
    distributed = dist.is_available() and dist.is_initialized()
    # Every rank's place in its data stream: with token budgets, ranks consume different numbers of batches.
    positions = [[epoch, batches]]
    if distributed:
        positions = [None] * dist.get_world_size()
        dist.all_gather_object(positions, [epoch, batches])
    if rank == 0:
        telemetry.flush(step)
        ckpt_io.begin(run, step)
    if distributed:
        dist.barrier()  # nobody writes before rank 0 has cleared a stale folder of this step
    ckpt_io.save_shards(run, step, _train_state(model, optim, ema))  # collective: ends when every rank wrote
    if rank == 0:
        ckpt_io.finish(run, step, train_state={"sched": sched.state_dict(), "epoch": epoch, "batches": batches,
                                               "positions": positions},
                       meta={"config": cfg.to_dict(), "metrics": metrics, "kind": cfg.kind},
                       keep=cfg.run.keep_checkpoints)
    if distributed:
        dist.barrier()


def _position(state: dict[str, Any], rank: int, world: int) -> tuple[int, int]:
    """Where this rank's data stream resumes: its own saved (epoch, batches) when the world size is the one saved;
    on another world size the streams cannot continue (each rank's stream is seeded by its rank and the worker
    count), so every rank restarts at the start of rank 0's saved epoch and the run is no longer exact in its
    data order (weights, optimiser, EMA, schedule and step are kept)."""
    positions = state.get("positions")
    if positions is None:  # saved before per-rank positions, when every rank had consumed as many batches
        return int(state["epoch"]), int(state["batches"])
    if len(positions) == world:
        epoch, batches = positions[rank]
        return int(epoch), int(batches)
    log.warning("resuming on %d worker(s) a run saved on %d: data order restarts at epoch %d", world,
                len(positions), positions[0][0])
    return int(positions[0][0]), 0


def with_feature_encoder(cfg: TrainConfig) -> TrainConfig:
    """An SMDiT (or structure flow) config whose `flow.encoder` is left empty gets the encoder the shards' features
    were made with (stats.json), so conditioning latents and voxel latents come from one encoder unless a run says
    otherwise; the run's config.json, and so `generate` and evaluation, record the resolved name."""
    if cfg.kind not in FLOW_KINDS or cfg.flow.encoder:
        return cfg
    encoder = read_stats(cfg.data.shards).get("encoder")
    if not encoder:
        raise ValueError(f"{cfg.data.shards}/stats.json does not name its features' encoder: set flow.encoder")
    return dataclasses.replace(cfg, flow=dataclasses.replace(cfg.flow, encoder=encoder))


def fit(cfg: TrainConfig, *, local: bool = False, ray_address: str | None = None,
        max_failures: int = 0) -> dict[str, Any]:
    """Train `cfg` to `cfg.run.steps`, resuming from the run directory's newest checkpoint if there is one.

    local=True runs one worker in this process. Otherwise Ray Train runs `cfg.scale.num_workers` workers on the
    Ray cluster at `ray_address` (None: the one this process is connected to, or a new local one);
    `max_failures` lets Ray restart a failed worker group, which then resumes from the newest checkpoint.
    """
    if not cfg.data.shards:
        raise ValueError("data.shards is empty: pass a dataset version folder (shards/<version>)")
    check_features(cfg, read_stats(cfg.data.shards))  # here too: a Ray worker's error would come back wrapped
    cfg = with_feature_encoder(cfg)
    if local:
        if cfg.scale.num_workers != 1:
            raise ValueError("local=True runs one worker; use Ray for scale.num_workers > 1")
        return train_loop(cfg.to_dict())
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        ray.init(address=ray_address, include_dashboard=False) if ray_address else ray.init(include_dashboard=False)
    use_gpu = cfg.scale.use_gpu if cfg.scale.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    run = Storage(cfg.run.out)
    storage_path = run.path("ray") if run.local else None  # Ray's own run state; None = ~/ray_results
    trainer = TorchTrainer(
        train_loop, train_loop_config=cfg.to_dict(),
        scaling_config=ScalingConfig(num_workers=cfg.scale.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=None if use_gpu else {"CPU": 1}),
        run_config=RunConfig(name=f"{cfg.kind}-{os.path.basename(cfg.run.out.rstrip('/'))}",
                             storage_path=storage_path, failure_config=FailureConfig(max_failures=max_failures)))
    trainer.fit()
    done = ckpt_io.latest(run)
    if done is None or done.step < cfg.run.steps:
        raise RuntimeError(f"training stopped before step {cfg.run.steps}: newest checkpoint "
                           f"{done.step if done else None} in {cfg.run.out}")
    return {"step": done.step, "metrics": done.meta.get("metrics", {}), "run": run.url,
            "checkpoint": run.path(done.rel)}

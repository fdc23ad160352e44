"""The train flow: the decoder, the SMDiT and the sparse-structure stage, each a Ray Train job on the cluster the
flow is connected to.

The two jobs run at once: the SMDiT diffuses the FLUX features themselves, not anything the decoder makes, and
needs the decoder only for its optional image grids (skipped until the decoder has a checkpoint). A cluster with
room for both trains them side by side. On a full one the second job waits: Ray Train retries a worker group
that found no resources (WorkerGroupStartupTimeoutError, every 60 s, without limit by default) until the first
job's workers are gone.
Local mode (`train.local`: all in this process) trains them one after the other. So does the Enc-Dec variant
(`[train.decoder] decoder.latent_channels > 0`): its SMDiT diffuses the finished decoder's latent. The structure
stage (`train.structure`) is two jobs in turn, the occupancy VAE, then the flow model over its finished latent,
alongside the other two.

Run directories are keyed by dataset version (<root>/models/<version>/{decoder,smdit}), and training resumes from a
run's newest checkpoint, so re-running the flow (or the pipeline after a crash) continues or skips finished runs
instead of starting over. The pipeline flow runs it as a sub-flow after the data flow.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NONE

from flux3d.config.features import ENCODER_CHANNELS
from flux3d.config.pipeline import Config
from flux3d.config.typecheck import merged
from flux3d.executors.ray import connect
from flux3d.flows.data import flow_config
from flux3d.storage import Storage


def run_config(cfg: Config, kind: str, version: str):  # noqa: ANN201 - TrainConfig
    """The TrainConfig a pipeline's model node runs: its recipe, the shards of `version`, its run directory, and
    `[train.<kind>]`'s changes on top. What one model takes from another (a decoder run, a VAE's latent) and from
    the data flow (voxel grid, feature encoder) is set here, so the runs fit together."""
    from flux3d.config.recipes import train_config

    storage = Storage(cfg.storage.root)
    t = cfg.train
    changes = t.changes(kind)
    run: dict[str, Any] = {"out": storage.path(t.runs, version, kind)}
    # The models' voxel grid is the one this pipeline voxelized at (the trainer refuses a mismatch).
    derived: dict[str, Any] = {"data": {"shards": storage.path("shards", version)}, "run": run}
    if kind == "decoder":
        # And its input width is the encoder's (the trainer refuses shards whose stats.json says otherwise).
        derived["decoder"] = {"gaussians": {"resolution": cfg.voxelize.resolution},
                              "in_channels": ENCODER_CHANNELS[cfg.encode.encoder]}
    elif kind == "structure_vae":
        derived["structure"] = {"grid": cfg.voxelize.resolution}
    elif kind == "structure_flow":
        vae = run_config(cfg, "structure_vae", version).structure
        derived["smdit"] = {"grid": vae.latent_resolution, "in_channels": vae.latent_channels}
        derived["flow"] = {"latents": storage.path(t.runs, version, "structure_vae")} | _encoder(cfg, changes)
    else:
        derived["smdit"] = {"grid": cfg.voxelize.resolution}
        run["decoder_run"] = storage.path(t.runs, version, "decoder")
        flow = changes.get("flow", {})
        derived["flow"] = _encoder(cfg, changes)
        latent = enc_dec_channels(cfg, version)
        if latent and "latents" not in flow:  # Enc-Dec: the SMDiT diffuses this pipeline's decoder's latent
            derived["flow"]["latents"] = run["decoder_run"]
            derived["smdit"]["in_channels"] = latent
    return train_config(kind, t.recipe(kind), merged(derived, changes))


def _encoder(cfg: Config, changes: dict[str, Any]) -> dict[str, Any]:
    """An image-conditioned model encodes its conditioning view with the features' encoder, unless told otherwise."""
    flow = changes.get("flow", {})
    if "encoder" in flow or "encoder_location" in flow:
        return {}
    return {"encoder": cfg.encode.encoder, "encoder_location": cfg.encode.location}


def enc_dec_channels(cfg: Config, version: str) -> int:
    """The latent width of the pipeline's decoder: > 0 for the encoder-decoder variant, 0 for Dec-Only."""
    return run_config(cfg, "decoder", version).decoder.latent_channels


@task(name="train-model", cache_policy=NONE, task_run_name="train-{kind}")
def train_task(cfg: Config, kind: str, version: str) -> dict[str, Any]:
    from flux3d.training import checkpoint as ckpt_io
    from flux3d.training.trainer import fit

    tcfg = run_config(cfg, kind, version)
    run = Storage(tcfg.run.out)
    done = ckpt_io.latest(run)
    if done is not None and done.step >= tcfg.run.steps:  # fit would find this too, but only inside a Ray job
        get_run_logger().info("%s: %s is already trained to step %d", kind, run.url, done.step)
        result = {"step": done.step, "metrics": done.meta.get("metrics", {}), "run": run.url}
    else:
        result = fit(tcfg, local=cfg.train.local)
    rows = [{"metric": k, "value": round(float(v), 5)} for k, v in sorted(result["metrics"].items())]
    create_table_artifact(rows, key=f"train-{kind.replace('_', '-')}",  # keys: a-z, 0-9, -
                          description=f"{kind} at step {result['step']}: {run.url}")
    return result


@flow(name="flux3d-train", log_prints=True)
def train_flow(root: str, dataset_version: str, config: str | None = None, recipe: str | None = None,
               ray_address: str | None = None) -> dict[str, Any]:
    """Train the decoder, the SMDiT and (with `train.structure`) the structure VAE and flow on the shards of
    `dataset_version` under `root`."""
    cfg = flow_config(root, config, recipe, ray_address)
    kinds = ["decoder", "smdit"] + (["structure_vae", "structure_flow"] if cfg.train.structure else [])
    if cfg.train.local:
        return {kind: train_task(cfg, kind, dataset_version) for kind in kinds}
    connect(cfg.flow.ray_address or None, cfg.flow.ray_num_cpus, cfg.flow.ray_dashboard)
    jobs = {"decoder": train_task.submit(cfg, "decoder", dataset_version)}
    if enc_dec_channels(cfg, dataset_version):
        jobs["decoder"].wait()  # the SMDiT's training data is the finished decoder's latent
    jobs["smdit"] = train_task.submit(cfg, "smdit", dataset_version)
    if cfg.train.structure:  # the flow diffuses the finished VAE's latent: it waits for that job alone
        jobs["structure_vae"] = train_task.submit(cfg, "structure_vae", dataset_version)
        jobs["structure_flow"] = train_task.submit(cfg, "structure_flow", dataset_version,
                                                   wait_for=[jobs["structure_vae"]])
    return {kind: job.result() for kind, job in jobs.items()}


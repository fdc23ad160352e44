"""The model commands of `flux3d`: `train decoder|smdit|structure-vae|structure-flow`, `generate`, `evaluate` and
`study features` (flux3d.evaluation)."""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Annotated, Optional

import typer

train_app = typer.Typer(add_completion=False, no_args_is_help=True,
                        help="Train the DA-SLAT decoder, the SMDiT or the sparse-structure stage on a dataset "
                             "version (Ray Train).")

study_app = typer.Typer(add_completion=False, no_args_is_help=True,
                        help="Studies over trained decoders (paper Tab. 2b: which input feature).")

RecipeOpt = Annotated[str, typer.Option("--recipe", help="Named run: debug (CPU, minutes) | paper (Tab. 6).")]
ShardsOpt = Annotated[Optional[str], typer.Option("--shards", help="Dataset version folder (shards/<version>).")]
OutOpt = Annotated[Optional[str], typer.Option("--out", help="Run directory (local or fsspec URL); an existing "
                                                             "run resumes from its newest checkpoint.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a field: --set optim.lr=3e-4 "
                                                                   "(repeatable).")]
WorkersOpt = Annotated[Optional[int], typer.Option("--workers", help="Ray Train workers (GPUs or CPU processes).")]
LocalOpt = Annotated[bool, typer.Option("--local", help="One worker in this process, without Ray.")]
RayOpt = Annotated[Optional[str], typer.Option("--ray-address", help="Ray cluster (default: start a local Ray).")]


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("flux3d").setLevel(logging.INFO)


def train_config(kind: str, recipe: str, shards: str | None, out: str | None, sets: list[str] | None,
                 workers: int | None):  # noqa: ANN201 - TrainConfig
    from flux3d.config.recipes import train_recipe as named
    from flux3d.config.training import apply_overrides

    overrides = list(sets or [])
    if shards:
        overrides.append(f"data.shards={shards}")
    if out:
        overrides.append(f"run.out={out}")
    if workers:
        overrides.append(f"scale.num_workers={workers}")
    try:
        return apply_overrides(named(kind, recipe), overrides)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e


def _train(kind: str, recipe: str, shards: str | None, out: str | None, sets: list[str] | None,
           workers: int | None, local: bool, ray_address: str | None) -> None:
    from flux3d.training.trainer import fit

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    _logging()
    cfg = train_config(kind, recipe, shards, out, sets, 1 if local else workers)
    try:
        result = fit(cfg, local=local, ray_address=ray_address)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    metrics = {k: round(v, 4) for k, v in result["metrics"].items()}
    typer.echo(f"{kind} trained to step {result['step']} in {result['run']}: {json.dumps(metrics)}")


@train_app.command("decoder")
def train_decoder(recipe: RecipeOpt = "debug", shards: ShardsOpt = None, out: OutOpt = None, set_: SetOpt = None,
                  workers: WorkersOpt = None, local: LocalOpt = False, ray_address: RayOpt = None) -> None:
    """The DA-SLAT Gaussian decoder: per-voxel FLUX latents -> 3D Gaussians, against the shards' renders."""
    _train("decoder", recipe, shards, out, set_, workers, local, ray_address)


@train_app.command("smdit")
def train_smdit(recipe: RecipeOpt = "debug", shards: ShardsOpt = None, out: OutOpt = None, set_: SetOpt = None,
                workers: WorkersOpt = None, local: LocalOpt = False, ray_address: RayOpt = None) -> None:
    """The SMDiT: image-conditioned flow matching over the shards' per-voxel FLUX latents."""
    _train("smdit", recipe, shards, out, set_, workers, local, ray_address)


@train_app.command("structure-vae")
def train_structure_vae(recipe: RecipeOpt = "debug", shards: ShardsOpt = None, out: OutOpt = None,
                        set_: SetOpt = None, workers: WorkersOpt = None, local: LocalOpt = False,
                        ray_address: RayOpt = None) -> None:
    """Stage 1's occupancy VAE: the shards' voxels as a dense grid <-> a low-resolution latent grid."""
    _train("structure_vae", recipe, shards, out, set_, workers, local, ray_address)


@train_app.command("structure-flow")
def train_structure_flow(recipe: RecipeOpt = "debug", shards: ShardsOpt = None, out: OutOpt = None,
                         set_: SetOpt = None, workers: WorkersOpt = None, local: LocalOpt = False,
                         ray_address: RayOpt = None) -> None:
    """Stage 1's flow model: image-conditioned flow matching over a finished structure VAE's latent
    (--set flow.latents=<that run>)."""
    _train("structure_flow", recipe, shards, out, set_, workers, local, ray_address)


def generate(
    image: Annotated[str, typer.Option("--image", help="Conditioning image: a photo (RGBA, or RGB on a plain "
                                                       "background) or a render.")],
    smdit: Annotated[str, typer.Option("--smdit", help="SMDiT run directory or checkpoint.")],
    decoder: Annotated[str, typer.Option("--decoder", help="Decoder run directory or checkpoint.")],
    structure: Annotated[Optional[str], typer.Option("--structure", help="Structure flow run (stage 1): predicts "
                                                                         "the layout from the image.")] = None,
    layout: Annotated[Optional[str], typer.Option("--layout", help="A given sparse layout instead of stage 1 (the "
                                                                   "paper's protocol): voxels/<sha>.npy, features "
                                                                   ".npz, or shard.tar#<key>.")] = None,
    out: Annotated[str, typer.Option("--out", help="Output 3DGS .ply.")] = "asset.ply",
    turntable: Annotated[Optional[str], typer.Option(help="Turntable .png grid or .gif.")] = None,
    layout_out: Annotated[Optional[str], typer.Option("--layout-out", help="Save the predicted layout (.npy).")]
    = None,
    matting: Annotated[str, typer.Option(help="TorchScript background-removal model for RGB photos (else a "
                                              "plain background is keyed out).")] = "",
    steps: Annotated[int, typer.Option(help="Euler steps.")] = 50,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance weight.")] = 3.0,
    structure_steps: Annotated[int, typer.Option(help="Stage-1 Euler steps.")] = 25,
    structure_guidance: Annotated[float, typer.Option(help="Stage-1 guidance weight (TRELLIS's 7.5 is our "
                                                           "8.5: w = 1 + its cfg_strength).")] = 8.5,
    background: Annotated[float, typer.Option(help="Background under a transparent image (0 black, 1 white).")]
    = 1.0,
    seed: int = 0,
    device: Annotated[str, typer.Option(help="cpu | cuda | auto")] = "auto",
) -> None:
    """Image -> [stage 1: structure flow -> layout] -> FLUX latents (SMDiT) -> Gaussians (decoder) -> a 3DGS .ply
    and a turntable. With --structure the photo is matted and framed like the training renders; with --layout the
    image is used as it is. An Enc-Dec SMDiT samples its decoder's 8-channel latent instead: give that decoder."""
    import numpy as np
    import torch

    from flux3d.features.photo import PhotoError, conditioning_image, prepare_photo
    from flux3d.features.vae import ConditionEncoder
    from flux3d.models.flow_matching import SamplerConfig
    from flux3d.models.gaussians import save_ply
    from flux3d.models.inference import generate as run_generate
    from flux3d.models.inference import load_image, predict_layout, read_layout, save_turntable
    from flux3d.models.inference import turntable as render_turntable
    from flux3d.training.checkpoint import decodes_latent, load_model, load_structure

    if (layout is None) == (structure is None):
        raise typer.BadParameter("give --structure (predict the layout from the image) or --layout, not both")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    try:
        smdit_model, smdit_cfg = load_model(smdit, device=dev)
        decoder_model, decoder_cfg = load_model(decoder, device=dev)
        if smdit_cfg.kind != "smdit" or decoder_cfg.kind != "decoder":
            raise ValueError(f"--smdit is a {smdit_cfg.kind} run and --decoder a {decoder_cfg.kind} run")
        latent = decodes_latent(smdit_cfg, decoder)
        sampler = SamplerConfig(steps=steps, guidance=guidance)

        def cond_latents(cfg):  # noqa: ANN001, ANN202 - a TrainConfig -> (1, 16, h, w)
            f = cfg.flow
            x = (conditioning_image(prepare_photo(image, f.cond_resolution, matting), background) if structure
                 else load_image(image, f.cond_resolution, background))
            return ConditionEncoder(f.encoder, f.encoder_location, f.cond_resolution, dev)(x.to(dev))

        if structure:
            flow, vae, flow_cfg = load_structure(structure, device=dev)
            if vae.cfg.grid != smdit_cfg.smdit.grid:
                raise ValueError(f"the structure model predicts {vae.cfg.grid}^3 layouts, the SMDiT works on "
                                 f"{smdit_cfg.smdit.grid}^3")
            coords, _ = predict_layout(flow, vae, cond_latents(flow_cfg),
                                       SamplerConfig(steps=structure_steps, guidance=structure_guidance), seed)
            typer.echo(f"stage 1: {len(coords)} voxels predicted by {structure}")
            if layout_out:
                np.save(layout_out, coords)
        else:
            coords = read_layout(layout)
        cond = cond_latents(smdit_cfg)
    except (ValueError, PhotoError) as e:
        raise typer.BadParameter(str(e)) from e
    result = run_generate(smdit_model, decoder_model, cond, coords, sampler, seed, latent)
    save_ply(result.gaussians, out)
    typer.echo(f"wrote {out}: {len(result.gaussians)} Gaussians on {len(coords)} voxels")
    if turntable:
        save_turntable(render_turntable(result.gaussians, background=background), turntable)
        typer.echo(f"wrote {turntable}")


def evaluate(
    run: Annotated[Optional[str], typer.Option("--run", help="A pipeline run folder holding decoder/ and smdit/ "
                                                             "(models/<dataset version>).")] = None,
    decoder: Annotated[Optional[str], typer.Option("--decoder", help="Decoder run (default: RUN/decoder).")] = None,
    smdit: Annotated[Optional[str], typer.Option("--smdit", help="SMDiT run (default: RUN/smdit if present).")]
    = None,
    structure: Annotated[Optional[str], typer.Option("--structure", help="Structure flow run for the predicted-"
                                                                         "layout protocol, Tab. 10 (default: "
                                                                         "RUN/structure_flow if present).")] = None,
    shards: Annotated[Optional[str], typer.Option("--shards", help="Evaluation dataset version (default: the "
                                                                   "decoder's training shards).")] = None,
    recipe: RecipeOpt = "paper",
    set_: SetOpt = None,
    out: Annotated[Optional[str], typer.Option("--out", help="Report folder (default: RUN/eval).")] = None,
    previous: Annotated[Optional[str], typer.Option("--previous", help="An earlier report.json to compare "
                                                                       "against.")] = None,
) -> None:
    """Reconstruction, generation and multi-view metrics of trained models, written as a report
    (report.json / .md / .html, grid.png) with the paper's published numbers beside them."""
    from flux3d.config.recipes import eval_config
    from flux3d.evaluation.evaluate import evaluate as run_evaluate
    from flux3d.storage import Storage

    _logging()
    if not run and not decoder:
        raise typer.BadParameter("give --run (a folder with decoder/ and smdit/) or --decoder")
    decoder = decoder or f"{run.rstrip('/')}/decoder"
    if smdit is None and run and Storage(run).exists("smdit/config.json"):
        smdit = f"{run.rstrip('/')}/smdit"
    if structure is None and run and Storage(run).exists("structure_flow/config.json"):
        structure = f"{run.rstrip('/')}/structure_flow"
    out = out or f"{(run or decoder).rstrip('/')}/eval"
    try:
        cfg = eval_config(recipe, [*(set_ or []), *([f"shards={shards}"] if shards else [])])
        prev = json.loads(open(previous).read()) if previous else None
        doc = run_evaluate(cfg, decoder, smdit, out, prev, structure)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    typer.echo(f"evaluated {doc['count']} assets ({doc['seconds_per_asset']:.1f} s each); report: {out}/report.md")
    for k, v in sorted(doc["summary"].items()):
        typer.echo(f"  {k:<18} {v:.4f}")


@study_app.command("features")
def study_features(
    encoders: Annotated[str, typer.Option("--encoders", help="Comma-separated encode.encoder names, one row each: "
                                                             "rgb, taef1, flux_vae, sdxl_vae, dinov2.")],
    root: Annotated[Optional[str], typer.Option("--root", help="Data root whose assets are rendered, curated and "
                                                               "voxelized (`flux3d data`).")] = None,
    config: Annotated[Optional[str], typer.Option("--config", help="The run's TOML: [train] decoder recipe and "
                                                                   "changes, [evaluate], encode settings.")] = None,
    recipe: Annotated[Optional[str], typer.Option("--recipe", help="Pipeline recipe under --config: paper | "
                                                                   "debug.")] = None,
    location: Annotated[Optional[list[str]], typer.Option("--location", help="Weights of one encoder: "
                                                                             "NAME=PATH (repeatable).")] = None,
    out: Annotated[str, typer.Option("--out", help="Study folder under the root.")] = "studies/features",
    split: Annotated[str, typer.Option("--split", help="Evaluation split: val | train | all.")] = "val",
) -> None:
    """The input-feature study (paper Tab. 2b): per encoder encode, shard, train the same decoder recipe and
    evaluate reconstruction; a table beside the paper's rows. Finished steps are skipped on a re-run."""
    from flux3d.config.load import load_config
    from flux3d.evaluation.feature_study import StudyConfig, run_study

    _logging()
    try:
        locations = dict(_pair(item) for item in location or [])
        cfg = load_config(config, {"storage.root": root} if root else None, recipe=recipe)
        study = StudyConfig(encoders=[e.strip() for e in encoders.split(",") if e.strip()], locations=locations,
                            out=out, split=split)
        doc = run_study(cfg, study)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    for r in doc["rows"]:
        typer.echo(f"{r['encoder']:<10} SSIM {r['ssim']:.4f}  PSNR {r['psnr']:.2f}  LPIPS {r['lpips']:.5f}  "
                   f"({r['channels']} ch, {r['steps']} steps, version {r['dataset_version']})")
    typer.echo(f"report: {cfg.storage.root.rstrip('/')}/{out}/report.md")


def _pair(item: str) -> tuple[str, str]:
    name, sep, path = item.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--location takes NAME=PATH, got {item!r}")
    return name.strip(), path

"""Run the protocols (protocols.py) over the evaluation assets and summarise: `flux3d evaluate` and the pipeline's
evaluate node. Feature networks are loaded once; assets are processed one at a time (a render of 32 Gaussians
per voxel at 512 px is the memory peak, not the batch)."""

from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from flux3d.config.evaluation import EvalConfig
from flux3d.config.training import TrainConfig
from flux3d.evaluation.protocols import (
    AssetResult,
    EvalAsset,
    azimuth_views,
    eval_assets,
    image,
    render,
    rng_for,
    sample_keys,
    scaled,
    view_metrics,
)
from flux3d.models.inference import decode_gaussians
from flux3d.shards.format import is_lossless

log = logging.getLogger(__name__)

LOSSY_TRUTH = ("Ground-truth views are lossy WebP (the dataset version was sharded with shard.image_quality < 100): "
               "the compression alone caps PSNR (48 dB on average, 38 dB on the worst views at q95 on real 512 px "
               "renders: a few tenths of a dB off a 34 dB model, docs/evaluation.md). "
               "Shard evaluation versions with shard.image_quality = 100 (lossless).")


@dataclass
class Models:
    decoder: torch.nn.Module
    decoder_cfg: TrainConfig
    decoder_run: str
    smdit: torch.nn.Module | None = None
    smdit_cfg: TrainConfig | None = None
    smdit_run: str = ""
    latent: bool = False
    """The SMDiT samples the decoder's own latent (Enc-Dec), not FLUX features."""
    structure: torch.nn.Module | None = None
    structure_vae: torch.nn.Module | None = None
    structure_cfg: TrainConfig | None = None
    """Stage 1 (a structure_flow run and its VAE): the predicted_layout protocol (paper Tab. 10)."""


class Evaluator:
    def __init__(self, cfg: EvalConfig, models: Models, device: torch.device) -> None:
        from flux3d.training.perceptual import load_lpips_vgg

        self.cfg, self.m, self.device = cfg, models, device
        self.bg = 0.0 if cfg.background == "black" else 1.0
        random_ok = cfg.allow_random_extractors
        # Networks allowed to be random (debug, demo) get the same random weights every run, so two evaluations of
        # the same models still agree and the comparison against a previous report means something.
        torch.manual_seed(cfg.seed)
        self.lpips = load_lpips_vgg(cfg.lpips_backbone or None, allow_random=random_ok, device=device)
        self.generate = "generation" in cfg.protocols and models.smdit is not None
        # Tab. 10 is generation on a predicted layout: it shares generation's input view, renders and networks.
        self.predict = self.generate and "predicted_layout" in cfg.protocols and models.structure is not None
        self.empty_layouts = 0
        self.lossy_truth = False  # any asset's ground-truth views stored as lossy WebP
        nets = {"LPIPS-VGG": cfg.lpips_backbone} | ({"CLIP": cfg.clip_weights, "Inception-v3": cfg.inception_weights,
                                                     "DINOv2": cfg.dinov2_weights} if self.generate else {})
        self.random_networks = [name for name, weights in nets.items() if not weights]
        if "generation" in cfg.protocols and models.smdit is None:
            log.warning("no SMDiT given: the generation protocol is skipped")
        if self.generate:
            from flux3d.evaluation.extractors import clip_image_encoder, dinov2, inception_v3
            from flux3d.evaluation.metrics import FeatureStats
            from flux3d.features.vae import ConditionEncoder

            self.clip = clip_image_encoder(cfg.clip_model, cfg.clip_weights or None,
                                           model_config=cfg.clip_model_config or None, allow_random=random_ok)
            self.clip.to(device)
            nets = {"inception": inception_v3(cfg.inception_weights or None, allow_random=random_ok),
                    "dinov2": dinov2(cfg.dinov2_weights or None, cfg.dinov2_variant, allow_random=random_ok)}
            sides = ("gen", "gt", "pgen") if self.predict else ("gen", "gt")
            self.stats = {(name, side): FeatureStats(net.to(device)) for name, net in nets.items() for side in sides}
            f = models.smdit_cfg.flow
            self.cond_encoder = ConditionEncoder(f.encoder, f.encoder_location, f.cond_resolution, device)
            if self.predict:
                f = models.structure_cfg.flow
                self.structure_encoder = ConditionEncoder(f.encoder, f.encoder_location, f.cond_resolution, device)

    def asset(self, a: EvalAsset) -> AssetResult:
        from flux3d.stages.render_layout import spread

        cfg, R, bg = self.cfg, self.cfg.resolution, self.bg
        res, rng = AssetResult(a.key), rng_for(cfg, a.key)
        cams, stored = a.cameras["views"], a.cameras["resolution"]
        self.lossy_truth |= not is_lossless(a.views[0])
        final = None
        if "reconstruction" in cfg.protocols:
            g = decode_gaussians(self.m.decoder, a.coords, a.mu)
            i = rng.randrange(len(cams))
            pred = render(g, scaled(cams[i]["K"], stored, R)[None], torch.tensor(cams[i]["w2c"])[None], R, bg)
            gt = image(a.views[i], bg, R)[None]
            res.rows |= view_metrics("recon", pred, gt.clamp(0, 1), self.lpips)
            res.grid += [gt[0], pred[0]]
            final = g
        if self.generate and not a.cond_images:
            # Shards built with shard.cond = "latents" carry no input image to compare renders against.
            log.warning("%s: no conditioning images in the shards (shard.cond = latents?): generation skipped", a.key)
        if self.generate and a.cond_images:
            from flux3d.evaluation.metrics import clip_score
            from flux3d.models.flow_matching import SamplerConfig
            from flux3d.models.inference import generate

            j = rng.randrange(len(a.cond_images))
            cam, cond_stored = a.cameras["cond"][j], a.cameras["cond_resolution"]
            inp = image(a.cond_images[j], bg, R)
            size = self.m.smdit_cfg.flow.cond_resolution
            latents = self.cond_encoder(image(a.cond_images[j], bg, size)[None].to(self.device))
            g = generate(self.m.smdit, self.m.decoder, latents, a.coords,
                         SamplerConfig(steps=cfg.sampler_steps, guidance=cfg.guidance),
                         seed=zlib.crc32(f"{cfg.seed}:{a.key}".encode()), latent=self.m.latent).gaussians
            pred = render(g, scaled(cam["K"], cond_stored, R)[None], torch.tensor(cam["w2c"])[None], R, bg)
            res.rows |= view_metrics("gen", pred, inp[None], self.lpips)
            idx = spread(len(cams), cfg.metric_views)
            K = torch.stack([scaled(cams[i]["K"], stored, R) for i in idx])
            views = render(g, K, torch.tensor([cams[i]["w2c"] for i in idx]), R, bg)
            gts = torch.stack([image(a.views[i], bg, R) for i in idx])
            res.rows["gen_clip"] = float(clip_score(views.to(self.device), inp[None].to(self.device),
                                                    self.clip).mean())
            for (name, side), stats in self.stats.items():
                stats.update((views if side == "gen" else gts).to(self.device))
            res.grid = [inp, pred[0], views[-1], gts[-1]] + res.grid
            final = g
            if self.predict:
                self.predicted_layout(a, res, a.cond_images[j], latents, cam, idx, inp)
        if "multiview" in cfg.protocols and final is not None:
            from flux3d.evaluation.metrics import psnr

            idx = azimuth_views(cams, cfg.multiview_views)
            K = torch.stack([scaled(cams[i]["K"], stored, R) for i in idx])
            views = render(final, K, torch.tensor([cams[i]["w2c"] for i in idx]), R, bg)
            per_view = psnr(views, torch.stack([image(a.views[i], bg, R) for i in idx]))
            res.rows["mv_psnr_mean"], res.rows["mv_psnr_std"] = float(per_view.mean()), float(per_view.std())
            res.rows["mv_views"] = float(len(idx))
        return res

    def predicted_layout(self, a: EvalAsset, res: AssetResult, cond_png: bytes, latents: torch.Tensor, cam: dict,
                         idx: list[int], inp: torch.Tensor) -> None:
        """Tab. 10: stage 1 predicts the layout from the input view; generation as above on it (`latents`: the
        SMDiT's conditioning latents of that view); the layout against the ground-truth voxels. An empty prediction
        scores IoU 0 and generates nothing (counted in the caveats)."""
        from flux3d.evaluation.metrics import chamfer_distance, clip_score, layout_iou
        from flux3d.models.flow_matching import SamplerConfig
        from flux3d.models.inference import generate, predict_layout

        cfg, R, bg, m = self.cfg, self.cfg.resolution, self.bg, self.m
        seed = zlib.crc32(f"{cfg.seed}:{a.key}".encode())
        size = m.structure_cfg.flow.cond_resolution
        s_latents = self.structure_encoder(image(cond_png, bg, size)[None].to(self.device))
        try:
            layout, _ = predict_layout(m.structure, m.structure_vae, s_latents,
                                       SamplerConfig(steps=cfg.structure_steps, guidance=cfg.structure_guidance), seed)
        except ValueError:
            res.rows["layout_iou"] = 0.0
            self.empty_layouts += 1
            return
        res.rows["layout_iou"] = layout_iou(layout, a.coords)
        res.rows["layout_chamfer"] = chamfer_distance(layout, a.coords, m.structure_vae.cfg.grid)
        sampler = SamplerConfig(steps=cfg.sampler_steps, guidance=cfg.guidance)
        g = generate(m.smdit, m.decoder, latents, layout, sampler, seed=seed, latent=m.latent).gaussians
        cams, stored = a.cameras["views"], a.cameras["resolution"]
        pred = render(g, scaled(cam["K"], a.cameras["cond_resolution"], R)[None], torch.tensor(cam["w2c"])[None], R,
                      bg)
        res.rows |= view_metrics("pgen", pred, inp[None], self.lpips)
        K = torch.stack([scaled(cams[i]["K"], stored, R) for i in idx])
        views = render(g, K, torch.tensor([cams[i]["w2c"] for i in idx]), R, bg)
        res.rows["pgen_clip"] = float(clip_score(views.to(self.device), inp[None].to(self.device), self.clip).mean())
        for name in ("inception", "dinov2"):
            self.stats[(name, "pgen")].update(views.to(self.device))
        res.grid += [pred[0]]

    def distances(self) -> tuple[dict[str, float], list[str]]:
        """FD and KD (raw; the paper's KD(%) is x100) per feature network, generated vs ground-truth views, and the
        caveats the report states about them (too few samples for the feature width)."""
        from flux3d.evaluation.metrics import fd_caveat, frechet_distance, kernel_distance

        out: dict[str, float] = {}
        caveats = [f"Random-weight networks (allow_random_extractors): {', '.join(self.random_networks)}; the metrics "
                   "that use them check the plumbing and measure nothing."] if self.random_networks else []
        if self.lossy_truth:
            caveats.append(LOSSY_TRUTH)
        if self.empty_layouts:
            caveats.append(f"Stage 1 predicted an empty layout for {self.empty_layouts} asset(s): layout IoU 0, no "
                           "generation on them (Tab. 10's other columns average over the rest).")
        if not self.generate:
            return out, caveats
        for name in ("inception", "dinov2"):
            gt = self.stats[(name, "gt")]
            for side, suffix in (("gen", ""), ("pgen", "_pred")):
                gen = self.stats.get((name, side))
                if gen is None or gen.num_samples < 2:
                    continue
                caveat = fd_caveat(min(gen.num_samples, gt.num_samples), gen.features.shape[1], name)
                caveats += [caveat] if caveat and caveat not in caveats else []
                out[f"fd_{name}{suffix}"] = frechet_distance(gen, gt)
                kd = kernel_distance(gen, gt, subsets=self.cfg.kd_subsets,
                                     subset_size=min(self.cfg.kd_subset_size, gen.num_samples), seed=self.cfg.seed)
                out[f"kd_{name}{suffix}"] = kd.mean
        return out, caveats


def run(cfg: EvalConfig, models: Models, device: torch.device) -> dict[str, Any]:
    """Evaluate; returns the summary (means over assets, distances), per-asset rows and the grid images."""
    shards = cfg.shards or models.decoder_cfg.data.shards
    keys = sample_keys(shards, cfg.split, cfg.assets, cfg.seed)
    ev = Evaluator(cfg, models, device)
    t0, results = time.perf_counter(), []
    for a in eval_assets(shards, keys):
        results.append(ev.asset(a))
        log.info("evaluated %d/%d: %s", len(results), len(keys), a.key)
    seconds = time.perf_counter() - t0
    names = sorted({k for r in results for k in r.rows})
    summary = {k: float(np.mean([r.rows[k] for r in results if k in r.rows])) for k in names}
    distances, caveats = ev.distances()
    summary |= distances
    return {"summary": summary, "caveats": caveats, "assets": [{"key": r.key, **r.rows} for r in results],
            "grids": results,
            "shards": shards, "seconds_per_asset": seconds / max(len(results), 1), "count": len(results)}


def evaluate(cfg: EvalConfig, decoder_run: str, smdit_run: str | None, out: str,
             previous: dict[str, Any] | None = None, structure_run: str | None = None) -> dict[str, Any]:
    """Load the models (their EMA weights), run the protocols, write the report folder `out`; returns the report.
    `structure_run`: a structure_flow run, for the predicted-layout protocol (Tab. 10)."""
    import dataclasses

    from flux3d.evaluation.report import write_report
    from flux3d.training import checkpoint as ckpt_io
    from flux3d.training.checkpoint import load_model

    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    decoder, dcfg = load_model(decoder_run, device=device)
    if dcfg.kind != "decoder":
        raise ValueError(f"{decoder_run} is a {dcfg.kind} run, not a decoder run")
    models = Models(decoder, dcfg, decoder_run)
    info: dict[str, Any] = {"config": dataclasses.asdict(cfg), "decoder_run": decoder_run,
                            "decoder_step": ckpt_io.resolve(decoder_run)[1].step,
                            "variant": "Enc-Dec" if dcfg.decoder.latent_channels else "Dec-Only"}
    if smdit_run:
        smdit, scfg = load_model(smdit_run, device=device)
        if scfg.kind != "smdit":
            raise ValueError(f"{smdit_run} is a {scfg.kind} run, not an SMDiT run")
        models.smdit, models.smdit_cfg, models.smdit_run = smdit, scfg, smdit_run
        models.latent = ckpt_io.decodes_latent(scfg, decoder_run)
        info |= {"smdit_run": smdit_run, "smdit_step": ckpt_io.resolve(smdit_run)[1].step,
                 "smdit_diffuses": f"{scfg.smdit.in_channels}-channel " + ("decoder latent" if models.latent else
                                                                            "FLUX features")}
    if structure_run:
        models.structure, models.structure_vae, models.structure_cfg = ckpt_io.load_structure(structure_run, device)
        if models.structure_vae.cfg.grid != dcfg.decoder.gaussians.resolution:
            raise ValueError(f"{structure_run} predicts {models.structure_vae.cfg.grid}^3 layouts, the decoder works "
                             f"on {dcfg.decoder.gaussians.resolution}^3")
        info |= {"structure_run": structure_run, "structure_step": ckpt_io.resolve(structure_run)[1].step}
    result = run(cfg, models, device)
    return write_report(out, result, info, previous)

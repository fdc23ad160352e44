"""The input-feature study of the paper's Tab. 2b (`flux3d study features`): which per-voxel input makes the best
Gaussian decoder. For each `encode.encoder` named, on one data root whose assets are already rendered, curated and
voxelized:

    encode   features/<encoder>/<sha>.npz          (catalog stage, resumable: params differ per encoder)
    shard    shards/<version>/                     (a dataset version of its own; shards/LATEST is left alone)
    train    <study>/<encoder>-<version>/decoder-<recipe hash>/   the same decoder recipe and steps for every encoder
    eval     .../eval/report.json                  reconstruction (SSIM / PSNR / LPIPS) on the held-out split

then `<study>/report.md` and `report.json`: our rows beside the paper's. Every step is skipped when its output is
there (the catalog, stats.json, a checkpoint at the final step, a report of that checkpoint with the same
evaluation config), so a re-run redoes nothing and an interrupted one resumes.

What differs between rows is the features alone: assets, train/val split (seeded by sha256), views, decoder recipe
and evaluation (assets and views seeded by key) are the same. The decoder's input width follows the dataset
(stats.json "channels"); the features are fed as the encoder gives them, without per-channel normalisation, as
TRELLIS feeds DINOv2's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any

from flux3d.catalog import Catalog
from flux3d.config.features import ENCODER_CHANNELS, FLUX_ENCODERS
from flux3d.config.pipeline import Config
from flux3d.config.recipes import eval_config, train_config
from flux3d.config.typecheck import merged
from flux3d.storage import Storage

log = logging.getLogger(__name__)

# Paper Tab. 2b ("Input Feature", reconstruction on Toys4k with the full-size decoder): SSIM, PSNR, LPIPS.
PAPER_TAB2B = [("DINOv2", 0.9719, 31.54, 0.02964), ("DINOv3", 0.9703, 32.61, 0.03192),
               ("Raw RGB", 0.9720, 31.14, 0.03794), ("SDXL", 0.9732, 32.54, 0.02916),
               ("FLUX (Ours)", 0.9779, 33.80, 0.02699)]
PAPER_ROW = {"dinov2": "DINOv2", "rgb": "Raw RGB", "sdxl_vae": "SDXL", "flux_vae": "FLUX (Ours)",
             "taef1": "FLUX (Ours)"}


@dataclass(kw_only=True, slots=True)
class StudyConfig:
    encoders: list[str]
    """`encode.encoder` names, one table row each (paper: dinov2, rgb, sdxl_vae, flux_vae)."""
    locations: dict[str, str] = field(default_factory=dict)
    """Weights per encoder; an encoder not named here uses `encode.location` if it is the config's own encoder,
    else "" (its default: hub ids, which download only when online)."""
    out: str = "studies/features"
    """Study folder under the data root."""
    split: str = "val"
    """Evaluation split: held-out assets, as the paper evaluates on Toys4k, which it does not train on."""

    def __post_init__(self) -> None:
        unknown = [e for e in self.encoders if e not in ENCODER_CHANNELS]
        if not self.encoders or unknown or len(set(self.encoders)) != len(self.encoders):
            raise ValueError(f"study encoders must be distinct names from {sorted(ENCODER_CHANNELS)}, got "
                             f"{self.encoders}")
        if set(self.locations) - set(self.encoders):
            raise ValueError(f"weights given for encoders the study does not run: "
                             f"{sorted(set(self.locations) - set(self.encoders))}")
        if self.split not in ("val", "train", "all"):
            raise ValueError(f"study split must be val, train or all, got {self.split!r}")


def encoder_config(cfg: Config, name: str, location: str | None) -> Config:
    """The run's config with `name` as its encoder (its other encode settings kept, so only the features differ)."""
    own = name == cfg.encode.encoder
    if location is None:
        location = cfg.encode.location if own else ""
    encode = dataclasses.replace(cfg.encode, encoder=name, location=location,
                                 decoder=cfg.encode.decoder if own else "",
                                 cond_latents=cfg.encode.cond_latents and name in FLUX_ENCODERS)
    shard = cfg.shard
    if shard.cond == "latents" and name not in FLUX_ENCODERS:  # conditioning latents exist only for FLUX
        shard = dataclasses.replace(shard, cond="images")
    return dataclasses.replace(cfg, encode=encode, shard=shard)


def decoder_run_config(cfg: Config, storage: Storage, study: StudyConfig, name: str, version: str,
                       channels: int):  # noqa: ANN201 - TrainConfig
    """The decoder recipe of `[train]` (recipe + changes) on this encoder's dataset version. The run folder is
    named by a hash of the recipe, so a changed recipe trains afresh instead of resuming another's checkpoint."""
    derived = {"data": {"shards": storage.path("shards", version)},
               "decoder": {"in_channels": channels, "gaussians": {"resolution": cfg.voxelize.resolution}}}
    recipe = train_config("decoder", cfg.train.decoder_recipe, merged(cfg.train.decoder, derived))
    # The encoder-specific fields are in the folder name already; the hash is of what all rows share.
    shared = merged(recipe.to_dict(), {"data": {"shards": ""}, "decoder": {"in_channels": 0}, "run": {"out": ""}})
    digest = hashlib.sha256(json.dumps(shared, sort_keys=True).encode()).hexdigest()[:8]
    out = storage.path(study.out, f"{name}-{version}", f"decoder-{digest}")
    return dataclasses.replace(recipe, run=dataclasses.replace(recipe.run, out=out))


def run_encoder(cfg: Config, study: StudyConfig, name: str, storage: Storage, catalog: Catalog) -> dict[str, Any]:
    """Encode, shard, train and evaluate one encoder's row, skipping each step whose output is there."""
    from flux3d.evaluation.evaluate import evaluate
    from flux3d.features.encode import encode_params
    from flux3d.pipeline.encode import run_encode
    from flux3d.pipeline.shard import run_shard
    from flux3d.training import checkpoint as ckpt_io
    from flux3d.training.trainer import fit

    ecfg = encoder_config(cfg, name, study.locations.get(name))
    reinstate_features(catalog, storage, encode_params(ecfg))
    encoded = run_encode(ecfg, storage, catalog)
    shards = run_shard(ecfg, storage, catalog, mark_latest=False)
    stats = shards.stats
    channels = int(stats.get("channels") or len(stats["mu_mean"]))
    tcfg = decoder_run_config(cfg, storage, study, name, shards.version, channels)
    run = Storage(tcfg.run.out)
    done = ckpt_io.latest(run)
    trained = done is None or done.step < tcfg.run.steps
    if trained:
        log.info("%s: training the decoder on %s to step %d", name, shards.version, tcfg.run.steps)
        fit(tcfg, local=True)
        done = ckpt_io.latest(run)
    ecfg_eval = eval_config(cfg.evaluate.recipe, changes=merged(cfg.evaluate.changes, {
        "protocols": ["reconstruction"], "split": study.split, "shards": ""}))
    eval_out = f"{tcfg.run.out}/eval"
    report = _reusable_report(run, ecfg_eval, done.step)
    if report is None:
        report = evaluate(ecfg_eval, tcfg.run.out, None, eval_out)
    s = report["summary"]
    return {"encoder": name, "paper_row": PAPER_ROW[name], "channels": channels, "dataset_version": shards.version,
            "train_assets": stats["assets"]["train"], "val_assets": stats["assets"]["val"],
            "decoder_run": tcfg.run.out, "steps": done.step, "train_loss": done.meta.get("metrics", {}).get("loss"),
            "ssim": s["recon_ssim"], "psnr": s["recon_psnr"], "lpips": s["recon_lpips"],
            "eval_assets": sorted(a["key"] for a in report["assets"]), "caveats": report.get("caveats", []),
            "report": f"{eval_out}/report.md",
            "work": {"encoded": encoded.processed, "sharded": not shards.up_to_date, "trained": trained,
                     "evaluated": report.get("_fresh", True)}}


def reinstate_features(catalog: Catalog, storage: Storage, params: str) -> int:
    """Make an asset's earlier ok encode result for `params` its newest again when its feature file is still there.

    The catalog keeps one current result per asset and stage (the newest), and the study encodes every asset once
    per encoder, so after a run each asset's current encode result is the last encoder's. Features of the others
    stay on disk (features/<encoder>/), so a re-run re-records their results instead of encoding again; `shard`
    then finds the assets encoded with these params. Returns how many results were re-recorded."""
    import pyarrow.compute as pc

    from flux3d.features.encode import FEATURE_COLUMNS
    from flux3d.records import OK, StageResult

    history = catalog.results("encode", dedupe=False)  # newest first
    if history is None:
        return 0
    current = catalog.results("encode", ["params"])
    stale = set(current.filter(pc.not_equal(current["params"], params))["sha256"].to_pylist())
    mine = history.filter(pc.and_(pc.equal(history["params"], params), pc.equal(history["state"], OK)))
    restored, seen = [], set()
    for row in mine.to_pylist():
        sha = row["sha256"]
        if sha in stale and sha not in seen and storage.fs.exists(row["features_path"]):
            seen.add(sha)
            restored.append(StageResult(sha, OK, seconds=row["seconds"],
                                        columns={c: row[c] for c in FEATURE_COLUMNS.names}))
    catalog.write_results("encode", params, restored, FEATURE_COLUMNS)
    return len(restored)


def _reusable_report(run: Storage, ecfg: Any, step: int) -> dict[str, Any] | None:
    """The evaluation already written for this checkpoint with this config, or None."""
    if not run.exists("eval/report.json"):
        return None
    report = json.loads(run.read_bytes("eval/report.json"))
    same = json.loads(json.dumps(dataclasses.asdict(ecfg))) == report.get("config")
    if not same or report.get("decoder_step") != step:
        return None
    return {**report, "_fresh": False}


def run_study(cfg: Config, study: StudyConfig) -> dict[str, Any]:
    """Every encoder's row, then the report (`<root>/<study.out>/report.md`, `.json`); returns the JSON document."""
    storage = Storage(cfg.storage.root)
    catalog = Catalog(storage)
    rows = [run_encoder(cfg, study, name, storage, catalog) for name in study.encoders]
    caveats = sorted({c for r in rows for c in r["caveats"]})
    if len({tuple(r["eval_assets"]) for r in rows}) > 1:
        caveats.insert(0, "The encoders were evaluated on different assets (an asset failed to encode or shard "
                          "for some of them): rows are not comparable. See each row's eval_assets.")
    doc = {"study": "input features (paper Tab. 2b)", "root": cfg.storage.root,
           "decoder_recipe": cfg.train.decoder_recipe, "decoder_changes": cfg.train.decoder,
           "evaluate_recipe": cfg.evaluate.recipe, "split": study.split, "rows": rows, "caveats": caveats,
           "paper": [dict(zip(("feature", "ssim", "psnr", "lpips"), r)) for r in PAPER_TAB2B]}
    out = Storage(storage.path(study.out))
    out.write_bytes("report.json", json.dumps(doc, indent=2, sort_keys=True, default=float).encode())
    out.write_bytes("report.md", study_markdown(doc).encode())
    return doc


def _num(v: float | None, digits: int) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def study_markdown(doc: dict[str, Any]) -> str:
    rows = doc["rows"]
    intro = (f"Decoder recipe `{doc['decoder_recipe']}` with changes `{json.dumps(doc['decoder_changes'])}`, the "
             f"same for every row; reconstruction on the `{doc['split']}` split "
             f"({len(rows[0]['eval_assets']) if rows else 0} assets, one seeded view each). The paper's rows are "
             "Toys4k with the full-size decoder: read ours against each other, not against them.")
    lines = ["# Input-feature study (paper Tab. 2b)", "", intro, "",
             "| input feature | SSIM | PSNR | LPIPS | source |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {s:.4f} | {p:.2f} | {lp:.5f} | paper |" for name, s, p, lp in PAPER_TAB2B]
    lines += [f"| {r['encoder']} ({r['channels']} ch) | {_num(r['ssim'], 4)} | {_num(r['psnr'], 2)} | "
              f"{_num(r['lpips'], 5)} | ours |" for r in rows]
    lines += ["", "| encoder | paper row | dataset version | train / val assets | steps | final train loss |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['encoder']} | {r['paper_row']} | `{r['dataset_version']}` | {r['train_assets']} / "
              f"{r['val_assets']} | {r['steps']} | {_num(r['train_loss'], 4)} |" for r in rows]
    if doc["caveats"]:
        lines += ["", *[f"- {c}" for c in doc["caveats"]]]
    return "\n".join(lines) + "\n"

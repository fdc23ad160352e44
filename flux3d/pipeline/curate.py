"""`flux3d curate`: score every rendered asset once, then decide keep/reject for all of them under the policy.

Two catalog stages:

- `score` (content stage, after render): per-view aesthetic scores and their mean, the heuristic's magenta and
  flat fractions. Params = the scorer's identity and the render params, so new thresholds never re-score and a
  re-render does.
- `curate` (after score): the decision (`ok` = keep, `rejected:<reason>`, `failed:vlm_*`) with the evidence that
  led to it. Params = the policy, so a threshold change re-decides everything from stored scores in seconds.
  VLM verdicts are columns of this stage keyed by `vlm_key` (model + prompt version + grid settings); a
  re-decision reuses every verdict already obtained under the same key and asks only for the missing ones.
"""

from __future__ import annotations

import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flux3d.catalog import Catalog, first_per_sha
from flux3d.config.pipeline import Config, section_params
from flux3d.curation.heuristic import texture_fractions
from flux3d.curation.policy import Evidence, decide, effective_rule, needs_vlm
from flux3d.curation.vlm import PROMPT_VERSION, VLMError, VLMJudge, view_grid
from flux3d.executors.local import run_local
from flux3d.pipeline.stage import Stage, StageSummary, gpu_request
from flux3d.records import FAILED, OK, REJECTED, StageResult, Timer, params_hash
from flux3d.stages.render import render_params
from flux3d.stages.render_layout import curation_set, curation_views
from flux3d.storage import Storage

SCORE_VERSION = 1
CURATE_VERSION = 1
SCORE_COLUMNS = pa.schema([
    ("aesthetic_scores", pa.list_(pa.float32())),
    ("aesthetic_mean", pa.float64()),
    ("magenta_fraction", pa.float64()),
    ("flat_fraction", pa.float64()),
    ("scorer", pa.string()),
])
CURATE_COLUMNS = pa.schema([
    ("decision", pa.string()),
    ("aesthetic_score", pa.float64()),
    ("aesthetic_threshold", pa.float64()),
    ("magenta_fraction", pa.float64()),
    ("flat_fraction", pa.float64()),
    ("missing_textures_flag", pa.bool_()),
    ("heuristic_flag", pa.string()),
    ("texture_rule", pa.string()),
    ("vlm_verdict", pa.string()),
    ("vlm_reason", pa.string()),
    ("vlm_key", pa.string()),
    ("scorer_aesthetic", pa.float64()),  # ours and the list's, whichever decided: the report compares them
    ("published_aesthetic", pa.float64()),
    ("aesthetic_source", pa.string()),
])
_POLICY_FIELDS = ("magenta_max", "flat_max", "use_inspect_flag", "aesthetic_threshold", "aesthetic_thresholds",
                  "aesthetic_source")
_UNDECIDED = {"decision": None, "aesthetic_threshold": None, "heuristic_flag": None}


def score_params(cfg: Config) -> str:
    c = cfg.curate
    scorer = {"clip_model": c.clip_model, "clip_pretrained": c.clip_pretrained, "head": c.aesthetic_head,
              "background": c.background, "render": render_params(cfg.render)}
    return params_hash("score", SCORE_VERSION, scorer)


def vlm_key(cfg: Config) -> str:
    v = cfg.vlm
    return params_hash("vlm", 1, {"model": v.model, "prompt": PROMPT_VERSION, "views": v.views, "tile": v.tile,
                                  "background": cfg.curate.background})


def curate_params(cfg: Config) -> str:
    policy = {k: v for k, v in section_params(cfg.curate).items() if k in _POLICY_FIELDS}
    rule = effective_rule(cfg.curate, cfg.vlm.endpoint)
    return params_hash("curate", CURATE_VERSION, {**policy, "rule": rule, "score": score_params(cfg),
                                                  "vlm": vlm_key(cfg) if rule != "heuristic" else ""})


# -- score ------------------------------------------------------------------------------------------------------
def score_batch(rows: list[dict[str, Any]], scorer: Any, cfg: Config, storage: Storage) -> list[StageResult]:
    """Aesthetic + heuristic for a batch of rendered assets (sha256, render_dir): one scorer pass over their views."""
    from PIL import Image

    def load(row: dict[str, Any]) -> list[np.ndarray] | str:
        try:
            return curation_views(storage, row["render_dir"], cfg.render)
        except (OSError, KeyError, ValueError) as e:
            return f"{type(e).__name__}: {e}"

    with Timer() as t, ThreadPoolExecutor(max_workers=4) as pool:
        loaded = list(pool.map(load, rows))
        images = [Image.fromarray(v, "RGBA") for views in loaded if not isinstance(views, str) for v in views]
        scores = scorer.score(images) if images else np.empty(0)
    per_asset = t.seconds / max(len(rows), 1)
    out, k = [], 0
    for row, views in zip(rows, loaded):
        if isinstance(views, str):
            out.append(StageResult(row["sha256"], FAILED, "missing_render", views, seconds=per_asset,
                                   columns={n: None for n in SCORE_COLUMNS.names}))
            continue
        s = scores[k:k + len(views)]
        k += len(views)
        magenta, flat = texture_fractions(views)
        out.append(StageResult(row["sha256"], OK, seconds=per_asset, columns={
            "aesthetic_scores": s.astype(np.float32).tolist(), "aesthetic_mean": float(s.mean()),
            "magenta_fraction": magenta, "flat_fraction": flat, "scorer": scorer.name}))
    return out


def score_stage(cfg: Config, storage: Storage, catalog: Catalog, scorer: Any = None) -> Stage:
    """The scorer is loaded once per worker (`scorer` is a test hook); a batch is as many assets as fill one
    `curate.batch_size` forward pass with their curation views."""
    params = score_params(cfg)

    def setup() -> Any:
        from flux3d.curation.aesthetic import AestheticScorer

        return scorer if scorer is not None else AestheticScorer.load(cfg.curate)

    return Stage(name="score", params=params, columns=SCORE_COLUMNS, setup=setup,
                 plan=lambda: catalog.todo("score", params, after=["render"], result_columns=("state", "render_dir"),
                                           asset_columns=("sha256",)),
                 apply=lambda model, rows: score_batch(rows, model, cfg, storage),
                 batch=max(1, cfg.curate.batch_size // curation_set(cfg.render)[1]),
                 gpus=gpu_request(cfg.curate.device), timeout_s=600.0)


def run_score(cfg: Config, storage: Storage, catalog: Catalog, scorer: Any = None,
              limit: int | None = None) -> StageSummary:
    """Score every rendered asset not yet scored with these params; the scorer is loaded once, only if needed."""
    return run_local(score_stage(cfg, storage, catalog, scorer), catalog, batch_size=cfg.ingest.batch_size,
                     limit=limit)


# -- curate -----------------------------------------------------------------------------------------------------
def known_verdicts(catalog: Catalog, key: str) -> dict[str, tuple[str, str]]:
    """sha256 -> (verdict, reason) of every VLM answer already recorded under `key`, newest first wins."""
    res = catalog.results("curate", ["vlm_verdict", "vlm_reason", "vlm_key"], dedupe=False)
    if res is None or "vlm_key" not in res.column_names:
        return {}
    res = res.filter(pc.and_(pc.equal(res["vlm_key"], key), pc.is_valid(res["vlm_verdict"])))
    out: dict[str, tuple[str, str]] = {}
    for sha, verdict, reason in zip(*(res[c].to_pylist() for c in ("sha256", "vlm_verdict", "vlm_reason"))):
        out.setdefault(sha, (verdict, reason))
    return out


def curate_one(row: dict[str, Any], cfg: Config, rule: str, key: str, verdicts: dict[str, tuple[str, str]],
               judge: VLMJudge | None, storage: Storage) -> StageResult:
    published = json.loads(row.get("metadata") or "{}").get("aesthetic_score")
    by = cfg.curate.aesthetic_source
    score = row["aesthetic_mean"] if by == "scorer" else published
    ev = Evidence(source=row["source"], aesthetic=score, magenta_fraction=row["magenta_fraction"],
                  flat_fraction=row["flat_fraction"],
                  # Inspect finds texture files the asset references but lacks; Blender finds the same at import
                  # (`missing_images`), also for formats inspect reads without an engine.
                  missing_textures_flag=bool(row.get("missing_textures")) or bool(row.get("missing_images")))
    cols = {"aesthetic_score": ev.aesthetic, "magenta_fraction": ev.magenta_fraction,
            "flat_fraction": ev.flat_fraction, "missing_textures_flag": ev.missing_textures_flag,
            "texture_rule": rule, "vlm_verdict": None, "vlm_reason": None, "vlm_key": None,
            "scorer_aesthetic": row["aesthetic_mean"], "published_aesthetic": published, "aesthetic_source": by}
    if score is None:
        return StageResult(row["sha256"], FAILED, "no_published_score",
                           f"curate.aesthetic_source = published, but {row['source']} lists no aesthetic_score",
                           columns={**cols, **_UNDECIDED})
    with Timer() as t:
        if needs_vlm(ev, cfg.curate, rule):
            verdict = verdicts.get(row["sha256"])
            if verdict is None:
                assert judge is not None, "a rule that needs the VLM comes with a judge"
                try:
                    views = curation_views(storage, row["render_dir"], cfg.render, limit=cfg.vlm.views)
                    v = judge.judge(view_grid(views, cfg.vlm.tile, cfg.curate.background))
                except VLMError as e:
                    # Deterministic (temperature 0) garbage stays garbage: only transport failures are retried.
                    return StageResult(row["sha256"], FAILED, e.reason, e.message,
                                       retryable=e.reason != "vlm_unparseable", columns={**cols, **_UNDECIDED})
                verdict = ("yes" if v.missing else "no", v.reason)
            cols.update(vlm_verdict=verdict[0], vlm_reason=verdict[1], vlm_key=key)
            ev = dataclasses.replace(ev, vlm_missing=verdict[0] == "yes")
        d = decide(ev, cfg.curate, rule)
    cols.update(decision=d.decision, aesthetic_threshold=d.threshold, heuristic_flag=d.heuristic_flag)
    state = OK if d.keep else REJECTED
    return StageResult(row["sha256"], state, d.reason, seconds=t.seconds, columns=cols)


def curate_stage(cfg: Config, storage: Storage, catalog: Catalog, judge: VLMJudge | None = None) -> Stage:
    """Decisions under the current policy; `setup` gathers the VLM verdicts already known under this key (so a
    re-decision asks only for the missing ones) and the judge (`judge` is a test hook)."""
    params = curate_params(cfg)
    rule = effective_rule(cfg.curate, cfg.vlm.endpoint)
    key = vlm_key(cfg)

    def setup() -> tuple[VLMJudge | None, dict[str, tuple[str, str]]]:
        if rule == "heuristic":
            return None, {}
        return judge or VLMJudge(cfg.vlm), known_verdicts(catalog, key)

    def one(model: tuple[VLMJudge | None, dict[str, tuple[str, str]]], row: dict[str, Any]) -> StageResult:
        return curate_one(row, cfg, rule, key, model[1], model[0], storage)

    return Stage(name="curate", params=params, columns=CURATE_COLUMNS, setup=setup, apply=one,
                 plan=lambda: catalog.todo("curate", params, after=["inspect", "render", "score"],
                                           result_columns=("state", "missing_textures", "missing_images",
                                                           "render_dir", "aesthetic_mean", "magenta_fraction",
                                                           "flat_fraction"),
                                           asset_columns=("source", "sha256", "metadata")),
                 workers=cfg.vlm.concurrency if rule != "heuristic" else 1, cpus=0.5,
                 timeout_s=cfg.vlm.timeout_s * cfg.vlm.max_attempts * cfg.vlm.parse_attempts + 60)


def run_curate(cfg: Config, storage: Storage, catalog: Catalog, judge: VLMJudge | None = None,
               limit: int | None = None) -> StageSummary:
    """Decide every scored asset not yet decided under this policy (VLM calls `vlm.concurrency` at a time)."""
    return run_local(curate_stage(cfg, storage, catalog, judge), catalog, batch_size=cfg.ingest.batch_size,
                     limit=limit)


def curation_table(catalog: Catalog) -> pa.Table:
    """Every decided asset (one row per sha256): source, license, curate state/reason and the evidence."""
    table = catalog.table(["render", "curate"], asset_columns=("source", "sha256", "license"))
    if "curate_state" not in table.column_names:
        return table.slice(0, 0)
    return first_per_sha(table.filter(pc.is_valid(table["curate_state"])))


def curate(cfg: Config, storage: Storage, catalog: Catalog, scorer: Any = None, judge: VLMJudge | None = None,
           limit: int | None = None, report: bool = True) -> tuple[StageSummary, StageSummary, dict[str, Any] | None]:
    """Score what is new, decide what is undecided under the current policy, then rewrite the report."""
    from flux3d.curation.report import write_report

    scored = run_score(cfg, storage, catalog, scorer=scorer, limit=limit)
    decided = run_curate(cfg, storage, catalog, judge=judge, limit=limit)
    summary = None
    if report:
        summary = write_report(curation_table(catalog), cfg, storage, curate_params(cfg),
                               effective_rule(cfg.curate, cfg.vlm.endpoint))
    return scored, decided, summary

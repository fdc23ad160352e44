"""Curation on TRELLIS-500K's published aesthetic scores: lists in the published layout go through the real
`trellis:` listing into a real catalog; the measurements of the stages before curation (inspect, render views,
our scorer's means) are written as those stages write them, so the test needs no Blender or CLIP model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.stats import spearmanr

from flux3d.catalog import Catalog
from flux3d.config.load import load_config
from flux3d.curation.report import write_report
from flux3d.pipeline.curate import SCORE_COLUMNS, curate_params, curation_table, run_curate
from flux3d.pipeline.ingest import list_sources
from flux3d.pipeline.reproduction import COLUMNS, reproduction_report
from flux3d.records import OK, StageResult
from flux3d.stages.download import DOWNLOAD_COLUMNS
from flux3d.stages.inspect import INSPECT_COLUMNS
from flux3d.stages.render import RENDER_COLUMNS
from flux3d.storage import Storage
from tests.test_sources_objaverse import _gz_json

# (published score, our score): values on and either side of each threshold, and a missing published score.
SKETCHFAB = [(5.5, 5.6), (5.4999, 5.7), (5.5001, 4.0), (7.2, 6.8), (2.0, 2.5), (6.0, 5.2), (None, 6.0)]
ABO = [(4.5, 4.6), (4.4999, 4.0), (4.51, 3.9), (6.3, 6.0), (1.0, 4.8)]


def _write_lists(tmp_path) -> tuple[list[str], dict]:
    uids = [f"{i:032x}" for i in range(len(SKETCHFAB))]
    cache = tmp_path / "objaverse"
    _gz_json(str(cache / "hf-objaverse-v1" / "object-paths.json.gz"), {u: f"glbs/000-000/{u}.glb" for u in uids})
    (tmp_path / "abo" / "3dmodels" / "original").mkdir(parents=True)
    ours = {}
    specs = []
    for name, rows, ids in (("ObjaverseXL_sketchfab", SKETCHFAB, [f"https://sketchfab.com/3d-models/m-{u}"
                                                                  for u in uids]),
                            ("ABO", ABO, [f"B/B{i:09d}.glb" for i in range(len(ABO))])):
        records = []
        for (published, mine), fid in zip(rows, ids):
            sha = f"{len(ours):064x}"
            ours[sha] = mine
            records.append({"sha256": sha, "file_identifier": fid, "aesthetic_score": published,
                            "captions": json.dumps([f"object {fid[-6:]}"])})
        path = tmp_path / f"{name}.csv"
        pd.DataFrame(records).to_csv(path, index=False)
        specs.append(f"trellis:{path}")
    cfg = {"sources.objaverse_dir": str(cache), "sources.abo_dir": str(tmp_path / "abo")}
    return specs, {"ours": ours, **cfg}


def _measured(catalog: Catalog, storage: Storage, cfg, ours: dict[str, float]) -> None:
    """What download, inspect, render and score record for textured assets: ok, curation views on disk, our mean
    score."""
    shas = list(ours)
    ids = catalog.assets(["sha256"]).to_pylist()
    catalog.write_results("download", "p", [StageResult(r["asset_id"], OK, columns={
        "sha256": r["sha256"], "source_outcome": "found"}) for r in ids], DOWNLOAD_COLUMNS)
    catalog.write_results("inspect", "p", [StageResult(s, OK, columns={"missing_textures": False}) for s in shas],
                          INSPECT_COLUMNS)
    folder = f"curation{cfg.render.curation_views}"
    renders = []
    for i, sha in enumerate(shas):
        view_dir = storage.path(f"renders/{sha}/{folder}")
        os.makedirs(view_dir)
        Image.new("RGBA", (32, 32), (40 * i % 255, 120, 200, 255)).save(os.path.join(view_dir, "000.png"))
        with open(os.path.join(view_dir, "transforms.json"), "w") as f:
            json.dump({"frames": [{"file_path": "000.png"}]}, f)
        renders.append(StageResult(sha, OK, columns={"render_dir": storage.path(f"renders/{sha}"),
                                                     "missing_images": 0}))
    catalog.write_results("render", "p", renders, RENDER_COLUMNS)
    catalog.write_results("score", "p", [StageResult(s, OK, columns={
        "aesthetic_scores": [v], "aesthetic_mean": v, "magenta_fraction": 0.0, "flat_fraction": 0.1,
        "scorer": "test"}) for s, v in ours.items()], SCORE_COLUMNS)


def test_published_scores_reproduce_the_lists_threshold_decisions(tmp_path):
    specs, extra = _write_lists(tmp_path)
    ours = extra.pop("ours")
    cfg = load_config(overrides={"storage.root": str(tmp_path / "root"), "curate.aesthetic_source": "published",
                                 "curate.report_samples": 3, **extra})
    storage = Storage(cfg.storage.root)
    catalog = Catalog(storage)
    list_sources(cfg, catalog, specs)
    _measured(catalog, storage, cfg, ours)
    run_curate(cfg, storage, catalog)
    rows = {r["file_identifier"]: r for r in catalog.table().to_pylist()}

    # The lists' own selection, as TRELLIS makes it: score >= 5.5 for Objaverse-XL, >= 4.5 for ABO.
    for name, threshold, kept in (("ObjaverseXL_sketchfab", 5.5, 4), ("ABO", 4.5, 3)):
        listed = pd.read_csv(tmp_path / f"{name}.csv")
        scored = listed[listed["aesthetic_score"].notna()]
        trellis_kept = set(scored[scored["aesthetic_score"] >= threshold]["file_identifier"])
        ours_kept = {fid for fid in scored["file_identifier"] if rows[fid]["curate_state"] == "ok"}
        assert ours_kept == trellis_kept and len(trellis_kept) == kept
        for fid in set(scored["file_identifier"]) - trellis_kept:
            assert (rows[fid]["curate_state"], rows[fid]["curate_reason"]) == ("rejected", "low_aesthetic")
    lists = reproduction_report(catalog)["lists"]
    assert {n: (r["listed"], r["rendered"], r["kept"]) for n, r in lists.items()} == {
        "ObjaverseXL_sketchfab": (7, 7, 4), "ABO": (5, 5, 3)}
    unscored = rows[f"https://sketchfab.com/3d-models/m-{6:032x}"]
    assert (unscored["curate_state"], unscored["curate_reason"]) == ("failed", "no_published_score")

    summary = write_report(curation_table(catalog), cfg, storage, curate_params(cfg), "heuristic")
    c = summary["score_comparison"]
    both = [(p, m) for p, m in SKETCHFAB + ABO if p is not None]
    assert c["assets"] == len(both)
    assert abs(c["spearman"] - spearmanr(*zip(*both)).statistic) < 1e-9
    # Decisions differ: kept by the list only (5.5001 vs 4.0, 6.0 vs 5.2, 4.51 vs 3.9), by ours only (5.4999 vs 5.7,
    # 1.0 vs 4.8).
    report = storage.path("reports/curation")
    differ = pd.read_csv(os.path.join(report, c["differences"]))
    assert sorted(differ[differ["kept_by"] == "published"]["published_aesthetic"]) == [4.51, 5.5001, 6.0]
    assert sorted(differ[differ["kept_by"] == "scorer"]["scorer_aesthetic"]) == [4.8, 5.7]
    assert (c["kept_by_published_only"], c["kept_by_scorer_only"]) == (3, 2)
    sheet = Image.open(os.path.join(report, c["sheet_published"]))
    assert sheet.size[1] == 3 * 128 and np.asarray(sheet).std() > 0  # three assets' rows, with their views drawn
    assert "Spearman" in open(os.path.join(report, "report.md")).read()

    # Our scorer deciding instead: the same measurements, other decisions, no re-scoring needed.
    cfg = load_config(overrides={"storage.root": str(tmp_path / "root"), **extra})
    run_curate(cfg, storage, catalog)
    rows = {r["file_identifier"]: r for r in catalog.table().to_pylist()}
    assert rows[f"https://sketchfab.com/3d-models/m-{1:032x}"]["curate_state"] == "ok"  # 5.7 by ours
    assert rows[f"https://sketchfab.com/3d-models/m-{6:032x}"]["curate_state"] == "ok"


ARTIFACT_SCRIPT = """
import json, sys
from prefect import flow
from prefect.client.orchestration import get_client
from flux3d.flows.artifacts import publish_reproduction

report = json.loads(sys.argv[1])
run = flow(name="t")(lambda: publish_reproduction(report))(return_state=True).state_details.flow_run_id
with get_client(sync_client=True) as client:
    print(json.dumps([a.data for a in client.read_artifacts() if a.key == "reproduction" and a.flow_run_id == run]))
"""


@pytest.mark.integration
def test_reproduction_report_is_a_prefect_artifact(prefect_server):
    """The data flow's artifact, published through a real Prefect server's API and read back from it."""
    report = {"lists": {"ABO": {**dict.fromkeys(COLUMNS, 2), "kept": 1, "trellis_published": 4_485}},
              "training_total": {**dict.fromkeys(COLUMNS, 2), "kept": 1, "trellis_published": 500_777},
              "paper_curated": 360_000}
    p = subprocess.run([sys.executable, "-c", ARTIFACT_SCRIPT, json.dumps(report)], env=prefect_server,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    (markdown,) = json.loads(p.stdout.strip().splitlines()[-1])
    assert "| ABO | 2 | 2 | 2 | 2 | 2 | 2 | 1 | 4,485 |" in markdown and "this run keeps 1" in markdown

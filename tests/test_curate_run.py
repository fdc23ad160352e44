"""Curation over real renders: the heuristic on the shared good/bad assets, and `flux3d curate` end to end
(ingest -> render -> score -> VLM -> decisions -> report), including re-deciding without re-scoring."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flux3d.catalog import Catalog
from flux3d.config.pipeline import CurateConfig, RenderConfig
from flux3d.curation.heuristic import texture_fractions
from flux3d.curation.policy import Evidence, heuristic_flag
from flux3d.demo import _textured_box_glb
from flux3d.stages.render import render_asset
from flux3d.stages.render_layout import load_views
from flux3d.storage import Storage
from tests.conftest import ASSETS as SHARED
from tests.conftest import TAEF1
from tests.test_curation import HEAD, tiny_scorer_config
from tests.test_ingest import flux3d
from tests.vlm_server import serve_vlm

pytestmark = [pytest.mark.integration, pytest.mark.shared_assets]


@pytest.fixture(autouse=True)
def _need_shared():
    if not SHARED.is_dir() or not HEAD.is_file():
        pytest.skip("../shared/assets or ../shared/weights absent")


def corrupt_texture_glb() -> bytes:
    """A textured box whose embedded PNG is damaged: inspect finds nothing wrong, Blender renders it magenta (the
    paper's 'pink' failure)."""
    glb = _textured_box_glb()
    i = glb.find(b"\x89PNG")
    return glb[:i] + b"\x00" * 64 + glb[i + 64:]


def test_heuristic_on_real_renders(tmp_path):
    """128-px curation renders: the missing-texture and untextured bad assets are flagged, textured good ones pass."""
    cases = {
        "bad/missing_texture_BoomBox/BoomBox.gltf": "missing_textures_flag",
        "bad/untextured_plain_material_Box.glb": "flat_untextured",
        "corrupt_texture.glb": "magenta_texture",
        "good/BoxTextured.glb": "", "good/Avocado.glb": "", "good/CesiumMan.glb": "", "good/Fox.glb": "",
    }
    (tmp_path / "corrupt_texture.glb").write_bytes(corrupt_texture_glb())
    cfg = RenderConfig(views=1, resolution=64, cond_views=1, cond_resolution=64, curation_views=10,
                       curation_resolution=128, samples=8, passes=[], contact_sheet_views=0, timeout_s=120)
    storage = Storage(str(tmp_path / "data"))
    for i, (rel, expected) in enumerate(cases.items()):
        path = SHARED / rel if rel.startswith(("good", "bad")) else tmp_path / rel
        result = render_asset(str(path), path.suffix[1:], f"{i:064d}", cfg, storage)
        assert result.state == "ok", (rel, result.message)
        magenta, flat = texture_fractions(load_views(storage, result.columns["render_dir"], "curation10"))
        ev = Evidence(source="local", aesthetic=5.0, magenta_fraction=magenta, flat_fraction=flat,
                      missing_textures_flag=result.columns["missing_images"] > 0)
        assert heuristic_flag(ev, CurateConfig()) == expected, (rel, magenta, flat)


def _config(tmp_path: Path, endpoint: str, sections: dict[str, dict] | None = None, **curate: object) -> Path:
    cur = tiny_scorer_config(tmp_path)
    render = dict(views=2, resolution=64, cond_views=1, cond_resolution=64, curation_views=4, curation_resolution=64,
                  samples=4, denoise=False, passes=[], contact_sheet_views=0, timeout_s=120.0)
    settings = {"clip_model": cur.clip_model, "clip_pretrained": cur.clip_pretrained,
                "clip_model_config": cur.clip_model_config, "aesthetic_head": cur.aesthetic_head,
                "report_samples": 2, **curate}
    path = tmp_path / "run.toml"
    path.write_text("\n".join(["[render]", *(f"{k} = {json.dumps(v)}" for k, v in render.items()),
                               "[curate]", *(f"{k} = {json.dumps(v)}" for k, v in settings.items()),
                               "[vlm]", f'endpoint = "{endpoint}"', "concurrency = 4", "views = 4", "tile = 64",
                               *(f"[{name}]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in values.items())
                                 for name, values in (sections or {}).items())]))
    return path


def _rows(root: str) -> dict[str, dict]:
    table = Catalog(Storage(root)).table(["score", "curate"], asset_columns=("sha256", "source", "file_identifier"))
    return {Path(r["file_identifier"]).name: r for r in table.to_pylist() if r.get("curate_state")}


def test_cli_curate_shared_assets_redecide_without_rescoring(tmp_path):
    assets, root = tmp_path / "assets", str(tmp_path / "root")
    shutil.copytree(SHARED / "good", assets / "good")
    shutil.copy(SHARED / "bad" / "untextured_plain_material_Box.glb", assets)
    (assets / "corrupt_texture.glb").write_bytes(corrupt_texture_glb())
    with serve_vlm() as server:
        config = _config(tmp_path, server.url, aesthetic_threshold=0.0, texture_rule="heuristic_or_vlm")
        flux3d("ingest", "--root", root, "--source", f"local:{assets}")
        flux3d("render", "--root", root, "--config", str(config))
        out = flux3d("curate", "--root", root, "--config", str(config)).stdout
        rows = _rows(root)
        rendered = Catalog(Storage(root)).results("render").num_rows
        assert len(rows) == rendered >= 15 and "kept; report:" in out
        assert rows["corrupt_texture.glb"]["curate_reason"] == "magenta_texture"
        # The VLM saw every asset the heuristic passed, and nothing it rejected.
        asked = {r["sha256"] for r in rows.values() if r["vlm_verdict"] is not None}
        passed = {r["sha256"] for r in rows.values() if not r["heuristic_flag"]}
        assert asked == passed and len(server.requests) == len(passed)
        for r in rows.values():
            assert r["aesthetic_score"] == r["aesthetic_mean"] and len(r["aesthetic_scores"]) == 4
            assert (r["curate_state"] == "ok") == (r["decision"] == "keep")
            assert r["decision"] in ("keep", f"reject:{r['curate_reason']}")
        summary = json.loads(Path(root, "reports", "curation", "summary.json").read_text())
        assert summary["assets"] == len(rows) and summary["kept"] == sum(r["curate_state"] == "ok" for r in rows.values())
        score_parts = sorted(Path(root, "catalog", "score").iterdir())

        # The VLM decides alone now: only the asset the heuristic had kept from it is sent; the rest is cached.
        before = len(server.requests)
        config = _config(tmp_path, server.url, aesthetic_threshold=0.0, texture_rule="vlm")
        flux3d("curate", "--root", root, "--config", str(config))
        assert len(server.requests) == before + len(rows) - len(passed)
        rows = _rows(root)
        assert rows["corrupt_texture.glb"]["curate_reason"] == "vlm_missing_texture"
        assert rows["corrupt_texture.glb"]["heuristic_flag"] == "magenta_texture"  # recorded, not acted on

        # New thresholds: decisions change, scores are not recomputed and the VLM is not asked again.
        before = len(server.requests)
        median = float(np.median([r["aesthetic_mean"] for r in rows.values()]))
        config = _config(tmp_path, server.url, aesthetic_threshold=median, texture_rule="vlm")
        out = flux3d("curate", "--root", root, "--config", str(config)).stdout
        assert sorted(Path(root, "catalog", "score").iterdir()) == score_parts and len(server.requests) == before
        score_line = next(line for line in out.splitlines() if line.startswith("│ score"))
        assert [c.strip() for c in score_line.split("│")[1:-1]][-2] == "0"  # processed
        rows = _rows(root)
        low = [r for r in rows.values() if r["curate_reason"] == "low_aesthetic"]
        assert low and all(r["aesthetic_mean"] < median for r in low)

    report = Path(root, "reports", "curation")
    summary = json.loads((report / "summary.json").read_text())
    assert summary["by_reason"].get("rejected:low_aesthetic") == len(low)
    assert sum(summary["by_reason"].values()) == summary["assets"] == len(rows)
    assert summary["thresholds"]["default"] == median
    for name in ("aesthetic.png", "texture.png"):
        with Image.open(report / name) as im:
            assert im.size[0] > 300 and len(np.unique(np.asarray(im.convert("L")))) > 10  # a drawn plot, not blank
    md = (report / "report.md").read_text()
    for reason, sheet in summary["contact_sheets"].items():
        n = min(2, summary["by_reason"][f"rejected:{reason}"])
        assert Image.open(report / sheet).size == (4 * 128, n * 128) and f"({sheet})" in md

    # Kept assets go on to voxelization; a re-run has nothing left to do.
    def stage_row(stage: str, *args: str) -> list[str]:
        out = flux3d(stage, "--root", root, *args).stdout
        return [c.strip() for c in next(x for x in out.splitlines() if x.startswith(f"│ {stage}")).split("│")[1:-1]]

    kept = sum(r["curate_state"] == "ok" for r in rows.values())
    assert stage_row("voxelize") == ["voxelize", str(kept), "0", "0", "0", str(kept)]
    assert stage_row("voxelize")[-1] == "0"
    for r in Catalog(Storage(root)).results("voxelize").to_pylist():
        coords = np.load(r["voxels_path"])
        assert coords.dtype == np.uint8 and len(coords) == r["num_voxels"] > 0

    # Features (TAEF1; this render has no depth pass, so the plain mean) and shards, then the loader.
    if not TAEF1.is_file():
        return
    features = {"encode": {"encoder": "taef1", "location": str(TAEF1)},
                "shard": {"supervision_views": 2, "cond_views": 1, "max_bytes": 65536, "val_fraction": 0.25}}
    config = _config(tmp_path, server.url, features, aesthetic_threshold=median, texture_rule="vlm")
    assert stage_row("encode", "--config", str(config)) == ["encode", str(kept), "0", "0", "0", str(kept)]
    assert stage_row("encode", "--config", str(config))[-1] == "0"
    out = flux3d("shard", "--root", root, "--config", str(config)).stdout
    version = out.split()[2].rstrip(":")
    assert "already complete" in flux3d("shard", "--root", root, "--config", str(config)).stdout

    from flux3d.training.data import make_loader, shard_urls

    version_dir = f"{root}/shards/{version}"
    stats = json.loads(Path(version_dir, "stats.json").read_text())
    assert sum(stats["assets"].values()) == kept and stats["failed"] == 0 and stats["shards"]["train"] > 1
    urls = shard_urls(version_dir, "train") + (shard_urls(version_dir, "val") if stats["assets"]["val"] else [])
    catalog = Catalog(Storage(root))
    voxels = {r["sha256"]: np.load(r["voxels_path"]) for r in catalog.results("voxelize").to_pylist()}
    feats = {r["sha256"]: np.load(r["features_path"]) for r in catalog.results("encode").to_pylist()}
    seen = set()
    for batch in make_loader(urls, batch_size=3, num_workers=2, cond=True):
        for key, (coords, mu) in zip(batch.keys, batch.voxels.unbind(), strict=True):
            assert np.array_equal(coords.numpy(), voxels[key]) and np.array_equal(coords.numpy(), feats[key]["coords"])
            assert np.array_equal(mu.numpy(), feats[key]["mu"].astype(np.float32))
            seen.add(key)
        assert batch.images.shape[-2:] == (64, 64) and batch.cond.shape[-2:] == (64, 64)
    assert seen == set(feats) and len(seen) == kept

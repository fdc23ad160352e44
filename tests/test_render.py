"""Render stage: camera maths, real Blender renders checked geometrically, isolation (timeout, crash), the batch."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

from flux3d.catalog import Catalog
from flux3d.config.load import load_config
from flux3d.config.pipeline import RenderConfig
from flux3d.demo import _checker, _textured_box_glb
from flux3d.pipeline.ingest import ingest
from flux3d.pipeline.render import run_render
from flux3d.stages.cameras import (
    GL_TO_CV,
    intrinsics,
    project,
    render_border,
    sphere_hammersley,
    view_set_cameras,
    w2c_opencv,
)
from flux3d.stages.render import RENDER_COLUMNS, render_asset, render_params, render_views
from flux3d.storage import TMP_MARK, Storage
from tests.conftest import ASSETS as SHARED_ASSETS

TINY = dict(views=4, resolution=64, cond_views=2, cond_resolution=64, curation_views=2, curation_resolution=64,
            samples=4, denoise=False, timeout_s=120.0, contact_sheet_views=4)
SETS = ("views4", "cond2", "curation2")
SHA_A, SHA_B = "a" * 64, "b" * 64


# -- test hooks: run in the isolated child, so they must be module level ---------------------------------------
def hang_worker(path: str, fmt: str, sha256: str, cfg: RenderConfig, out_dir: str) -> None:
    """Spawn a grandchild (as Blender's helpers would), record its pid next to the asset, then never return."""
    grandchild = subprocess.Popen(["sleep", "600"])
    with open(path + ".pid", "w") as f:
        f.write(str(grandchild.pid))
    time.sleep(600)


def crash_worker(path: str, fmt: str, sha256: str, cfg: RenderConfig, out_dir: str) -> None:
    os.kill(os.getpid(), signal.SIGSEGV)


def hang_if_marked(path: str, fmt: str, sha256: str, cfg: RenderConfig, out_dir: str) -> dict:
    if os.path.exists(path + ".hang"):
        hang_worker(path, fmt, sha256, cfg, out_dir)
    return render_views(path, fmt, sha256, cfg, out_dir)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")  # a zombie waiting for init to reap it is gone for our purposes


def _wait_gone(pid: int, seconds: float = 5.0) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


# -- camera maths (no Blender) ----------------------------------------------------------------------------------
def test_render_config_validation():
    RenderConfig(**TINY)
    for bad in ({"views": 0}, {"cond_views": 0}, {"resolution": 500}, {"cond_resolution": 4}, {"radius": 0.5},
                {"device": "metal"}, {"fov_deg": 0}, {"samples": 0}, {"sampling_pattern": "SOBOL"},
                {"denoise_prefilter": "SOME"}):
        with pytest.raises(ValueError):
            RenderConfig(**bad)
    assert load_config(None, {"render.views": 8}).render.views == 8
    with pytest.raises(ValueError):
        load_config(None, {"render.bogus": 1})


def test_cameras_reproducible_per_asset_and_set():
    a1, a2 = view_set_cameras(SHA_A, "views150", 150, 2.0), view_set_cameras(SHA_A, "views150", 150, 2.0)
    b = view_set_cameras(SHA_B, "views150", 150, 2.0)
    cond = view_set_cameras(SHA_A, "cond24", 24, 2.0)
    assert all(np.array_equal(x, y) for x, y in zip(a1, a2))
    assert not np.allclose(a1[0], b[0]) and not np.allclose(a1[0][:3, 3], cond[0][:3, 3])
    pos = np.array([c[:3, 3] for c in a1])
    assert np.allclose(np.linalg.norm(pos, axis=1), 2.0)
    # Every camera looks at the origin (-z axis of the OpenGL camera points at it).
    assert np.allclose(np.array([-c[:3, 2] for c in a1]), -pos / 2.0)
    # TRELLIS's remap: about a quarter of the views below the equator.
    assert 0.2 < (pos[:, 2] < 0).mean() < 0.3
    yaw, pitch = sphere_hammersley(0, 4, (0.0, 0.0))
    assert (yaw, pitch) == (0.0, -math.pi / 2)


# -- real renders -----------------------------------------------------------------------------------------------
def test_render_border_is_the_projected_points_rectangle():
    """The border spans exactly where the points land (Blender's y up), widened by the margin, clipped to the frame;
    a point behind the camera has no bounded projection."""
    points = np.random.default_rng(0).uniform(-0.35, 0.35, (300, 3))  # inside every frame
    for c2w in view_set_cameras(SHA_A, "views150", 5, 2.0):
        uv, _ = project(points, intrinsics(math.radians(40), 128, 128), w2c_opencv(c2w))
        x0, x1, y0, y1 = render_border(points, c2w, math.radians(40), 128, margin_px=0)
        np.testing.assert_allclose([x0, x1], [uv[:, 0].min() / 128, uv[:, 0].max() / 128])
        np.testing.assert_allclose([y0, y1], [1 - uv[:, 1].max() / 128, 1 - uv[:, 1].min() / 128])
        wide = render_border(points, c2w, math.radians(40), 128, margin_px=2)
        np.testing.assert_allclose(wide, [x0 - 2 / 128, x1 + 2 / 128, y0 - 2 / 128, y1 + 2 / 128])
    c2w = view_set_cameras(SHA_A, "views150", 1, 2.0)[0]
    assert render_border(np.array([[0.0, 0.0, 0.0], *c2w[:3, 3:].T * 1.5]), c2w, 0.7, 64) is None
    assert render_border(points * 50, c2w, 0.7, 64) is None  # points around the camera
    far = render_border(points * 1.5, c2w, math.radians(40), 64, margin_px=40)
    assert far is not None and min(far) >= 0 and max(far) <= 1


@pytest.fixture(scope="module")
def box_render(tmp_path_factory):
    root = tmp_path_factory.mktemp("render")
    asset = root / "box.glb"
    asset.write_bytes(_textured_box_glb())
    storage = Storage(str(root / "data"))
    cfg = RenderConfig(**TINY, passes=["depth", "normal"])
    result = render_asset(str(asset), "glb", SHA_A, cfg, storage)
    return result, Path(storage.path("renders", SHA_A)), root


def _transforms(render_dir: Path, view_set: str) -> dict:
    return json.loads((render_dir / view_set / "transforms.json").read_text())


def _check_projection(render_dir: Path, points: np.ndarray, tol: float) -> int:
    """Projected points' 2D box vs the alpha mask's box, every view of every set; returns views checked."""
    checked = 0
    for view_set in SETS:
        for frame in _transforms(render_dir, view_set)["frames"]:
            alpha = np.asarray(Image.open(render_dir / view_set / frame["file_path"]))[..., 3]
            h, w = alpha.shape
            ys, xs = np.nonzero(alpha > 0)
            uv, depth = project(points, np.array(frame["K"]), np.array(frame["w2c"]))
            assert (depth > 0).all()
            lo, hi = np.clip(uv.min(axis=0), 0, [w, h]), np.clip(uv.max(axis=0), 0, [w, h])
            mask_lo, mask_hi = np.array([xs.min(), ys.min()]), np.array([xs.max() + 1, ys.max() + 1])
            assert np.abs(lo - mask_lo).max() <= tol and np.abs(hi - mask_hi).max() <= tol, (
                view_set, frame["file_path"], lo, hi, mask_lo, mask_hi)
            checked += 1
    return checked


@pytest.mark.integration
def test_box_render_outputs_and_normalisation(box_render):
    result, render_dir, _ = box_render
    assert (result.state, result.reason) == ("ok", ""), result.message
    assert set(result.columns) == set(RENDER_COLUMNS.names)
    cols = result.columns
    assert (cols["num_views"], cols["blank_views"], cols["clipped_views"]) == (8, 0, 0)
    assert cols["magenta_fraction_max"] < 0.01 and cols["missing_images"] == 0
    assert cols["render_dir"] == str(render_dir) and cols["render_device"] == "cpu"
    for view_set, n, res in zip(SETS, (4, 2, 2), (64, 64, 64)):
        t = _transforms(render_dir, view_set)
        assert len(t["frames"]) == n and t["aabb"] == [[-0.5] * 3, [0.5] * 3]
        # One normalisation for every view set, equal to the catalog's.
        assert t["scale"] == cols["scale"] and t["offset"] == cols["offset"]
        for frame in t["frames"]:
            assert Image.open(render_dir / view_set / frame["file_path"]).size == (res, res)
            assert Image.open(render_dir / view_set / frame["file_path"]).mode == "RGBA"
    mesh = trimesh.load(render_dir / "mesh.ply", process=False)
    extent = mesh.bounds[1] - mesh.bounds[0]
    assert np.isclose(extent.max(), 1.0, atol=1e-5) and np.allclose(mesh.bounds.mean(axis=0), 0, atol=1e-5)
    assert len(mesh.faces) == 12
    assert (render_dir / "contact.png").is_file() and (render_dir / "render.json").is_file()
    assert not any(TMP_MARK in p.name for p in render_dir.parent.iterdir())  # the temp folder was renamed


@pytest.mark.integration
def test_box_projection_matches_alpha_mask(box_render):
    """The recorded OpenCV K and w2c put the normalised box's 8 corners exactly where Blender drew it."""
    _, render_dir, _ = box_render
    mesh = trimesh.load(render_dir / "mesh.ply", process=False)
    corners = trimesh.bounds.corners(mesh.bounds)
    assert _check_projection(render_dir, corners, tol=1.0) == 8


@pytest.mark.integration
def test_depth_and_normal_passes_land_on_the_box(box_render):
    """Back-projecting every depth pixel with the recorded K and w2c lands on the normalised box's surface, and
    the normal pass there is that face's outward normal; the passes exist for the main set only."""
    _, render_dir, _ = box_render
    lo, hi = trimesh.load(render_dir / "mesh.ply", process=False).bounds
    t = _transforms(render_dir, "views4")
    assert t["passes"] == ["depth", "normal"] and not list((render_dir / "cond2").glob("*_depth.png"))
    for frame in t["frames"]:
        stem = render_dir / "views4" / frame["file_path"].removesuffix(".png")
        q = np.asarray(Image.open(f"{stem}_depth.png"))
        assert q.dtype == np.uint16
        alpha = np.asarray(Image.open(f"{stem}.png"))[..., 3]
        hit = q > 0
        assert (hit != (alpha > 127)).mean() < 0.03  # they differ at anti-aliased edge pixels only
        ys, xs = np.nonzero(hit)
        z = q[ys, xs] / t["depth_scale"]
        pix = np.stack([xs + 0.5, ys + 0.5, np.ones_like(z)], axis=1)
        cam = (np.linalg.inv(np.array(frame["K"])) @ pix.T).T * z[:, None]
        world = (np.linalg.inv(np.array(frame["w2c"])) @ np.c_[cam, np.ones(len(z))].T).T[:, :3]
        to_face = np.concatenate([np.abs(world - lo), np.abs(world - hi)], axis=1)  # per point: 6 face distances
        assert to_face.min(axis=1).max() < 1e-3  # measured: 2e-5, the uint16 step is 4e-5
        face = to_face.argmin(axis=1)
        expected = np.zeros((len(z), 3))
        expected[np.arange(len(z)), face % 3] = np.where(face < 3, -1.0, 1.0)
        normal = np.asarray(Image.open(f"{stem}_normal.png"))[ys, xs] / 127.5 - 1
        assert np.median((normal * expected).sum(axis=1)) > 0.99


@pytest.mark.integration
def test_transforms_conventions_consistent(box_render):
    _, render_dir, _ = box_render
    for view_set in SETS:
        for frame in _transforms(render_dir, view_set)["frames"]:
            c2w, w2c, K = (np.array(frame[k]) for k in ("transform_matrix", "w2c", "K"))
            assert np.allclose(w2c @ c2w @ GL_TO_CV, np.eye(4), atol=1e-9)
            w = 2 * K[0, 2]
            assert np.isclose(2 * math.atan(w / 2 / K[0, 0]), frame["camera_angle_x"])
            assert np.isclose(frame["camera_angle_x"], math.radians(40))
            assert np.isclose(np.linalg.norm(c2w[:3, 3]), 2.0)
            # The origin projects to the image centre.
            uv, _ = project(np.zeros((1, 3)), K, w2c)
            assert np.allclose(uv[0], [K[0, 2], K[1, 2]])


@pytest.mark.integration
def test_missing_texture_measured_as_magenta(tmp_path):
    obj = trimesh.creation.box(extents=(1, 1, 1)).export(file_type="obj", include_texture=False)
    (tmp_path / "box.obj").write_text("mtllib box.mtl\nusemtl m\n" + obj)
    (tmp_path / "box.mtl").write_text("newmtl m\nKd 1 1 1\nmap_Kd textures/gone.png\n")
    result = render_asset(str(tmp_path / "box.obj"), "obj", SHA_B, RenderConfig(**TINY), Storage(str(tmp_path / "d")))
    assert result.state == "ok", result.message
    assert result.columns["missing_images"] == 1
    assert result.columns["magenta_fraction_max"] > 0.5


@pytest.mark.integration
def test_hanging_render_times_out_and_kills_group(tmp_path):
    asset = tmp_path / "box.glb"
    asset.write_bytes(_textured_box_glb())
    storage = Storage(str(tmp_path / "d"))
    cfg = RenderConfig(**{**TINY, "timeout_s": 1.5})
    result = render_asset(str(asset), "glb", SHA_A, cfg, storage, worker=hang_worker)
    assert (result.state, result.reason) == ("failed", "timeout")
    pid = int((tmp_path / "box.glb.pid").read_text())
    assert _wait_gone(pid), f"grandchild {pid} survived the timeout"
    assert not os.path.exists(storage.path("renders", SHA_A))
    assert os.listdir(storage.path("renders")) == []  # the temp folder is gone too
    # The real renderer, cut short: the same outcome.
    real = render_asset(str(asset), "glb", SHA_A, RenderConfig(**{**TINY, "timeout_s": 0.2}), storage)
    assert (real.state, real.reason) == ("failed", "timeout")


@pytest.mark.integration
def test_crashing_child_is_blender_crash(tmp_path):
    asset = tmp_path / "box.glb"
    asset.write_bytes(_textured_box_glb())
    result = render_asset(str(asset), "glb", SHA_A, RenderConfig(**TINY), Storage(str(tmp_path / "d")),
                          worker=crash_worker)
    assert (result.state, result.reason) == ("failed", "blender_crash")
    assert "SIGSEGV" in result.message


@pytest.mark.integration
def test_run_render_batch_continues_and_resumes(tmp_path):
    assets = tmp_path / "assets"
    assets.mkdir()
    (assets / "box.glb").write_bytes(_textured_box_glb())
    tall = trimesh.creation.box(extents=(0.2, 0.2, 3.0))
    tall.unmerge_vertices()
    uv = np.tile(np.array([[0, 0], [1, 0], [0, 1]], dtype=np.float64), (len(tall.faces), 1))
    tall.visual = trimesh.visual.TextureVisuals(uv=uv, image=_checker(seed=3))
    (assets / "tall.glb").write_bytes(trimesh.Scene(tall).export(file_type="glb"))
    cfg = load_config(None, {"storage.root": str(tmp_path / "data"), "ingest.batch_size": 1,
                             **{f"render.{k}": v for k, v in TINY.items()}, "render.timeout_s": 20.0})
    ingest(cfg, [f"local:{assets}"])
    storage = Storage(cfg.storage.root)
    catalog = Catalog(storage)
    table = catalog.table(["download"], asset_columns=("sha256",))
    shas = dict(zip(table["sha256"].to_pylist(), table["local_path"].to_pylist()))
    assert len(shas) == 2
    hang_sha = next(s for s, p in shas.items() if Path(p).name == "box.glb")
    Path(shas[hang_sha] + ".hang").touch()
    cfg.render.timeout_s = 3.0  # params hash ignores the timeout
    run = run_render(cfg, storage, catalog, worker=hang_if_marked)
    assert run.processed == 2 and run.states == {"ok": 1, "failed": 1} and run.reasons == {"failed:timeout": 1}
    res = {r["sha256"]: r for r in catalog.results("render").to_pylist()}
    assert res[hang_sha]["state"] == "failed" and res[hang_sha]["params"] == render_params(cfg.render)
    ok_sha = next(s for s in shas if s != hang_sha)
    assert res[ok_sha]["state"] == "ok" and res[ok_sha]["num_views"] == 8
    assert np.isclose(res[ok_sha]["scale"], 1 / 3.0)
    assert os.path.isfile(storage.path("renders", ok_sha, "views4", "transforms.json"))
    # Resumable: nothing left to do for the same params.
    assert run_render(cfg, storage, catalog).processed == 0


@pytest.mark.integration
@pytest.mark.shared_assets
def test_shared_skinned_asset_projection(tmp_path):
    asset = SHARED_ASSETS / "good" / "CesiumMan.glb"
    if not asset.is_file():
        pytest.skip(f"{asset} absent")
    cfg = RenderConfig(**{**TINY, "resolution": 128, "cond_resolution": 128, "curation_resolution": 128})
    storage = Storage(str(tmp_path / "d"))
    result = render_asset(str(asset), "glb", SHA_B, cfg, storage)
    assert result.state == "ok", result.message
    assert result.columns["blank_views"] == 0 and result.columns["magenta_fraction_max"] < 0.01
    render_dir = Path(storage.path("renders", SHA_B))
    mesh = trimesh.load(render_dir / "mesh.ply", process=False)
    assert np.isclose((mesh.bounds[1] - mesh.bounds[0]).max(), 1.0, atol=1e-5)
    assert _check_projection(render_dir, mesh.vertices, tol=2.0) == 8


@pytest.mark.integration
def test_object_store_root_publishes_complete_render(tmp_path, monkeypatch):
    """A render to an fsspec root (memory://, the same code path as s3://) lands whole under renders/<sha>/, and
    a re-render with other settings replaces it, leaving no file of the old one."""
    monkeypatch.setenv("FLUX3D_LOCAL_CACHE", str(tmp_path / "cache"))
    asset = tmp_path / "box.glb"
    asset.write_bytes(_textured_box_glb())
    storage = Storage(f"memory://flux3d-{tmp_path.name}/data")
    first = render_asset(str(asset), "glb", SHA_A, RenderConfig(**TINY), storage)
    assert first.state == "ok", first.message
    final = storage.path("renders", SHA_A)
    names = {p.removeprefix(final + "/") for p in storage.fs.find(final)}
    expected = {"mesh.ply", "contact.png", "render.json"} | {f"{s}/transforms.json" for s in SETS} | {
        f"{s}/{i:03d}.png" for s, n in zip(SETS, (4, 2, 2)) for i in range(n)} | {
        f"views4/{i:03d}_depth.png" for i in range(4)}
    assert names == expected
    facts = json.loads(storage.read_bytes(f"renders/{SHA_A}/render.json"))
    assert facts["scale"] == first.columns["scale"] and first.columns["render_dir"] == final
    second = render_asset(str(asset), "glb", SHA_A, RenderConfig(**{**TINY, "views": 3, "passes": []}), storage)
    assert second.state == "ok"
    names = {p.removeprefix(final + "/") for p in storage.fs.find(final)}
    assert "views3/002.png" in names and not any(n.startswith("views4/") for n in names)
    assert not os.listdir(tmp_path / "cache" / "renders")  # the local scratch folders are gone


@pytest.mark.integration
def test_cli_render_limit_resume_and_status(tmp_path):
    """`flux3d render` over the demo assets: --limit renders part, the next run the rest, the third nothing."""
    from flux3d.demo import make_demo_assets
    from tests.test_ingest import flux3d

    assets, root = tmp_path / "assets", str(tmp_path / "root")
    make_demo_assets(str(assets))
    config = tmp_path / "tiny.toml"
    config.write_text("[render]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in TINY.items()))
    flux3d("ingest", "--root", root, "--source", f"local:{assets}")

    def run(*extra: str) -> list[str]:  # the table row: stage, ok, skipped, rejected, failed, processed
        out = flux3d("render", "--root", root, "--config", str(config), "--views", "4,2,2", *extra).stdout
        return next(line.split("│")[1:-1] for line in out.splitlines() if line.startswith("│ render"))

    assert [c.strip() for c in run("--limit", "1")] == ["render", "1", "0", "0", "0", "1"]
    # The three inspect-ok demo assets, one already done; then nothing is left.
    assert [c.strip() for c in run()] == ["render", "2", "0", "0", "0", "2"]
    assert [c.strip() for c in run()] == ["render", "0", "0", "0", "0", "0"]
    report = json.loads(flux3d("status", "--root", root, "--json").stdout)
    assert report["stages"]["render"]["states"]["ok"] == 3
    for row in Catalog(Storage(root)).results("render").to_pylist():
        frames = json.loads((Path(row["render_dir"]) / "views4" / "transforms.json").read_text())["frames"]
        assert len(frames) == 4 and row["num_views"] == 8 and row["blank_views"] == 0
    bad = flux3d("render", "--root", root, "--views", "4,2", check=False)
    assert bad.returncode != 0 and "three counts" in bad.stderr


@pytest.mark.integration
def test_without_a_curation_set_curation_reads_main_set_views(tmp_path):
    """`render.curation_views = 0` renders no curation set; curation then reads 10 views spread over the main set."""
    from flux3d.stages.render_layout import curation_views, load_views, spread

    asset = tmp_path / "box.glb"
    asset.write_bytes(_textured_box_glb())
    cfg = RenderConfig(**{**TINY, "views": 12, "curation_views": 0})
    storage = Storage(str(tmp_path / "d"))
    result = render_asset(str(asset), "glb", SHA_A, cfg, storage)
    assert result.state == "ok" and result.columns["num_views"] == 12 + 2
    root = storage.path("renders", SHA_A)
    assert sorted(p for p in os.listdir(root) if os.path.isdir(os.path.join(root, p))) == ["cond2", "views12"]
    judged, main = curation_views(storage, root, cfg), load_views(storage, root, "views12")
    assert len(judged) == 10 and all(np.array_equal(j, main[i]) for j, i in zip(judged, spread(12, 10)))
    assert len(curation_views(storage, root, cfg, limit=4)) == 4


@pytest.mark.integration
def test_auto_prefilter_cleans_the_denoiser_guides_only_for_see_through_assets(tmp_path):
    """`denoise_prefilter = AUTO`: NONE for an opaque asset (its first-hit guides are clean), ACCURATE for one with
    a see-through material (a glTF alpha-blended one here), recorded in render.json."""
    opaque, clear = tmp_path / "box.glb", tmp_path / "clear.glb"
    opaque.write_bytes(_textured_box_glb())
    box = trimesh.creation.box()
    box.visual = trimesh.visual.TextureVisuals(material=trimesh.visual.material.PBRMaterial(
        baseColorFactor=[200, 200, 255, 100], alphaMode="BLEND"))
    clear.write_bytes(trimesh.Scene(box).export(file_type="glb"))
    cfg = RenderConfig(**{**TINY, "denoise": True, "denoise_prefilter": "AUTO"})
    chosen = {}
    for path, sha in ((opaque, SHA_A), (clear, SHA_B)):
        storage = Storage(str(tmp_path / sha[:4]))
        assert render_asset(str(path), "glb", sha, cfg, storage).state == "ok"
        chosen[path.stem] = json.loads(Path(storage.path("renders", sha, "render.json")).read_text())[
            "denoise_prefilter"]
    assert chosen == {"box": "NONE", "clear": "ACCURATE"}


@pytest.mark.integration
def test_crop_to_object_renders_the_full_frames_pixels(tmp_path):
    """Rendering only the rectangle the asset's vertices project into changes no pixel: without the denoiser (which
    sees the image's extent) every view's RGBA, depth and normals equal the full-frame render's, in every set, while
    Cycles traced a fraction of each frame."""
    asset = tmp_path / "box.glb"
    asset.write_bytes(_textured_box_glb())
    roots, facts = {}, {}
    for crop in (False, True):
        cfg = RenderConfig(**{**TINY, "samples": 16, "passes": ["depth", "normal"], "crop_to_object": crop})
        storage = Storage(str(tmp_path / str(crop)))
        assert render_asset(str(asset), "glb", SHA_A, cfg, storage).state == "ok"
        roots[crop] = Path(storage.path("renders", SHA_A))
        facts[crop] = json.loads((roots[crop] / "render.json").read_text())
    assert (facts[False]["cropped"], facts[True]["cropped"]) == (False, True)
    compared = 0
    for view_set in SETS:
        assert facts[False]["sets"][view_set]["rendered_fraction"] == 1.0
        assert 0.2 < facts[True]["sets"][view_set]["rendered_fraction"] < 0.9
        for png in sorted((roots[False] / view_set).glob("*.png")):
            full, crop = (np.asarray(Image.open(r / view_set / png.name)) for r in (roots[False], roots[True]))
            assert np.array_equal(full, crop), (view_set, png.name)
            compared += 1
    assert compared == 4 * 3 + 2 + 2  # the main set's views with depth and normal, and the other two sets


MAKE_DISPLACED_BLEND = """
import bpy, sys
bpy.ops.wm.read_factory_settings(use_empty=True)
bpy.ops.mesh.primitive_cube_add(size=2.0)
mat = bpy.data.materials.new("displaced")
mat.use_nodes = True
mat.displacement_method = "DISPLACEMENT"  # Cycles moves the surface: the vertices no longer bound it
bpy.context.object.data.materials.append(mat)
bpy.ops.wm.save_as_mainfile(filepath=sys.argv[-1])
"""


@pytest.mark.integration
def test_an_asset_its_vertices_do_not_bound_renders_uncropped(tmp_path):
    blend = tmp_path / "displaced.blend"
    subprocess.run([sys.executable, "-c", MAKE_DISPLACED_BLEND, str(blend)], check=True, capture_output=True,
                   timeout=120)
    storage = Storage(str(tmp_path / "d"))
    assert render_asset(str(blend), "blend", SHA_A, RenderConfig(**TINY), storage).state == "ok"
    facts = json.loads(Path(storage.path("renders", SHA_A, "render.json")).read_text())
    assert facts["cropped"] is False and facts["sets"]["views4"]["rendered_fraction"] == 1.0

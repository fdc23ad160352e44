"""One Blender child renders many assets in turn (`BlenderSessions`): the same bytes as a process per asset, and an
asset that hangs or crashes mid-batch fails alone while the rest of the batch renders."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

from flux3d.config.pipeline import RenderConfig
from flux3d.demo import _checker, _textured_box_glb
from flux3d.stages.render import BlenderSessions, render_asset, render_views
from flux3d.storage import Storage
from tests.test_render import SETS, TINY, _wait_gone, hang_worker

pytestmark = pytest.mark.integration
SHA = "a" * 64


def misbehave_if_marked(path: str, fmt: str, sha256: str, cfg: RenderConfig, out_dir: str) -> dict:
    """The real render, unless a marker beside the asset says to hang (with a grandchild) or to segfault."""
    if os.path.exists(path + ".hang"):
        hang_worker(path, fmt, sha256, cfg, out_dir)
    if os.path.exists(path + ".crash"):
        os.kill(os.getpid(), signal.SIGSEGV)
    with open(path + ".renderer", "w") as f:  # which child rendered it
        f.write(str(os.getpid()))
    return render_views(path, fmt, sha256, cfg, out_dir)


def _tall_glb() -> bytes:
    tall = trimesh.creation.box(extents=(0.2, 0.2, 3.0))
    tall.unmerge_vertices()
    uv = np.tile(np.array([[0, 0], [1, 0], [0, 1]], dtype=np.float64), (len(tall.faces), 1))
    tall.visual = trimesh.visual.TextureVisuals(uv=uv, image=_checker(seed=3))
    return trimesh.Scene(tall).export(file_type="glb")


def _files(storage: Storage, sha: str) -> dict[str, bytes]:
    """Every published file of one render: PNGs as their decoded pixels (Blender stamps each file with its render
    time), the rest as bytes, but `render.json` (timings, the child's pid)."""
    root = Path(storage.path("renders", sha))
    return {str(p.relative_to(root)): np.asarray(Image.open(p)).tobytes() if p.suffix == ".png" else p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "render.json"}


def test_one_session_renders_assets_in_turn_like_a_process_each(tmp_path):
    box, tall = tmp_path / "box.glb", tmp_path / "tall.glb"
    box.write_bytes(_textured_box_glb())
    tall.write_bytes(_tall_glb())
    cfg = RenderConfig(**TINY)
    jobs = [(str(box), "a" * 64), (str(tall), "b" * 64)]

    apart = Storage(str(tmp_path / "apart"))
    for path, sha in jobs:
        assert render_asset(path, "glb", sha, cfg, apart).state == "ok"

    # One child: box, tall, then box again (into another root), so the second box follows another asset.
    together, again = Storage(str(tmp_path / "together")), Storage(str(tmp_path / "again"))
    sessions = BlenderSessions(cfg)
    try:
        for (path, sha), storage in [*zip(jobs, [together, together]), (jobs[0], again)]:
            assert sessions.render(path, "glb", sha, cfg, storage).state == "ok"
    finally:
        sessions.close()
    renderers = {json.loads(Path(s.path("renders", sha, "render.json")).read_text())["pid"]
                 for (_, sha), s in [*zip(jobs, [together, together]), (jobs[0], again)]}
    assert len(renderers) == 1, "every asset of the batch was rendered by one child"
    assert _wait_gone(renderers.pop()), "closing the sessions ends their child"

    for _, sha in jobs:
        want = _files(apart, sha)
        assert {k.split("/")[0] for k in want} >= set(SETS) and "mesh.ply" in want
        assert _files(together, sha) == want, f"{sha[:8]}: a shared session rendered other bytes"
    assert _files(again, "a" * 64) == _files(apart, "a" * 64), "the asset before leaked into the next render"


def test_a_hang_or_crash_mid_batch_fails_alone(tmp_path):
    names = ["ok1", "hang", "ok2", "crash", "ok3"]
    for name in names:
        (tmp_path / f"{name}.glb").write_bytes(_textured_box_glb())
    (tmp_path / "hang.glb.hang").touch()
    (tmp_path / "crash.glb.crash").touch()
    cfg = RenderConfig(**{**TINY, "timeout_s": 20.0})
    storages = {n: Storage(str(tmp_path / "d" / n)) for n in names}  # one sha (same cameras), a root each
    sessions = BlenderSessions(cfg)
    try:
        results = {n: sessions.render(str(tmp_path / f"{n}.glb"), "glb", SHA, cfg, storages[n],
                                      worker=misbehave_if_marked) for n in names}
    finally:
        sessions.close()
    assert {n: (r.state, r.reason) for n, r in results.items()} == {
        "ok1": ("ok", ""), "hang": ("failed", "timeout"), "ok2": ("ok", ""),
        "crash": ("failed", "blender_crash"), "ok3": ("ok", "")}
    assert "SIGSEGV" in results["crash"].message
    grandchild = int((tmp_path / "hang.glb.pid").read_text())
    assert _wait_gone(grandchild), f"the hanging asset's grandchild {grandchild} survived its timeout"
    # Each failure cost its own child only: the assets after it got a fresh one and rendered in full.
    pids = [(tmp_path / f"{n}.glb.renderer").read_text() for n in ("ok1", "ok2", "ok3")]
    assert len(set(pids)) == 3
    views = [_files(storages[n], SHA) for n in ("ok1", "ok2", "ok3")]
    assert views[0] == views[1] == views[2] and len(views[0]) > 10
    for n in ("hang", "crash"):  # nothing published, no temporary folder left
        assert os.listdir(storages[n].path("renders")) == []

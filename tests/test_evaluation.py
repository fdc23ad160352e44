"""The evaluation protocols and report: helpers checked against geometry, and `flux3d evaluate` on debug models
trained on a tiny synthetic dataset version (written by the project's shard builder, no Blender), checked for
completeness and consistency (debug-size numbers mean nothing)."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from flux3d.config.recipes import train_recipe as recipe
from flux3d.config.training import apply_overrides
from flux3d.evaluation.protocols import azimuth_views, sample_keys, scaled
from flux3d.evaluation.report import better, gate_metrics
from flux3d.stages.cameras import orbit_cameras, project
from flux3d.training.trainer import fit


def test_azimuth_views_pick_the_nearest_distinct_cameras():
    _, w2c = orbit_cameras(24, 2.0, 40.0, 64, elevation_deg=30.0)
    cams = [{"w2c": m.tolist()} for m in w2c]
    rng = np.random.default_rng(0)
    order = rng.permutation(24)
    shuffled = [cams[i] for i in order]
    chosen = azimuth_views(shuffled, 8)  # 8 evenly spaced azimuths: every third orbit camera, whatever the order
    picked = sorted(int(order[i]) for i in chosen)
    assert len(set(chosen)) == 8 and np.all(np.diff(picked) == 3)
    assert len(azimuth_views(cams[:5], 24)) == 5  # never more views than there are


def test_scaled_intrinsics_project_to_the_resized_image():
    K, w2c = orbit_cameras(1, 2.0, 40.0, 512)
    points = np.random.default_rng(1).uniform(-0.4, 0.4, (20, 3))
    uv512, _ = project(points, K[0], w2c[0])
    uv64, _ = project(points, scaled(K[0], 512, 64).double().numpy(), w2c[0])
    np.testing.assert_allclose(uv64, uv512 * 64 / 512, atol=1e-9)


def test_gate_metrics_prefer_generation_and_directions():
    assert gate_metrics({"recon_psnr": 30.0, "gen_psnr": 25.0, "gen_lpips": 0.1})["psnr"] == 25.0
    assert gate_metrics({"recon_psnr": 30.0, "recon_lpips": 0.05})["lpips"] == 0.05
    assert [better(k) for k in ("gen_psnr", "recon_ssim", "gen_clip", "gen_lpips", "fd_dinov2", "kd_inception",
                                "mv_psnr_mean", "mv_psnr_std")] == ["max"] * 3 + ["min"] * 3 + ["max", "min"]


@pytest.fixture(scope="module")
def dataset(synthetic_shards):
    return synthetic_shards(3, views=16, resolution=64, voxels=16, supervision_views=16, cond_views=2,
                            cond_resolution=64)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dataset):
    tmp, ds = tmp_path_factory.mktemp("eval"), dataset
    base = {"data.shards": ds.version_dir, "run.image_every": 0, "run.steps": 40, "run.ckpt_every": 40}
    run = tmp / "runs" / "v"
    fit(apply_overrides(recipe("decoder", "debug"), {**base, "run.out": str(run / "decoder"),
                                                     "decoder.gaussians.resolution": 16}), local=True)
    fit(apply_overrides(recipe("smdit", "debug"), {**base, "run.out": str(run / "smdit"), "smdit.grid": 16,
                                                   "flow.encoder": ds.encoder,
                                                   "flow.encoder_location": ds.encoder_location}), local=True)
    return ds, run


def _evaluate(run, *extra: str) -> dict:
    from flux3d.demo import make_demo_models

    changes = make_demo_models(str(run.parent / "models"))["evaluate"]["changes"]  # the demo's tiny CLIP
    models = [f"{k}={v}" for k, v in changes.items()]
    args = [sys.executable, "-m", "flux3d.cli", "evaluate", "--run", str(run), "--recipe", "debug",
            "--set", "split=all", *sum((["--set", s] for s in models), []), *extra]
    p = subprocess.run(args, capture_output=True, text=True, timeout=600, check=False)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return {"stdout": p.stdout}


@pytest.fixture(scope="module")
def report(trained):
    """`flux3d evaluate` once on the trained runs: the run folder, its stdout and report.json."""
    _, run = trained
    out = _evaluate(run)["stdout"]
    return run, out, json.loads((run / "eval" / "report.json").read_text())


@pytest.mark.integration
@pytest.mark.timeout(600)  # training, then `flux3d evaluate` subprocesses: minutes on 2 busy cores
def test_evaluate_writes_a_complete_consistent_report(report):
    run, out, doc = report
    s = doc["summary"]
    expected = {f"{p}_{m}" for p in ("recon", "gen") for m in ("psnr", "ssim", "lpips")} | {
        "gen_clip", "fd_inception", "kd_inception", "fd_dinov2", "kd_dinov2", "mv_psnr_mean", "mv_psnr_std"}
    assert expected <= set(s) and all(math.isfinite(v) for v in s.values())
    assert doc["count"] == 3 == len(doc["assets"]) and doc["decoder_step"] == doc["smdit_step"] == 40
    for k in ("recon_psnr", "gen_psnr", "gen_clip", "mv_psnr_mean"):  # the summary is the mean of the rows
        assert s[k] == pytest.approx(np.mean([a[k] for a in doc["assets"]]))
    assert 0 < s["recon_ssim"] <= 1 and 0 < s["gen_ssim"] <= 1 and s["fd_inception"] >= 0
    assert doc["metrics"]["psnr"] == s["gen_psnr"] and doc["config"]["sampler_steps"] == 10
    assert doc["variant"] == "Dec-Only" and not any("lossy WebP" in c for c in doc["caveats"])  # lossless truth
    md = (run / "eval" / "report.md").read_text()
    for table in ("Reconstruction (paper Tab. 2)", "Generation (paper Tab. 3)", "Multi-view consistency"):
        assert table in md
    assert "| TRELLIS | 0.9719 | 31.54 | 0.0296 |" in md  # the published rows beside ours
    ours = next(line for line in md.splitlines() if line.startswith("| this run") and "Tab" not in line)
    assert f"{s['recon_psnr']:.2f}" in ours
    html = (run / "eval" / "report.html").read_text()
    assert f"{s['gen_psnr']:.2f}" in html and "<table>" in html
    grid = Image.open(run / "eval" / "grid.png")
    assert grid.size == (6 * 66 + 2, 3 * 66 + 2)  # 3 assets x (input, ours, ours elsewhere, truth, recon pair)
    assert re.search(r"evaluated 3 assets", out)


@pytest.mark.integration
@pytest.mark.timeout(600)  # training, then `flux3d evaluate` subprocesses: minutes on 2 busy cores
def test_evaluate_again_reproduces_the_report_and_compares_with_it(report):
    """The same models again, against the first report: every random choice is seeded, so nothing changes."""
    run, _, doc = report
    s = doc["summary"]
    _evaluate(run, "--out", str(run / "eval2"), "--previous", str(run / "eval" / "report.json"))
    again = json.loads((run / "eval2" / "report.json").read_text())
    for k, v in s.items():
        assert again["summary"][k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    md2 = (run / "eval2" / "report.md").read_text()
    assert "Against the previous evaluation" in md2 and "+0" in md2


def test_sample_keys_is_seeded_and_bounded(dataset):
    ds = dataset
    a = sample_keys(ds.version_dir, "all", 2, seed=0)
    assert a == sample_keys(ds.version_dir, "all", 2, seed=0) and len(a) == 2
    assert len(sample_keys(ds.version_dir, "all", 100, seed=0)) == 3
    with pytest.raises(ValueError, match="no 'val' assets"):
        sample_keys(ds.version_dir, "val", 5, seed=0)
    assert torch.is_tensor(scaled([[1, 0, 0], [0, 1, 0], [0, 0, 1]], 8, 4))


@pytest.fixture(scope="module")
def enc_dec(tmp_path_factory, synthetic_shards):
    """The Enc-Dec variant (paper Tab. 3): an encoder-decoder with an 8-channel latent, and an SMDiT trained on
    that latent (`flow.latents`), laid out as a pipeline's run folder; views stored as lossy WebP q95."""
    tmp = tmp_path_factory.mktemp("encdec")
    ds = synthetic_shards(3, views=16, resolution=64, voxels=16, supervision_views=16, cond_views=2,
                          cond_resolution=64, image_quality=95)
    base = {"data.shards": ds.version_dir, "run.image_every": 0, "run.steps": 20, "run.ckpt_every": 20}
    run = tmp / "runs" / "v"
    fit(apply_overrides(recipe("decoder", "debug"), {**base, "run.out": str(run / "decoder"),
                                                     "decoder.gaussians.resolution": 16,
                                                     "decoder.latent_channels": 8}), local=True)
    smdit = apply_overrides(recipe("smdit", "debug"), {**base, "run.out": str(run / "smdit"), "smdit.grid": 16,
                                                       "smdit.in_channels": 8, "flow.latents": str(run / "decoder"),
                                                       "flow.encoder": ds.encoder,
                                                       "flow.encoder_location": ds.encoder_location})
    fit(smdit, local=True)
    return ds, run


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_evaluate_an_enc_dec_run_generates_with_the_8_channel_smdit(enc_dec, trained):
    from flux3d.training.checkpoint import decodes_latent, load_model
    from flux3d.training.data import every_sample, shard_urls
    from flux3d.training.smdit_step import EncDecLatents

    ds, run = enc_dec
    smdit, scfg = load_model(str(run / "smdit"))
    decoder, _ = load_model(str(run / "decoder"))
    # The SMDiT's normalisation is that of the encoded train split, not of the FLUX features.
    (batch,) = every_sample(shard_urls(ds.version_dir, "train"), batch_size=100)
    with torch.no_grad():
        z = decoder.encode(batch.voxels.feats, batch.voxels.coords, batch.voxels.offsets)
    assert smdit.latent_mean.shape == (8,)
    torch.testing.assert_close(smdit.latent_mean, z.mean(0), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(smdit.latent_std, z.std(0, unbiased=False), atol=1e-4, rtol=1e-4)
    # Its samples belong to that decoder alone: another decoder is refused, as is a decoder-only run or an
    # unfinished one (named as a run, whose newest checkpoint still moves) as the latent to train on.
    assert decodes_latent(scfg, str(run / "decoder"))
    with pytest.raises(ValueError, match="decode its samples with that decoder"):
        decodes_latent(scfg, str(trained[1] / "decoder"))
    with pytest.raises(ValueError, match="not an encoder-decoder run"):
        EncDecLatents(apply_overrides(scfg, {"flow.latents": str(trained[1] / "decoder")}), torch.device("cpu"))
    unfinished = run.parent / "unfinished"
    shutil.copytree(run / "decoder", unfinished)
    meta = unfinished / "checkpoints" / "step_0000020" / "meta.json"
    doc = json.loads(meta.read_text())
    doc["config"]["run"]["steps"] = 40
    meta.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="at step 20 of 40"):
        EncDecLatents(apply_overrides(scfg, {"flow.latents": str(unfinished)}), torch.device("cpu"))
    EncDecLatents(apply_overrides(scfg, {"flow.latents": str(meta.parent)}), torch.device("cpu"))  # pinned: fine

    _evaluate(run)
    doc = json.loads((run / "eval" / "report.json").read_text())
    assert doc["variant"] == "Enc-Dec" and doc["smdit_diffuses"] == "8-channel decoder latent"
    assert math.isfinite(doc["summary"]["gen_psnr"]) and math.isfinite(doc["summary"]["recon_psnr"])
    md = (run / "eval" / "report.md").read_text()
    assert any(line.startswith("| this run (Enc-Dec)") for line in md.splitlines())
    assert any("lossy WebP" in c for c in doc["caveats"])  # q95 ground truth caps PSNR: the report says so

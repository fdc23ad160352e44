"""Config loading and the local / manifest sources."""

from __future__ import annotations

import hashlib

import pytest

from flux3d.config.load import load_config
from flux3d.records import StageResult
from flux3d.sources import parse_spec
from flux3d.sources.local import list_local
from flux3d.sources.manifest import list_manifest


def test_config_from_toml_with_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[storage]\nroot = "s3://bucket/x"\n\n[download]\nworkers = 32\nbackoff_s = 2\n')
    cfg = load_config(path, {"inspect.timeout_s": 5})
    assert (cfg.storage.root, cfg.download.workers, cfg.download.backoff_s, cfg.inspect.timeout_s) == (
        "s3://bucket/x", 32, 2.0, 5.0)
    assert cfg.ingest.batch_size == 64  # untouched defaults stay


@pytest.mark.parametrize("overrides, match", [
    ({"download.wokers": 3}, "unknown key"),
    ({"nosuch.x": 1}, "unknown key"),
    ({"download.workers": "8"}, "expected int"),
    ({"download.workers": True}, "expected int"),
    ({"download.backoff_s": 120.0}, "must not exceed"),
    ({"ingest.batch_size": 0}, ">= 1"),
    ({"inspect.geometry_only_formats": "stl"}, "expected a list"),
    ({"train.decoder": {"optim": {"lrr": 1e-4}}}, r"unknown key.*train\.decoder\.optim"),
    ({"train.smdit": {"run": {"steps": "many"}}}, r"train\.smdit\.run\.steps: expected int"),
    ({"evaluate.changes": {"assets": -1}}, "assets"),
    ({"train.decoder": ["optim.lr=3e-4"]}, "expected a table"),
])
def test_bad_config_raises_value_error(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config(overrides=overrides)


def test_train_changes_are_typed_tables_that_add_to_the_recipe(tmp_path):
    """`[train.<model>]` tables change the recipe's TrainConfig field by field; the pipeline's own settings (shards,
    run folder, voxel grid, encoder) come in under them, and what the user names wins."""
    from flux3d.config.recipes import train_recipe
    from flux3d.flows.train import run_config

    path = tmp_path / "run.toml"
    path.write_text(f'[storage]\nroot = "{tmp_path}"\n[voxelize]\nresolution = 32\n'
                    '[train.decoder.optim]\nlr = 3e-4\n[train.smdit]\nflow = {encoder_location = "/w/vae"}\n'
                    'smdit = {grid = 32, width = 256}\n')
    cfg = load_config(path, recipe="debug")  # the file's [train] tables replace the recipe's
    decoder, smdit = run_config(cfg, "decoder", "v1"), run_config(cfg, "smdit", "v1")
    base = train_recipe("decoder", "debug")  # run.steps = 400, not the debug pipeline's 40: its table is replaced
    assert (decoder.optim.lr, decoder.optim.warmup_steps, decoder.run.steps) == (3e-4, base.optim.warmup_steps,
                                                                                 base.run.steps)
    assert decoder.decoder.gaussians.resolution == 32 and decoder.data.shards == f"{tmp_path}/shards/v1"
    assert decoder.run.out == f"{tmp_path}/models/v1/decoder"
    assert (smdit.smdit.width, smdit.smdit.grid, smdit.smdit.heads) == (256, 32, train_recipe("smdit", "debug").smdit.heads)
    # The user named an encoder location: the pipeline's encoder is not laid over it.
    assert (smdit.flow.encoder, smdit.flow.encoder_location) == (base.flow.encoder, "/w/vae")
    assert smdit.run.decoder_run == f"{tmp_path}/models/v1/decoder"


def test_an_enc_dec_pipeline_diffuses_its_decoders_latent(tmp_path):
    """`[train.decoder] decoder.latent_channels = 8` makes the pipeline the paper's Enc-Dec variant: its SMDiT
    diffuses that decoder's 8-channel latent (trained after it); a Dec-Only pipeline diffuses the features."""
    from flux3d.flows.train import enc_dec_channels, run_config

    path = tmp_path / "run.toml"
    path.write_text(f'[storage]\nroot = "{tmp_path}"\n[train.decoder]\ndecoder = {{latent_channels = 8}}\n')
    cfg = load_config(path, recipe="debug")
    smdit = run_config(cfg, "smdit", "v1")
    assert enc_dec_channels(cfg, "v1") == 8 and smdit.smdit.in_channels == 8 and smdit.smdit.cond_channels == 16
    assert smdit.flow.latents == smdit.run.decoder_run == f"{tmp_path}/models/v1/decoder"
    plain = run_config(load_config(recipe="debug", overrides={"storage.root": str(tmp_path)}), "smdit", "v1")
    assert (plain.flow.latents, plain.smdit.in_channels) == ("", 16)


@pytest.mark.parametrize("spec", ["local", "ftp:x", "local:", "objaverse:lvis", "objaverse-xl:limit=ten"])
def test_bad_source_specs(spec):
    with pytest.raises(ValueError):
        parse_spec(spec)


def test_source_spec_options():
    spec = parse_spec("objaverse-xl:sources=github,thingiverse;limit=10")
    assert (spec.kind, spec.options["sources"], spec.limit) == ("objaverse-xl", "github,thingiverse", 10)


def test_local_listing_hashes_and_reuses_known_hashes(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.GLB").write_bytes(b"glTF-ish")
    (tmp_path / "b.obj").write_bytes(b"v 0 0 0\n")
    (tmp_path / "b.mtl").write_bytes(b"newmtl x\n")  # sidecar, not an asset
    (tmp_path / "tex.png").write_bytes(b"png")
    recs = list(list_local(str(tmp_path), {}))
    assert [(r.format, r.sha256) for r in recs] == [("obj", hashlib.sha256(b"v 0 0 0\n").hexdigest()),
                                                     ("glb", hashlib.sha256(b"glTF-ish").hexdigest())]
    # An unchanged file (same size and mtime) keeps its known hash without being read again.
    known = {r.file_identifier: (r.bytes, r.metadata["mtime_ns"], "cached") for r in recs}
    assert {r.sha256 for r in list_local(str(tmp_path), known)} == {"cached"}


def test_manifest_csv_and_parquet(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "chair.obj").write_bytes(b"v 0 0 0\n")
    csv = tmp_path / "3D-FUTURE.csv"
    csv.write_text("sha256,file_identifier,license,aesthetic_score,captions\n"
                   f"{'A' * 64},models/chair.obj,CC-BY-NC-4.0,5.1,\"[\"\"a chair\"\"]\"\n"
                   "0123,https://example.org/x/table.glb?dl=1,CC0-1.0,4.0,\n")
    recs = list(list_manifest(str(csv)))
    assert [r.source for r in recs] == ["manifest:3D-FUTURE"] * 2
    chair, table = recs
    assert chair.url is None and chair.file_identifier == str(tmp_path / "models" / "chair.obj")
    assert chair.sha256 == "a" * 64 and chair.format == "obj" and chair.metadata["aesthetic_score"] == 5.1
    assert table.url == "https://example.org/x/table.glb?dl=1" and table.format == "glb"
    assert table.sha256 == "0123"  # read as text: an all-digit hash stays a string
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    pq.write_table(pacsv.read_csv(csv), tmp_path / "copy.parquet")
    assert [r.file_identifier for r in list_manifest(str(tmp_path / "copy.parquet"))][1] == table.file_identifier
    with pytest.raises(ValueError, match="file_identifier"):
        (tmp_path / "bad.csv").write_text("sha256,path\nx,y\n")
        list(list_manifest(str(tmp_path / "bad.csv")))


def test_stage_result_requires_reason():
    with pytest.raises(ValueError, match="reason"):
        StageResult("k", "failed")
    with pytest.raises(ValueError, match="unknown state"):
        StageResult("k", "done")

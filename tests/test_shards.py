"""The shard writer: exact read-back, the size bound, and a writer killed mid-shard that leaves nothing partial
visible and resumes to the same bytes as a run that was never interrupted."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from flux3d.shards.format import decode_image, decode_sample, encode_image, encode_sample
from flux3d.shards.writer import Item, ShardSet, Sums, tar_file_bytes
from flux3d.storage import Storage

MAX_BYTES = 1 << 16


def _item(i: int) -> Item:
    """A synthetic asset: i-dependent voxel count, random latents and two small lossless RGBA views."""
    rng = np.random.default_rng(i)
    n = 50 + 37 * i
    coords = np.unique(rng.integers(0, 64, (n, 3), dtype=np.uint8), axis=0)
    mu = rng.normal(size=(len(coords), 16)).astype(np.float16)
    sigma = np.abs(rng.normal(size=(len(coords), 16))).astype(np.float16)
    views = [encode_image(rng.integers(0, 256, (24, 24, 4), dtype=np.uint8), 100) for _ in range(2)]
    key = f"{i:064x}"
    cams = {"views": [{"K": np.eye(3).tolist(), "w2c": (np.eye(4) * (v + 1)).tolist()} for v in range(2)],
            "cond": [], "resolution": 24, "cond_resolution": 24}
    sample = encode_sample(key, coords, mu, sigma, views, cams, {"sha256": key, "i": i})
    m = mu.astype(np.float64)
    return Item(sample, {"key": key, "split": "train", "num_voxels": len(coords), "source": "t", "license": "x"},
                Sums(voxels=len(coords), mu=m.sum(0).tolist(), mu_sq=(m * m).sum(0).tolist(),
                     sigma=sigma.astype(np.float64).sum(0).tolist()))


def _items(n: int, stall_after: int | None = None, flag: str = ""):  # noqa: ANN202
    for i in range(n):
        if i == stall_after:  # the killed writer: say where it is, then hang mid-shard until killed
            Path(flag).touch()
            time.sleep(600)
        yield _item(i)


def _write(root: str, n: int, stall_after: int | None = None, flag: str = "") -> list[dict]:
    return list(ShardSet(Storage(root), "shards/v", MAX_BYTES).write("train", _items(n, stall_after, flag)))


def _visible(root: str) -> dict[str, bytes]:
    d = Path(root) / "shards" / "v"
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.tar")) if not p.name.startswith(".")}


def test_shards_read_back_exactly_and_respect_the_size_bound(tmp_path):
    parts = _write(str(tmp_path), 12)
    files = _visible(str(tmp_path))
    assert len(files) == len(parts) > 2  # the 64 KiB bound split the set
    assert all(len(b) <= MAX_BYTES for b in files.values())
    assert all(len(b) == tar_file_bytes(sum(r["bytes"] for r in p["rows"])) for p, b in zip(parts, files.values()))
    got = {}
    for s in wds.WebDataset([str(tmp_path / "shards" / "v" / n) for n in files], shardshuffle=False):
        got[s["__key__"]] = decode_sample(s)
    assert list(got) == [f"{i:064x}" for i in range(12)]  # order kept across shards
    for i, s in got.items():
        ref = decode_sample(_item(int(i, 16)).sample)
        for name in ("coords", "mu", "sigma"):
            assert s[name].dtype == ref[name].dtype and s[name].tobytes() == ref[name].tobytes()
        assert s["views"] == ref["views"] and s["cameras"] == ref["cameras"] and s["meta"]["i"] == int(i, 16)
        assert decode_image(s["views"][1]).shape == (24, 24, 4)
    # Part records carry the statistics: their sum equals a direct computation.
    total = Sums()
    for p in parts:
        total.add(Sums(**p["sums"]))
    mus = np.concatenate([got[k]["mu"].astype(np.float64) for k in got])
    assert total.voxels == len(mus) and np.allclose(total.mu, mus.sum(0))


def test_a_killed_writer_leaves_no_partial_shard_and_resumes_to_identical_bytes(tmp_path):
    clean = str(tmp_path / "clean")
    _write(clean, 12)
    killed, flag = str(tmp_path / "killed"), str(tmp_path / "stalled")
    proc = mp.get_context("spawn").Process(target=_write, args=(killed, 12, 7, flag))
    proc.start()
    deadline = time.time() + 120
    while not os.path.exists(flag) and time.time() < deadline:
        time.sleep(0.05)
    assert os.path.exists(flag), "the writer never reached the stall point"
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    shard_dir = Path(killed) / "shards" / "v"
    visible = _visible(killed)
    parts = sorted(p.name for p in (shard_dir / "parts").glob("*.json"))
    assert [n.removesuffix(".tar") for n in visible] == [p.removesuffix(".json") for p in parts]  # no orphan tar
    assert any(p.name.startswith(".tmp-") for p in shard_dir.iterdir())  # the interrupted shard stayed hidden
    for name, data in visible.items():  # what is visible is complete: every member reads back
        assert data == _visible(clean)[name]
    # Resume: the finished keys are skipped, new shards continue the numbering, the result is the clean run's.
    done = {r["key"] for p in ShardSet(Storage(killed), "shards/v", MAX_BYTES).parts().values() for r in p["rows"]}
    rest = (it for it in _items(12) if it.row["key"] not in done)
    list(ShardSet(Storage(killed), "shards/v", MAX_BYTES).write("train", rest))
    assert _visible(killed) == _visible(clean)
    assert Storage(killed).sweep_tmp("shards/v", min_age_s=0) == 1


def test_is_lossless_tells_the_stored_views_encoding():
    from flux3d.shards.format import encode_image, is_lossless

    rgba = np.random.default_rng(0).integers(0, 256, (32, 32, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[:8, :8, 3] = 0  # with transparency: lossy views then carry an ALPH chunk before their VP8 one
    for opaque in (False, True):
        img = rgba.copy()
        if opaque:
            img[..., 3] = 255
        assert is_lossless(encode_image(img, 100)) and not is_lossless(encode_image(img, 95))
    with pytest.raises(ValueError, match="not a WebP"):
        is_lossless(b"\x89PNG\r\n\x1a\n" + bytes(20))

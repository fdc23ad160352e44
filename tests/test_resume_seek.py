"""A resume's seek (data.make_dataset(skip_batches=...)): the resumed stream equals the uninterrupted one from the
seek on, and the skipped samples' images are never decoded."""

from __future__ import annotations

import pytest

from flux3d.training import data, samples


@pytest.fixture(scope="module")
def seek_ds(synthetic_shards):
    return synthetic_shards(6, views=4, resolution=16, voxels=16, supervision_views=4, cond_views=1,
                            cond_resolution=16)


def _keys(ds, **kw) -> list[list[str]]:
    urls = data.shard_urls(ds.version_dir, "train")
    stream = data.make_dataset(urls, resampled=True, seed=3, epoch_samples=6, shuffle_buffer=4, **kw)
    it = iter(stream)
    epochs = [[b.keys for b in it]]  # the resumed epoch to its end, then one more: the seek is per start epoch
    epochs.append([b.keys for b in iter(stream)])
    return epochs


@pytest.mark.parametrize("batching", [{"batch_size": 2}, {"batch_size": 3, "token_budget": "two"}])
def test_the_seek_replays_the_stream_without_decoding_what_it_skips(seek_ds, monkeypatch, batching):
    import pyarrow.parquet as pq

    voxels = sorted(pq.read_table(f"{seek_ds.version_dir}/index.parquet")["num_voxels"].to_pylist())
    # "two": a budget that the two largest assets together pass, so batches close on tokens as well as counts
    kw = {k: voxels[-1] + voxels[-2] - 1 if v == "two" else v for k, v in batching.items()}
    decoded: list[int] = []
    real = samples.decode_image
    monkeypatch.setattr(samples, "decode_image", lambda b: decoded.append(1) or real(b))
    straight = _keys(seek_ds, start_epoch=1, **kw)
    assert len(straight[0]) >= 3
    per_sample = len(decoded) / sum(len(k) for k in straight[0] + straight[1])  # supervision view (+ cond image)
    assert per_sample >= 1
    for skip in (1, 2, len(straight[0])):
        decoded.clear()
        resumed = _keys(seek_ds, start_epoch=1, skip_batches=skip, **kw)
        assert resumed[0] == straight[0][skip:] and resumed[1] == straight[1]
        # as many images as the samples yielded need; none for the skipped ones
        assert len(decoded) == per_sample * sum(len(k) for k in resumed[0] + resumed[1])

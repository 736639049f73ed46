"""Tar-shard indexes kept between runs: a second open reads no tar header, a changed shard is indexed again, and the
cached index gives the same samples as a fresh one (bad members included)."""

import os

import pytest

from ldm_jax.data import sources

import own_data


@pytest.fixture
def wds(tmp_path, monkeypatch):
    monkeypatch.setenv(sources.INDEX_CACHE_ENV, str(tmp_path / "index"))
    return own_data.write_webdataset(str(tmp_path / "wds"))


def _samples(source):
    return [(k, dict(m), e) for _, k, m, e in source.index]


def test_a_second_open_reads_the_index_cache_and_gives_the_same_samples(wds, tmp_path, monkeypatch):
    fresh = sources.open_source(wds["spec"])
    assert len(os.listdir(tmp_path / "index")) == 3  # one entry per shard
    calls = []
    real = sources._index_tar
    monkeypatch.setattr(sources, "_index_tar", lambda *a: calls.append(a) or real(*a))
    again = sources.open_source(wds["spec"])
    assert calls == []  # no shard was read
    assert _samples(again) == _samples(fresh)
    assert [again[i] for i in range(len(again))] == [fresh[i] for i in range(len(fresh))]
    assert dict((k, e) for _, k, _, e in again.index if e) == {own_data.WDS_TRUNCATED: "truncated"}
    # A shard rewritten since (new mtime) is indexed again; the others still come from the cache.
    path = wds["pattern"].replace("{00000..00002}", "00001")
    os.utime(path, ns=(1, 1))
    sources.open_source(wds["spec"])
    assert [os.path.basename(a[2]) for a in calls] == ["00001.tar"]


def test_the_index_cache_can_be_switched_off(wds, tmp_path, monkeypatch):
    monkeypatch.setenv(sources.INDEX_CACHE_ENV, "off")
    sources.open_source(wds["spec"])
    assert not os.path.exists(tmp_path / "index") and not os.path.exists("off")

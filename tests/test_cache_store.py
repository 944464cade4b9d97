"""The feature cache's storage: safetensors entries (round trip, atomic, damaged files read as missing),
per-rank manifests, the cache folder check, the media-hash memo and the model fingerprint."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from fantasytalk_cli.cache.fingerprint import MediaHashes, model_fingerprint
from fantasytalk_cli.cache.store import CACHE_FORMAT, CACHE_VERSION, CacheError, CacheStore
from fantasytalk_cli.errors import FtalkError
from fantasytalk_cli.fileio import file_sha256

KEY = "ab" + "0" * 62
OTHER = "cd" + "1" * 62


def _tensors() -> dict[str, torch.Tensor]:
    return {
        "latents": torch.randn(4, 3, 5).transpose(0, 2),  # not contiguous
        "mask": torch.tensor([True, False]),
        "emb": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3),
    }


def test_round_trip_keeps_tensors_and_metadata(tmp_path: Path) -> None:
    store = CacheStore(tmp_path / "cache")
    tensors = _tensors()
    path = store.write("video", KEY, tensors, {"model": "wan"})
    assert path == tmp_path / "cache" / "video" / "ab" / f"{KEY}.safetensors" == store.path("video", KEY)
    got = store.read("video", KEY)
    assert got is not None and set(got) == set(tensors)
    for name, tensor in tensors.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor)
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        meta = handle.metadata()
    assert meta == {"model": "wan", "format": CACHE_FORMAT, "version": str(CACHE_VERSION), "kind": "video", "key": KEY}
    assert store.corrupt == []
    assert json.loads((tmp_path / "cache" / "cache.json").read_text()) == {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
    }


def test_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    store = CacheStore(tmp_path)
    path = store.write("audio", KEY, {"x": torch.ones(3)}, {})
    store.write("audio", KEY, {"x": torch.zeros(3)}, {})  # a rewrite replaces the file
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    got = store.read("audio", KEY)
    assert got is not None and torch.equal(got["x"], torch.zeros(3))


def test_reserved_meta_and_bad_keys_are_refused(tmp_path: Path) -> None:
    store = CacheStore(tmp_path)
    with pytest.raises(ValueError, match="reserved"):
        store.write("text", KEY, {"x": torch.ones(1)}, {"key": "x"})
    with pytest.raises(ValueError, match="kind"):
        store.path("image", KEY)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="hex"):
        store.path("text", "../x")


def test_damaged_entries_read_as_missing_and_are_listed(tmp_path: Path) -> None:
    store = CacheStore(tmp_path)
    assert store.read("text", KEY) is None and store.corrupt == []  # missing is not damaged
    truncated = store.write("text", KEY, {"x": torch.randn(64, 64)}, {})
    truncated.write_bytes(truncated.read_bytes()[:-100])
    other = store.write("text", OTHER, {"x": torch.ones(2)}, {})
    wrong_key = store.path("audio", OTHER)
    wrong_key.parent.mkdir(parents=True)
    wrong_key.write_bytes(other.read_bytes())  # right key, wrong kind
    moved = store.path("text", "cd" + "2" * 62)
    moved.write_bytes(other.read_bytes())  # a text entry under another key

    assert store.read("text", KEY) is None
    assert store.read("audio", OTHER) is None
    assert store.read("text", "cd" + "2" * 62) is None
    assert store.read("text", OTHER) is not None
    assert len(store.corrupt) == 3
    assert store.corrupt[0].startswith(f"{truncated}: unreadable")
    assert store.corrupt[1].startswith(f"{wrong_key}: kind 'text'")
    assert store.corrupt[2].startswith(f"{moved}: key ")


def test_has_looks_only_for_the_file(tmp_path: Path) -> None:
    store = CacheStore(tmp_path)
    assert not store.has("video", KEY)
    store.write("video", KEY, {"x": torch.ones(1)}, {})
    assert store.has("video", KEY) and not store.has("text", KEY) and not store.has("video", OTHER)


def test_manifests_of_two_ranks_merge_and_a_torn_line_is_skipped(tmp_path: Path) -> None:
    store = CacheStore(tmp_path)
    store.record("rank0", {"kind": "text", "key": KEY, "entry": 0})
    store.record("rank1", {"kind": "text", "key": OTHER, "entry": 1})
    with open(tmp_path / "manifest-rank1.jsonl", "a") as handle:
        handle.write('{"kind": "audio", "ke')  # a rank killed mid-line
    assert [r["entry"] for r in store.manifest()] == [0, 1]
    store.record("rank1", {"kind": "audio", "key": OTHER, "entry": 2})  # appended after the torn line
    assert [r["entry"] for r in CacheStore(tmp_path).manifest()] == [0, 1, 2]


def test_a_folder_that_is_not_a_cache_is_refused_untouched(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "clip.mp4").write_bytes(b"video")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(CacheError, match=r"not a feature cache.*--cache_dir") as err:
        CacheStore(tmp_path)
    assert str(tmp_path) in str(err.value)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_another_cache_version_is_refused(tmp_path: Path) -> None:
    CacheStore(tmp_path / "c")
    (tmp_path / "c" / "cache.json").write_text(json.dumps({"format": CACHE_FORMAT, "version": CACHE_VERSION + 1}))
    with pytest.raises(CacheError, match=r"version 2.*--cache_dir"):
        CacheStore(tmp_path / "c")
    empty = tmp_path / "empty"
    empty.mkdir()
    CacheStore(empty)  # an empty folder becomes a cache
    CacheStore(empty)  # and is accepted again
    assert (empty / "cache.json").is_file()


def test_media_hashes_reuse_the_memo_across_instances(tmp_path: Path) -> None:
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"frames" * 1000)
    memo = tmp_path / "memo"
    first = MediaHashes(memo, writer_name="rank0")
    assert first.sha256(clip) == file_sha256(clip) and first.sha256(clip) == file_sha256(clip)
    assert (first.hashed, first.reused) == (1, 1)
    line = json.loads((memo / "media-hashes-rank0.jsonl").read_text())
    assert line["path"] == str(clip.resolve()) and line["size"] == clip.stat().st_size

    second = MediaHashes(memo, writer_name="rank1")
    assert second.sha256(clip) == file_sha256(clip)
    assert (second.hashed, second.reused, second.skipped_lines) == (0, 1, 0)
    assert not (memo / "media-hashes-rank1.jsonl").exists()


def test_media_hashes_rehash_a_changed_file(tmp_path: Path) -> None:
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"aaaa")
    MediaHashes(tmp_path / "memo", writer_name="w").sha256(clip)
    stat = clip.stat()
    clip.write_bytes(b"bbbb")  # same size, other bytes: the mtime tells
    os.utime(clip, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    again = MediaHashes(tmp_path / "memo", writer_name="w")
    assert again.sha256(clip) == file_sha256(clip) and again.hashed == 1
    mtime = clip.stat().st_mtime_ns
    clip.write_bytes(b"ccccc")  # another size, same mtime: the size tells
    os.utime(clip, ns=(mtime, mtime))
    third = MediaHashes(tmp_path / "memo", writer_name="w")
    assert third.sha256(clip) == file_sha256(clip) and (third.hashed, third.reused) == (1, 0)


def test_media_hashes_skip_a_torn_line(tmp_path: Path) -> None:
    a, b = tmp_path / "a.wav", tmp_path / "b.wav"
    a.write_bytes(b"a")
    b.write_bytes(b"b")
    memo = tmp_path / "memo"
    MediaHashes(memo, writer_name="w").sha256(a)
    with open(memo / "media-hashes-w.jsonl", "a") as handle:
        handle.write('{"path": "/x", "size": 1, "mtime_ns": 2, "sha2')  # killed mid-line
    (memo / "media-hashes-other.jsonl").write_text('{"path": "/y", "size": "1"}\nnot json\n')
    hashes = MediaHashes(memo, writer_name="w")
    assert hashes.skipped_lines == 3
    assert hashes.sha256(a) == file_sha256(a) and hashes.reused == 1
    hashes.sha256(b)  # appended after the torn line, on a line of its own
    later = MediaHashes(memo, writer_name="w")
    assert later.sha256(b) == file_sha256(b) and (later.reused, later.skipped_lines) == (1, 3)


def test_model_fingerprint_follows_head_tail_size_and_files(tmp_path: Path) -> None:
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    weights = model / "sub" / "weights.safetensors"
    data = bytearray(os.urandom(3 << 20))
    weights.write_bytes(bytes(data))
    (model / "config.json").write_text("{}")
    base = model_fingerprint([model])
    assert model_fingerprint([model / "config.json", weights]) == base  # the same files named one by one

    data[100] ^= 0xFF  # a byte in the first MiB
    weights.write_bytes(bytes(data))
    head_changed = model_fingerprint([model])
    assert head_changed != base

    data[(3 << 20) // 2] ^= 0xFF  # a byte in the middle is not read: the fingerprint is cheap by design
    weights.write_bytes(bytes(data))
    assert model_fingerprint([model]) == head_changed

    (model / "sub" / "extra.bin").write_bytes(b"x")
    added = model_fingerprint([model])
    assert added != head_changed

    (model / ".cache").mkdir()
    (model / ".cache" / "download.lock").write_text("t")  # hidden bookkeeping does not count
    moved = tmp_path / "elsewhere"
    os.rename(model, moved)  # nor does where the model folder lives
    assert model_fingerprint([moved]) == added


def test_model_fingerprint_names_a_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FtalkError, match="does not exist"):
        model_fingerprint([tmp_path / "nope"])

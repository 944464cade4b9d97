"""`ftalk validate-metadata` on a generated corpus of broken clips: every case yields exactly its code(s), a clean
set yields none, the clean output carries probe facts, and a re-run opens no decoder."""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import soundfile as sf
import yaml
from typer.testing import CliRunner

from fantasytalk_cli.cli import app
from fantasytalk_cli.config.schema import BucketConfig, DataConfig
from fantasytalk_cli.data import probe
from fantasytalk_cli.data.captions import TokenCounter
from fantasytalk_cli.data.findings import CODES
from fantasytalk_cli.data.metadata import load_entries
from fantasytalk_cli.data.metadata_write import write_entries_atomic
from fantasytalk_cli.data.probing import CACHE_NAME
from fantasytalk_cli.data.synthetic import write_talking_clip
from fantasytalk_cli.data.validate import (
    ValidateOptions,
    ValidateUsageError,
    validate_metadata,
)

BUCKETS = BucketConfig(video_sample_size=64, video_sample_n_frames=17)
SMALL_FLAGS = ["--video_sample_size", "64", "--video_sample_n_frames", "17"]
LONG_CAPTION = " ".join(["word"] * 600)


# ---------------------------------------------------------------------------------------------- corpus helpers


def clip(root: Path, name: str, *, size: int = 64, fps: float = 25, seconds: float = 1.0) -> dict:
    """A tiny talking clip (16 kHz mono audio, seeded by its name so no two are equal) and its metadata entry."""
    seed = zlib.crc32(name.encode())
    write_talking_clip(
        root / f"train/{name}.mp4",
        root / f"wav/{name}.wav",
        width=size,
        height=size,
        fps=fps,
        seconds=seconds,
        seed=seed,
    )
    return {
        "file_path": f"train/{name}.mp4",
        "audio_path": f"wav/{name}.wav",
        "text": f"A person says {name}.",
        "type": "video",
    }


def replace_audio(root: Path, entry: dict, samples: np.ndarray, rate: int, subtype: str = "PCM_16") -> dict:
    sf.write(root / entry["audio_path"], samples, rate, subtype=subtype, format="WAV")
    return entry


def noise(seconds: float, rate: int = 16000, channels: int = 1) -> np.ndarray:
    rng = np.random.default_rng(1)
    shape = (round(seconds * rate), channels) if channels > 1 else (round(seconds * rate),)
    return (0.3 * rng.standard_normal(shape)).astype(np.float32)


def packets(path: Path) -> list[tuple[int, int]]:
    with av.open(str(path)) as container:
        return [(p.pos, p.size) for p in container.demux(container.streams.video[0]) if p.size]


def corrupt(path: Path, pos: int, size: int) -> None:
    """Overwrite one packet (its NAL length prefix included) in place: the file keeps its size and index."""
    data = bytearray(path.read_bytes())
    data[pos : pos + size] = b"\xff" * size
    path.write_bytes(bytes(data))


def halve_mdhd_duration(path: Path) -> None:
    """Make the container claim half the duration it holds (its frames still all decode)."""
    data = bytearray(path.read_bytes())
    at = data.index(b"mdhd")
    assert data[at + 4] == 0  # version 0 box: 32-bit duration at +20
    (duration,) = struct.unpack(">I", data[at + 20 : at + 24])
    data[at + 20 : at + 24] = struct.pack(">I", duration // 2)
    path.write_bytes(bytes(data))


def header_only_mp4(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        container.start_encoding()


Case = tuple[str, Callable[[Path], Any], set[str]]


def build_corpus(root: Path) -> tuple[list[Any], list[set[str]]]:
    """The broken corpus: one entry per case, and the exact codes each must yield."""
    cases: list[tuple[Any, set[str]]] = []

    def add(entry: Any, codes: set[str]) -> None:
        cases.append((entry, codes))

    base = clip(root, "clean0")
    add(base, set())
    add(clip(root, "clean1"), set())
    # video
    e = clip(root, "zero_bytes")
    (root / e["file_path"]).write_bytes(b"")
    add(e, {"E401"})
    e = clip(root, "text_as_mp4")
    (root / e["file_path"]).write_text("this is not a video\n")
    add(e, {"E401"})
    e = clip(root, "truncated", seconds=2)
    data = (root / e["file_path"]).read_bytes()
    (root / e["file_path"]).write_bytes(data[: len(data) * 6 // 10])
    add(e, {"E403"})
    e = clip(root, "bad_last_frame")
    corrupt(root / e["file_path"], *packets(root / e["file_path"])[-1])
    add(e, {"E403"})
    e = clip(root, "bad_first_frame")
    corrupt(root / e["file_path"], *packets(root / e["file_path"])[0])
    add(e, {"E403"})
    e = clip(root, "no_frames")
    header_only_mp4(root / e["file_path"])
    add(e, {"E402"})
    e = clip(root, "claims_half", seconds=2)
    halve_mdhd_duration(root / e["file_path"])
    add(e, {"W404"})
    add(clip(root, "fps300", fps=300, seconds=0.1), {"E405"})
    add(clip(root, "upscaled", size=56), {"W406"})
    add(clip(root, "tiny", size=32), {"E408"})
    add(clip(root, "too_short", seconds=0.5), {"E407"})
    # audio
    add(replace_audio(root, clip(root, "rate8k"), noise(1.0, 8000), 8000), {"I505"})
    add(replace_audio(root, clip(root, "stereo44k"), noise(1.0, 44100, 2), 44100), {"I505", "I506"})
    add(replace_audio(root, clip(root, "half_audio", seconds=2), noise(1.0), 16000), {"E507"})
    add(replace_audio(root, clip(root, "long_audio"), noise(3.0), 16000), {"W508"})
    nan = noise(1.0)
    nan[100:110] = np.nan
    add(replace_audio(root, clip(root, "nan_audio"), nan, 16000, "FLOAT"), {"E503"})
    add(replace_audio(root, clip(root, "silent"), np.zeros(16000, np.float32), 16000), {"W504"})
    add(replace_audio(root, clip(root, "no_samples"), np.zeros(0, np.float32), 16000), {"E502"})
    e = clip(root, "text_as_wav")
    (root / e["audio_path"]).write_text("not audio")
    add(e, {"E501"})
    # text
    add({**clip(root, "empty_caption"), "text": "  "}, {"W601"})
    add({**clip(root, "long_caption"), "text": LONG_CAPTION}, {"W602"})
    # paths
    add(dict(base), {"E303"})
    outside = root.parent / "outside_clip.mp4"
    write_talking_clip(outside, root.parent / "outside_clip.wav", width=64, height=64, fps=25, seconds=1, seed=7)
    add({**base, "file_path": "../../" + root.parent.name + "/outside_clip.mp4"}, {"E302"})
    add({**base, "file_path": "train/nowhere.mp4"}, {"E301"})
    link = root / "train/link_out.mp4"
    link.symlink_to(outside)
    add({**base, "file_path": "train/link_out.mp4"}, {"E302"})  # a symlink out is outside too
    add({**base, "file_path": str(outside)}, {"E302"})  # and so is an absolute path elsewhere
    shutil.copy(root / base["file_path"], root / "train/copy_of_clean0.mp4")
    add({**base, "file_path": "train/copy_of_clean0.mp4"}, {"E304"})
    # schema
    own = clip(root, "schema")
    add({**own, "type": "image"}, {"E205"})
    add({**clip(root, "schema_type"), "type": "audio"}, {"E204"})
    add({k: v for k, v in clip(root, "schema_text").items() if k != "text"}, {"E202"})
    add({**clip(root, "schema_wrong"), "text": 5}, {"E203"})
    add("train/clean0.mp4", {"E201"})
    add({**clip(root, "schema_extra"), "fps": 25}, {"W206"})
    add({k: v for k, v in clip(root, "schema_notype").items() if k != "type"}, {"I208"})
    add({**clip(root, "schema_probe"), "probe": {"width": 64}}, {"W207"})
    entries, expected = zip(*cases, strict=True)
    return list(entries), list(expected)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[set[str]]]:
    root = tmp_path_factory.mktemp("corpus") / "data"
    root.mkdir()
    entries, expected = build_corpus(root)
    meta = root / "metadata_control.json"
    meta.write_text(json.dumps(entries, indent=1), encoding="utf-8")
    return root, meta, expected


@pytest.fixture(scope="module")
def clean_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("clean") / "data"
    root.mkdir()
    entries = [clip(root, f"c{i}", seconds=1 + 0.25 * i) for i in range(4)]
    meta = root / "metadata_control.json"
    write_entries_atomic(meta, entries)
    return root, meta


def codes_by_entry(report_path: Path) -> dict[int, set[str]]:
    report = json.loads(report_path.read_text(encoding="utf-8"))
    return {rec["index"]: {f["code"] for f in rec["findings"]} for rec in report["entries"]}


@pytest.fixture
def count_opens(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Count every decoder/container open of in-process probes (workers=1)."""
    opens: Counter[str] = Counter()
    real = probe.open_decoder

    def counted(kind: str, path: Path) -> Any:
        opens[kind] += 1
        return real(kind, path)  # type: ignore[arg-type]

    monkeypatch.setattr(probe, "open_decoder", counted)
    return opens


# ---------------------------------------------------------------------------------------------- the corpus


def test_every_broken_case_yields_exactly_its_codes(corpus: tuple[Path, Path, list[set[str]]], tmp_path: Path) -> None:
    root, meta, expected = corpus
    assert len({frozenset(c) for c in expected if c}) >= 20
    options = ValidateOptions(json_path=tmp_path / "r.json", workers=1, use_cache=False, hash_duplicates=True)
    report = validate_metadata(DataConfig(train_data_meta=meta, train_data_dir=root), BUCKETS, options)
    got = codes_by_entry(tmp_path / "r.json")
    mismatches = {i: (sorted(want), sorted(got[i])) for i, want in enumerate(expected) if got[i] != want}
    assert not mismatches, mismatches
    assert report.entries == len(expected)
    assert report.clean == sum(not any(c[0] == "E" for c in want) for want in expected)
    assert report.codes == Counter(c for want in expected for c in want)
    assert report.errors > 0 and not report.ok


def test_clean_set_yields_no_finding(clean_set: tuple[Path, Path], tmp_path: Path) -> None:
    root, meta = clean_set
    options = ValidateOptions(json_path=tmp_path / "r.json", workers=1, use_cache=False)
    report = validate_metadata(DataConfig(train_data_meta=meta, train_data_dir=root), BUCKETS, options)
    assert report.ok and not report.codes and report.clean == report.entries == 4
    doc = json.loads((tmp_path / "r.json").read_text())
    assert [rec["probe"]["num_frames"] for rec in doc["entries"]] == [25, 31, 38, 44]
    assert doc["summary"]["errors"] == 0 and doc["file_findings"] == []


def test_thorough_mode_agrees(corpus: tuple[Path, Path, list[set[str]]], tmp_path: Path) -> None:
    """Decoding the real last frame of every clip finds exactly what the fast tail check finds."""
    root, meta, expected = corpus
    options = ValidateOptions(json_path=tmp_path / "r.json", workers=1, use_cache=False, thorough=True)
    validate_metadata(DataConfig(train_data_meta=meta, train_data_dir=root), BUCKETS, options)
    got = codes_by_entry(tmp_path / "r.json")
    assert all(got[i] == want for i, want in enumerate(expected) if "E304" not in want)


@pytest.mark.parametrize(
    ("name", "body", "code"),
    [
        ("m.json", '[{"file_path": "a.mp4", "audio_path": "a.wav",\n "text": "x",, }]', "E102"),
        ("m.csv", 'file_path,audio_path,text\na,b,"unclosed\n', "E102"),
        ("m.json", '{"file_path": "a.mp4"}', "E103"),
        ("m.json", "[]", "E104"),
        ("missing.json", None, "E101"),
    ],
)
def test_file_level_findings(tmp_path: Path, name: str, body: str | None, code: str) -> None:
    meta = tmp_path / name
    if body is not None:
        meta.write_text(body, encoding="utf-8")
    options = ValidateOptions(clean_path=tmp_path / "clean.json", workers=1, use_cache=False)
    report = validate_metadata(DataConfig(train_data_meta=meta), BUCKETS, options)
    assert [f.code for f in report.file_findings] == [code]
    assert set(report.codes) == {code} and not report.ok
    assert not (tmp_path / "clean.json").exists()  # a broken metadata file gives no clean file


def test_byte_order_mark_validates_clean(clean_set: tuple[Path, Path], tmp_path: Path) -> None:
    root, meta = clean_set
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + meta.read_bytes())
    report = validate_metadata(
        DataConfig(train_data_meta=bom, train_data_dir=root), BUCKETS, ValidateOptions(workers=1)
    )
    assert report.ok and not report.codes


# ---------------------------------------------------------------------------------------------- clean output, cache


def test_write_clean_then_revalidate_opens_no_decoder(
    corpus: tuple[Path, Path, list[set[str]]], tmp_path: Path, count_opens: Counter[str]
) -> None:
    root, meta, expected = corpus
    work = tmp_path / "meta"
    work.mkdir()
    shutil.copy(meta, work / "in.json")
    before = (work / "in.json").read_bytes()
    data = DataConfig(train_data_meta=work / "in.json", train_data_dir=root)
    report = validate_metadata(data, BUCKETS, ValidateOptions(clean_path=work / "clean.jsonl", workers=1))
    assert (work / "in.json").read_bytes() == before  # the input is never modified
    assert count_opens["decord"] > 0 and (work / CACHE_NAME).is_file()
    clean = load_entries(work / "clean.jsonl")
    want_clean = [i for i, want in enumerate(expected) if not any(c[0] == "E" for c in want - {"E304"})]
    assert len(clean) == report.clean == len(want_clean)
    assert all(e.probe is not None and e.probe.num_frames > 0 and e.probe.sample_rate > 0 for e in clean)
    assert clean[0].probe.to_dict() == {  # type: ignore[union-attr]
        "width": 64, "height": 64, "num_frames": 25, "fps": 25.0, "audio_duration": 1.0, "sample_rate": 16000,
        "channels": 1,
    }  # fmt: skip

    count_opens.clear()
    again = validate_metadata(
        DataConfig(train_data_meta=work / "clean.jsonl", train_data_dir=root), BUCKETS, ValidateOptions(workers=1)
    )
    assert sum(count_opens.values()) == 0
    assert again.ok and again.probed_files == 0 and again.cache_hits == 2 * len(clean)

    (root / clean[0].file_path).touch()  # a changed file is probed again, and only it
    os.utime(root / clean[0].file_path, ns=(1, 1))
    validate_metadata(
        DataConfig(train_data_meta=work / "clean.jsonl", train_data_dir=root), BUCKETS, ValidateOptions(workers=1)
    )
    assert count_opens["decord"] == 1


@pytest.fixture
def warm_cache(clean_set: tuple[Path, Path], tmp_path: Path, count_opens: Counter[str]) -> tuple[DataConfig, Path]:
    """The clean set validated once into a fresh probe cache; the open counter starts at zero after it."""
    root, meta = clean_set
    cache = tmp_path / "cache.jsonl"
    data = DataConfig(train_data_meta=meta, train_data_dir=root)
    validate_metadata(data, BUCKETS, ValidateOptions(workers=1, cache_path=cache))
    count_opens.clear()
    return data, cache


def test_config_change_reuses_the_cache(warm_cache: tuple[DataConfig, Path], count_opens: Counter[str]) -> None:
    data, cache = warm_cache
    strict = BucketConfig(video_sample_size=64, video_sample_n_frames=33)
    report = validate_metadata(data, strict, ValidateOptions(workers=1, cache_path=cache))
    assert sum(count_opens.values()) == 0
    assert report.codes == Counter({"E407": 2})  # 25 and 31 frames < 33


def test_thorough_run_does_not_reuse_fast_probes(
    warm_cache: tuple[DataConfig, Path], count_opens: Counter[str]
) -> None:
    data, cache = warm_cache
    thorough = validate_metadata(data, BUCKETS, ValidateOptions(workers=1, cache_path=cache, thorough=True))
    assert count_opens["decord"] == 4 and thorough.ok  # every video probed again, the exact way
    count_opens.clear()
    for deep in (True, False):  # a thorough result serves both kinds of run
        validate_metadata(data, BUCKETS, ValidateOptions(workers=1, cache_path=cache, thorough=deep))
    assert sum(count_opens.values()) == 0


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv"])
def test_clean_output_plans_without_opening_media(
    clean_set: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str
) -> None:
    root, meta = clean_set
    clean = tmp_path / f"clean{suffix}"
    result = invoke("--train_data_meta", str(meta), "--train_data_dir", str(root), *SMALL_FLAGS,
                    "--write-clean", str(clean), "--workers", "1")  # fmt: skip
    assert result.exit_code == 0, result.output

    opened: list[str] = []

    def refuse(*args: object, **kwargs: object) -> None:
        opened.append(str(args[:2]))
        raise AssertionError("plan-buckets opened a media file")

    import decord

    monkeypatch.setattr(decord, "VideoReader", refuse)
    for name in ("SoundFile", "read", "info"):
        monkeypatch.setattr(sf, name, refuse)
    monkeypatch.setattr(probe, "open_decoder", refuse)
    planned = CliRunner().invoke(
        app, ["plan-buckets", "--train_data_meta", str(clean), "--train_data_dir", str(root), *SMALL_FLAGS]
    )
    assert planned.exit_code == 0, planned.output
    assert opened == []
    assert "entries 4; trained this epoch 4" in " ".join(planned.output.split())  # every clean entry planned


def test_parallel_probes_keep_input_order(corpus: tuple[Path, Path, list[set[str]]], tmp_path: Path) -> None:
    root, meta, expected = corpus
    options = ValidateOptions(json_path=tmp_path / "r.json", workers=2, chunk_size=3, use_cache=False)
    validate_metadata(DataConfig(train_data_meta=meta, train_data_dir=root), BUCKETS, options)
    got = codes_by_entry(tmp_path / "r.json")
    assert list(got) == list(range(len(expected)))
    assert all(got[i] == want - {"E304"} for i, want in enumerate(expected))  # no --hash-duplicates here


def test_relative_data_dir(clean_set: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    root, meta = clean_set
    monkeypatch.chdir(root)
    data = DataConfig(train_data_meta=Path(meta.name), train_data_dir=Path("."))
    report = validate_metadata(data, BUCKETS, ValidateOptions(workers=1, use_cache=False))
    assert report.ok and not report.codes


def test_worst_entries_are_bounded_and_ranked(corpus: tuple[Path, Path, list[set[str]]]) -> None:
    root, meta, _ = corpus
    options = ValidateOptions(workers=1, use_cache=False, top_n=3)
    report = validate_metadata(DataConfig(train_data_meta=meta, train_data_dir=root), BUCKETS, options)
    assert len(report.worst) == 3
    ranks = [(w.errors, w.warnings) for w in report.worst]
    assert ranks == sorted(ranks, reverse=True) and ranks[0][0] >= 1


def test_usage_errors(clean_set: tuple[Path, Path], tmp_path: Path) -> None:
    root, meta = clean_set
    with pytest.raises(ValidateUsageError, match="--train_data_meta"):
        validate_metadata(DataConfig(), BUCKETS)
    with pytest.raises(ValidateUsageError, match="never modified"):
        validate_metadata(DataConfig(train_data_meta=meta), BUCKETS, ValidateOptions(clean_path=meta))
    with pytest.raises(ValidateUsageError, match="tokenizer"):
        validate_metadata(DataConfig(train_data_meta=meta), BUCKETS, ValidateOptions(tokenizer=tmp_path))


def test_every_code_is_documented() -> None:
    from fantasytalk_cli.data import findings

    for code, (name, fix) in CODES.items():
        assert f"| {code} | {name} |" in (findings.__doc__ or "") and fix


# ---------------------------------------------------------------------------------------------- captions


def test_token_counts_approximate_without_a_tokenizer() -> None:
    counter = TokenCounter(None, None)
    assert not counter.exact and counter.count("one two three") == 4  # ceil(1.3 * 3)
    assert counter.count("你好世界") == 6  # CJK characters count as words


def test_token_counts_with_a_real_tokenizer(tmp_path: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "</s>": 1, "word": 2}
    model = tokenizers.models.WordLevel(vocab, unk_token="[UNK]")
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>")
    fast.save_pretrained(tmp_path / "model" / "tokenizer")
    from_model = TokenCounter(None, tmp_path / "model")  # the diffusers layout's tokenizer/ is found
    assert from_model.exact and from_model.count("word word word") == 3
    assert TokenCounter(tmp_path / "model" / "tokenizer", None).count(LONG_CAPTION) == 600


# ---------------------------------------------------------------------------------------------- the command


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, ["validate-metadata", *args])


def test_cli_exit_0_on_a_clean_set_with_outputs(clean_set: tuple[Path, Path], tmp_path: Path) -> None:
    root, meta = clean_set
    result = invoke(
        "--train_data_meta", str(meta), "--train_data_dir", str(root), *SMALL_FLAGS,
        "--json", str(tmp_path / "r.json"), "--write-clean", str(tmp_path / "clean.csv"), "--workers", "2",
        "--cache", str(tmp_path / "cache.jsonl"),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "4 entries, 4 without errors" in " ".join(result.output.split())
    assert json.loads((tmp_path / "r.json").read_text())["summary"]["clean"] == 4
    assert [e.probe.num_frames for e in load_entries(tmp_path / "clean.csv")] == [25, 31, 38, 44]  # type: ignore[union-attr]


def test_cli_exit_1_on_errors_and_config_file(corpus: tuple[Path, Path, list[set[str]]], tmp_path: Path) -> None:
    root, meta, _ = corpus
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(
        yaml.safe_dump(
            {
                "data": {"train_data_meta": str(meta), "train_data_dir": str(root)},
                "buckets": {"video_sample_size": 64, "video_sample_n_frames": 17},
            }
        )
    )
    result = invoke("--config", str(run_yaml), "--json", str(tmp_path / "r.json"), "--workers", "1", "--no-cache")
    assert result.exit_code == 1, result.output
    assert "E401" in result.output and "worst entries" in result.output
    assert json.loads((tmp_path / "r.json").read_text())["summary"]["errors"] > 0


@pytest.mark.parametrize(
    "args",
    [
        [],  # no metadata
        ["--train_data_meta", "{meta}", "--write-clean", "{meta}"],
        ["--train_data_meta", "{meta}", "--video_sample_n_frames", "16"],  # not 4k+1
        ["--train_data_meta", "{meta}", "--workers", "-1"],
        ["--train_data_meta", "{meta}", "--tokenizer", "{tmp}"],
        ["--train_data_meta", "{meta}", "--json", "{meta}/r.json"],  # a folder that is a file
        ["--train_data_meta", "{meta}", "--write-clean", "{meta}/clean.json"],
    ],
)
def test_cli_exit_2_on_usage_errors(clean_set: tuple[Path, Path], tmp_path: Path, args: list[str]) -> None:
    _, meta = clean_set
    result = invoke(*(a.format(meta=meta, tmp=tmp_path) for a in args))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output

"""The metadata reader/writer: three formats, a BOM, positions in syntax errors, strict entries, atomic writes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fantasytalk_cli.data.metadata import MetadataEntry, load_entries, metadata_hash, resolve_media_path
from fantasytalk_cli.data.metadata_file import MetadataError, count_entries, iter_raw_entries
from fantasytalk_cli.data.metadata_write import EntryWriter, write_entries_atomic
from fantasytalk_cli.data.probe_facts import ProbeFacts

FACTS = ProbeFacts(width=64, height=48, num_frames=25, fps=25.0, audio_duration=1.0, sample_rate=16000, channels=1)


def entry(i: int, **extra: object) -> dict[str, object]:
    return {"file_path": f"train/{i}.mp4", "audio_path": f"wav/{i}.wav", "text": f"clip {i}", "type": "video", **extra}


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv"])
def test_round_trip_keeps_fields_extras_and_probe_facts(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"meta{suffix}"
    entries = [entry(0, probe=FACTS.to_dict(), source="cam A"), entry(1, text='says "hi", then\nleaves')]
    write_entries_atomic(path, entries)
    loaded = load_entries(path)
    assert [e.index for e in loaded] == [0, 1]
    assert loaded[0].probe == FACTS and loaded[1].probe is None
    assert loaded[0].extra == {"source": "cam A"} and loaded[1].extra == {}
    assert loaded[1].text == 'says "hi", then\nleaves'
    assert loaded[0].to_dict()["probe"] == FACTS.to_dict()


def test_csv_probe_facts_are_flat_typed_columns(tmp_path: Path) -> None:
    path = tmp_path / "meta.csv"
    write_entries_atomic(path, [MetadataEntry(0, "a.mp4", "a.wav", "t", probe=FACTS)])
    header = path.read_text(encoding="utf-8").splitlines()[0].split(",")
    assert header[:4] == ["file_path", "audio_path", "text", "type"]
    assert "probe.width" in header and "probe.sample_rate" in header
    facts = load_entries(path)[0].probe
    assert facts == FACTS and isinstance(facts.width, int) and isinstance(facts.fps, float)


@pytest.mark.parametrize(
    ("name", "body"),
    [
        ("m.json", '[{"file_path": "a.mp4", "audio_path": "a.wav", "text": "t", "type": "video"}]'),
        ("m.jsonl", '{"file_path": "a.mp4", "audio_path": "a.wav", "text": "t", "type": "video"}\n'),
        ("m.csv", "file_path,audio_path,text,type\na.mp4,a.wav,t,video\n"),
    ],
)
def test_byte_order_mark_is_accepted(tmp_path: Path, name: str, body: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    (only,) = load_entries(path)
    assert only.file_path == "a.mp4" and only.type == "video"
    assert count_entries(path) == 1


@pytest.mark.parametrize(
    ("name", "body", "line", "column"),
    [
        ("m.json", '[\n  {"file_path": "a.mp4",}\n]', 2, 25),
        ("m.jsonl", json.dumps(entry(0)) + '\n\n{"file_path": }\n', 3, 15),
        ("m.csv", 'file_path,audio_path,text\na,b,"unclosed\n', 2, None),
        ("m.csv", "file_path,audio_path,text\na,b,c\nd,e,f,g\n", 3, None),
    ],
)
def test_syntax_errors_name_line_and_column(
    tmp_path: Path, name: str, body: str, line: int, column: int | None
) -> None:
    path = tmp_path / name
    path.write_text(body, encoding="utf-8")
    with pytest.raises(MetadataError) as caught:
        load_entries(path)
    err = caught.value
    assert (err.code, err.line, err.column) == ("E102", line, column)
    assert str(path) in str(err) and f"line {line}" in str(err) and "fix:" in str(err)


def test_streamed_formats_yield_entries_before_a_syntax_error(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(entry(0)) + "\n" + json.dumps(entry(1)) + "\n{oops\n", encoding="utf-8")
    seen = []
    with pytest.raises(MetadataError, match="line 3"):
        for index, raw in iter_raw_entries(path):
            seen.append((index, raw["file_path"]))
    assert seen == [(0, "train/0.mp4"), (1, "train/1.mp4")]


@pytest.mark.parametrize(
    ("name", "body", "code", "words"),
    [
        ("m.json", '{"entries": [{"file_path": "a"}]}', "E103", "'entries'"),
        ("m.json", "[]", "E104", "empty"),
        ("m.json", "  \n", "E104", "empty"),
        ("m.jsonl", "\n\n", "E104", "no JSON lines"),
        ("m.csv", "file_path,audio_path,text\n", "E104", "no rows"),
    ],
)
def test_file_level_problems(tmp_path: Path, name: str, body: str, code: str, words: str) -> None:
    path = tmp_path / name
    path.write_text(body, encoding="utf-8")
    with pytest.raises(MetadataError) as caught:
        load_entries(path)
    assert caught.value.code == code and words in str(caught.value)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(MetadataError) as caught:
        load_entries(tmp_path / "missing.json")
    assert caught.value.code == "E101" and "--train_data_meta" in str(caught.value)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(MetadataError, match="UTF-8") as caught:
        load_entries(latin)
    assert caught.value.code == "E101"
    with pytest.raises(MetadataError) as caught:
        load_entries(tmp_path)  # a folder
    assert caught.value.code == "E101"


@pytest.mark.parametrize(
    ("raw", "code", "words"),
    [
        ({"audio_path": "a.wav", "text": "t"}, "E202", "`file_path`"),
        ({"file_path": "a.mp4", "audio_path": "a.wav"}, "E202", "`text`"),
        ({"file_path": "a.mp4", "audio_path": 3, "text": "t"}, "E203", "`audio_path` must be a string"),
        ({"file_path": " ", "audio_path": "a.wav", "text": "t"}, "E203", "`file_path` is empty"),
        ({"file_path": "a.mp4", "audio_path": "a.wav", "text": "t", "type": "image"}, "E205", "image"),
        ({"file_path": "a.mp4", "audio_path": "a.wav", "text": "t", "type": "audio"}, "E204", "'audio'"),
        ({"file_path": "a.mp4", "audio_path": "a.wav", "text": "t", "probe": {"width": 1}}, "W207", "lack"),
        (["a.mp4", "a.wav"], "E201", "list"),
    ],
)
def test_load_entries_is_strict_and_names_entry_field_and_fix(
    tmp_path: Path, raw: object, code: str, words: str
) -> None:
    path = tmp_path / "m.json"
    path.write_text(json.dumps([entry(0), raw]), encoding="utf-8")
    with pytest.raises(MetadataError) as caught:
        load_entries(path)
    err = caught.value
    assert err.code == code and err.index == 1 and words in err.message and err.fix
    assert "entry 1" in str(err)


def test_extra_fields_and_missing_type_are_tolerated(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_text(json.dumps([{"file_path": "a.mp4", "audio_path": "a.wav", "text": "", "fps": 25}]))
    (only,) = load_entries(path)
    assert only.type == "video" and only.extra == {"fps": 25} and only.text == ""


def test_resolve_media_path(tmp_path: Path) -> None:
    assert resolve_media_path(tmp_path, "train/a.mp4") == tmp_path / "train/a.mp4"
    assert resolve_media_path(tmp_path, "/abs/a.mp4") == Path("/abs/a.mp4")
    assert resolve_media_path(None, "train/a.mp4") == Path("train/a.mp4")


def test_metadata_hash_is_sha256_of_the_bytes(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    write_entries_atomic(path, [entry(0)])
    assert metadata_hash(path) == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv"])
def test_failed_write_leaves_the_target_untouched(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"m{suffix}"
    path.write_text("original", encoding="utf-8")

    def entries():
        yield entry(0)
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        write_entries_atomic(path, entries())
    assert path.read_text(encoding="utf-8") == "original"
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temp file left


def test_entry_writer_streams_and_counts(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    writer = EntryWriter(path).open()
    for i in range(3):
        writer.write(entry(i))
    assert not path.exists()
    writer.commit()
    assert writer.count == 3 and count_entries(path) == 3


_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(_text, min_size=1, max_size=4), suffix=st.sampled_from([".json", ".jsonl", ".csv"]))
def test_any_caption_round_trips(tmp_path: Path, texts: list[str], suffix: str) -> None:
    path = tmp_path / f"prop{suffix}"
    if suffix == ".csv":  # the csv module normalises a lone CR and newline style inside quoted fields
        texts = [t.replace("\r", "") for t in texts]
    write_entries_atomic(path, [entry(i, text=t) for i, t in enumerate(texts)])
    assert [e.text for e in load_entries(path)] == texts


@pytest.mark.parametrize(
    "body",
    [
        '[{"file_path": "a.mp4", "audio_path": "a.wav", "text": "héllo \\u00e9 日本", "x": {"n": [1, 2.5e3, null]}}]',
        '\ufeff[{"file_path": "a.mp4", "audio_path": "a.wav", "text": ""}, {"text": 1}]',  # BOM, odd entries
        '[{"file_path": "a.mp4", "audio_path": "a.wav", "text": "x", "score": NaN}]',  # only Python's reader
    ],
)
def test_json_list_entries_equal_the_standard_reader(tmp_path: Path, body: str) -> None:
    path = tmp_path / "meta.json"
    path.write_text(body, encoding="utf-8")
    want = json.loads(body.removeprefix("\ufeff"))
    got = list(iter_raw_entries(path))
    assert [i for i, _ in got] == list(range(len(want)))
    assert json.dumps([e for _, e in got]) == json.dumps(want)
    assert count_entries(path) == len(want)


def test_json_list_is_decoded_entry_by_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "meta.json"
    path.write_text(json.dumps([{"file_path": f"{i}.mp4", "audio_path": f"{i}.wav", "text": ""} for i in range(50)]))
    decoded: list[object] = []
    real = json.loads
    monkeypatch.setattr(json, "loads", lambda *a, **k: decoded.append(1) or real(*a, **k))
    entries = iter_raw_entries(path)
    next(entries)
    assert len(decoded) == 1  # the rest of the list stays undecoded until it is reached

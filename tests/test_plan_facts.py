"""`read_plan_facts`, the planning reader of `plan-buckets`: its typed fast path gives exactly what the ordinary
reader (`iter_raw_entries` + `stored_plan_facts`) gives, facts and errors alike, for every kind of line."""

from __future__ import annotations

import codecs
import json
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fantasytalk_cli.data import metadata_facts, metadata_file
from fantasytalk_cli.data.metadata_facts import PLAN_FACT_FIELDS, PlanFacts, read_plan_facts
from fantasytalk_cli.data.metadata_file import MetadataError, iter_raw_entries

PROBE = {"width": 640, "height": 480, "num_frames": 75, "fps": 25.0, "audio_duration": 3.0, "sample_rate": 16000,
         "channels": 1}  # fmt: skip


def line(**probe: object) -> str:
    return json.dumps({"file_path": "a.mp4", "audio_path": "a.wav", "text": "hi", "probe": {**PROBE, **probe}})


LINES = [
    line(),
    line(width=1280, height=720, fps=30),  # an int fps
    line(fps=29.97),
    line(width=512.0),  # a float width: int() takes it, the typed decoder does not
    line(width="512"),  # a string: int() takes it too
    line(width=True),
    line(fps=1e400),  # inf
    json.dumps({"file_path": "b.mp4", "audio_path": "b.wav", "text": "no facts"}),
    json.dumps({"probe": None}),
    json.dumps({"probe": {}}),
    json.dumps({"text": "caf\u00e9 \u4f60\u597d", "probe": PROBE}, ensure_ascii=False),  # UTF-8 text
    '{"text": "\\ud800", "probe": ' + json.dumps(PROBE) + "}",  # a lone surrogate escape (json.loads takes it)
    '{"x": NaN, "probe": ' + json.dumps(PROBE) + "}",  # NaN: json.loads takes it
    "[1, 2]",  # not an object
    "",
    "   ",
]
BAD_LINES = ["{bad", '{"probe": {"width": 1} x', "\udcff"]  # syntax errors; "\udcff" is written as a non-UTF-8 byte


def _ordinary(path: Path) -> PlanFacts:
    facts = PlanFacts()
    for _, raw in iter_raw_entries(path):
        facts.add(raw)
    return facts


def _outcome(read: object, path: Path) -> object:
    try:
        facts = read(path)  # type: ignore[operator]
    except MetadataError as exc:
        return (exc.code, exc.line, exc.column)
    arrays = facts.arrays()
    return ([arrays[name].tolist() for name in PLAN_FACT_FIELDS], [i for i, _ in facts.missing])


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.sampled_from(LINES + BAD_LINES), min_size=0, max_size=12),
    st.sampled_from(["\n", "\r\n", "\r"]),
    st.booleans(),
    st.booleans(),
    st.sampled_from([16, 200, 1 << 20]),
)
def test_fast_path_equals_the_ordinary_reader(
    lines: list[str], end: str, bom: bool, last_end: bool, chunk: int
) -> None:
    text = end.join(lines) + (end if last_end else "")
    data = (codecs.BOM_UTF8 if bom else b"") + text.encode("utf-8", "surrogateescape")
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(metadata_file, "_CHUNK_BYTES", chunk):
        for suffix in (".jsonl", ".json"):
            path = Path(tmp) / f"m{suffix}"
            body = data if suffix == ".jsonl" else b"[" + b",".join(x.encode("utf-8", "surrogateescape")
                                                                     for x in lines if x.strip()) + b"]"  # fmt: skip
            path.write_bytes(body)
            assert _outcome(read_plan_facts, path) == _outcome(_ordinary, path)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([*LINES, "{bad"]), min_size=1, max_size=10), st.sampled_from(["\n", "\r\n", "\r"]))
def test_chunked_json_lines_read_like_a_text_file(lines: list[str], end: str) -> None:
    """The chunked JSON Lines reader gives what iterating the text file (newline="") and `json.loads` give."""
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(metadata_file, "_CHUNK_BYTES", 32):
        path = Path(tmp) / "m.jsonl"
        path.write_text(end.join(lines) + end, encoding="utf-8", newline="")
        expected: list[object] = []
        error = None
        with open(path, encoding="utf-8-sig", newline="") as handle:
            for number, text in enumerate(handle, start=1):
                if not text.strip():
                    continue
                try:
                    expected.append(json.loads(text))
                except json.JSONDecodeError:
                    error = number
                    break
        got: list[object] = []
        try:
            got.extend(raw for _, raw in iter_raw_entries(path))
        except MetadataError as exc:
            assert (exc.code, exc.line) == ("E102" if error else "E104", error)
        assert json.dumps(got) == json.dumps(expected)  # NaN-safe comparison


def test_non_utf8_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_bytes((line() + "\n").encode() * 3 + b'{"text": "\xff"}\n' + (line() + "\n").encode())
    for read in (read_plan_facts, lambda p: list(iter_raw_entries(p))):
        with pytest.raises(MetadataError, match="line 4") as err:
            read(path)
        assert err.value.code == "E101"


def test_facts_and_missing_entries(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join([line(), json.dumps({"text": "none"}), line(width=512.0, fps=30)]) + "\n")
    facts = read_plan_facts(path)
    arrays = facts.arrays()
    assert arrays["width"].tolist() == [640, 0, 512] and arrays["fps"].dtype == np.float64
    assert [i for i, _ in facts.missing] == [1] and facts.missing[0][1] == {"text": "none"}


def test_clean_metadata_takes_the_typed_path(tmp_path: Path) -> None:
    clean = [line(), line(width=1280, height=720, fps=30)] * 50
    (tmp_path / "m.jsonl").write_text("\r\n".join(clean) + "\r\n")
    (tmp_path / "m.json").write_text(json.dumps([json.loads(x) for x in clean], indent=1))
    ordinary = mock.Mock(side_effect=AssertionError("the ordinary reader ran"))
    with (
        mock.patch.object(metadata_facts, "jsonl_entries", ordinary),
        mock.patch.object(metadata_file, "_iter_json", ordinary),
    ):
        for name in ("m.jsonl", "m.json"):
            arrays = read_plan_facts(tmp_path / name).arrays()
            assert arrays["width"].tolist() == [640, 1280] * 50 and arrays["fps"].tolist() == [25.0, 30.0] * 50

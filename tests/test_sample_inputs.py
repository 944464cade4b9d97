"""`ftalk sample`'s input checks: batch files, upstream's geometry, every error path (naming the file and the fix),
all problems at once, notes, and the image resized as upstream resizes it. Tiny files written into tmp_path."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image

from fantasytalk_cli.errors import FtalkUsageError
from fantasytalk_cli.sample.batch_file import read_batch_file
from fantasytalk_cli.sample.geometry import (
    audio_samples_for_frames,
    longest_edge_size,
    max_frames_4k1,
    num_frames_for_audio,
    video_size,
)
from fantasytalk_cli.sample.inputs import (
    CheckedRequest,
    SampleInputError,
    SampleRequest,
    check_request,
    check_requests,
    load_image,
)

SETTINGS = {"image_size": 64, "fps": 23.0, "max_num_frames": 81}


def write_image(path: Path, size: tuple[int, int] = (48, 64), mode: str = "RGB") -> Path:
    rng = np.random.default_rng(0)
    channels = {"RGB": 3, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode).save(path, format="PNG")
    return path


def write_audio(path: Path, seconds: float = 1.0, rate: int = 1000, channels: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, np.zeros((round(seconds * rate), channels), dtype=np.float32), rate, format="WAV")
    return path


def good_request(tmp_path: Path, name: str = "a", **overrides: object) -> SampleRequest:
    """A request that passes every check; `overrides` replace fields (the default files are only written when used)."""
    fields: dict[str, object] = dict(overrides)
    if "image" not in fields:
        fields["image"] = write_image(tmp_path / f"{name}.png")
    if "audio" not in fields:
        fields["audio"] = write_audio(tmp_path / f"{name}.wav")
    fields.setdefault("prompt", "A woman is talking.")
    fields.setdefault("out", tmp_path / "out" / f"{name}.mp4")
    return SampleRequest(**fields)  # type: ignore[arg-type]


def problems_of(exc: pytest.ExceptionInfo[SampleInputError]) -> list[str]:
    return [str(problem) for problem in exc.value.problems]


# ---------------------------------------------------------------------------------------------------- geometry


def test_video_size_matches_upstream() -> None:
    # scale = 512 / 1536; int(1024 * scale) = 341 -> 352; int(1536 * scale) = 512
    assert longest_edge_size(1024, 1536, 512) == (341, 512)
    assert video_size(1024, 1536, 512) == (352, 512)
    assert video_size(1536, 1024, 512) == (512, 352)
    assert video_size(1920, 1080, 512) == (512, 288)
    assert video_size(512, 512, 512) == (512, 512)
    assert video_size(300, 400, 512) == (384, 512)  # scaled up: int(300 * 1.28) = 384
    assert video_size(1000, 1001, 500) == (512, 512)  # (499, 500) -> each up to a multiple of 16
    with pytest.raises(ValueError):
        video_size(0, 10, 512)


def test_num_frames_matches_upstream() -> None:
    # min(int(fps * d // 4) * 4 + 5, max): 23 * 3.0 = 69 -> 17 * 4 + 5 = 73
    assert num_frames_for_audio(3.0, 23, 81) == 73
    assert num_frames_for_audio(2.9, 23, 81) == 69  # 66.7 // 4 = 16 -> 69
    assert num_frames_for_audio(10.0, 23, 81) == 81
    assert num_frames_for_audio(0.0, 23, 81) == 5
    assert num_frames_for_audio(3.0, 25, 81) == 77  # 75 // 4 = 18 -> 77
    assert all((num_frames_for_audio(d / 10, 23, 81) - 1) % 4 == 0 for d in range(0, 100))


def test_max_num_frames_not_4k1_is_rounded_down() -> None:
    assert max_frames_4k1(81) == 81
    assert max_frames_4k1(80) == 77
    assert max_frames_4k1(5) == 5
    assert num_frames_for_audio(10.0, 23, 80) == 77
    with pytest.raises(ValueError):
        num_frames_for_audio(1.0, 23, 4)
    with pytest.raises(ValueError):
        num_frames_for_audio(-1.0, 23, 81)


def test_audio_samples_for_frames() -> None:
    assert audio_samples_for_frames(81, 23) == 56347  # int(81 / 23 * 16000) = int(56347.8...)
    assert audio_samples_for_frames(69, 23) == 48000
    assert audio_samples_for_frames(81, 23, rate=8000) == 28173


# ------------------------------------------------------------------------------------------------- batch files


def test_jsonl_batch_resolves_relative_paths_against_its_folder(tmp_path: Path) -> None:
    batch = tmp_path / "jobs" / "batch.jsonl"
    batch.parent.mkdir()
    lines = [
        {"image": "faces/a.png", "audio": "a.wav", "prompt": "A man is talking.", "out": "out/a.mp4"},
        {"image": str(tmp_path / "b.png"), "audio": "b.wav", "out": "b.mp4"},
        {"image": "c.png", "audio": "c.wav", "prompt": None, "out": "c.mp4"},
    ]
    batch.write_text(json.dumps(lines[0]) + "\n\n" + "\n".join(json.dumps(x) for x in lines[1:]) + "\n")
    requests = read_batch_file(batch, default_prompt="A person is talking.")
    assert [r.image for r in requests] == [batch.parent / "faces/a.png", tmp_path / "b.png", batch.parent / "c.png"]
    assert requests[0].out == batch.parent / "out/a.mp4"
    assert [r.prompt for r in requests] == ["A man is talking.", "A person is talking.", "A person is talking."]
    assert requests[2].origin == f"{batch}, line 4"  # the blank line counts


def test_csv_batch_with_header_and_optional_prompt(tmp_path: Path) -> None:
    batch = tmp_path / "batch.csv"
    batch.write_text(
        'image,audio,prompt,out\na.png, a.wav,"A woman, smiling, is talking.",a.mp4\n\nb.png,b.wav,,b.mp4\n'
    )
    requests = read_batch_file(batch, default_prompt="default")
    assert requests == [
        SampleRequest(tmp_path / "a.png", tmp_path / "a.wav", "A woman, smiling, is talking.", tmp_path / "a.mp4"),
        SampleRequest(tmp_path / "b.png", tmp_path / "b.wav", "default", tmp_path / "b.mp4"),
    ]
    assert requests[1].origin == f"{batch}, line 4"
    # the prompt column is optional
    (tmp_path / "short.csv").write_text("out,image,audio\nx.mp4,x.png,x.wav\n")
    assert read_batch_file(tmp_path / "short.csv", default_prompt="d")[0].prompt == "d"


def test_batch_unknown_format(tmp_path: Path) -> None:
    batch = tmp_path / "batch.json"
    batch.write_text("[]")
    with pytest.raises(SampleInputError) as exc:
        read_batch_file(batch, default_prompt="p")
    assert isinstance(exc.value, FtalkUsageError)
    assert str(batch) in str(exc.value) and ".jsonl" in str(exc.value) and ".csv" in str(exc.value)


def test_batch_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SampleInputError, match="check the batch file path"):
        read_batch_file(tmp_path / "nope.jsonl", default_prompt="p")


@pytest.mark.parametrize("name,text", [("empty.jsonl", ""), ("blank.jsonl", "\n  \n"), ("empty.csv", "")])
def test_batch_empty(tmp_path: Path, name: str, text: str) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(SampleInputError) as exc:
        read_batch_file(tmp_path / name, default_prompt="p")
    assert str(tmp_path / name) in str(exc.value) and "no requests" in str(exc.value) and "fix:" in str(exc.value)


def test_jsonl_batch_reports_every_bad_line_at_once(tmp_path: Path) -> None:
    batch = tmp_path / "batch.jsonl"
    batch.write_text(
        "\n".join(
            [
                '{"image": "a.png", "audio": "a.wav", "out": "a.mp4"}',  # 1 fine
                '{"image": "b.png", "audio": "b.wav" "out": "b.mp4"}',  # 2 malformed
                '{"image": "c.png", "out": "c.mp4"}',  # 3 audio missing
                '{"image": "d.png", "audoi": "d.wav", "out": "d.mp4"}',  # 4 unknown key (and audio missing)
                '{"image": "e.png", "audio": "e.wav", "out": "a.mp4"}',  # 5 same out as line 1
                '["f.png", "f.wav"]',  # 6 not an object
                '{"image": 7, "audio": "g.wav", "out": "g.mp4", "prompt": 3}',  # 7 wrong types
                '{"image": "h.png", "audio": "h.wav", "out": "h.mp4", "out": "i.mp4"}',  # 8 repeated key
            ]
        )
    )
    with pytest.raises(SampleInputError) as exc:
        read_batch_file(batch, default_prompt="p")
    lines = problems_of(exc)
    assert all(line.startswith(f"{batch}, line ") and "fix:" in line for line in lines)
    by_line = {p.line: p for p in exc.value.problems}
    assert "not valid JSON" in by_line[2].message
    assert by_line[3].field_name == "audio" and "missing" in by_line[3].message
    unknown = [p for p in exc.value.problems if p.line == 4 and p.field_name == "audoi"][0]
    assert "did you mean 'audio'" in unknown.fix and "image, audio, prompt, out" in unknown.fix
    assert by_line[5].field_name == "out" and "line 1" in by_line[5].message
    assert "not an object" in by_line[6].message
    assert {p.field_name for p in exc.value.problems if p.line == 7} == {"image", "prompt"}
    assert "'out'" in by_line[8].message and "more than once" in by_line[8].message
    assert str(exc.value).startswith(f"{len(lines)} problems")


def test_csv_batch_header_problems(tmp_path: Path) -> None:
    batch = tmp_path / "batch.csv"
    batch.write_text("image,sound,out\na.png,a.wav,a.mp4\n")
    with pytest.raises(SampleInputError) as exc:
        read_batch_file(batch, default_prompt="p")
    fields = {p.field_name for p in exc.value.problems}
    assert fields == {"sound", "audio"}  # the unknown column, the missing required one
    assert all(p.line == 1 and p.path == batch for p in exc.value.problems)
    assert "allowed keys are image, audio, prompt, out" in str(exc.value)


def test_csv_batch_row_problems(tmp_path: Path) -> None:
    batch = tmp_path / "batch.csv"
    batch.write_text("image,audio,out\na.png,a.wav\nb.png,,b.mp4\nc.png,c.wav,c.mp4\nd.png,d.wav,./c.mp4\n")
    with pytest.raises(SampleInputError) as exc:
        read_batch_file(batch, default_prompt="p")
    by_line = {p.line: p for p in exc.value.problems}
    assert set(by_line) == {2, 3, 5}
    assert "2 fields but the header has 3" in by_line[2].message
    assert by_line[3].field_name == "audio" and "empty" in by_line[3].message
    assert by_line[5].field_name == "out" and "line 4" in by_line[5].message


# ------------------------------------------------------------------------------------------------------ checks


def test_good_request_is_checked(tmp_path: Path) -> None:
    req = good_request(tmp_path, audio=write_audio(tmp_path / "a.wav", seconds=3.0, rate=8000, channels=2))
    checked = check_request(req, **SETTINGS)
    assert isinstance(checked, CheckedRequest)
    assert checked.request == req
    assert checked.image_wh == (48, 64)
    assert checked.resized_wh == (48, 64)
    assert checked.video_wh == (48, 64)
    assert checked.num_frames == 73 and checked.latent_frames == 19
    assert checked.audio_seconds == pytest.approx(3.0)
    assert (checked.audio_rate, checked.audio_channels) == (8000, 2)
    assert checked.audio_used_seconds == pytest.approx(3.0)  # 73 / 23 = 3.17 s, capped by the audio
    assert checked.notes == []
    assert not req.out.parent.exists()  # checking creates nothing


def test_long_audio_note(tmp_path: Path) -> None:
    req = good_request(tmp_path, audio=write_audio(tmp_path / "long.wav", seconds=9.1))
    checked = check_request(req, image_size=64, fps=23, max_num_frames=81)
    assert checked.num_frames == 81
    assert checked.audio_used_seconds == pytest.approx(81 / 23)
    assert checked.notes == ["audio is 9.1 s; only the first 3.52 s are used (max_num_frames 81 at 23 fps)"]
    rounded = check_request(req, image_size=64, fps=23, max_num_frames=80)
    assert rounded.num_frames == 77
    assert any("max_num_frames 80 is not 4k+1" in note for note in rounded.notes)


def test_image_notes(tmp_path: Path) -> None:
    req = good_request(tmp_path, image=write_image(tmp_path / "rgba.png", size=(40, 50), mode="RGBA"))
    notes = check_request(req, image_size=128, fps=23, max_num_frames=81).notes
    assert any("scaled up to 102x128" in note for note in notes)
    assert any("transparency" in note for note in notes)


def test_image_problems(tmp_path: Path) -> None:
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    cases = {
        "missing.png": "does not exist",
        "folder.png": "is a folder",
        "garbage.png": "Pillow cannot read it",
        "tiny.png": "shorter side must be at least 32 px",
        "strip.png": "smaller than 32 px on a side",
    }
    write_image(tmp_path / "tiny.png", size=(20, 40))
    write_image(tmp_path / "strip.png", size=(400, 32))  # at image_size 64: (64, 5) -> (64, 16)
    for name, expected in cases.items():
        req = good_request(tmp_path, image=tmp_path / name, out=tmp_path / "out" / f"{name}.mp4")
        with pytest.raises(SampleInputError) as exc:
            check_request(req, **SETTINGS)
        (problem,) = exc.value.problems
        assert problem.field_name == "image" and problem.path == tmp_path / name
        assert expected in problem.message, (name, problem)
        assert str(tmp_path / name) in str(exc.value) and "; fix: " in str(exc.value)


def test_audio_problems(tmp_path: Path) -> None:
    (tmp_path / "folder.wav").mkdir()
    (tmp_path / "garbage.wav").write_bytes(b"RIFF nonsense")
    write_audio(tmp_path / "empty.wav", seconds=0.0)
    write_audio(tmp_path / "short.wav", seconds=0.1)  # < 4 / 23 = 0.174 s
    cases = {
        "missing.wav": ("does not exist", "check the path"),
        "folder.wav": ("is a folder", "audio file"),
        "garbage.wav": ("soundfile cannot read it", "ffmpeg"),
        "empty.wav": ("empty", "speech"),
        "short.wav": ("shorter than one latent frame", "at least 0.174 s"),
    }
    for name, (message, fix) in cases.items():
        req = good_request(tmp_path, audio=tmp_path / name, out=tmp_path / "out" / f"{name}.mp4")
        with pytest.raises(SampleInputError) as exc:
            check_request(req, **SETTINGS)
        (problem,) = exc.value.problems
        assert problem.field_name == "audio" and problem.path == tmp_path / name
        assert message in problem.message and fix in problem.fix, (name, problem)
        assert str(tmp_path / name) in str(exc.value)


def test_out_problems(tmp_path: Path) -> None:
    base = good_request(tmp_path)
    (tmp_path / "exists.mp4").write_bytes(b"someone's video")
    (tmp_path / "adir.mp4").mkdir()
    (tmp_path / "afile").write_text("x")
    disguised = write_image(tmp_path / "face.mp4")  # a PNG named .mp4: out == image must still be refused
    cases = [
        (base, tmp_path / "video.avi", "must be an .mp4", "video.mp4"),
        (base, tmp_path / "exists.mp4", "exists", "--overwrite"),
        (base, tmp_path / "adir.mp4", "is a folder", "video.mp4"),
        (base, tmp_path / "afile" / "sub" / "v.mp4", "is not a folder", "inside a folder"),
        (SampleRequest(disguised, base.audio, "p", tmp_path / "x.mp4"), disguised, "image file", "another out"),
    ]
    for req, out, message, fix in cases:
        req = SampleRequest(req.image, req.audio, req.prompt, out)
        with pytest.raises(SampleInputError) as exc:
            check_request(req, **SETTINGS)
        (problem,) = exc.value.problems
        assert problem.field_name == "out" and problem.path == out
        assert message in problem.message and fix in problem.fix, (out, problem)
    assert (tmp_path / "exists.mp4").read_bytes() == b"someone's video"


def test_existing_out_with_overwrite_and_creatable_folder(tmp_path: Path) -> None:
    out = tmp_path / "exists.mp4"
    out.write_bytes(b"old")
    assert check_request(good_request(tmp_path, out=out), **SETTINGS, overwrite=True).request.out == out
    deep = tmp_path / "new" / "deeper" / "v.mp4"
    check_request(good_request(tmp_path, out=deep), **SETTINGS)
    assert not (tmp_path / "new").exists()


def test_out_folder_not_writable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    # os.access is patched rather than the folder's mode: the tests may run as root, who may write anywhere
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == locked else real_access(path, mode))
    with pytest.raises(SampleInputError) as exc:
        check_request(good_request(tmp_path, out=locked / "sub" / "v.mp4"), **SETTINGS)
    (problem,) = exc.value.problems
    assert f"cannot create {locked / 'sub'} in {locked} (permission denied)" in problem.message
    assert "you can write to" in problem.fix


def test_every_problem_of_every_request_at_once(tmp_path: Path) -> None:
    good = good_request(tmp_path, "good")
    bad_image = good_request(tmp_path, "b1", image=tmp_path / "missing.png")
    bad_both = good_request(
        tmp_path, "b2", audio=tmp_path / "missing.wav", out=tmp_path / "b2.mov", origin="batch.jsonl, line 3"
    )
    same_out = good_request(tmp_path, "b3", out=good.out)
    with pytest.raises(SampleInputError) as exc:
        check_requests([good, bad_image, bad_both, same_out], **SETTINGS)
    lines = problems_of(exc)
    assert len(lines) == 4
    assert str(exc.value).startswith("4 problems with the sample inputs")
    assert any(str(tmp_path / "missing.png") in line for line in lines)
    assert any(str(tmp_path / "missing.wav") in line and "[request from batch.jsonl, line 3]" in line for line in lines)
    assert any("b2.mov" in line and ".mp4" in line for line in lines)
    assert any("another request" in line and str(good.out) in line for line in lines)
    assert all("; fix: " in line for line in lines)


def test_out_must_not_replace_another_requests_input(tmp_path: Path) -> None:
    first = good_request(tmp_path, "first", image=write_image(tmp_path / "first.mp4"))  # a PNG named .mp4
    second = good_request(tmp_path, "second", out=first.image, origin="b.csv, line 3")
    with pytest.raises(SampleInputError) as exc:
        check_requests([first, second], **SETTINGS, overwrite=True)
    (problem,) = exc.value.problems
    assert problem.path == first.image and "out is the image of another request" in problem.message
    assert "[request from b.csv, line 3]" in str(problem)
    # the same request twice writes its out twice
    with pytest.raises(SampleInputError, match="writes the same file"):
        check_requests([SampleRequest(first.image, first.audio, "p", tmp_path / "v.mp4")] * 2, **SETTINGS)


def test_settings_problems_all_at_once(tmp_path: Path) -> None:
    with pytest.raises(SampleInputError) as exc:
        check_requests([good_request(tmp_path)], image_size=0, fps=0.0, max_num_frames=3)
    assert [p.field_name for p in exc.value.problems] == ["image_size", "fps", "max_num_frames"]
    with pytest.raises(SampleInputError, match="nothing to sample"):
        check_requests([], **SETTINGS)


# ------------------------------------------------------------------------------------------------------- image


def test_load_image_resizes_as_upstream(tmp_path: Path) -> None:
    path = write_image(tmp_path / "face.png", size=(102, 154))
    checked = check_request(good_request(tmp_path, image=path), **SETTINGS)
    assert checked.resized_wh == (42, 64) and checked.video_wh == (48, 64)
    image = load_image(path, checked.video_wh, image_size=64)
    assert image.shape == (64, 48, 3) and image.dtype == np.uint8
    # upstream: resize_image_by_longest_edge (LANCZOS), then the pipeline's image.resize((w, h)) (Pillow's default)
    upstream = Image.open(path).convert("RGB").resize((42, 64), Image.LANCZOS).resize((48, 64))
    np.testing.assert_array_equal(image, np.asarray(upstream))


def test_load_image_refuses_another_size(tmp_path: Path) -> None:
    path = write_image(tmp_path / "face.png", size=(102, 154))
    with pytest.raises(SampleInputError, match="not the 64x64"):
        load_image(path, (64, 64), image_size=64)
    with pytest.raises(SampleInputError, match="Pillow cannot read it"):
        load_image(tmp_path / "missing.png", (48, 64), image_size=64)

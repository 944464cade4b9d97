"""`ftalk sample`'s videos are named one way: --batch FILE, or --image, --audio and --out together; any other mix
is a usage error (exit 2) before the config loads."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fantasytalk_cli.cli import app
from fantasytalk_cli.errors import FtalkUsageError
from fantasytalk_cli.sample.request import SampleArgs

BOTH = "give either --batch FILE or --image/--audio/--out, not both"
MISSING = "give --image, --audio and --out (or --batch FILE for several videos)"
SETTINGS = {
    "prompt": "A person is talking.",
    "adapter": None,
    "image_size": 512,
    "max_num_frames": 81,
    "fps": 23.0,
    "num_inference_steps": 30,
    "prompt_cfg_scale": 5.0,
    "audio_cfg_scale": 5.0,
    "audio_cfg_end": 1.0,
    "negative_prompt": None,
    "seed": None,
    "strip": None,
    "overwrite": False,
}
CASES = [
    ({"batch": "b.jsonl", "image": "i.png"}, BOTH),
    ({"batch": "b.jsonl", "image": "i.png", "audio": "a.wav", "out": "o.mp4"}, BOTH),
    ({}, MISSING),
    ({"image": "i.png", "audio": "a.wav"}, MISSING),
    ({"out": "o.mp4"}, MISSING),
]


@pytest.mark.parametrize(("given", "message"), CASES)
def test_args_name_the_videos_one_way(given: dict[str, str], message: str) -> None:
    paths = {key: Path(given[key]) if key in given else None for key in ("image", "audio", "out", "batch")}
    with pytest.raises(FtalkUsageError) as caught:
        SampleArgs(**paths, **SETTINGS)  # type: ignore[arg-type]
    assert str(caught.value) == message


@pytest.mark.parametrize(("given", "message"), CASES)
def test_cli_exits_2_before_the_config_loads(given: dict[str, str], message: str, tmp_path: Path) -> None:
    argv = ["sample", "--config", str(tmp_path / "missing.yaml")]
    for key, value in given.items():
        argv += [f"--{key}", str(tmp_path / value)]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2, result.output
    assert message in result.output and "missing.yaml" not in result.output


@pytest.mark.parametrize("given", [{"batch": "b.jsonl"}, {"image": "i.png", "audio": "a.wav", "out": "o.mp4"}])
def test_one_way_is_accepted(given: dict[str, str]) -> None:
    paths = {key: Path(given[key]) if key in given else None for key in ("image", "audio", "out", "batch")}
    args = SampleArgs(**paths, **SETTINGS)  # type: ignore[arg-type]
    assert (args.batch is None) == ("batch" not in given)

"""Findings of `ftalk validate-metadata`: one stable code per check, its severity and its default fix.

The first letter of a code is its severity (E error: the entry is dropped from `--write-clean` and the
exit code is 1; W warning: trains, but probably not as you meant; I info: what training will do for you).
The hundreds say what was checked.

| code | name | what | default fix |
|---|---|---|---|
| E101 | file-unreadable | metadata file missing, unreadable or not UTF-8 | fix the path / save as UTF-8 |
| E102 | syntax-error | JSON / JSON Lines / CSV syntax error (line, column) | fix the file at that position |
| E103 | not-a-list | JSON top level is not a list of entries | wrap the entries in `[...]` |
| E104 | empty | no entries at all | add entries |
| E201 | not-an-object | an entry is not a JSON object | make it `{"file_path": ..., ...}` |
| E202 | missing-field | `file_path`, `audio_path` or `text` absent | add the field |
| E203 | wrong-type | a field has the wrong type or an empty path | use a (non-empty) string |
| E204 | unknown-type | `type` is neither "video" nor "image" | set `"type": "video"` |
| E205 | image-entry | `type` is "image" | FantasyTalking trains on video: remove it |
| W206 | extra-field | a field ftalk does not read (kept in `extra`) | remove it or ignore |
| W207 | bad-probe | stored `probe` facts malformed (ignored, re-probed) | re-run with `--write-clean` |
| I208 | type-missing | no `type`: taken as "video" | add `"type": "video"` |
| E301 | missing-file | video or audio file does not exist / is not a file | fix the path |
| E302 | outside-data-dir | outside the data folder (absolute, `../`, or a symlink out) | move inside, or allow |
| E303 | duplicate-path | same resolved video path as an earlier entry | remove the later entry |
| E304 | duplicate-content | same video bytes as an earlier entry (`--hash-duplicates`) | remove the later entry |
| E401 | video-unreadable | decord cannot open the video | re-encode (ffmpeg -i in -c:v libx264 out.mp4) |
| E402 | video-no-frames | the video has no frames | re-export the clip |
| E403 | video-truncated | the first or the last frame does not decode | re-download / re-encode |
| W404 | frame-count-mismatch | decodable frames differ from the container's claim | re-mux; the decoded count is used |
| E405 | bad-fps | frame rate missing, 0 or above 240 | re-encode with a real frame rate |
| W406 | video-upscaled | smaller than its bucket at the smallest training size (upscaled) | larger clips |
| E407 | too-few-frames | fewer frames than one sample needs (`plan-buckets` drops it) | longer clip, fewer frames |
| E408 | video-too-small | needs more than `max_upscale` to cover its bucket (`plan-buckets` drops it) | larger clips |
| E501 | audio-unreadable | soundfile cannot open the audio | convert to wav (ffmpeg -i in -ar 16000 -ac 1 out.wav) |
| E502 | audio-empty | zero samples | re-export the audio |
| E503 | audio-nonfinite | NaN or infinite samples | re-export the audio |
| W504 | audio-silent | RMS below the silence threshold | check the track |
| I505 | audio-resampled | sample rate is not 16 kHz (resampled when loading) | nothing / pre-resample |
| I506 | audio-downmixed | more than one channel (downmixed to mono) | nothing / pre-downmix |
| E507 | audio-too-short | audio ends before the video beyond the tolerance | re-cut audio and video together |
| W508 | audio-too-long | audio lasts much longer than the video | check the pair belongs together |
| W601 | caption-empty | empty caption: trains as unconditional | write a caption |
| W602 | caption-too-long | more than 512 text tokens: truncated | shorten the caption |
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

Severity = Literal["error", "warning", "info"]

_SEVERITY: dict[str, Severity] = {"E": "error", "W": "warning", "I": "info"}

CODES: dict[str, tuple[str, str]] = {
    # code: (name, default fix)
    "E101": ("file-unreadable", "check the --train_data_meta path and that the file is UTF-8 text"),
    "E102": ("syntax-error", "fix the syntax at the position shown (a JSON/CSV linter shows the context)"),
    "E103": ("not-a-list", 'the file must be a JSON list of entries: [{"file_path": ..., "audio_path": ...}, ...]'),
    "E104": ("empty", "add at least one entry"),
    "E201": ("not-an-object", 'write the entry as {"file_path": ..., "audio_path": ..., "text": ..., "type": "video"}'),
    "E202": ("missing-field", "add the field to the entry"),
    "E203": ("wrong-type", "use a string (paths must not be empty)"),
    "E204": ("unknown-type", 'set "type": "video"'),
    "E205": ("image-entry", "FantasyTalking trains on talking videos with audio: remove image entries"),
    "W206": ("extra-field", "remove the field if it is a typo; ftalk keeps but does not read it"),
    "W207": ("bad-probe", "drop the probe facts or re-run validate-metadata --write-clean to refresh them"),
    "I208": ("type-missing", 'add "type": "video" (the reference trainer treats an entry without type as an image)'),
    "E301": ("missing-file", "fix the path (relative paths are joined to --train_data_dir)"),
    "E302": ("outside-data-dir", "move the file inside the data folder, or pass --allow_outside_data_dir"),
    "E303": ("duplicate-path", "remove the later entry (it would be trained twice as often)"),
    "E304": ("duplicate-content", "remove the later entry (same bytes as an earlier clip)"),
    "E401": ("video-unreadable", "re-encode the clip: ffmpeg -i IN -c:v libx264 -pix_fmt yuv420p OUT.mp4"),
    "E402": ("video-no-frames", "re-export the clip; it holds no video frames"),
    "E403": ("video-truncated", "the file is cut short: re-download or re-encode it"),
    "W404": ("frame-count-mismatch", "re-mux the clip (ffmpeg -i IN -c copy OUT.mp4); training uses the decoded count"),
    "E405": ("bad-fps", "re-encode with a real frame rate: ffmpeg -i IN -r 25 OUT.mp4"),
    "W406": ("video-upscaled", "use larger clips or a smaller --video_sample_size; small clips are upscaled"),
    "E407": ("too-few-frames", "use a longer clip, or lower --video_sample_n_frames / --video_sample_stride"),
    "E408": ("video-too-small", "use larger clips, or lower --video_sample_size or raise --max_upscale"),
    "E501": ("audio-unreadable", "convert the audio: ffmpeg -i IN -ar 16000 -ac 1 OUT.wav"),
    "E502": ("audio-empty", "re-export the audio track; it holds no samples"),
    "E503": ("audio-nonfinite", "re-export the audio; NaN/inf samples poison wav2vec features"),
    "W504": ("audio-silent", "check the audio track belongs to the clip; silence teaches nothing about lips"),
    "I505": ("audio-resampled", "nothing to do; pre-resample to 16 kHz to save loading time"),
    "I506": ("audio-downmixed", "nothing to do; pre-downmix to mono to save loading time"),
    "E507": ("audio-too-short", "cut video and audio to the same span (ffmpeg -shortest)"),
    "W508": ("audio-too-long", "check the audio belongs to this clip; only the video span is used"),
    "W601": ("caption-empty", "write a caption; an empty one trains as the unconditional (dropped) text"),
    "W602": ("caption-too-long", "shorten the caption; the text encoder keeps the first 512 tokens"),
}


def severity_of(code: str) -> Severity:
    """The severity a code's first letter stands for."""
    return _SEVERITY[code[0]]


@dataclass(frozen=True)
class Finding:
    """One problem (or note) about the metadata file or one of its entries."""

    code: str
    message: str
    index: int | None = None
    """Entry index (0-based position in the file); None for file-level findings."""
    path: str | None = None
    """The file concerned (media file or, for file-level findings, the metadata file)."""
    fix: str = ""

    @property
    def name(self) -> str:
        return CODES[self.code][0]

    @property
    def severity(self) -> Severity:
        return severity_of(self.code)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["name"] = self.name
        out["severity"] = self.severity
        return out

    def __str__(self) -> str:
        where = f"entry {self.index}: " if self.index is not None else ""
        return f"{self.code} {self.name}: {where}{self.message} (fix: {self.fix})"


def finding(code: str, message: str, *, index: int | None = None, path: str | None = None, fix: str = "") -> Finding:
    """Build a finding; the fix defaults to the code's own."""
    if code not in CODES:  # a programming error, caught by the tests
        raise KeyError(f"unknown finding code {code}")
    return Finding(code=code, message=message, index=index, path=path, fix=fix or CODES[code][1])

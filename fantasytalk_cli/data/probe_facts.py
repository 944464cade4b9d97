"""What probing a clip found out: the facts `validate-metadata --write-clean` stores with each entry
so that `plan-buckets` and `train` never open the files again to plan."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

PROBE_KEY = "probe"
"""Key under which a clean metadata entry carries its `ProbeFacts` (a JSON object)."""


@dataclass(frozen=True)
class ProbeFacts:
    """Decoded (not container-claimed) facts of one video + audio pair."""

    width: int
    height: int
    num_frames: int
    fps: float
    audio_duration: float
    sample_rate: int
    channels: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProbeFacts:
        """Build from a JSON object; a missing or extra key is a `KeyError`/`TypeError` naming it."""
        names = {f.name for f in fields(cls)}
        missing = names - set(data)
        if missing:
            raise KeyError(f"probe facts lack {sorted(missing)}")
        extra = set(data) - names
        if extra:
            raise TypeError(f"unknown probe facts {sorted(extra)}")
        return cls(**data)

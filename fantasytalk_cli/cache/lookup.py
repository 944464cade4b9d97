"""The feature cache as training reads it: for one sample, the cached text, audio and video entries, or None
(the dataset then computes them online; every miss and every corrupt entry is counted, or refused with
`cache_required`). Picklable for DataLoader workers: the store and the media-hash memo open in each process."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, get_args

import torch

from fantasytalk_cli.cache.fingerprint import MediaHashes
from fantasytalk_cli.cache.keys import EMPTY_CAPTION, CacheSettings, planned_items
from fantasytalk_cli.cache.store import CacheError, CacheStore, Kind
from fantasytalk_cli.config.schema import DataConfig
from fantasytalk_cli.data.buckets import ClipWindow
from fantasytalk_cli.data.dataset import FeaturesRequiredError
from fantasytalk_cli.data.metadata import MetadataEntry, resolve_media_path
from fantasytalk_cli.data.plan import BucketPlan, ClipFacts
from fantasytalk_cli.models.encoders import VIDEO_TENSORS


class CacheMissError(CacheError, FeaturesRequiredError):
    """An entry a `--cache_required` run needs is not in the cache."""


@dataclass
class CacheLookup:
    """Read side of the cache for one run (``settings`` fingerprint the run's model files and precision)."""

    root: Path
    settings: CacheSettings
    required: bool = False
    misses: Counter[str] = field(default_factory=Counter)
    """Entries this process looked for and did not find (or found corrupt), by kind."""

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("store", None)  # each process opens its own
        state.pop("hashes", None)
        return state

    @cached_property
    def store(self) -> CacheStore:
        return CacheStore(self.root)

    @cached_property
    def hashes(self) -> MediaHashes:
        return MediaHashes(self.root, writer_name=f"train-{os.getpid()}")

    def _get(self, kind: str, key: str, what: str) -> dict[str, torch.Tensor] | None:
        found = self.store.read(kind, key)  # type: ignore[arg-type]
        if found is None:
            self.misses[kind] += 1
            if self.required:
                corrupt = f" ({self.store.corrupt[-1]})" if self.store.corrupt else ""
                raise CacheMissError(
                    f"{self.root}: no cached {kind} entry for {what}{corrupt}, and --cache_required is set: run "
                    "`ftalk cache` with this run's flags (same model, precision, buckets, seed, --cache_epochs / "
                    "--fixed_window), or train without --cache_required to compute what is missing online"
                )
        return found

    def text(self, caption: str) -> torch.Tensor | None:
        found = self._get("text", self.settings.text_key(caption), f"the caption {caption[:60]!r}")
        return None if found is None else found["text"]

    def empty_text(self) -> torch.Tensor | None:
        return self.text(EMPTY_CAPTION)

    def audio(self, path: Path, window: ClipWindow) -> torch.Tensor | None:
        key = self.settings.audio_key(self.hashes.sha256(path), window)
        found = self._get("audio", key, f"{path} from frame {window.start_frame}")
        return None if found is None else found["audio"]

    def video(self, path: Path, window: ClipWindow, height: int, width: int) -> dict[str, torch.Tensor] | None:
        key = self.settings.video_key(self.hashes.sha256(path), window, height, width)
        found = self._get("video", key, f"{path} from frame {window.start_frame} at {height}x{width}")
        return None if found is None else {name: found[name] for name in VIDEO_TENSORS}


@dataclass(frozen=True)
class Coverage:
    """How much of what a run will train on the cache holds, by kind: (present, needed)."""

    counts: dict[str, tuple[int, int]]
    cropped_batches: bool
    """`random_frame_crop` shortens some batches: those are never cached."""

    def complete(self, kind: str) -> bool:
        present, needed = self.counts[kind]
        return present == needed and (kind == "text" or not self.cropped_batches)

    def whole_kinds(self) -> frozenset[str]:
        """The kinds held for every batch of the run: their encoders need not load (training leaves them unloaded,
        the planner leaves them out of the memory estimate)."""
        return frozenset(kind for kind in get_args(Kind) if self.complete(kind))

    def notes(self) -> list[str]:
        shown = ", ".join(f"{kind} {p}/{n}" for kind, (p, n) in self.counts.items())
        lines = [f"feature cache: {shown} entries of this run present"]
        if self.cropped_batches:
            lines.append("random_frame_crop: the batches it shortens are computed online")
        return lines


def coverage(
    lookup: CacheLookup,
    entries: Sequence[MetadataEntry],
    facts: ClipFacts,
    plan: BucketPlan,
    *,
    seed: int,
    data: DataConfig,
    epochs: int,
) -> Coverage:
    """Count the entries the run's first ``epochs`` epochs need and the cache holds (file present; a corrupt one
    is found, counted and computed online when read)."""
    root = data.media_root()
    needed = {"text": {EMPTY_CAPTION}, "audio": set(), "video": set()}
    for item in planned_items(facts, plan, seed=seed, data=data, epochs=epochs):
        entry = entries[item.index]
        needed["text"].add(entry.text)
        audio = lookup.hashes.sha256(resolve_media_path(root, entry.audio_path))
        video = lookup.hashes.sha256(resolve_media_path(root, entry.file_path))
        needed["audio"].add(lookup.settings.audio_key(audio, item.window))
        needed["video"].add(lookup.settings.video_key(video, item.window, item.height, item.width))
    keys = {
        "text": {lookup.settings.text_key(caption) for caption in needed["text"]},
        "audio": needed["audio"],
        "video": needed["video"],
    }
    counts = {kind: (sum(lookup.store.has(kind, k) for k in ks), len(ks)) for kind, ks in keys.items()}  # type: ignore[arg-type]
    return Coverage(counts, plan.random_frame_crop)

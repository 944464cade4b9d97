"""`ftalk cache`: compute, once, what training would compute on every step from the frozen encoders, for every
(clip, frame window, bucket) the run can train on (`keys.planned_items`), and store it (`store.CacheStore`).

Under `accelerate launch ... cache` each process takes the clips whose index is its rank modulo the world size;
there is nothing to exchange: entries are content-addressed files, each process appends to its own manifest and
its own media-hash memo, and the readers take the union. An interrupted run resumes: an entry whose file is there
and reads back is not computed again (counted as reused); a corrupt one is recomputed (counted).
"""

from __future__ import annotations

import itertools
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fantasytalk_cli.cache.fingerprint import MediaHashes
from fantasytalk_cli.cache.keys import EMPTY_CAPTION, CacheItem, CacheSettings, cache_settings, planned_items
from fantasytalk_cli.cache.store import RANK_LOCK, CacheError, CacheStore
from fantasytalk_cli.config.schema import FtalkConfig, ModelConfig, TrainConfig
from fantasytalk_cli.config.wan_yaml import load_wan_yaml
from fantasytalk_cli.data.dataset import loader_frames, read_frames, to_model_pixels
from fantasytalk_cli.data.entry_facts import MissingFactsError, with_probe_facts
from fantasytalk_cli.data.metadata import MetadataEntry, load_entries, resolve_media_path
from fantasytalk_cli.data.plan import facts_from_entries, plan_from_metadata
from fantasytalk_cli.locks import hold
from fantasytalk_cli.models.audio import Wav2Vec2Features, read_audio_for_frames
from fantasytalk_cli.models.dit_config import find_wav2vec
from fantasytalk_cli.models.encoders import VIDEO_TENSORS, FrozenEncoders, encode_video, load_frozen_encoders
from fantasytalk_cli.models.paths import check_model_paths
from fantasytalk_cli.runtime.dtypes import DTYPES
from fantasytalk_cli.runtime.world import World


@dataclass
class CacheReport:
    """What one process of `ftalk cache` did."""

    folder: Path
    rank: int
    world_size: int
    items: int
    epochs: int
    fixed_window: bool
    computed: Counter[str] = field(default_factory=Counter)
    reused: Counter[str] = field(default_factory=Counter)
    failed: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    merged: Path | None = None
    """The merged manifest, when this process was the last of its run to finish."""

    def summary(self) -> list[str]:
        kinds = ("text", "audio", "video")
        windows = (
            "epoch 0's window, used every epoch (--fixed_window)"
            if self.fixed_window
            else (
                f"the windows of epochs 0..{self.epochs - 1} (--cache_epochs {self.epochs}; later epochs draw new "
                "windows, computed online unless --fixed_window)"
            )
        )
        lines = [
            f"feature cache {self.folder} (process {self.rank} of {self.world_size}): {self.items} clip windows, "
            f"{windows}",
            "computed: "
            + ", ".join(f"{k} {self.computed[k]}" for k in kinds)
            + "; already there: "
            + ", ".join(f"{k} {self.reused[k]}" for k in kinds)
            + f"; {self.seconds:.1f} s",
        ]
        lines += [f"recomputed a corrupt entry: {c}" for c in self.corrupt]
        lines += [f"failed: {f}" for f in self.failed]
        if self.merged is not None:
            lines.append(f"merged manifest of all {self.world_size} processes: {self.merged}")
        elif self.world_size > 1:
            lines.append("the merged manifest (manifest.json) is written by the last process to finish")
        return lines + [f"note: {n}" for n in self.notes]


def _device(world: World) -> torch.device:
    return torch.device("cuda", world.local_rank) if torch.cuda.is_available() else torch.device("cpu")


class _Encoders:
    """The frozen encoders, loaded on first use only (a resumed run with everything cached loads nothing)."""

    def __init__(self, model: ModelConfig, train: TrainConfig, device: torch.device) -> None:
        self.model, self.train, self.device = model, train, device
        self._frozen: FrozenEncoders | None = None
        self._wav2vec: Wav2Vec2Features | None = None

    @property
    def frozen(self) -> FrozenEncoders:
        if self._frozen is None:
            model, train = self.model, self.train
            assert model.pretrained_model_name_or_path is not None
            self._frozen = load_frozen_encoders(  # as training loads them: the same tensors come out
                model.pretrained_model_name_or_path,
                dtype=DTYPES[train.mixed_precision],
                wan_yaml=load_wan_yaml(model.config_path),
                device=self.device,
                vae_dtype=torch.float32,
            )
        return self._frozen

    @property
    def wav2vec(self) -> Wav2Vec2Features:
        if self._wav2vec is None:
            self._wav2vec = Wav2Vec2Features.from_pretrained(
                find_wav2vec(self.model), device=self.device, dtype=torch.float32
            )
        return self._wav2vec


def build_cache(cfg: FtalkConfig, *, progress: Callable[[int, int], None] | None = None) -> CacheReport:
    """Fill ``cfg.data.cache_dir`` with this process's share (see the module docstring)."""
    data = cfg.data
    if data.cache_dir is None:
        raise CacheError("--cache_dir is required: the folder the feature cache is written to")
    if data.train_data_meta is None:
        raise CacheError("--train_data_meta is required (the metadata file, the one training reads)")
    check_model_paths(cfg.model)
    start = time.perf_counter()
    world = World.from_env()  # the launcher's environment: no process group needed
    store = CacheStore(data.cache_dir)
    # One process per rank: ranks (and separate runs of other ranks) cooperate through atomic entry files and
    # per-rank manifests; a second process of the same rank would interleave this one's manifest: refused.
    with hold(
        data.cache_dir / RANK_LOCK.format(rank=world.dp_rank),
        f"rank {world.dp_rank} of the feature cache {data.cache_dir}",
        "wait for that `ftalk cache` to end or stop it; ranks of one `accelerate launch` share a cache, a second "
        "process of the same rank cannot",
    ):
        store.start_rank(world.dp_rank)
        settings = cache_settings(cfg.model, cfg.train)
        entries = load_entries(data.train_data_meta)
        try:
            notes = with_probe_facts(entries, data, world)
        except MissingFactsError as exc:
            raise CacheError(str(exc)) from exc
        facts = facts_from_entries(entries)
        plan, _, plan_notes = plan_from_metadata(
            data=data, buckets=cfg.buckets, train=cfg.train, metadata_path=data.train_data_meta, facts=facts
        )
        epochs = 1 if data.fixed_window else data.cache_epochs
        items = list(planned_items(facts, plan, seed=cfg.train.seed, data=data, epochs=epochs))
        mine = [item for item in items if item.index % world.dp_size == world.dp_rank]
        report = CacheReport(
            data.cache_dir, world.dp_rank, world.dp_size, len(mine), epochs, data.fixed_window, notes=notes + plan_notes
        )
        if plan.random_frame_crop:
            report.notes.append("random_frame_crop: batches it shortens are not cached (computed online)")
        name = f"rank{world.dp_rank}"
        writer = _Writer(store, settings, MediaHashes(data.cache_dir, writer_name=name),
                         _Encoders(cfg.model, cfg.train, _device(world)), report, name, data.media_root())  # fmt: skip
        if world.main:
            writer.text(EMPTY_CAPTION, None)
        texts_done: set[str] = set()
        workers = data.dataloader_num_workers
        if workers:
            report.notes.append(f"{workers} threads (--dataloader_num_workers) decode and read ahead of the encoders")
        loaded = _read_ahead(mine, lambda item: writer.load(entries[item.index], item), workers)
        for done, (item, media) in enumerate(loaded, start=1):
            entry = entries[item.index]
            try:
                if entry.text not in texts_done:
                    writer.text(entry.text, item.index)
                    texts_done.add(entry.text)
                writer.encode(media)
            except (OSError, RuntimeError, ValueError) as exc:  # one clip's decoder or file error: listed, not fatal
                report.failed.append(f"entry {item.index} ({entry.file_path}): {type(exc).__name__}: {exc}")
            if progress is not None:
                progress(done, len(mine))
        report.corrupt = list(store.corrupt)
        report.merged = store.finish_rank(world.dp_rank, world.dp_size)
        report.seconds = time.perf_counter() - start
        return report


@dataclass
class _Writer:
    """Computes and stores one process's entries: each is skipped when it is there and reads back (counted as
    reused; a corrupt one is recomputed), else computed, written, recorded in this process's manifest, counted."""

    store: CacheStore
    settings: CacheSettings
    hashes: MediaHashes
    encoders: _Encoders
    report: CacheReport
    name: str
    root: Path | None

    def _there(self, kind: str, key: str) -> bool:
        """The entry's file is there and reads back (thread-safe: counts nothing)."""
        return self.store.has(kind, key) and self.store.read(kind, key) is not None  # type: ignore[arg-type]

    def _put(
        self, kind: str, key: str, tensors: dict[str, torch.Tensor], meta: dict[str, str], entry: int | None
    ) -> None:
        path = self.store.write(kind, key, tensors, meta)  # type: ignore[arg-type]
        self.store.record(
            self.name, {"kind": kind, "key": key, "entry": entry, "file": str(path.relative_to(self.store.root))}
        )
        self.report.computed[kind] += 1

    def text(self, caption: str, index: int | None) -> None:
        key = self.settings.text_key(caption)
        if self._there("text", key):
            self.report.reused["text"] += 1
            return
        with torch.no_grad():
            embedding = self.encoders.frozen.text.encode([caption]).cpu()
        self._put("text", key, {"text": embedding}, {"caption": caption}, index)

    def load(self, entry: MetadataEntry, item: CacheItem) -> _Media:
        """The keys of one clip window's audio and video entries, and the media the missing ones need (the audio
        span, the frames as a DataLoader worker hands them to training). Runs in the read-ahead threads; an error
        is kept for `encode` to raise in the main thread, where it is reported against the entry."""
        media = _Media(item)
        try:
            w = item.window
            audio_path = resolve_media_path(self.root, entry.audio_path)
            media.audio_key = self.settings.audio_key(self.hashes.sha256(audio_path), w)
            if not self._there("audio", media.audio_key):
                media.audio = read_audio_for_frames(audio_path, w.start_frame, w.num_frames, w.stride, w.fps)
            video_path = resolve_media_path(self.root, entry.file_path)
            media.video_key = self.settings.video_key(self.hashes.sha256(video_path), w, item.height, item.width)
            if not self._there("video", media.video_key):
                media.frames = loader_frames(read_frames(video_path, w.frame_indices), item.height, item.width)
            media.paths = (str(audio_path), str(video_path))
        except (OSError, RuntimeError, ValueError) as exc:
            media.error = exc
        return media

    def encode(self, media: _Media) -> None:
        """Encode and store what `load` found missing; count what was there."""
        if media.error is not None:
            raise media.error
        item, (audio_path, video_path) = media.item, media.paths
        if media.audio is None:
            self.report.reused["audio"] += 1
        else:
            with torch.no_grad():
                features = self.encoders.wav2vec(media.audio).cpu()
            meta = {"entry": str(item.index), "path": audio_path}
            self._put("audio", media.audio_key, {"audio": features}, meta, item.index)
        if media.frames is None:
            self.report.reused["video"] += 1
            return
        frozen, device = self.encoders.frozen, self.encoders.device
        with torch.no_grad(), frozen.on(device):
            video = encode_video(frozen, to_model_pixels([media.frames], item.height, item.width, device))
        tensors = {name: getattr(video, name).cpu() for name in VIDEO_TENSORS}
        self._put("video", media.video_key, tensors, {"entry": str(item.index), "path": video_path}, item.index)


@dataclass
class _Media:
    """One clip window as `_Writer.load` left it for `_Writer.encode`."""

    item: CacheItem
    audio_key: str = ""
    video_key: str = ""
    audio: np.ndarray | None = None
    """The window's audio at 16 kHz, when its entry is missing."""
    frames: torch.Tensor | None = None
    """The window's frames (`loader_frames`), when its entry is missing."""
    paths: tuple[str, str] = ("", "")
    error: Exception | None = None


def _read_ahead(
    items: Sequence[CacheItem], load: Callable[[CacheItem], _Media], workers: int
) -> Iterator[tuple[CacheItem, _Media]]:
    """``(item, load(item))`` in order; with ``workers`` > 0, loaded by that many threads, at most 2 x workers
    ahead of the consumer (decord, soundfile and hashlib release the GIL while they decode, read and hash), so the
    encoders never wait for a decode that could have run beside them."""
    if workers <= 0:
        for item in items:
            yield item, load(item)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="ftalk-cache-read") as pool:
        upcoming = iter(items)
        pending: deque[tuple[CacheItem, Future[_Media]]] = deque(
            (item, pool.submit(load, item)) for item in itertools.islice(upcoming, 2 * workers)
        )
        while pending:
            item, future = pending.popleft()
            following = next(upcoming, None)
            if following is not None:
                pending.append((following, pool.submit(load, following)))
            yield item, future.result()

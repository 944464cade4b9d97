"""`ftalk cache`: compute, once, what training would compute on every step from the frozen encoders, for every
(clip, frame window, bucket) the run can train on (`keys.planned_items`), and store it (`store.CacheStore`).

Under `accelerate launch ... cache` each process takes the clips whose index is its rank modulo the world size;
there is nothing to exchange: entries are content-addressed files, each process appends to its own manifest and
its own media-hash memo, and the readers take the union. An interrupted run resumes: an entry whose file is there
and reads back is not computed again (counted as reused); a corrupt one is recomputed (counted).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fantasytalk_cli.cache.fingerprint import MediaHashes
from fantasytalk_cli.cache.keys import EMPTY_CAPTION, CacheItem, CacheSettings, cache_settings, planned_items
from fantasytalk_cli.cache.store import CacheError, CacheStore
from fantasytalk_cli.config.schema import FtalkConfig
from fantasytalk_cli.config.wan_yaml import load_wan_yaml
from fantasytalk_cli.data.dataset import read_frames, to_bucket, to_model_pixels
from fantasytalk_cli.data.metadata import MetadataEntry, load_entries, resolve_media_path
from fantasytalk_cli.data.plan import facts_from_entries, plan_from_metadata
from fantasytalk_cli.data.probing import default_cache_path, probe_missing_facts
from fantasytalk_cli.models.audio import Wav2Vec2Features, read_audio_for_frames
from fantasytalk_cli.models.dit_config import find_wav2vec
from fantasytalk_cli.models.encoders import FrozenEncoders, load_frozen_encoders
from fantasytalk_cli.train.model_setup import DTYPES
from fantasytalk_cli.train.preflight import check_model_paths
from fantasytalk_cli.train.step import encode_video


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
        return lines + [f"note: {n}" for n in self.notes]


def _rank() -> tuple[int, int]:
    """This process's rank and the world size, from the launcher's environment (no process group needed)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _entries(cfg: FtalkConfig, world_size: int) -> tuple[list[MetadataEntry], list[str]]:
    assert cfg.data.train_data_meta is not None
    entries = load_entries(cfg.data.train_data_meta)
    lacking = [(e.index, e.file_path, e.audio_path) for e in entries if e.probe is None]
    if not lacking:
        return entries, []
    if world_size > 1:
        raise CacheError(
            f"{cfg.data.train_data_meta}: {len(lacking)} entries lack probe facts; with several processes each would "
            "probe them at once. Run `ftalk validate-metadata ... --write-clean CLEAN.json` and cache from CLEAN.json"
            ", or run `ftalk cache` in one process first"
        )
    filled = probe_missing_facts(lacking, cfg.data.media_root(), default_cache_path(cfg.data.train_data_meta))
    for index, facts in filled.facts.items():
        entries[index] = dataclasses.replace(entries[index], probe=facts)
    return entries, [filled.note()]


class _Encoders:
    """The frozen encoders, loaded on first use only (a resumed run with everything cached loads nothing)."""

    def __init__(self, cfg: FtalkConfig, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self._frozen: FrozenEncoders | None = None
        self._wav2vec: Wav2Vec2Features | None = None

    @property
    def frozen(self) -> FrozenEncoders:
        if self._frozen is None:
            model, train = self.cfg.model, self.cfg.train
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
                find_wav2vec(self.cfg.model), device=self.device, dtype=torch.float32
            )
        return self._wav2vec


def build_cache(
    cfg: FtalkConfig, *, progress: Callable[[int, int], None] | None = None, say: Callable[[str], None] = print
) -> CacheReport:
    """Fill ``cfg.data.cache_dir`` with this process's share (see the module docstring)."""
    data = cfg.data
    if data.cache_dir is None:
        raise CacheError("--cache_dir is required: the folder the feature cache is written to")
    if data.train_data_meta is None:
        raise CacheError("--train_data_meta is required (the metadata file, the one training reads)")
    check_model_paths(cfg.model)
    start = time.perf_counter()
    rank, world = _rank()
    store = CacheStore(data.cache_dir)
    settings = cache_settings(cfg.model, cfg.train)
    entries, notes = _entries(cfg, world)
    facts = facts_from_entries(entries)
    plan, _, plan_notes = plan_from_metadata(
        data=data, buckets=cfg.buckets, train=cfg.train, metadata_path=data.train_data_meta, facts=facts
    )
    epochs = 1 if data.fixed_window else data.cache_epochs
    items = list(planned_items(facts, plan, seed=cfg.train.seed or 0, data=data, epochs=epochs))
    mine = [item for item in items if item.index % world == rank]
    report = CacheReport(data.cache_dir, rank, world, len(mine), epochs, data.fixed_window, notes=notes + plan_notes)
    if plan.random_frame_crop:
        report.notes.append("random_frame_crop: batches it shortens are not cached (computed online)")
    hashes = MediaHashes(data.cache_dir, writer_name=f"rank{rank}")
    encoders = _Encoders(cfg, _device())
    writer = f"rank{rank}"
    if rank == 0:
        _text(store, settings, EMPTY_CAPTION, None, encoders, report, writer)
    texts_done: set[str] = set()
    for done, item in enumerate(mine, start=1):
        entry = entries[item.index]
        try:
            if entry.text not in texts_done:
                _text(store, settings, entry.text, item.index, encoders, report, writer)
                texts_done.add(entry.text)
            _audio(store, settings, entry, item, hashes, encoders, report, writer, data.media_root())
            _video(store, settings, entry, item, hashes, encoders, report, writer, data.media_root())
        except (OSError, RuntimeError, ValueError) as exc:  # one clip's decoder or file error: listed, not fatal
            report.failed.append(f"entry {item.index} ({entry.file_path}): {type(exc).__name__}: {exc}")
        if progress is not None:
            progress(done, len(mine))
    report.corrupt = list(store.corrupt)
    report.seconds = time.perf_counter() - start
    return report


def _cached(store: CacheStore, kind: str, key: str, report: CacheReport) -> bool:
    """The entry is there and reads back (a corrupt one is recomputed)."""
    if store.has(kind, key) and store.read(kind, key) is not None:  # type: ignore[arg-type]
        report.reused[kind] += 1
        return True
    return False


def _text(
    store: CacheStore,
    settings: CacheSettings,
    caption: str,
    index: int | None,
    encoders: _Encoders,
    report: CacheReport,
    writer: str,
) -> None:
    key = settings.text_key(caption)
    if _cached(store, "text", key, report):
        return
    with torch.no_grad():
        embedding = encoders.frozen.text.encode([caption]).cpu()
    path = store.write("text", key, {"text": embedding}, {"caption": caption})
    store.record(writer, {"kind": "text", "key": key, "entry": index, "file": str(path.relative_to(store.root))})
    report.computed["text"] += 1


def _audio(
    store: CacheStore,
    settings: CacheSettings,
    entry: MetadataEntry,
    item: CacheItem,
    hashes: MediaHashes,
    encoders: _Encoders,
    report: CacheReport,
    writer: str,
    root: Path | None,
) -> None:
    path = resolve_media_path(root, entry.audio_path)
    key = settings.audio_key(hashes.sha256(path), item.window)
    if _cached(store, "audio", key, report):
        return
    w = item.window
    clip = read_audio_for_frames(path, w.start_frame, w.num_frames, w.stride, w.fps)
    with torch.no_grad():
        features = encoders.wav2vec(clip).cpu()
    out = store.write("audio", key, {"audio": features}, {"entry": str(item.index), "path": str(path)})
    store.record(writer, {"kind": "audio", "key": key, "entry": item.index, "file": str(out.relative_to(store.root))})
    report.computed["audio"] += 1


def _video(
    store: CacheStore,
    settings: CacheSettings,
    entry: MetadataEntry,
    item: CacheItem,
    hashes: MediaHashes,
    encoders: _Encoders,
    report: CacheReport,
    writer: str,
    root: Path | None,
) -> None:
    path = resolve_media_path(root, entry.file_path)
    key = settings.video_key(hashes.sha256(path), item.window, item.height, item.width)
    if _cached(store, "video", key, report):
        return
    frozen = encoders.frozen
    pixels = to_bucket(read_frames(path, item.window.frame_indices), item.height, item.width)
    with torch.no_grad(), frozen.on(encoders.device):
        video = encode_video(frozen, to_model_pixels(pixels.unsqueeze(0), encoders.device))
    tensors = {name: getattr(video, name).cpu() for name in ("mean", "std", "first", "image")}
    out = store.write("video", key, tensors, {"entry": str(item.index), "path": str(path)})
    store.record(writer, {"kind": "video", "key": key, "entry": item.index, "file": str(out.relative_to(store.root))})
    report.computed["video"] += 1

"""The metadata's entries given their probe facts, as `train` and `cache` need them under one or several processes:
stored ones (`validate-metadata --write-clean`), else the probe cache beside the metadata, else probed now, by one
process only."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

from fantasytalk_cli.config.schema import DataConfig
from fantasytalk_cli.data.metadata import MetadataEntry
from fantasytalk_cli.data.probe_facts import ProbeFacts
from fantasytalk_cli.data.probing import FilledFacts, cached_facts, default_cache_path, probe_missing_facts
from fantasytalk_cli.errors import FtalkError
from fantasytalk_cli.runtime.world import World

Share = Callable[[FilledFacts | None], FilledFacts | None]
"""A collective handing the main process's value to every process (`distributed.share_from_main`)."""


class MissingFactsError(FtalkError):
    """Entries lack probe facts and no process may probe them (several processes without a collective)."""


def with_probe_facts(
    entries: list[MetadataEntry],
    data: DataConfig,
    world: World,
    share: Share | None = None,
    say: Callable[[str], None] = lambda _: None,
) -> list[str]:
    """Give `data.train_data_meta`'s `entries` (as `load_entries` read them) their probe facts, in place; returns
    one note on where missing facts came from.

    One process probes what neither the file nor the probe cache holds (in parallel, written to that cache so the
    next run probes nothing). With several processes: given `share` (training's process group), the main process
    probes and every process receives its facts, so all plan the same; without it (`ftalk cache`, no process
    group), every process reads the probe cache only (each would otherwise probe every file at once) and a gap is
    refused naming `validate-metadata`, which fills the cache."""
    metadata = data.train_data_meta
    assert metadata is not None
    lacking = [(e.index, e.file_path, e.audio_path) for e in entries if e.probe is None]
    if not lacking:
        return []
    probe_cache = default_cache_path(metadata)
    if world.processes > 1 and share is None:
        found = cached_facts(lacking, data.media_root(), probe_cache)
        if len(found) < len(lacking):
            raise MissingFactsError(
                f"{metadata}: {len(lacking) - len(found)} of its entries lack probe facts, in the file and in the "
                f"probe cache {probe_cache}; with several processes each would probe them at once. Run "
                f"`ftalk validate-metadata {metadata}` first (it fills the probe cache), then this command again"
            )
        _fill(entries, found)
        return [f"{len(found)} entries carry no probe facts: all read from the probe cache {probe_cache}"]
    filled: FilledFacts | None = None
    if world.main:
        say(f"reading the probe facts of {len(lacking)} entries (validate-metadata --write-clean stores them)")
        filled = probe_missing_facts(lacking, data.media_root(), probe_cache)
    if share is not None:
        filled = share(filled)
    assert filled is not None
    _fill(entries, filled.facts)
    return [filled.note()]


def _fill(entries: list[MetadataEntry], facts: Mapping[int, ProbeFacts | None]) -> None:
    for index, found in facts.items():
        entries[index] = dataclasses.replace(entries[index], probe=found)

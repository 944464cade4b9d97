"""Caption checks: how many tokens the text encoder (umT5) will see, with the model's real tokenizer where one is
configured, else an approximation; an empty caption or one longer than the encoder reads is a warning."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from fantasytalk_cli.data.findings import Finding, finding
from fantasytalk_cli.errors import FtalkUsageError

MAX_TEXT_TOKENS = 512
"""The text encoder's context (umT5, Wan's `text_len`)."""
WORDS_TO_TOKENS = 1.3
"""Approximate tokens per word (or CJK character) when no tokenizer is configured."""
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af\uf900-\ufaff]")


class TokenizerError(FtalkUsageError):
    """The tokenizer asked for cannot be loaded."""


class TokenCounter:
    """Counts caption tokens with a real tokenizer (transformers, local files only) or approximates them."""

    def __init__(self, tokenizer_dir: Path | None, model_dir: Path | None) -> None:
        self._tok: Any = None
        self.description = f"approximate: {WORDS_TO_TOKENS} x words (CJK characters count as words)"
        candidates: list[tuple[Path, bool]] = []
        if tokenizer_dir is not None:
            candidates.append((Path(tokenizer_dir), True))
        elif model_dir is not None:
            for sub in ("google/umt5-xxl", "tokenizer"):
                if (Path(model_dir) / sub).is_dir():
                    candidates.append((Path(model_dir) / sub, False))
        for folder, required in candidates:
            try:
                from transformers import AutoTokenizer

                self._tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
                self.description = f"tokenizer {folder}"
                break
            except Exception as exc:  # transformers raises many kinds
                if required:
                    raise TokenizerError(
                        f"cannot load a tokenizer from {folder} ({type(exc).__name__}: {str(exc)[:200]}); "
                        "pass a folder holding tokenizer.json / tokenizer_config.json, or drop --tokenizer"
                    ) from exc

    @property
    def exact(self) -> bool:
        return self._tok is not None

    def count(self, text: str) -> int:
        if self._tok is not None:
            return len(self._tok(text, add_special_tokens=True, verbose=False)["input_ids"])
        cjk = len(_CJK.findall(text))
        words = len(_CJK.sub(" ", text).split())
        return math.ceil(WORDS_TO_TOKENS * (words + cjk))


def text_checks(index: int, text: str, counter: TokenCounter, path: str) -> list[Finding]:
    """W601 (empty) and W602 (longer than the text encoder reads) for one caption."""
    if not text.strip():
        return [finding("W601", "the caption is empty", index=index, path=path)]
    tokens = counter.count(text)
    if tokens > MAX_TEXT_TOKENS:
        how = "counted with " + counter.description if counter.exact else counter.description + " (pass --tokenizer)"
        return [finding("W602", f"caption has {tokens} tokens > {MAX_TEXT_TOKENS} ({how})", index=index, path=path)]
    return []

"""What trains (`models/trainable.py`): the planner's trainable count is the real selection on the meta model, for
the default `--trainable_modules` and others; the adapter predicate and the released-file rule."""

from __future__ import annotations

import pytest
import torch

from fantasytalk_cli.models.dims import TINY_CONFIG, WAN21_I2V_14B_CONFIG
from fantasytalk_cli.models.lora import LoraSpec, add_lora
from fantasytalk_cli.models.trainable import (
    DEFAULT_LORA_TARGETS,
    DEFAULT_TRAINABLE_MODULES,
    is_adapter_name,
    released_adapter,
    set_trainable,
    trainable_count,
    trained_patterns,
)
from fantasytalk_cli.models.transformer import FantasyTalkingTransformer
from fantasytalk_cli.models.weights import build_empty
from fantasytalk_cli.planning.memory import estimate_memory

SETTINGS = [
    DEFAULT_TRAINABLE_MODULES,
    ("blocks.0.", "proj_model."),  # a whole block besides the projector
    ("attn1.to_q", "ffn.net.2", "processor."),  # self-attention queries and the FFN's out linear with the audio k/v
]


def _meta_count(config: dict, patterns: tuple[str, ...]) -> int:
    model = build_empty(lambda: FantasyTalkingTransformer(**config))
    set_trainable(model, patterns)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("patterns", SETTINGS, ids=["default", "block0", "q_ffn_audio"])
def test_the_planner_counts_what_trains_on_the_meta_model(patterns: tuple[str, ...]) -> None:
    expected = _meta_count(TINY_CONFIG, patterns)
    assert trainable_count(TINY_CONFIG, patterns) == (expected, 0)
    estimate = estimate_memory(TINY_CONFIG, (64, 64, 5), device="cpu", trainable_modules=patterns)
    terms = {term.name: term for term in estimate.terms}
    assert terms["trainable weights (fp32)"].bytes == expected * 4
    assert terms["AdamW moments (fp32)"].bytes == expected * 8


def test_settings_differ_and_the_14b_default_is_the_released_adapter() -> None:
    counts = {trainable_count(TINY_CONFIG, p)[0] for p in SETTINGS}
    assert len(counts) == len(SETTINGS)
    assert trainable_count(WAN21_I2V_14B_CONFIG)[0] == 840_437_760  # the released fantasytalking_model.ckpt


def test_adapter_predicate_and_released_rule() -> None:
    model = build_empty(lambda: FantasyTalkingTransformer(**TINY_CONFIG))
    names = [n for n, _ in model.named_parameters()]
    adapter = [n for n in names if is_adapter_name(n)]
    assert adapter and all(n.startswith("proj_model.") or ".attn2.processor." in n for n in adapter)
    assert not is_adapter_name("blocks.0.attn2.to_k.weight")
    weights = {n: torch.zeros(1) for n in adapter}
    assert released_adapter(weights) == weights
    assert released_adapter({**weights, "blocks.0.attn1.to_q.weight": torch.zeros(1)}) is None
    assert released_adapter({}) is None


@pytest.mark.parametrize(
    ("rank", "targets"), [(4, DEFAULT_LORA_TARGETS), (8, ("attn1.to_q", "ffn.net.2"))], ids=["default", "q_ffn2"]
)
def test_the_planner_counts_the_lora_as_training_injects_it(rank: int, targets: tuple[str, ...]) -> None:
    """The planner's LoRA count is the requires-grad count of a model with the LoRA training would inject."""
    model = build_empty(lambda: FantasyTalkingTransformer(**TINY_CONFIG))
    add_lora(model, LoraSpec(rank, float(rank), 0.0, targets), seed=0)
    set_trainable(model, trained_patterns(DEFAULT_TRAINABLE_MODULES, rank))
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    adapter, lora = trainable_count(TINY_CONFIG, DEFAULT_TRAINABLE_MODULES, (rank, targets))
    assert adapter + lora == trained and lora > 0
    dims = TINY_CONFIG["num_attention_heads"] * TINY_CONFIG["attention_head_dim"]
    assert lora == TINY_CONFIG["num_layers"] * sum(
        rank * (TINY_CONFIG["ffn_dim"] + dims) if t.startswith("ffn") else rank * 2 * dims for t in targets
    )
    estimate = estimate_memory(
        TINY_CONFIG, (64, 64, 5), device="cpu", trainable_modules=DEFAULT_TRAINABLE_MODULES, lora=(rank, targets)
    )
    terms = {term.name: term for term in estimate.terms}
    assert terms["AdamW moments (fp32)"].bytes == trained * 8
    assert terms["LoRA activations"].bytes > 0

"""The memory estimate: parameter counts from configs, the sharding of each strategy, the shown terms, and
the per-token activation model checked against what autograd really saves in a small Wan block."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fantasytalk_cli.cli import app
from fantasytalk_cli.data.metadata_write import write_entries_atomic
from fantasytalk_cli.models.dims import TINY_CONFIG, WAN21_I2V_14B_CONFIG
from fantasytalk_cli.planning.memory import GB, activation_bytes_per_token_layer, estimate_memory
from fantasytalk_cli.planning.model_size import (
    clip_vision_params,
    encoder_params,
    transformer_params,
    umt5_encoder_params,
    wan_vae_params,
    wav2vec2_params,
)

MANIFESTS = Path(__file__).resolve().parent / "manifests"  # the real checkpoint files' names and shapes
FROZEN_14B, ADAPTER_14B = 16_394_878_784, 840_437_760


def test_14b_parameter_counts_from_dims() -> None:
    assert transformer_params(WAN21_I2V_14B_CONFIG) == (FROZEN_14B, ADAPTER_14B)
    frozen, adapter = transformer_params(TINY_CONFIG)
    assert 0 < adapter < frozen < 10**6


@pytest.mark.parametrize(
    ("manifest", "count"),
    [
        ("diffusers_wan21_i2v_14b_transformer.json", lambda: transformer_params(WAN21_I2V_14B_CONFIG)[0]),
        ("fantasytalking_model_ckpt.json", lambda: transformer_params(WAN21_I2V_14B_CONFIG)[1]),
        ("transformers_umt5_xxl_encoder.json", umt5_encoder_params),
        ("transformers_clip_vit_h14_vision.json", clip_vision_params),
        ("diffusers_wan21_vae.json", wan_vae_params),
        ("transformers_wav2vec2_base_960h.json", wav2vec2_params),
    ],
)
def test_counts_equal_the_real_checkpoints(manifest: str, count: object) -> None:
    tensors = json.loads((MANIFESTS / manifest).read_text())["tensors"]
    assert count() == sum(math.prod(t["shape"]) for t in tensors.values())  # type: ignore[operator]


def test_encoder_counts() -> None:
    enc = encoder_params()
    assert enc["umT5-XXL text encoder"] == 5_680_910_336
    assert sum(enc.values()) == 5_680_910_336 + 632_076_800 + 126_892_531 + 94_371_712


def _term(est: object, prefix: str) -> int:
    return next(t.bytes for t in est.terms if t.name.startswith(prefix))  # type: ignore[attr-defined]


def test_zero2_replicates_33_gb_of_frozen_weights() -> None:
    est = estimate_memory(WAN21_I2V_14B_CONFIG, (512, 512, 81), strategy="zero2", devices=8)
    assert _term(est, "frozen DiT weights") == FROZEN_14B * 2
    text = "\n".join(est.lines())
    assert "32.8 GB, replicated on every GPU (zero2)" in text
    assert "16,394,878,784 params x 2 B (bf16)" in text
    # zero2 shards grads and moments, not the fp32 trainable weights
    assert _term(est, "trainable weights") == ADAPTER_14B * 4
    assert _term(est, "gradients") == ADAPTER_14B * 4 // 8
    assert _term(est, "AdamW") == ADAPTER_14B * 8 // 8


def test_zero3_and_fsdp_shard_everything() -> None:
    for strategy in ("zero3", "fsdp"):
        est = estimate_memory(WAN21_I2V_14B_CONFIG, (512, 512, 81), strategy=strategy, devices=8)  # type: ignore[arg-type]
        assert _term(est, "frozen DiT weights") == FROZEN_14B * 2 // 8
        assert f"/ 8 GPUs, sharded ({strategy})" in "\n".join(est.lines())
        assert _term(est, "trainable weights") == ADAPTER_14B * 4 // 8
        assert _term(est, "gathered blocks") > 0


def test_ddp_replicates_everything_and_keeps_buckets() -> None:
    est = estimate_memory(WAN21_I2V_14B_CONFIG, (512, 512, 81), strategy="ddp", devices=4)
    assert _term(est, "gradients") == ADAPTER_14B * 4 and _term(est, "AdamW") == ADAPTER_14B * 8
    assert _term(est, "DDP gradient buckets") == ADAPTER_14B * 4


def test_terms_respond_to_the_settings() -> None:
    base = dict(strategy="zero2", devices=8)
    shape = (512, 512, 81)
    plain = estimate_memory(WAN21_I2V_14B_CONFIG, shape, **base)  # type: ignore[arg-type]
    ckpt = estimate_memory(WAN21_I2V_14B_CONFIG, shape, gradient_checkpointing=True, **base)  # type: ignore[arg-type]
    assert _term(ckpt, "activations") < _term(plain, "activations") / 10
    low = estimate_memory(WAN21_I2V_14B_CONFIG, shape, low_vram=True, **base)  # type: ignore[arg-type]
    assert _term(low, "frozen encoders") == 0 and _term(plain, "frozen encoders") > 13 * GB
    fp32 = estimate_memory(WAN21_I2V_14B_CONFIG, shape, mixed_precision="no", **base)  # type: ignore[arg-type]
    assert _term(fp32, "frozen DiT weights") == 2 * _term(plain, "frozen DiT weights")
    math_ = estimate_memory(WAN21_I2V_14B_CONFIG, shape, attention_impl="math", **base)  # type: ignore[arg-type]
    assert not any(t.name.startswith("attention probabilities") for t in plain.terms)
    s = 21_504
    assert _term(math_, "attention probabilities") >= 40 * 40 * s * s * 2  # heads x S^2 x bf16 per layer
    small = estimate_memory(WAN21_I2V_14B_CONFIG, (512, 512, 49), attention_impl="math", **base)  # type: ignore[arg-type]
    ratio = _term(math_, "attention probabilities") / _term(small, "attention probabilities")
    assert ratio == pytest.approx((21_504 / 13_312) ** 2, rel=0.05)  # quadratic in tokens
    batch2 = estimate_memory(WAN21_I2V_14B_CONFIG, shape, batch_size=2, **base)  # type: ignore[arg-type]
    assert _term(batch2, "activations") == 2 * _term(plain, "activations")


def test_at_risk_flag() -> None:
    kw = dict(strategy="zero2", devices=8, gradient_checkpointing=True, low_vram=True)
    ok = estimate_memory(WAN21_I2V_14B_CONFIG, (512, 512, 81), capacity_gb=80, **kw)  # type: ignore[arg-type]
    assert not ok.at_risk and 40 * GB < ok.total_bytes < 72 * GB
    tight = estimate_memory(WAN21_I2V_14B_CONFIG, (512, 512, 81), capacity_gb=40, **kw)  # type: ignore[arg-type]
    assert tight.at_risk and any("AT RISK" in line for line in tight.lines())


REAL_VAE_ENCODE_BYTES_PER_PIXEL = (900 + 32 * 96) * 4
"""The estimate's video encode per pixel at the real VAE's base_dim 96, fp32: 15.9 KB (15.7 KB measured on CPU)."""


def test_vae_encode_counts_only_above_the_step() -> None:
    big = estimate_memory(WAN21_I2V_14B_CONFIG, (512, 512, 81), gradient_checkpointing=True)
    assert _term(big, "encode phase") == 0  # the DiT step needs more than the VAE
    tiny = estimate_memory(TINY_CONFIG, (256, 256, 17), mixed_precision="no", device="cpu", encoders={})
    step = sum(_term(tiny, name) for name in ("activations", "backward", "inputs"))
    assert _term(tiny, "encode phase") == REAL_VAE_ENCODE_BYTES_PER_PIXEL * 256 * 256 - step > 0
    assert _term(tiny, "runtime overhead") == int(0.45 * GB) and "replicated on every process" in tiny.lines()[1]


STEP_TERMS = ("activations", "backward working memory", "inputs, context, head, loss")
RESIDENT_TERMS = ("frozen DiT weights", "trainable weights", "gradients", "AdamW moments", "frozen encoders")


def test_encoders_in_their_training_dtypes() -> None:
    est = estimate_memory(WAN21_I2V_14B_CONFIG, (512, 512, 81), strategy="zero2", devices=8)
    # umT5 and CLIP in bf16; the VAE and wav2vec2 stay fp32 (load_training_models)
    assert _term(est, "frozen encoders") == (5_680_910_336 + 632_076_800) * 2 + (126_892_531 + 94_371_712) * 4
    assert "Wan2.1 VAE 0.13B x 4 B" in "\n".join(est.lines())


def test_low_vram_encoders_visit_the_gpu_to_encode() -> None:
    """With low_vram the encoders are in CPU memory between steps but `FrozenEncoders.on` moves umT5, CLIP and
    the VAE onto the GPU together to encode (wav2vec2 stays on the CPU): the peak is the larger phase."""
    kw = dict(strategy="zero2", devices=8, gradient_checkpointing=True)
    moved = (5_680_910_336 + 632_076_800) * 2 + 126_892_531 * 4  # ~13 GB
    for shape in ((512, 512, 17), (512, 512, 81), (1024, 1024, 81)):
        low = estimate_memory(WAN21_I2V_14B_CONFIG, shape, low_vram=True, **kw)  # type: ignore[arg-type]
        resident = sum(_term(low, name) for name in RESIDENT_TERMS) + _term(low, "runtime overhead")
        step = sum(_term(low, name) for name in STEP_TERMS)
        encode = moved + REAL_VAE_ENCODE_BYTES_PER_PIXEL * shape[0] * shape[1]
        assert _term(low, "frozen encoders") == 0
        assert low.total_bytes == resident + max(step, encode)  # max(DiT step, encoders + encode activations)
        formula = next(t.formula for t in low.terms if t.name.startswith("encode phase"))
        assert f"encoders moved to the GPU {moved / GB:.2f} GB (low_vram)" in formula
    small = estimate_memory(WAN21_I2V_14B_CONFIG, (512, 512, 17), low_vram=True, **kw)  # type: ignore[arg-type]
    assert _term(small, "encode phase") > 10 * GB  # the short bucket's step is small: encoding sets the peak
    assert any("encode phase" in note and "low_vram" in note for note in small.notes)
    resident_enc = estimate_memory(WAN21_I2V_14B_CONFIG, (512, 512, 17), **kw)  # type: ignore[arg-type]
    assert resident_enc.total_bytes > small.total_bytes  # low_vram still saves wav2vec2 and the encode overlap
    assert small.total_bytes - (resident_enc.total_bytes - _term(resident_enc, "frozen encoders")) > 12 * GB
    cpu = estimate_memory(TINY_CONFIG, (64, 64, 9), low_vram=True, device="cpu", mixed_precision="no")
    assert _term(cpu, "frozen encoders") > 0  # on the CPU the encoders are always in the process


def test_activation_model_matches_what_autograd_saves() -> None:
    """Count the bytes autograd saves in a small real Wan block (bf16 autocast) against the model."""
    torch = pytest.importorskip("torch")
    from fantasytalk_cli.models.trainable import DEFAULT_TRAINABLE_MODULES, set_trainable
    from fantasytalk_cli.models.transformer import FantasyTalkingTransformer

    cfg = dict(TINY_CONFIG)
    cfg.update(num_attention_heads=4, attention_head_dim=64, ffn_dim=1024, num_layers=3, added_kv_proj_dim=256)
    cfg.update(text_dim=64, image_dim=64, audio_in_dim=64, audio_proj_dim=64)
    torch.manual_seed(0)
    model = FantasyTalkingTransformer(**cfg)
    set_trainable(model, DEFAULT_TRAINABLE_MODULES)
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    current = [-1]
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda mod, args, i=i: current.__setitem__(0, i))

    def saved_in_block_1(side: int, frames: int = 25) -> tuple[int, int]:
        t_lat = (frames - 1) // 4 + 1
        saved: dict[int, tuple[int, int]] = {}

        def pack(t: object) -> object:
            storage = t.untyped_storage()  # type: ignore[attr-defined]
            saved.setdefault(storage.data_ptr(), (current[0], storage.nbytes()))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
            model(
                torch.randn(1, 36, t_lat, side // 8, side // 8),
                torch.tensor([500.0]),
                torch.randn(1, 512, 64),
                torch.randn(1, 257, 64),
                torch.randn(1, 50, 64),
            )
        # block 1 has grads on both sides (block 0's self-attention runs before the first trainable weight)
        return t_lat * (side // 16) ** 2, sum(nbytes for block, nbytes in saved.values() if block == 1)

    (s1, b1), (s2, b2) = saved_in_block_1(128), saved_in_block_1(256)
    per_token = (b2 - b1) / (s2 - s1)  # the slope: per-sample context and weights cancel
    assert per_token == pytest.approx(activation_bytes_per_token_layer(cfg, 2), rel=0.1)


def test_plan_buckets_shows_the_memory_terms(tmp_path: Path) -> None:
    meta = tmp_path / "m.json"
    probe = {"width": 512, "height": 512, "num_frames": 100, "fps": 25.0, "audio_duration": 4.0,
             "sample_rate": 16000, "channels": 1}  # fmt: skip
    write_entries_atomic(meta, [{"file_path": "a.mp4", "audio_path": "a.wav", "text": "", "probe": probe}] * 4)
    args = ["plan-buckets", "--train_data_meta", str(meta), "--video_sample_n_frames", "81"]
    report = tmp_path / "r.json"
    result = CliRunner().invoke(
        app, [*args, "--strategy", "zero2", "--gpus", "8", "--gpu-memory", "80", "--json", str(report)]
    )
    out = result.output
    assert "frozen DiT weights" in out and "32.8 GB, replicated" in out
    for term in ("trainable weights", "gradients", "AdamW", "frozen encoders", "activations", "runtime overhead"):
        assert term in out, term
    formulas = {t["name"]: t["formula"] for t in json.loads(report.read_text())["memory"]["terms"]}
    assert "24*5120 + 8*2*5120 + 2*13824" in formulas["activations (no grad. checkpointing)"]
    assert result.exit_code == 1 and "AT RISK" in out  # no checkpointing, no low_vram: 81 frames do not fit 80 GB
    flags = ["--strategy", "zero3", "--gpus", "8", "--gpu-memory", "80", "--gradient_checkpointing"]
    ok = CliRunner().invoke(app, [*args, *flags, "--json", str(report)])
    assert ok.exit_code == 0, ok.output
    frozen = json.loads(report.read_text())["memory"]["terms"][0]
    assert frozen["bytes"] == FROZEN_14B * 2 // 8 and "/ 8 GPUs, sharded (zero3)" in frozen["formula"]

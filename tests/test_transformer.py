"""FantasyTalkingTransformer: real 14B names and sizes, exact plain-Wan behaviour without audio, the audio formula.

Also the guard for the diffusers internals we build on (see the module docstring of models/transformer.py): a
change in diffusers' Wan block/attention layout, its forward, or its constructor shows up here as a failing
name/shape comparison against the manifest or as an output that no longer equals plain `WanTransformer3DModel`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel

from fantasytalk_cli.models.audio_adapter import AudioContext, audio_windows
from fantasytalk_cli.models.dims import wan_config
from fantasytalk_cli.models.trainable import DEFAULT_TRAINABLE_MODULES as ADAPTER_PATTERNS
from fantasytalk_cli.models.trainable import set_trainable
from fantasytalk_cli.models.transformer import (
    TINY_CONFIG,
    WAN21_I2V_14B_CONFIG,
    AudioAttentionBlock,
    FantasyTalkingTransformer,
    adapter_state_dict,
)

_REPO = Path(__file__).resolve().parents[1]
_MANIFESTS = _REPO / "tests" / "manifests"


def _manifest(name: str) -> dict[str, list[int]]:
    """Tensor name -> shape of one manifest file (tests/manifests: the real checkpoint files' names and shapes)."""
    tensors = json.loads((_MANIFESTS / name).read_text())["tensors"]
    return {key: list(value["shape"]) for key, value in tensors.items()}


def _is_adapter(name: str) -> bool:
    return name.startswith("proj_model.") or ".processor." in name


def _tiny_pair(seed: int = 0) -> tuple[FantasyTalkingTransformer, WanTransformer3DModel]:
    """A tiny FantasyTalking model (zero k/v as built) and plain diffusers Wan with the same base weights."""
    torch.manual_seed(seed)
    model = FantasyTalkingTransformer(**TINY_CONFIG).eval()
    plain = WanTransformer3DModel(**wan_config(TINY_CONFIG)).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not _is_adapter(k)}, strict=True)
    return model, plain


def _randomize_adapter(model: FantasyTalkingTransformer, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if _is_adapter(name):
                offset = 1.0 if name.endswith("norm.weight") else 0.0
                param.copy_(offset + 0.3 * torch.randn(param.shape, generator=generator))


def _inputs(batch: int = 2, latent_frames: int = 3, audio_len: int = 20, seed: int = 0):
    """Wan I2V inputs (36 channels, 4x4 latent -> 4 tokens per latent frame, 512 text + 4 image tokens) + audio."""
    generator = torch.Generator().manual_seed(seed)
    inputs = {
        "hidden_states": torch.randn(batch, 36, latent_frames, 4, 4, generator=generator),
        "timestep": torch.tensor([500.0, 900.0, 100.0, 700.0][:batch]),
        "encoder_hidden_states": torch.randn(batch, 512, TINY_CONFIG["text_dim"], generator=generator),
        "encoder_hidden_states_image": torch.randn(batch, 4, TINY_CONFIG["image_dim"], generator=generator),
    }
    audio = torch.randn(batch, audio_len, TINY_CONFIG["audio_in_dim"], generator=generator)
    return inputs, audio


# --- the real 14B layout (meta device: no memory, no weights) -----------------------------------------------------


def test_14b_adapter_size_and_diffusers_names() -> None:
    with torch.device("meta"):
        model = FantasyTalkingTransformer(**WAN21_I2V_14B_CONFIG)
    assert type(model.blocks[0]).__name__ == "AudioAttentionBlock" and len(model.blocks) == 40
    assert model.config.num_layers == 40 and model.config.audio_in_dim == 768 and model.config.audio_proj_dim == 2048
    assert set_trainable(model, list(ADAPTER_PATTERNS)) == 840_437_760
    assert len(model.trainable_parameter_names(ADAPTER_PATTERNS)) == 83
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 840_437_760

    ours = {name: list(t.shape) for name, t in model.state_dict().items()}
    base = {name: shape for name, shape in ours.items() if not _is_adapter(name)}
    manifest = _manifest("diffusers_wan21_i2v_14b_transformer.json")
    missing, extra = sorted(set(manifest) - set(base)), sorted(set(base) - set(manifest))
    wrong = sorted(n for n in set(manifest) & set(base) if manifest[n] != base[n])
    assert (missing, extra, wrong) == ([], [], []), f"missing {missing[:20]}, extra {extra[:20]}, shape {wrong[:20]}"
    assert len(base) == 1303

    adapter = {name: shape for name, shape in ours.items() if _is_adapter(name)}
    assert adapter == {name: list(t.shape) for name, t in adapter_state_dict(model).items()}
    expected = {"proj_model.proj.weight": [2048, 768], "proj_model.norm.weight": [2048], "proj_model.norm.bias": [2048]}
    for i in range(40):
        for kv in ("k_proj", "v_proj"):
            expected[f"blocks.{i}.attn2.processor.{kv}.weight"] = [5120, 2048]
    assert adapter == expected
    # The released checkpoint's names map one to one (cross_attn -> attn2), same shapes.
    released = _manifest("fantasytalking_model_ckpt.json")
    renamed = {
        name.split("/", 1)[1].replace(".cross_attn.", ".attn2.")
        if name.startswith("audio_processor/")
        else "proj_model." + name.split("/", 1)[1]: shape
        for name, shape in released.items()
    }
    assert renamed == expected


# --- tiny model: construction, config, loading ----------------------------------------------------------------------


def test_tiny_config_roundtrip_and_strict_diffusers_load(tmp_path: Path) -> None:
    model, plain = _tiny_pair()
    assert isinstance(model.blocks[1], AudioAttentionBlock)
    assert model.blocks[0].attn2.processor is model.blocks[0].attn2.get_processor()
    assert not any(p.any() for n, p in model.named_parameters() if "processor." in n), "k/v must start at zero"

    # A diffusers-layout state dict loads; only the adapter keys are missing.
    fresh = FantasyTalkingTransformer.from_config(model.config)
    result = fresh.load_state_dict(plain.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == sorted(adapter_state_dict(model))

    _randomize_adapter(model)
    model.save_pretrained(tmp_path)
    reloaded = FantasyTalkingTransformer.from_pretrained(tmp_path)
    assert reloaded.config.num_layers == 2 and reloaded.config.audio_proj_dim == 32
    assert all(torch.equal(v, reloaded.state_dict()[k]) for k, v in model.state_dict().items())

    model.reset_adapter_parameters()
    assert not any(p.any() for n, p in model.named_parameters() if "processor." in n)


def test_from_pretrained_of_a_base_only_diffusers_folder(tmp_path: Path) -> None:
    """diffusers leaves keys missing from the folder on the meta device; reset_adapter_parameters materialises them."""
    model, plain = _tiny_pair()
    plain.save_pretrained(tmp_path)
    loaded = FantasyTalkingTransformer.from_pretrained(tmp_path, audio_in_dim=32, audio_proj_dim=32).eval()
    loaded.reset_adapter_parameters()
    assert not any(p.is_meta for p in loaded.parameters())
    inputs, audio = _inputs()
    with torch.no_grad():
        assert torch.equal(loaded(**inputs, audio_features=audio)[0], plain(**inputs, return_dict=False)[0])


def test_set_trainable_and_adapter_state_dict() -> None:
    model, _ = _tiny_pair()
    count = set_trainable(model, ["processor.", "proj_model."])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == model.trainable_parameter_names(["processor.", "proj_model."])
    assert count == sum(p.numel() for p in model.parameters() if p.requires_grad) == 32 * 32 + 2 * 32 + 2 * 2 * 32 * 32
    assert sorted(adapter_state_dict(model)) == sorted(trainable)
    with pytest.raises(ValueError, match="match no parameter"):
        set_trainable(model, ["no_such_module."])
    with pytest.raises(ValueError, match="no trainable pattern"):
        set_trainable(model, [])


# --- behaviour -------------------------------------------------------------------------------------------------------


def test_without_audio_equals_plain_wan() -> None:
    model, plain = _tiny_pair()
    inputs, audio = _inputs()
    with torch.no_grad():
        expected = plain(**inputs, return_dict=False)[0]
        assert torch.equal(model(**inputs)[0], expected)
        assert torch.equal(model(**inputs, audio_features=audio)[0], expected), "zero-initialised k/v"
        _randomize_adapter(model)
        assert torch.equal(model(**inputs, audio_features=audio, audio_scale=0.0)[0], expected)
        assert not torch.allclose(model(**inputs, audio_features=audio)[0], expected, atol=1e-3)
        assert torch.equal(
            model(**inputs, audio_features=audio, return_dict=True).sample, model(**inputs, audio_features=audio)[0]
        )
    assert all(p.audio is None for p in model.audio_processors()), "audio must not outlive the call"


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over all keys; q [S, dim], k/v [L, dim] -> [S, dim]."""
    q, k, v = (t.unflatten(-1, (heads, -1)) for t in (q, k, v))
    scores = torch.einsum("shd,lhd->hsl", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("hsl,lhd->shd", scores.softmax(-1), v).flatten(-2)


def _reference_cross_attention(block, x, context, features, proj_model, scale, latent_frames):
    """The audio cross-attention (docs/model.md#audio-cross-attention) written out in float64, attending only to
    each window's real tokens."""
    attn, eps = block.attn2, TINY_CONFIG["eps"]
    p = {name: t.detach().double() for name, t in attn.named_parameters()}
    x, context, features = x.double(), context.double(), features.double()
    heads = attn.heads
    projected = torch.nn.functional.layer_norm(
        features @ proj_model.proj.weight.double().T,
        (proj_model.proj.weight.shape[0],),
        proj_model.norm.weight.double(),
        proj_model.norm.bias.double(),
        eps=1e-5,
    )
    indices, valid = audio_windows(latent_frames, features.shape[1])
    image, text = context[:, : context.shape[1] - 512], context[:, context.shape[1] - 512 :]
    outputs = []
    for b in range(x.shape[0]):
        q = _rms(x[b] @ p["to_q.weight"].T + p["to_q.bias"], p["norm_q.weight"], eps)
        k_txt = _rms(text[b] @ p["to_k.weight"].T + p["to_k.bias"], p["norm_k.weight"], eps)
        v_txt = text[b] @ p["to_v.weight"].T + p["to_v.bias"]
        k_img = _rms(image[b] @ p["add_k_proj.weight"].T + p["add_k_proj.bias"], p["norm_added_k.weight"], eps)
        v_img = image[b] @ p["add_v_proj.weight"].T + p["add_v_proj.bias"]
        x_audio = []
        for t, q_frame in enumerate(q.chunk(latent_frames)):
            window = projected[b, indices[t][valid[t]]]  # real tokens only: no padding, no mask
            k_a, v_a = window @ p["processor.k_proj.weight"].T, window @ p["processor.v_proj.weight"].T
            x_audio.append(_attend(q_frame, k_a, v_a, heads))
        mixed = _attend(q, k_txt, v_txt, heads) + _attend(q, k_img, v_img, heads) + scale[b] * torch.cat(x_audio)
        outputs.append(mixed @ p["to_out.0.weight"].T + p["to_out.0.bias"])
    return torch.stack(outputs)


def test_audio_branch_matches_reference_formula() -> None:
    model, _ = _tiny_pair()
    _randomize_adapter(model)
    inputs, audio = _inputs(audio_len=20)  # 3 latent frames, windows of 17 with 6/14/14 real tokens
    assert audio_windows(3, 20)[1].sum(1).tolist() == [6, 14, 14]
    scale = torch.tensor([1.0, 0.5])
    captured = {}

    def grab(module, args, output):
        captured.setdefault("calls", []).append((args[0], args[1], output))

    for block in model.blocks:
        block.attn2.register_forward_hook(grab)
    with torch.no_grad():
        model(**inputs, audio_features=audio, audio_scale=scale)
    for block, (x, context, output) in zip(model.blocks, captured["calls"], strict=True):
        expected = _reference_cross_attention(block, x, context, audio, model.proj_model, scale.double(), 3)
        error = (output.double() - expected).abs().max() / expected.abs().max()
        assert error < 1e-5, f"relative error {error:.2e}"
        without_audio = _reference_cross_attention(block, x, context, audio, model.proj_model, 0 * scale.double(), 3)
        assert (expected - without_audio).abs().max() > 1e-2 * expected.abs().max(), "audio must matter in this test"


def test_padding_slots_have_no_effect() -> None:
    """Padded slots are exact zeros in the projected space, and masked: any value there changes nothing."""
    model, _ = _tiny_pair()
    _randomize_adapter(model)
    inputs, audio = _inputs(audio_len=20)
    windows, valid = model.prepare_audio(audio, 3)
    assert (~valid).any() and not windows[:, ~valid].any()
    # Padding is zeros, not projected zeros (LayerNorm would make those its bias).
    assert not torch.equal(model.proj_model(torch.zeros(1, 32)), torch.zeros(1, 32))

    block = model.blocks[0]
    x = torch.randn(2, 12, 32)
    context = torch.randn(2, 516, 32)
    scale = torch.ones(2)

    def run(win: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
        with block._audio_handover(AudioContext(win, ok, scale)), torch.no_grad():
            return block.attn2(x, context)

    garbage = torch.where(valid[None, :, :, None], windows, 100 * torch.randn_like(windows))
    assert torch.equal(run(garbage, valid), run(windows, valid))
    # The mask is what does it: attending to the zero slots as if real changes the result.
    assert not torch.allclose(run(windows, torch.ones_like(valid)), run(windows, valid), atol=1e-4)
    assert block.attn2.processor.audio is None


def test_per_sample_audio_scale() -> None:
    model, _ = _tiny_pair()
    _randomize_adapter(model)
    inputs, audio = _inputs()
    with torch.no_grad():
        no_audio = model(**inputs)[0]
        mixed = model(**inputs, audio_features=audio, audio_scale=torch.tensor([1.0, 0.0]))[0]
        full = model(**inputs, audio_features=audio)[0]
    assert torch.equal(mixed[1], no_audio[1])
    assert torch.equal(mixed[0], full[0])
    assert not torch.allclose(mixed[0], no_audio[0], atol=1e-3)
    with pytest.raises(ValueError, match="audio_scale"):
        model(**inputs, audio_features=audio, audio_scale=torch.ones(3))


def test_gradient_checkpointing_gives_same_loss_and_grads() -> None:
    model, _ = _tiny_pair()
    _randomize_adapter(model)
    model.train()
    inputs, audio = _inputs()

    def loss_and_grads() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss = model(**inputs, audio_features=audio, audio_scale=torch.tensor([1.0, 0.7]))[0].pow(2).mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss, grads = loss_and_grads()
    model.enable_gradient_checkpointing()
    assert model.gradient_checkpointing
    calls = []
    original = model._gradient_checkpointing_func
    model._gradient_checkpointing_func = lambda block, *args: calls.append(block) or original(block, *args)
    loss_ckpt, grads_ckpt = loss_and_grads()
    assert len(calls) == len(model.blocks), "the checkpointed path must be the one taken"
    assert torch.equal(loss, loss_ckpt)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-6, atol=1e-8, msg=name)
    assert grads["proj_model.proj.weight"].abs().sum() > 0 and grads["blocks.1.attn2.processor.k_proj.weight"].any()

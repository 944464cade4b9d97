"""The frozen encoders on a tiny original-layout model: normalised VAE latents, zero-padded umT5 embeddings, CLIP
penultimate features equal to Wan's own ViT computation; and the make-tiny-model command."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from fantasytalk_cli.cli import app
from fantasytalk_cli.models.encoders import CLIP_MEAN, CLIP_STD, FrozenEncoders, clean_caption, load_frozen_encoders
from fantasytalk_cli.models.frozen_loading import WAN_CLIP_HEADS
from fantasytalk_cli.models.layout import detect_layout
from fantasytalk_cli.models.tiny import TEXT_LEN, TINY_CLIP, TINY_T5, make_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "Wan2.1-I2V-14B-720P", seed=3).path


@pytest.fixture(scope="module")
def encoders(model_dir: Path) -> FrozenEncoders:
    return load_frozen_encoders(model_dir, vae_mini_batch=1)


def test_everything_is_frozen(encoders: FrozenEncoders) -> None:
    encoders.train()
    assert not any(p.requires_grad for p in encoders.parameters())
    assert not any(m.training for m in encoders.modules())
    with encoders.on("cpu") as on:
        assert on.device.type == "cpu"


def test_vae_latents_are_normalised_and_chunked(encoders: FrozenEncoders) -> None:
    vae = encoders.vae
    pixels = torch.rand(2, 3, 5, 16, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = vae.encode(pixels)
    assert latents.shape == (2, 16, (5 - 1) // 4 + 1, 16 // 8, 24 // 8)
    with torch.no_grad():
        raw = vae.vae.encode(pixels).latent_dist.mean
    mean = torch.tensor(vae.vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(vae.vae.config.latents_std).view(1, 16, 1, 1, 1)
    assert torch.allclose(latents, (raw - mean) / std, atol=1e-5)
    assert torch.allclose(vae.denormalise(latents), raw, atol=1e-5)
    vae.mini_batch = 2
    try:
        assert torch.allclose(vae.encode(pixels), latents, atol=1e-5)
    finally:
        vae.mini_batch = 1
    drawn = [vae.encode(pixels[:1, :, :1], sample=True, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(drawn[0], drawn[1]) and not torch.allclose(drawn[0], latents[:1, :, :1])
    with pytest.raises(ValueError, match="4k\\+1"):
        vae.encode(pixels[:, :, :4])


def test_text_is_padded_to_text_len_with_zeros(encoders: FrozenEncoders) -> None:
    text = encoders.text
    captions = ["a person talks to the camera", "the woman   smiles &amp; nods while she speaks, close up"]
    ids, mask = text.tokenize(captions)
    lengths = mask.sum(1)
    assert ids.shape == (2, TEXT_LEN) and lengths[0] < lengths[1]
    emb = text.encode(captions)
    assert emb.shape == (2, TEXT_LEN, TINY_T5["d_model"])
    for row, n in enumerate(lengths.tolist()):
        assert ids[row, n - 1] == text.tokenizer.eos_token_id
        assert torch.count_nonzero(emb[row, n:]) == 0
        assert (emb[row, :n].abs().sum(-1) > 0).all()
    # Wan encodes each caption at its true length and zero-pads: padding must not change the real rows.
    n = int(lengths[0])
    with torch.no_grad():
        alone = text.model(input_ids=ids[:1, :n]).last_hidden_state
    assert (alone - emb[:1, :n]).abs().max() < 1e-5
    long = text.encode(["talk " * 1000])
    assert torch.count_nonzero(long.abs().sum(-1)) == TEXT_LEN


def test_caption_cleaning_follows_wan() -> None:
    assert clean_caption("  a &amp;amp; b \n\t c  ") == "a & b c"


def reference_wan_vit(state: dict[str, torch.Tensor], images: torch.Tensor, heads: int) -> torch.Tensor:
    """Wan's ``CLIPModel.visual`` written out from ``wan/modules/clip.py`` on the open-clip tensors: bicubic resize,
    CLIP mean/std, ViT with fused q/k/v, output of all blocks but the last (``use_31_block``)."""
    size = 224
    x = F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False).mul(0.5).add(0.5)
    x = (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    weight = state["visual.patch_embedding.weight"]
    x = F.conv2d(x, weight, stride=weight.shape[-1]).flatten(2).transpose(1, 2)
    b, dim = x.shape[0], x.shape[-1]
    x = torch.cat([state["visual.cls_embedding"].expand(b, -1, -1), x], dim=1) + state["visual.pos_embedding"]
    x = F.layer_norm(x, (dim,), state["visual.pre_norm.weight"], state["visual.pre_norm.bias"], 1e-5)
    blocks = len({k.split(".")[2] for k in state if k.startswith("visual.transformer.")})
    for i in range(blocks - 1):
        p = f"visual.transformer.{i}."
        h = F.layer_norm(x, (dim,), state[p + "norm1.weight"], state[p + "norm1.bias"], 1e-5)
        q, k, v = (
            F.linear(h, state[p + "attn.to_qkv.weight"], state[p + "attn.to_qkv.bias"])
            .view(b, -1, 3, heads, dim // heads)
            .unbind(2)
        )
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + F.linear(
            a.transpose(1, 2).reshape(b, -1, dim), state[p + "attn.proj.weight"], state[p + "attn.proj.bias"]
        )
        h = F.layer_norm(x, (dim,), state[p + "norm2.weight"], state[p + "norm2.bias"], 1e-5)
        h = F.linear(F.gelu(F.linear(h, state[p + "mlp.0.weight"], state[p + "mlp.0.bias"])), state[p + "mlp.2.weight"])
        x = x + h + state[p + "mlp.2.bias"]
    return x


def test_clip_features_match_wans_vit(encoders: FrozenEncoders, model_dir: Path) -> None:
    images = torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    features = encoders.image.encode(images)
    width = TINY_CLIP["hidden_size"]
    assert features.shape == (2, 1 + (224 // 14) ** 2, width) == (2, 257, width)
    state = torch.load(model_dir / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth", weights_only=True)
    expected = reference_wan_vit(state, images, WAN_CLIP_HEADS)
    assert (features - expected).abs().max() < 1e-4


def test_make_tiny_model_command(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "tiny-diffusers"
    result = runner.invoke(app, ["make-tiny-model", str(out), "--layout", "diffusers", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert "diffusers-layout" in result.output and detect_layout(out) == "diffusers"
    for name in ("model_index.json", "transformer/config.json", "wav2vec2-base-960h/config.json"):
        assert (out / name).is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary folder left behind"
    again = runner.invoke(app, ["make-tiny-model", str(out), "--layout", "diffusers"])
    assert again.exit_code == 2 and "--overwrite" in again.output
    replaced = runner.invoke(app, ["make-tiny-model", str(out), "--layout", "original", "--overwrite"])
    assert replaced.exit_code == 0 and detect_layout(out) == "original"
    assert runner.invoke(app, ["make-tiny-model", str(out), "--layout", "bogus"]).exit_code == 2

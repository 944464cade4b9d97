"""A tiny random-weight FantasyTalking world in the exact real on-disk layouts, for tests and demos.

`make_tiny_model(out_dir, layout)` writes a base model folder with the real file names and key names at tiny sizes:
the original Wan2.1 layout (sharded DiT safetensors with original names + index + ``config.json``, Wan-named T5
``.pth``, open-clip ``.pth`` with its text tower, Wan-named VAE ``.pth``, ``google/umt5-xxl/`` and
``xlm-roberta-large/`` tokenizers) or the diffusers layout (``model_index.json``, ``transformer/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``image_encoder/``, ``image_processor/``, ``scheduler/``); both also get
``wav2vec2-base-960h/`` (released naming) and ``fantasytalking_model.ckpt`` (released nested format, non-zero k/v).
The same seed gives the same weights in both layouts, so both must load to identical models. Tokenizers are built
offline from a fixed vocabulary. Everything is written to a temporary folder and renamed into place.
"""

from __future__ import annotations

import json
import math
import shutil
import string
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file

from fantasytalk_cli.errors import FtalkUsageError
from fantasytalk_cli.fileio import follow_umask, swap_folder
from fantasytalk_cli.models.adapter_file import adapter_to_format
from fantasytalk_cli.models.dims import AUDIO_CONFIG_KEYS, TINY_CONFIG, wan_config
from fantasytalk_cli.models.frozen_loading import WAN_CLIP_HEADS, build_text_encoder
from fantasytalk_cli.models.layout import DIT_SHARD_PREFIX
from fantasytalk_cli.models.state_dict_adapters import (
    clip_vision_to_original,
    dit_name_to_original,
    t5_name_to_original,
    vae_name_to_original,
    wav2vec2_to_released,
)
from fantasytalk_cli.models.trainable import is_adapter_name
from fantasytalk_cli.models.transformer import FantasyTalkingTransformer
from fantasytalk_cli.models.weights import build_empty, model_shapes

TinyLayout = Literal["original", "diffusers"]

TINY_T5: dict[str, Any] = {
    "d_model": 32,
    "d_kv": 16,
    "d_ff": 64,
    "num_layers": 2,
    "num_heads": 2,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    "layer_norm_epsilon": 1e-6,
    "tie_word_embeddings": False,
}
"""umT5 at width 32 (``vocab_size`` is the tiny tokenizer's size)."""

TINY_CLIP: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": WAN_CLIP_HEADS,
    "image_size": 224,
    "patch_size": 14,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 16,
}
"""ViT at width 32 with ViT-H/14's 16 heads (the open-clip file does not record heads), patch 14 on 224 pixels:
257 tokens; 3 layers so the penultimate hidden state is a real layer's output."""

TINY_CLIP_TEXT: dict[str, int] = {"dim": 32, "layers": 2, "max_len": 514}
"""The open-clip file's XLM-R text tower (written for layout fidelity; the loaders drop it)."""

TINY_VAE: dict[str, Any] = {"base_dim": 8, "z_dim": 16}
"""AutoencoderKLWan at base width 8; z_dim 16 and the 4/8 temporal/spatial downsampling stay real."""

TINY_WAV2VEC2: dict[str, Any] = {
    "vocab_size": 32,
    "hidden_size": TINY_CONFIG["audio_in_dim"],
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "conv_dim": [16] * 7,
    "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
    "conv_stride": [5, 2, 2, 2, 2, 2, 2],
    "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 2,
    "architectures": ["Wav2Vec2ForCTC"],
}
"""wav2vec2 with the real conv kernel/stride pattern (stride 320 samples per token) at width ``audio_in_dim``."""

TINY_DIT: dict[str, Any] = {**TINY_CONFIG, "text_dim": TINY_T5["d_model"], "image_dim": TINY_CLIP["hidden_size"]}
"""The FantasyTalkingTransformer kwargs of the tiny world: `TINY_CONFIG`, its text/image widths tied to the tiny
T5 and CLIP."""

TINY_AUDIO_DIMS: dict[str, int] = {key: TINY_DIT[key] for key in AUDIO_CONFIG_KEYS}
"""Pass to `load_transformer(**TINY_AUDIO_DIMS)`: a base folder does not record the adapter's sizes."""

TEXT_LEN = 512
"""Wan's text_len, kept real: captions are padded to 512 tokens in the tiny world too."""

_SENTENCES = (
    "a person talks to the camera with a calm face",
    "the woman smiles and nods while she speaks",
    "a man in a bright room says hello",
    "close up of a talking head, mouth moving with the audio",
)
_UMT5_SPECIALS = ("<pad>", "</s>", "<unk>")
_XLMR_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
_WAV2VEC2_VOCAB = ["<pad>", "<s>", "</s>", "<unk>", "|", *"ETAONIHSRDLUMWCFGYPBVK'XJQZ"]
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


class TinyModelError(FtalkUsageError):
    """The tiny model folder cannot be written (exists without ``overwrite``, bad layout)."""


@dataclass(frozen=True)
class TinyModelReport:
    """What `make_tiny_model` wrote."""

    path: Path
    layout: TinyLayout
    seed: int
    files: tuple[str, ...]
    parameters: dict[str, int]

    def summary(self) -> str:
        """A few lines for the console."""
        parts = ", ".join(f"{name} {count:,}" for name, count in self.parameters.items())
        head = f"wrote a tiny {self.layout}-layout model to {self.path} (seed {self.seed}; {len(self.files)} files)"
        return f"{head}\nparameters: {parts}"


# --------------------------------------------------------------------------------------------------------------------
# Tokenizers, built offline from a fixed vocabulary (deterministic, no training).


def _unigram_pieces() -> list[str]:
    words = sorted({w for s in _SENTENCES for w in s.replace(",", " ").split()})
    chars = string.ascii_letters + string.digits + string.punctuation
    return sorted({"\u2581" + w for w in words} | set(chars) | {"\u2581" + c for c in chars} | {"\u2581"})


def _unigram_tokenizer(specials: list[str], unk: str, template: tuple[str, str]) -> Any:
    """A sentencepiece-style unigram tokenizer (``tokenizers`` library) over a fixed vocabulary."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab = [(s, 0.0) for s in specials]
    vocab += [(p, -1.0 if len(p) > 2 else -5.0 - 0.01 * i) for i, p in enumerate(_unigram_pieces())]
    tok = Tokenizer(models.Unigram(vocab, unk_id=specials.index(unk), byte_fallback=False))
    tok.normalizer = normalizers.Replace(" {2,}", " ")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    single, pair = template
    tokens = sorted({t for t in (single + " " + pair).split() if not t.startswith("$")})
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(t, specials.index(t)) for t in tokens]
    )
    return tok


def write_umt5_tokenizer(folder: Path) -> int:
    """A tiny umT5-style tokenizer (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, ``</s>`` appended); returns its size."""
    from transformers import T5TokenizerFast

    tok = _unigram_tokenizer(list(_UMT5_SPECIALS), "<unk>", ("$A </s>", "$A </s> $B </s>"))
    wrapped = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0)
    wrapped.save_pretrained(str(folder))
    return len(wrapped)


def write_xlm_roberta_tokenizer(folder: Path) -> int:
    """A tiny XLM-R-style tokenizer (``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3, ``<mask>``); returns its size."""
    from transformers import XLMRobertaTokenizer

    tok = _unigram_tokenizer(list(_XLMR_SPECIALS), "<unk>", ("<s> $A </s>", "<s> $A </s> </s> $B </s>"))
    wrapped = XLMRobertaTokenizer(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
    )
    wrapped.save_pretrained(str(folder))
    return len(wrapped)


# --------------------------------------------------------------------------------------------------------------------
# Seeded weights by name and shape (independent of any init code, so both layouts get the very same tensors).


def _random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Norm scales near 1, biases small, matrices scaled by 1/sqrt(fan_in): outputs stay O(1) through the nets."""
    if name.endswith("gamma") or (len(shape) == 1 and name.endswith("weight")):
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if len(shape) <= 1:
        return 0.1 * torch.randn(shape, generator=gen)
    return torch.randn(shape, generator=gen) / math.sqrt(max(math.prod(shape[1:]), 1))


def random_state(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Seeded random tensors for every parameter and persistent buffer of ``model`` (tied ones once), by name."""
    shapes, aliases = model_shapes(model)
    gen = torch.Generator().manual_seed(seed)
    return {name: _random_tensor(name, shapes[name], gen) for name in sorted(shapes) if name not in aliases}


def _clip_text_tower(vocab: int, embed_dim: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """open-clip's XLM-R text tower under its stored names, at `TINY_CLIP_TEXT` sizes."""
    dim, layers, max_len = TINY_CLIP_TEXT["dim"], TINY_CLIP_TEXT["layers"], TINY_CLIP_TEXT["max_len"]
    mid = (dim + embed_dim) // 2
    shapes: dict[str, tuple[int, ...]] = {
        "textual.token_embedding.weight": (vocab, dim),
        "textual.type_embedding.weight": (1, dim),
        "textual.pos_embedding.weight": (max_len, dim),
        "textual.norm.weight": (dim,),
        "textual.norm.bias": (dim,),
        "textual.head.0.weight": (mid, dim),
        "textual.head.2.weight": (embed_dim, mid),
        "log_scale": (),
    }
    for i in range(layers):
        block = f"textual.blocks.{i}"
        for part in ("q", "k", "v", "o"):
            shapes[f"{block}.attn.{part}.weight"] = (dim, dim)
            shapes[f"{block}.attn.{part}.bias"] = (dim,)
        for norm in ("norm1", "norm2"):
            shapes[f"{block}.{norm}.weight"] = (dim,)
            shapes[f"{block}.{norm}.bias"] = (dim,)
        shapes[f"{block}.ffn.0.weight"] = (4 * dim, dim)
        shapes[f"{block}.ffn.0.bias"] = (4 * dim,)
        shapes[f"{block}.ffn.2.weight"] = (dim, 4 * dim)
        shapes[f"{block}.ffn.2.bias"] = (dim,)
    return {name: _random_tensor(name, shapes[name], gen) for name in sorted(shapes)}


@dataclass
class _TinyWeights:
    """All tiny weights under our (diffusers/transformers) names, plus the configs they were drawn for."""

    dit: dict[str, torch.Tensor]
    adapter: dict[str, torch.Tensor]
    vae: dict[str, torch.Tensor]
    vae_config: dict[str, Any]
    t5: dict[str, torch.Tensor]
    t5_config: Any
    clip: dict[str, torch.Tensor]
    clip_config: Any
    clip_text: dict[str, torch.Tensor]
    wav2vec2: dict[str, torch.Tensor]
    wav2vec2_config: Any


def _tiny_weights(seed: int, t5_vocab: int, xlm_vocab: int) -> _TinyWeights:
    from diffusers import AutoencoderKLWan
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, UMT5Config, Wav2Vec2Config, Wav2Vec2ForCTC

    # One stream per component, so changing one component never shifts another's weights.
    dit_all = random_state(build_empty(lambda: FantasyTalkingTransformer(**TINY_DIT)), seed * 100 + 1)
    vae = build_empty(lambda: AutoencoderKLWan(**TINY_VAE))
    t5_config = UMT5Config(vocab_size=t5_vocab, **TINY_T5)
    clip_config = CLIPVisionConfig(**TINY_CLIP)
    wav2vec2_config = Wav2Vec2Config(**TINY_WAV2VEC2)
    return _TinyWeights(
        dit={k: v for k, v in dit_all.items() if not is_adapter_name(k)},
        adapter={k: v for k, v in dit_all.items() if is_adapter_name(k)},
        vae=random_state(vae, seed * 100 + 2),
        vae_config={k: v for k, v in vae.config.items() if not k.startswith("_")},
        t5=random_state(build_text_encoder(t5_config), seed * 100 + 3),
        t5_config=t5_config,
        clip=random_state(build_empty(lambda: CLIPVisionModelWithProjection(clip_config)), seed * 100 + 4),
        clip_config=clip_config,
        clip_text=_clip_text_tower(
            xlm_vocab, TINY_CLIP["projection_dim"], torch.Generator().manual_seed(seed * 100 + 5)
        ),
        wav2vec2=random_state(build_empty(lambda: Wav2Vec2ForCTC(wav2vec2_config)), seed * 100 + 6),
        wav2vec2_config=wav2vec2_config,
    )


# --------------------------------------------------------------------------------------------------------------------
# Writers.


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_sharded_safetensors(state: Mapping[str, torch.Tensor], folder: Path, stem: str, shards: int) -> list[str]:
    """``<stem>-0000i-of-0000n.safetensors`` + ``<stem>.safetensors.index.json``, keys sorted and split evenly."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(state)
    per = math.ceil(len(keys) / shards)
    weight_map: dict[str, str] = {}
    names = []
    for i in range(shards):
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k].contiguous() for k in keys[i * per : (i + 1) * per]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
        names.append(name)
    total = sum(t.numel() * t.element_size() for t in state.values())
    _write_json(
        folder / f"{stem}.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map}
    )
    return names


def _save_safetensors(state: Mapping[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})


def _original_dit_config() -> dict[str, Any]:
    """The tiny DiT's ``config.json`` in Wan's own keys (as the real ``Wan2.1-I2V-14B-720P/config.json``, plus
    ``text_dim``, a ``WanModel`` argument the real file leaves at its default 4096)."""
    return {
        "_class_name": "WanModel",
        "_diffusers_version": "0.30.0",
        "dim": TINY_DIT["num_attention_heads"] * TINY_DIT["attention_head_dim"],
        "eps": TINY_DIT["eps"],
        "ffn_dim": TINY_DIT["ffn_dim"],
        "freq_dim": TINY_DIT["freq_dim"],
        "in_dim": TINY_DIT["in_channels"],
        "model_type": "i2v",
        "num_heads": TINY_DIT["num_attention_heads"],
        "num_layers": TINY_DIT["num_layers"],
        "out_dim": TINY_DIT["out_channels"],
        "text_dim": TINY_DIT["text_dim"],
        "text_len": TEXT_LEN,
    }


def _write_original(root: Path, w: _TinyWeights) -> None:
    _write_json(root / "config.json", _original_dit_config())
    write_sharded_safetensors({dit_name_to_original(k): v for k, v in w.dit.items()}, root, DIT_SHARD_PREFIX, 3)
    t5 = {t5_name_to_original(k): v.to(torch.bfloat16) for k, v in w.t5.items()}
    torch.save(t5, root / "models_t5_umt5-xxl-enc-bf16.pth")
    torch.save(
        {**clip_vision_to_original(w.clip), **w.clip_text},
        root / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth",
    )
    torch.save({vae_name_to_original(k): v for k, v in w.vae.items()}, root / "Wan2.1_VAE.pth")
    write_umt5_tokenizer(root / "google" / "umt5-xxl")
    write_xlm_roberta_tokenizer(root / "xlm-roberta-large")


def _write_diffusers(root: Path, w: _TinyWeights) -> None:
    import diffusers
    from diffusers import UniPCMultistepScheduler

    version = diffusers.__version__
    _write_json(
        root / "model_index.json",
        {
            "_class_name": "WanImageToVideoPipeline",
            "_diffusers_version": version,
            "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
            "image_processor": ["transformers", "CLIPImageProcessor"],
            "scheduler": ["diffusers", "UniPCMultistepScheduler"],
            "text_encoder": ["transformers", "UMT5EncoderModel"],
            "tokenizer": ["transformers", "T5TokenizerFast"],
            "transformer": ["diffusers", "WanTransformer3DModel"],
            "vae": ["diffusers", "AutoencoderKLWan"],
        },
    )
    dit_config = {"_class_name": "WanTransformer3DModel", "_diffusers_version": version, **wan_config(TINY_DIT)}
    _write_json(root / "transformer" / "config.json", dit_config)
    write_sharded_safetensors(w.dit, root / "transformer", DIT_SHARD_PREFIX, 2)
    _write_json(
        root / "vae" / "config.json", {"_class_name": "AutoencoderKLWan", "_diffusers_version": version, **w.vae_config}
    )
    _save_safetensors(w.vae, root / "vae" / f"{DIT_SHARD_PREFIX}.safetensors")
    w.t5_config.architectures = ["UMT5EncoderModel"]
    w.t5_config.save_pretrained(str(root / "text_encoder"))
    write_sharded_safetensors({k: v.to(torch.bfloat16) for k, v in w.t5.items()}, root / "text_encoder", "model", 2)
    write_umt5_tokenizer(root / "tokenizer")
    w.clip_config.architectures = ["CLIPVisionModelWithProjection"]
    w.clip_config.save_pretrained(str(root / "image_encoder"))
    _save_safetensors(w.clip, root / "image_encoder" / "model.safetensors")
    _write_json(
        root / "image_processor" / "preprocessor_config.json",
        {
            "crop_size": {"height": 224, "width": 224},
            "do_center_crop": True,
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": _CLIP_MEAN,
            "image_processor_type": "CLIPImageProcessor",
            "image_std": _CLIP_STD,
            "resample": 3,
            "rescale_factor": 1 / 255,
            "size": {"shortest_edge": 224},
        },
    )
    UniPCMultistepScheduler(
        num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0
    ).save_config(str(root / "scheduler"))


def _write_wav2vec2(folder: Path, w: _TinyWeights) -> None:
    """The released ``wav2vec2-base-960h`` folder: Wav2Vec2ForCTC weights with legacy names, feature extractor,
    CTC tokenizer (the real 32-letter vocabulary)."""
    from transformers import Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor

    w.wav2vec2_config.save_pretrained(str(folder))
    _save_safetensors(wav2vec2_to_released(w.wav2vec2), folder / "model.safetensors")
    Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True, return_attention_mask=False
    ).save_pretrained(str(folder))
    vocab = folder / "vocab.json"
    _write_json(vocab, {c: i for i, c in enumerate(_WAV2VEC2_VOCAB)})
    Wav2Vec2CTCTokenizer(str(vocab)).save_pretrained(str(folder))


def make_tiny_model(
    out_dir: Path, layout: TinyLayout = "original", seed: int = 0, overwrite: bool = False
) -> TinyModelReport:
    """Write a tiny random-weight base model folder in ``layout`` at ``out_dir`` (plus ``wav2vec2-base-960h/`` and
    ``fantasytalking_model.ckpt`` inside it), atomically. Same ``seed`` = same weights in either layout."""
    if layout not in ("original", "diffusers"):
        raise TinyModelError(f"layout must be 'original' or 'diffusers', got {layout!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise TinyModelError(f"{out_dir} exists; pass overwrite=True (--overwrite) to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        pieces = len(_unigram_pieces())
        weights = _tiny_weights(seed, len(_UMT5_SPECIALS) + pieces, len(_XLMR_SPECIALS) + pieces)
        (_write_original if layout == "original" else _write_diffusers)(tmp, weights)
        _write_wav2vec2(tmp / "wav2vec2-base-960h", weights)
        torch.save(adapter_to_format(weights.adapter, "fantasytalking"), tmp / "fantasytalking_model.ckpt")
        follow_umask(tmp, *tmp.rglob("*"))  # mkdtemp's 0700 and safetensors' 0600 -> the umask's modes
        files = tuple(sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()))
        swap_folder(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    counts = {
        "transformer": sum(t.numel() for t in weights.dit.values()),
        "adapter": sum(t.numel() for t in weights.adapter.values()),
        "vae": sum(t.numel() for t in weights.vae.values()),
        "text_encoder": sum(t.numel() for t in weights.t5.values()),
        "image_encoder": sum(t.numel() for t in weights.clip.values()),
        "wav2vec2": sum(t.numel() for t in weights.wav2vec2.values()),
    }
    return TinyModelReport(out_dir, layout, seed, files, counts)

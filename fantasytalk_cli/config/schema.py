"""The one configuration model of ftalk: `FtalkConfig`, a tree of small sections.

Every command reads the same model; functions receive only the section they need. Field docstrings
become the command-line help (``use_attribute_docstrings``). Leaf field names are unique across the
whole tree, because each is also a command-line flag of ``ftalk train`` (``--video_sample_size`` and
``--video-sample-size``), spelled as in the reference trainer's documentation.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fantasytalk_cli.models.trainable import (
    DEFAULT_LORA_TARGETS,
    DEFAULT_TRAINABLE_MODULES,
    LORA_AUDIO_DROPOUT,
    LORA_TARGETS,
    lora_target_name,
    trained_patterns,
)


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class DataConfig(Section):
    """Where the training clips are and how they are read."""

    train_data_dir: Path | None = None
    """Folder that relative `file_path` / `audio_path` entries of the metadata are joined to
    (default: the metadata file's folder)."""
    train_data_meta: Path | None = None
    """Metadata file: a JSON list (`metadata_control.json`), JSON Lines or CSV of clips
    (`file_path`, `audio_path`, `text`, `type`)."""
    dataloader_num_workers: int = Field(0, ge=0)
    """Data loader worker processes per training process (0 = load in the training process)."""
    bad_sample_policy: Literal["skip", "fail"] = "skip"
    """What to do with a clip that fails to load: `skip` it (logged, counted) or `fail` the run."""
    max_bad_sample_fraction: float = Field(0.01, ge=0.0, le=1.0)
    """Abort when more than this fraction of the samples seen so far failed to load (policy `skip`)."""
    bucket_plan: Path | None = None
    """Plan file written by `ftalk plan-buckets --write`; rebuilt with a warning when stale."""
    allow_outside_data_dir: bool = False
    """Accept media outside the data folder (an absolute path elsewhere, a `..` path, a symlink that resolves
    out); by default validate, plan and train refuse such entries, naming them."""
    cache_dir: Path | None = None
    """Feature cache written by `ftalk cache`: what it holds is read instead of computed (text embeddings, audio
    features, VAE latents and CLIP embeddings); what it lacks is computed online and counted."""
    cache_epochs: int = Field(1, ge=1)
    """`ftalk cache`: epochs whose frame windows (and buckets) are cached per clip (each epoch draws new windows)."""
    fixed_window: bool = False
    """Every epoch uses each clip's epoch-0 frame window (so one cached window serves the whole run)."""
    cache_required: bool = False
    """With `cache_dir`: refuse to compute online what the cache lacks (stop with the list) instead of warning."""
    eval_meta: Path | None = None
    """Held-out metadata (the training metadata's format) that `ftalk evaluate` and `--validation_metrics` score:
    clips the run does not train on."""
    eval_data_dir: Path | None = None
    """Folder that relative paths of `eval_meta` are joined to (default: the held-out file's folder)."""

    def media_root(self) -> Path | None:
        """The folder relative media paths are joined to: `train_data_dir`, else the metadata file's folder
        (never the current directory, so a command gives the same answer wherever it is run)."""
        if self.train_data_dir is not None:
            return self.train_data_dir
        return self.train_data_meta.parent if self.train_data_meta is not None else None


class BucketConfig(Section):
    """How clips become fixed-shape training samples (sizes, frame counts, buckets)."""

    video_sample_size: int = Field(512, ge=16)
    """Largest side of a training sample in pixels (bucket sizes are scaled to it, multiples of 16)."""
    token_sample_size: int = Field(512, ge=16)
    """With `training_with_video_token_length`: frame budget = video_sample_n_frames * token_sample_size^2 pixels."""
    video_sample_stride: int = Field(1, ge=1)
    """Take every N-th frame; raised automatically until fps / stride <= 30."""
    video_sample_n_frames: int = Field(81, ge=1)
    """Frames per training sample (a 4k+1 number: 49, 81, ...)."""
    enable_bucket: bool = False
    """Group clips by aspect ratio into buckets instead of centre-cropping everything to a square."""
    random_hw_adapt: bool = False
    """Train on several sizes, from 512 (256 with token-length training) up to `video_sample_size`."""
    training_with_video_token_length: bool = False
    """Trade frames for pixels so every sample stays within the token budget of `token_sample_size`."""
    random_frame_crop: bool = False
    """Train on random 4k+1 frame counts up to `video_sample_n_frames`, audio cut to match."""
    leftover_policy: Literal["carry", "drop"] = "carry"
    """Samples that do not fill a last batch in a bucket: `carry` them to the next epoch, or `drop` and report them."""
    max_fps_after_stride: float = Field(30.0, gt=0)
    """The stride is raised until fps / stride is at most this (the reference trainer's rule)."""
    max_upscale: float = Field(1.25, ge=1.0)
    """Most a clip may be upscaled to cover its bucket; clips needing more at every size are dropped as too small."""

    @model_validator(mode="after")
    def _frames_are_4k_plus_1(self) -> BucketConfig:
        if (self.video_sample_n_frames - 1) % 4 != 0:
            lower = (self.video_sample_n_frames - 1) // 4 * 4 + 1
            raise ValueError(
                f"video_sample_n_frames={self.video_sample_n_frames} is not of the form 4k+1 "
                f"(the VAE compresses time by 4); use {lower} or {lower + 4}"
            )
        return self


class ModelConfig(Section):
    """Which weights to load and which parameters train."""

    pretrained_model_name_or_path: Path | None = None
    """Base model folder: the original Wan2.1-I2V layout or its diffusers layout."""
    config_path: Path | None = None
    """Model config YAML of the reference layout (where sub-models live, scheduler settings),
    e.g. examples/wan2.1/wan_civitai.yaml."""
    transformer_path: Path | None = None
    """Start from this adapter (`fantasytalking_model.ckpt`, flat or ComfyUI safetensors)
    or full transformer safetensors file."""
    wav2vec_path: Path | None = None
    """wav2vec2 folder (transformers layout); default: `wav2vec2-base-960h` beside or inside the base model folder."""
    trainable_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_TRAINABLE_MODULES))
    """Parameters whose name contains any of these substrings train; everything else is frozen (`none`: only the
    LoRA trains)."""
    lora_rank: int = Field(0, ge=0)
    """Rank of a LoRA on the DiT's block linears (peft), trained with the audio adapter (0 = no LoRA)."""
    lora_alpha: float | None = Field(None, gt=0)
    """LoRA alpha: its update is scaled by alpha / rank (default: the rank, scale 1)."""
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the LoRA's input."""
    lora_target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    """Block linears the LoRA wraps, in diffusers' names inside `blocks.N.` (the original Wan names are accepted):
    default every block's self- and cross-attention q/k/v/o and both FFN linears, i.e. `self_attn.{q,k,v,o}`,
    `cross_attn.{q,k,v,o}`, `ffn.0`, `ffn.2` in the original Wan layout; also `attn2.add_k_proj`/`add_v_proj`
    (`cross_attn.k_img`/`v_img`)."""
    low_vram: bool = False
    """Keep the frozen encoders (VAE, text, image, audio) off the accelerator between uses."""
    gradient_checkpointing: bool = False
    """Recompute transformer block activations in the backward pass to save memory."""
    base_weights_dtype: Literal["bf16", "fp8"] = "bf16"
    """Storage of the frozen DiT's weights: `bf16` (the mixed precision), or `fp8` (float8_e4m3fn, computed in
    bf16 layer by layer; halves them). The adapter, norms, embeddings and modulation tables keep their precision."""
    activation_offload: bool = False
    """Keep the tensors the backward pass needs (with gradient checkpointing: the block inputs) in host memory."""
    blocks_to_offload: int = Field(0, ge=0)
    """Keep the frozen weights of this many DiT blocks (the last ones) in pinned host memory, each brought to the
    device for its forward and its recompute (the adapter's k/v stay on the device). In training it needs gradient
    checkpointing to save memory (without it autograd keeps every block's weights for the backward), and DDP,
    ZeRO-2 or one process; in `ftalk sample` every weight of those blocks waits in host memory."""
    vae_mini_batch: int = Field(1, ge=1)
    """Videos encoded by the VAE at once."""
    audio_scale: float = 1.0
    """Weight of the audio branch in every audio cross-attention (0 = no audio)."""

    @field_validator("trainable_modules", mode="before")
    @classmethod
    def _none_is_empty(cls, value: object) -> object:
        return [] if value in (["none"], "none", None) else value

    @field_validator("lora_target_modules")
    @classmethod
    def _known_targets(cls, value: list[str]) -> list[str]:
        names = list(dict.fromkeys(lora_target_name(v) for v in value))
        if not names:
            raise ValueError(f"lora_target_modules names no linear; choose among {', '.join(LORA_TARGETS)}")
        return names

    @model_validator(mode="after")
    def _some_module_trains(self) -> ModelConfig:
        if any(not m for m in self.trainable_modules):
            raise ValueError("trainable_modules holds an empty substring (it would match every parameter)")
        if not self.trainable_modules and not self.lora_rank:
            raise ValueError(
                "trainable_modules must name at least one substring, e.g. processor. proj_model. (`none` only with "
                "--lora_rank, to train the LoRA alone)"
            )
        return self

    def trained_patterns(self) -> tuple[str, ...]:
        """What trains: `trainable_modules`, plus the LoRA's parameters when `lora_rank` is set."""
        return trained_patterns(self.trainable_modules, self.lora_rank)


LrScheduler = Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"]
WeightingScheme = Literal["none", "logit_normal", "mode", "cosmap", "sigma_sqrt"]


class TrainConfig(Section):
    """Optimisation: length, batch, learning rate, precision, the diffusion objective."""

    train_batch_size: int = Field(1, ge=1)
    """Samples per process per step."""
    gradient_accumulation_steps: int = Field(1, ge=1)
    """Micro-batches accumulated before each optimizer step."""
    num_train_epochs: int = Field(1, ge=1)
    """Passes over the data (ignored when `max_train_steps` is set)."""
    max_train_steps: int | None = Field(None, ge=1)
    """Optimizer steps to run; wins over `num_train_epochs` when set."""
    learning_rate: float = Field(2e-5, gt=0)
    """Peak learning rate."""
    lr_scheduler: LrScheduler = "constant"
    """Learning-rate schedule (diffusers' `get_scheduler` names)."""
    lr_warmup_steps: int = Field(0, ge=0)
    """Warm-up optimizer steps."""
    seed: int = 42
    """Seed of everything random in training (sampling order, noise, timesteps, dropout); 42 as the seed recipe."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "bf16"
    """Autocast precision; frozen weights are stored in it, trainable weights stay fp32."""
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    """AdamW beta1."""
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    """AdamW beta2."""
    adam_weight_decay: float = Field(1e-2, ge=0)
    """AdamW weight decay."""
    adam_epsilon: float = Field(1e-8, gt=0)
    """AdamW epsilon."""
    max_grad_norm: float = Field(1.0, ge=0)
    """Gradient clipping norm (0 = off); filled into a DeepSpeed JSON that lacks `gradient_clipping`."""
    uniform_sampling: bool = False
    """Stratify timesteps over the global batch so every step covers the noise range evenly."""
    weighting_scheme: WeightingScheme = "none"
    """Timestep density / loss weighting of the flow-matching objective."""
    logit_mean: float = 0.0
    """Mean of the `logit_normal` weighting scheme."""
    logit_std: float = Field(1.0, gt=0)
    """Standard deviation of the `logit_normal` weighting scheme."""
    mode_scale: float = 1.29
    """Scale of the `mode` weighting scheme."""
    text_dropout: float = Field(0.1, ge=0, le=1)
    """Probability of replacing the caption by the empty text (classifier-free guidance)."""
    image_dropout: float = Field(0.1, ge=0, le=1)
    """Probability of zeroing the CLIP image features."""
    audio_dropout: float | None = Field(None, ge=0, le=1)
    """Probability of dropping the audio (audio_scale 0), enabling audio guidance at inference (default 0; 0.1 with
    a LoRA, whose audio-off pass is no longer the base model and must be learned)."""
    lip_loss_weight: float = Field(0.0, ge=0)
    """Lip-focused loss (the paper's second stage): latent cells of the mouth region (the entry's `track`, from
    `ftalk prepare`) weigh 1 + this in the flow-matching loss (0 = off: the plain loss, bitwise)."""
    face_loss_weight: float = Field(0.0, ge=0)
    """Latent cells of the face box weigh 1 + this (added to the lip weight where both apply; 0 = off)."""
    require_tracks: bool = False
    """With a lip or face weight: refuse entries without a `track` (default: they train with weight 1, counted)."""
    loss_outlier_threshold: float = Field(50.0, gt=0)
    """Elements whose |error| exceeds this are zeroed before averaging (the reference's outlier guard)."""
    max_consecutive_nonfinite: int = Field(5, ge=1)
    """Abort after this many optimizer steps in a row with a NaN/inf loss (each is skipped)."""
    report_to: Literal["tensorboard", "wandb", "none"] = "tensorboard"
    """Where scalars go."""
    logging_steps: int = Field(10, ge=1)
    """When the output is not a terminal (a job log, `> train.log`): print a plain line with loss, lr,
    throughput, data wait and ETA every N optimizer steps and at the first step."""
    validation_image_paths: list[Path] = Field(default_factory=list)
    """Reference portraits to sample during training, each with the audio at the same position of
    `validation_audio_paths`: videos go to `output_dir/samples/step-N/` and TensorBoard."""
    validation_audio_paths: list[Path] = Field(default_factory=list)
    """Speech for each validation image."""
    validation_prompts: list[str] = Field(default_factory=list)
    """One prompt per validation pair, or one for all (none: "A person is talking.")."""
    validation_steps: int | None = Field(None, ge=1)
    """Sample the validation pairs every N optimizer steps, and at the end of training (unset: at the end only)."""
    validation_num_inference_steps: int = Field(30, ge=1)
    """Denoising steps of each validation video (upstream: 30)."""
    validation_image_size: int = Field(512, ge=32)
    """Longer side of the validation videos (upstream: 512)."""
    validation_max_num_frames: int = Field(81, ge=5)
    """Most frames of a validation video (the audio's duration sets the count; upstream: 81)."""
    validation_metrics: bool = False
    """Score `eval_meta`'s held-out clips for audio reliance (`ftalk evaluate`'s numbers) every `validation_steps`
    and at the end, into `output_dir/metrics.jsonl` and TensorBoard; every rank takes part."""
    eval_timesteps: int = Field(8, ge=1)
    """Audio reliance: the fixed, stratified timesteps each held-out clip's loss is computed at."""

    def region_weights(self) -> tuple[float, float] | None:
        """(face, lip) loss weights when either is set, else None (the plain loss)."""
        return (self.face_loss_weight, self.lip_loss_weight) if self.face_loss_weight or self.lip_loss_weight else None

    def audio_drop_probability(self) -> float:
        """`audio_dropout` as set, else 0 (`FtalkConfig` fills in the LoRA default)."""
        return self.audio_dropout or 0.0

    def total_steps(self, steps_per_epoch: int) -> int:
        """Optimizer steps the run takes: `max_train_steps`, else `num_train_epochs` epochs of `steps_per_epoch`."""
        return self.max_train_steps or self.num_train_epochs * steps_per_epoch

    def epochs_covered(self, steps_per_epoch: int) -> int:
        """Epochs (at least one) the run's steps reach into: the windows a feature cache must hold."""
        return max(1, math.ceil(self.total_steps(steps_per_epoch) / max(1, steps_per_epoch)))

    @model_validator(mode="after")
    def _validation_pairs(self) -> TrainConfig:
        images, audios, prompts = self.validation_image_paths, self.validation_audio_paths, self.validation_prompts
        if len(images) != len(audios):
            raise ValueError(
                f"validation_image_paths has {len(images)} paths and validation_audio_paths {len(audios)}: give one "
                "audio file per image"
            )
        if len(prompts) > 1 and len(prompts) != len(images):
            raise ValueError(
                f"validation_prompts has {len(prompts)} prompts for {len(images)} validation pairs: give one per "
                "pair, or one for all"
            )
        if prompts and not images:
            raise ValueError("validation_prompts need validation_image_paths and _audio_paths")
        if self.validation_steps is not None and not images and not self.validation_metrics:
            raise ValueError(
                "validation_steps needs something to validate: validation_image_paths and _audio_paths (samples), "
                "or --validation_metrics with --eval_meta (held-out scores)"
            )
        return self


class CheckpointConfig(Section):
    """Where the run writes, how often it saves, what it resumes from."""

    output_dir: Path = Path("output_dir")
    """Run folder: checkpoints, logs and the resolved config."""
    checkpointing_steps: int = Field(500, ge=1)
    """Save a `checkpoint-N/` every N optimizer steps."""
    checkpoints_total_limit: int | None = Field(None, ge=1)
    """Keep at most this many checkpoints (oldest pruned after a successful save)."""
    resume_from_checkpoint: str | None = None
    """`latest` or a checkpoint folder to resume from (`latest` on a folder without checkpoints starts anew)."""
    init_from: Path | None = None
    """Start this run from another run's trained weights (a checkpoint, run or convert-zero folder, an adapter
    file): the trainable tensors only, with this run's own optimizer and schedule, at step 0 (stage 2 from stage 1).
    A resume of this run's own checkpoints wins over it."""
    allow_unverified_resume: bool = False
    """Resume from a checkpoint whose manifest does not verify, or that lacks its RNG state, saying which
    guarantee is lost (default: refuse, or with `latest` fall back to the newest checkpoint that verifies)."""
    overwrite_output_dir: bool = False
    """Start a new run in a folder that holds another run's checkpoints: that run's files are moved into
    `replaced-<time>/` inside it (nothing is deleted; other files stay)."""


class DistConfig(Section):
    """How processes share the work; normally read from `accelerate launch`."""

    strategy: Literal["auto", "ddp", "zero2", "zero3", "fsdp"] = "auto"
    """`auto` takes what `accelerate launch` set up; the others force a strategy."""
    deepspeed_config_file: Path | None = None
    """DeepSpeed JSON when not given to `accelerate launch`."""
    fsdp_version: Literal[1, 2] = 2
    """FSDP implementation when `strategy` is fsdp and accelerate did not say."""


class FtalkConfig(BaseModel):
    """Everything ftalk needs to validate, plan, train and convert."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)

    data: DataConfig = Field(default_factory=DataConfig)
    """Training clips and metadata."""
    buckets: BucketConfig = Field(default_factory=BucketConfig)
    """Sample sizes, frame counts and buckets."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """Weights and trainable parameters."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """Optimisation."""
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    """Run folder and checkpoints."""
    dist: DistConfig = Field(default_factory=DistConfig)
    """Distribution strategy."""

    @model_validator(mode="after")
    def _audio_dropout_default(self) -> FtalkConfig:
        if self.train.audio_dropout is None:
            self.train.audio_dropout = LORA_AUDIO_DROPOUT if self.model.lora_rank else 0.0
        return self

    @model_validator(mode="after")
    def _metrics_need_held_out_clips(self) -> FtalkConfig:
        if self.train.validation_metrics and self.data.eval_meta is None:
            raise ValueError("--validation_metrics scores held-out clips: give them with --eval_meta HELD_OUT.json")
        return self


SECTIONS: dict[str, type[Section]] = {
    name: field.annotation  # type: ignore[misc]
    for name, field in FtalkConfig.model_fields.items()
}

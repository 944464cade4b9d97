"""The denoising loop of `ftalk sample`: the schedule, the guidance formula on captured predictions (with and
without `audio_cfg_end`), and one real step on the tiny upstream-layout weights against the upstream formula."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fantasytalk_cli.models.adapter_file import load_adapter_or_transformer
from fantasytalk_cli.models.dit_loading import load_transformer
from fantasytalk_cli.models.tiny import TINY_AUDIO_DIMS
from fantasytalk_cli.sample.denoise import Conditions, Guidance, combine, denoise, inference_sigmas, steps_count


def test_inference_sigmas_are_the_shifted_linspace_ending_at_zero() -> None:
    sigmas = inference_sigmas(30, 5.0)
    plain = torch.linspace(1, 0, 31, dtype=torch.float64)[:-1]
    assert sigmas.shape == (31,) and sigmas[0] == 1.0 and sigmas[-1] == 0.0
    torch.testing.assert_close(sigmas[:-1], 5 * plain / (1 + 4 * plain))
    assert bool((sigmas[1:] < sigmas[:-1]).all())


def _conditions(frames: int = 3) -> Conditions:
    gen = torch.Generator().manual_seed(0)
    return Conditions(
        text=torch.randn(1, 4, 8, generator=gen),
        negative_text=torch.randn(1, 4, 8, generator=gen),
        image=torch.randn(1, 5, 8, generator=gen),
        y=torch.randn(1, 20, frames, 2, 2, generator=gen),
        audio=torch.randn(1, 7, 8, generator=gen),
    )


class Recorder:
    """A stand-in transformer: a different, deterministic prediction for every (text, audio_scale, step) call."""

    def __init__(self, cond: Conditions) -> None:
        self.cond = cond
        self.calls: list[tuple[str, float, torch.Tensor]] = []

    def __call__(
        self, hidden: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, audio_scale: float
    ) -> torch.Tensor:
        which = "prompt" if torch.equal(text, self.cond.text) else "negative"
        latents = hidden[:, :16]
        pred = torch.sin(
            latents * (1.3 if which == "prompt" else 0.7) + audio_scale + timestep.view(-1, 1, 1, 1, 1) / 997
        )
        self.calls.append((which, audio_scale, pred))
        return pred


@pytest.mark.parametrize(
    ("prompt_cfg", "audio_cfg_end", "passes"),
    [(5.0, 1.0, [3, 3, 3, 3]), (1.0, 1.0, [2, 2, 2, 2]), (4.5, 0.5, [3, 3, 2, 2]), (4.5, 0.0, [2, 2, 2, 2])],
)
def test_each_step_combines_the_captured_predictions_by_the_formula(
    prompt_cfg: float, audio_cfg_end: float, passes: list[int]
) -> None:
    cond = _conditions()
    guidance = Guidance(
        num_inference_steps=4, prompt_cfg_scale=prompt_cfg, audio_cfg_scale=3.0, audio_scale=0.8,
        audio_cfg_end=audio_cfg_end,
    )  # fmt: skip
    recorder = Recorder(cond)
    latents = denoise(recorder, cond, guidance, generator=torch.Generator().manual_seed(1), dtype=torch.float32)
    assert sum(passes) == len(recorder.calls) == steps_count(guidance)
    # replay: the same noise, each step's flow from the captured predictions by the written-out formula
    x = torch.randn((1, 16, 3, 2, 2), generator=torch.Generator().manual_seed(1))
    sigmas = inference_sigmas(4, 5.0)
    calls = iter(recorder.calls)
    for step, count in enumerate(passes):
        got = {(which, scale): pred for which, scale, pred in (next(calls) for _ in range(count))}
        posi = got[("prompt", 0.8)]
        if count == 3 or (count == 2 and prompt_cfg == 1.0):  # audio-guided step
            noaudio, uncond = got[("prompt", 0.0)], got.get(("negative", 0.0))
            flow = (uncond + prompt_cfg * (noaudio - uncond) if uncond is not None else noaudio) + 3.0 * (
                posi - noaudio
            )
        else:  # after audio_cfg_end: prompt guidance, the audio on in both passes
            uncond = got[("negative", 0.8)]
            flow = uncond + prompt_cfg * (posi - uncond)
        x = x + flow * float(sigmas[step + 1] - sigmas[step])
    torch.testing.assert_close(latents, x, rtol=0, atol=1e-6)


def test_combine_without_guidance_passes_through() -> None:
    posi = torch.randn(2, 3)
    assert torch.equal(combine(posi, None, None, prompt_cfg=1.0, audio_cfg=None), posi)
    with pytest.raises(ValueError, match="no-audio"):
        combine(posi, None, None, prompt_cfg=1.0, audio_cfg=2.0)


def test_one_real_step_equals_the_upstream_formula(tiny_world: dict[str, Path]) -> None:
    """Tiny upstream-layout weights with the released-form adapter: the first step of `denoise` (fp32) equals
    x + (uncond + 5 (noaudio - uncond) + 5 (posi - noaudio)) (sigma_1 - sigma_0), each prediction computed directly."""
    model = load_transformer(tiny_world["model"], **TINY_AUDIO_DIMS)
    load_adapter_or_transformer(tiny_world["model"] / "fantasytalking_model.ckpt", model)
    cfg = model.config
    gen = torch.Generator().manual_seed(3)
    cond = Conditions(
        text=torch.randn(1, 6, cfg.text_dim, generator=gen),
        negative_text=torch.randn(1, 6, cfg.text_dim, generator=gen),
        image=torch.randn(1, 5, cfg.image_dim, generator=gen),
        y=torch.randn(1, 20, 3, 4, 4, generator=gen),
        audio=torch.randn(1, 40, cfg.audio_in_dim, generator=gen),
    )

    def predict(hidden: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, audio_scale: float) -> torch.Tensor:
        return model(hidden, timestep, text, cond.image, cond.audio, audio_scale)[0]

    guidance = Guidance(num_inference_steps=1)  # one step: sigma 1 -> 0
    with torch.no_grad():
        got = denoise(predict, cond, guidance, generator=torch.Generator().manual_seed(11), dtype=torch.float32)
        x = torch.randn((1, 16, 3, 4, 4), generator=torch.Generator().manual_seed(11))
        hidden, t = torch.cat([x, cond.y], 1), torch.tensor([1000.0])
        posi = model(hidden, t, cond.text, cond.image, cond.audio, 1.0)[0]
        noaudio = model(hidden, t, cond.text, cond.image, cond.audio, 0.0)[0]
        uncond = model(hidden, t, cond.negative_text, cond.image, cond.audio, 0.0)[0]
    want = x + (uncond + 5.0 * (noaudio - uncond) + 5.0 * (posi - noaudio)) * (0.0 - 1.0)
    assert not torch.allclose(posi, noaudio)  # the adapter acts: the audio pass differs from the no-audio one
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)

"""Captioned synthetic scenes and a pixel judge: the data the embedded model learns from, and how we grade it.

A scene is one or two plain shapes on a plain background, named by the words in :mod:`.vocabulary`. We
draw them (:func:`render`), caption them (:func:`caption`), stream them for training (:func:`scene_stream`)
and keep a fixed set of evaluation prompts (:func:`evaluation_prompts`). The judge (:func:`judge`,
:func:`prompt_adherence`) reads a generated image back into those same words, from pixels alone — so "does
FP8 keep the picture?" becomes "does FP8 still draw a red circle on the left?", with a confidence interval.

Example:
    >>> from sd35fp8_helpers.scenes import ObjectSpec, SceneSpec, caption, judge, render
    >>> spec = SceneSpec((ObjectSpec("circle", "red", "left", "large"),), "blue")
    >>> caption(spec)
    'a large red circle on the left, on a blue background'
    >>> judge(render(spec).image, spec).all_ok
    True
"""

from .captions import caption, training_caption
from .dataset import EvalPrompt, SceneSample, evaluation_prompts, scene_sample, scene_stream
from .judge import (
                    AdherenceReport,
                    PairedQuality,
                    Rate,
                    Verdict,
                    judge,
                    paired_psnr_ssim,
                    prompt_adherence,
                    read_scene,
                    ssim,
                    wilson_interval,
)
from .render import RenderedScene, render
from .spec import ObjectSpec, SceneSpec

__all__ = ["AdherenceReport", "EvalPrompt", "ObjectSpec", "PairedQuality", "Rate", "RenderedScene", "SceneSample",
           "SceneSpec", "Verdict", "caption", "evaluation_prompts", "judge", "paired_psnr_ssim", "prompt_adherence",
           "read_scene", "render", "scene_sample", "scene_stream", "ssim", "training_caption", "wilson_interval"]

"""What determines an image, as plain data: :class:`GenerationSettings` (no heavy imports, no pipeline)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GenerationSettings:
    """Everything that determines an image (with the model and precision): plain data, JSON-able."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 4
    guidance_scale: float = 4.5
    height: int = 128
    width: int = 128
    lora: str = ""
    """A LoRA by name (:func:`~sd35fp8_helpers.lora.shipped.named_loras`: shipped, or in ``$SD35FP8_HOME/loras``),
    applied on a side path; "" = none."""
    lora_scale: float = 1.0

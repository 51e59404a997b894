"""Helpers shared by the FP8 and Comfy tests: the tiny pipeline's latents for one prompt, and relative error."""

from __future__ import annotations

import torch


def tiny_latents(pipe, seed: int = 0) -> torch.Tensor:
    """Denoised latents (no VAE) of a fixed prompt: what precision changes are measured on."""
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt="a red fox", num_inference_steps=2, height=128, width=128, output_type="latent",
                generator=torch.Generator("cpu").manual_seed(seed)).images


def rel_error(a, b) -> float:
    """‖a − b‖ / ‖b‖."""
    return float((a - b).norm() / b.norm())

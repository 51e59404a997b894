"""The architecture presets: real configs match REFERENCE, parameter counts are recomputed, tiny obeys the rules."""

from __future__ import annotations

import pytest
import torch

from sd35fp8_helpers.presets import LARGE, MEDIUM, PARAMETER_COUNTS, PRESETS, TINY, get_preset, instantiate_transformer


def _meta_counts(preset) -> dict[str, int]:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    cfg = preset.component_configs()
    with torch.device("meta"):
        modules = {
            "transformer": instantiate_transformer(preset),
            "vae": AutoencoderKL(**cfg["vae"]),
            "clip_l": CLIPTextModelWithProjection(CLIPTextConfig(**cfg["clip_l"])),
            "clip_g": CLIPTextModelWithProjection(CLIPTextConfig(**cfg["clip_g"])),
            "t5": T5EncoderModel(T5Config(**cfg["t5"])),
        }
    return {name: sum(p.numel() for p in m.parameters()) for name, m in modules.items()}


@pytest.mark.parametrize("preset", [LARGE, MEDIUM], ids=lambda p: p.name)
def test_parameter_counts_are_those_of_the_configs(preset):
    counts = _meta_counts(preset)
    assert counts == PARAMETER_COUNTS[preset.name]
    assert next(instantiate_transformer(preset).parameters()).device.type == "meta"


def test_real_sizes_match_published_figures():
    # REFERENCE §2/§10: Large transformer 8.06B, Medium 2.24B, T5-XXL 4.76B parameters.
    assert round(PARAMETER_COUNTS["large"]["transformer"] / 1e9, 2) == 8.06
    assert round(PARAMETER_COUNTS["medium"]["transformer"] / 1e9, 2) == 2.24
    assert round(PARAMETER_COUNTS["large"]["t5"] / 1e9, 2) == 4.76


@pytest.mark.parametrize("preset,max_px", [(LARGE, 3072), (MEDIUM, 6144), (TINY, 256)], ids=lambda x: str(x))
def test_single_pass_limit(preset, max_px):
    assert preset.max_side_px == max_px
    assert preset.size_multiple == 16


@pytest.mark.parametrize("preset", list(PRESETS.values()), ids=lambda p: p.name)
def test_dimension_rules_of_stable_diffusion_3_pipeline(preset):
    t, clip_l, g, t5 = preset.transformer, preset.clip_l, preset.clip_g, preset.t5
    assert clip_l["hidden_size"] + g["hidden_size"] <= t5["d_model"]  # CLIP states padded up to T5 width
    assert t["joint_attention_dim"] == t5["d_model"]
    assert t["pooled_projection_dim"] == clip_l["projection_dim"] + g["projection_dim"]
    assert t["caption_projection_dim"] == t["num_attention_heads"] * t["attention_head_dim"]
    assert preset.vae["latent_channels"] == t["in_channels"] == 16


def test_tiny_keeps_the_sd35_medium_features():
    assert TINY.transformer["qk_norm"] == "rms_norm"
    assert TINY.transformer["dual_attention_layers"]  # at least one dual-attention layer, like Medium
    assert len(TINY.vae["block_out_channels"]) == len(MEDIUM.vae["block_out_channels"]) == 4
    assert (TINY.vae["scaling_factor"], TINY.vae["shift_factor"]) == (1.5305, 0.0609)


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="unknown preset 'xl'; choose one of tiny, medium, large"):
        get_preset("xl")


def test_component_configs_are_copies():
    cfg = LARGE.component_configs()
    cfg["transformer"]["num_layers"] = 1
    assert LARGE.transformer["num_layers"] == 38

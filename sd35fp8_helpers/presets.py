"""SD3.5 architectures as plain data: the real ``large`` and ``medium`` configs, and the embedded ``tiny`` one.

The real presets let us instantiate SD3.5 at its true size with random weights — on the ``meta`` device to
count parameters and bytes with no memory at all, or directly on a GPU to measure speed and memory
faithfully without downloading anything. The ``tiny`` preset keeps every architectural feature of SD3.5
Medium (joint attention, RMS qk-norm, a dual-attention layer, 16 latent channels, three text encoders)
at a size that builds and runs in seconds on 2 CPU cores.

Dimension rules the tiny preset must keep (StableDiffusion3Pipeline does not check all of them):

* CLIP-L hidden + CLIP-G hidden <= T5 d_model (they are concatenated, then padded up to d_model);
* ``transformer.joint_attention_dim == t5.d_model``;
* ``pooled_projection_dim == clip_l.projection_dim + clip_g.projection_dim``;
* ``caption_projection_dim == num_attention_heads * attention_head_dim``;
* ``vae.latent_channels == transformer.in_channels == 16``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

_TRANSFORMER_COMMON: dict[str, Any] = dict(
    patch_size=2, in_channels=16, out_channels=16, sample_size=128, joint_attention_dim=4096,
    pooled_projection_dim=2048, attention_head_dim=64, qk_norm="rms_norm",
)
_VAE_REAL: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=16,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32,
    use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609,
    sample_size=1024, force_upcast=True,
)
_CLIP_L: dict[str, Any] = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                               num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu",
                               max_position_embeddings=77)
_CLIP_G: dict[str, Any] = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                               num_attention_heads=20, projection_dim=1280, hidden_act="gelu",
                               max_position_embeddings=77)
_T5_XXL: dict[str, Any] = dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64,
                               feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)


@dataclass(frozen=True)
class Preset:
    """One SD3.5 architecture: configs for every component, as plain dictionaries."""

    name: str
    transformer: dict[str, Any]
    vae: dict[str, Any]
    clip_l: dict[str, Any]
    clip_g: dict[str, Any]
    t5: dict[str, Any]
    scheduler: dict[str, Any] = field(default_factory=lambda: {"shift": 3.0})
    default_steps: int = 28
    default_guidance: float = 4.5
    architecture: str = ""
    """The preset whose weights' shapes this one shares (``large-turbo`` → ``large``); empty = its own name."""
    repo_ids: tuple[str, ...] = ()
    """Hub repositories of this model: how a loaded pipeline is recognised (see :func:`recognise_preset`)."""

    @property
    def arch(self) -> str:
        """Name of the architecture (parameter counts, memory calibration): ``large`` for Large Turbo."""
        return self.architecture or self.name

    @property
    def uses_cfg(self) -> bool:
        """Whether the default guidance runs classifier-free guidance (diffusers: ``guidance_scale > 1``).

        Without CFG each step is one transformer pass at batch 1 instead of two (conditional + unconditional)
        at batch 2: Turbo's ``guidance_scale=0`` is half the work per step, not just fewer steps.
        """
        return self.default_guidance > 1.0

    @property
    def step_batch(self) -> int:
        """Transformer batch of one denoising step for one image: 2 with CFG, 1 without."""
        return 2 if self.uses_cfg else 1

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    @property
    def max_side_px(self) -> int:
        """Largest image side one transformer pass accepts (pos-embed limit × patch × VAE factor).

        Beyond it diffusers raises ``ValueError``: tiled denoising is the only way up.
        """
        t = self.transformer
        return t["pos_embed_max_size"] * t["patch_size"] * self.vae_scale_factor

    @property
    def default_side_px(self) -> int:
        return self.transformer["sample_size"] * self.vae_scale_factor

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this (VAE factor × patch size)."""
        return self.vae_scale_factor * self.transformer["patch_size"]

    def component_configs(self) -> dict[str, dict[str, Any]]:
        """Deep copies, safe to edit."""
        return copy.deepcopy(dict(transformer=self.transformer, vae=self.vae, clip_l=self.clip_l,
                                  clip_g=self.clip_g, t5=self.t5))


LARGE = Preset(
    name="large",
    transformer=dict(_TRANSFORMER_COMMON, num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                     pos_embed_max_size=192, dual_attention_layers=[]),
    vae=_VAE_REAL, clip_l=_CLIP_L, clip_g=_CLIP_G, t5=_T5_XXL,
    default_steps=28, default_guidance=3.5, repo_ids=("stabilityai/stable-diffusion-3.5-large",),
)
LARGE_TURBO = Preset(
    # Same weights' shapes as Large (REFERENCE §2), distilled (ADD) for 4 steps without guidance: its model card
    # runs num_inference_steps=4, guidance_scale=0.0 — so no negative pass, batch 1 per step.
    name="large-turbo",
    transformer=LARGE.transformer, vae=_VAE_REAL, clip_l=_CLIP_L, clip_g=_CLIP_G, t5=_T5_XXL,
    scheduler={"shift": 3.0}, default_steps=4, default_guidance=0.0, architecture="large",
    repo_ids=("stabilityai/stable-diffusion-3.5-large-turbo",),
)
MEDIUM = Preset(
    name="medium",
    transformer=dict(_TRANSFORMER_COMMON, num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                     pos_embed_max_size=384, dual_attention_layers=list(range(13))),
    vae=_VAE_REAL, clip_l=_CLIP_L, clip_g=_CLIP_G, t5=_T5_XXL,
    default_steps=40, default_guidance=4.5, repo_ids=("stabilityai/stable-diffusion-3.5-medium",),
)
TINY = Preset(
    name="tiny",
    # 2 layers, the first with dual attention (as in Medium), RMS qk-norm; 16 px per patch as in the real model.
    # pos_embed_max_size 16 → one pass covers at most 256 px: tiling notebooks can go past it cheaply.
    transformer=dict(patch_size=2, in_channels=16, out_channels=16, sample_size=16, num_layers=2,
                     attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64,
                     caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=16,
                     dual_attention_layers=[0], qk_norm="rms_norm"),
    vae=dict(_VAE_REAL, block_out_channels=[8, 16, 16, 16], layers_per_block=1, norm_num_groups=4, sample_size=128),
    clip_l=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32,
                hidden_act="quick_gelu", max_position_embeddings=77),
    clip_g=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32,
                hidden_act="gelu", max_position_embeddings=77),
    t5=dict(d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
            is_encoder_decoder=False, use_cache=False),
    default_steps=4, default_guidance=4.5,
)
PRESETS: dict[str, Preset] = {p.name: p for p in (TINY, MEDIUM, LARGE, LARGE_TURBO)}

# Parameter counts of the real configs, measured by instantiating them on the meta device
# (tests/test_presets.py recomputes them, so these cannot drift from the configs above).
PARAMETER_COUNTS: dict[str, dict[str, int]] = {
    "large": {"transformer": 8_056_627_520, "vae": 83_819_683, "clip_l": 123_650_304,
              "clip_g": 694_659_840, "t5": 4_762_310_656},
    "large-turbo": {"transformer": 8_056_627_520, "vae": 83_819_683, "clip_l": 123_650_304,
                    "clip_g": 694_659_840, "t5": 4_762_310_656},  # = large: same architecture
    "medium": {"transformer": 2_243_171_520, "vae": 83_819_683, "clip_l": 123_650_304,
               "clip_g": 694_659_840, "t5": 4_762_310_656},
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def recognise_preset(spec: str = "", transformer_config: dict[str, Any] | None = None) -> Preset | None:
    """The preset a model belongs to, from its name and/or its transformer config; None if neither tells.

    Large and Large Turbo have identical configs, so only a name can tell them apart: the repo id, a hub-cache
    folder (``models--stabilityai--stable-diffusion-3.5-large-turbo``), a folder named after the repo, or the
    config's ``_name_or_path`` (diffusers writes the repo id there when it saves). The longest matching repo
    id wins (``…-large-turbo`` contains ``…-large``). Without a name, the depth tells Large from Medium.

    Example:
        >>> recognise_preset("stabilityai/stable-diffusion-3.5-large-turbo").default_steps
        4
        >>> recognise_preset("", {"num_layers": 24}).name
        'medium'
    """
    names = [str(spec)]
    if transformer_config:
        names.append(str(transformer_config.get("_name_or_path", "")))
    for text in names:
        text = text.lower().replace("--", "/")
        hits = [(len(r), p) for p in PRESETS.values() for r in p.repo_ids
                if r in text or r.rsplit("/", 1)[1] == text.rstrip("/").rsplit("/", 1)[-1]]
        if hits:
            return max(hits, key=lambda h: h[0])[1]
    if transformer_config and "num_layers" in transformer_config:
        depth = {p.transformer["num_layers"]: p for p in (TINY, MEDIUM, LARGE)}
        return depth.get(transformer_config["num_layers"])
    return None


def model_bytes(preset: str, bytes_per_param: float = 2.0) -> int:
    """Bytes of all weights of a real preset at ``bytes_per_param`` (2 = bf16/fp16 as distributed)."""
    return int(sum(PARAMETER_COUNTS[preset].values()) * bytes_per_param)


def instantiate_transformer(preset: str | Preset, *, device: str = "meta", dtype: Any = None):
    """An ``SD3Transformer2DModel`` of the preset with random weights, built directly on ``device``.

    ``device="meta"`` allocates nothing (for counting); ``device="cuda"`` builds at real size on the GPU
    without a host copy — the way our benchmarks measure speed and memory without downloading weights.
    """
    import torch
    from diffusers import SD3Transformer2DModel

    p = get_preset(preset) if isinstance(preset, str) else preset
    with torch.device(device):
        model = SD3Transformer2DModel(**p.component_configs()["transformer"])
    return model.to(dtype) if dtype is not None else model


def count_parameters(module) -> int:
    return sum(t.numel() for t in module.parameters())

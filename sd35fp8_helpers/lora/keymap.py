"""Where a LoRA key lands in diffusers' SD3 transformer — for diffusers/PEFT names and for the original
(Kohya / Comfy) names, whose ``qkv`` is one fused Linear and whose final AdaLN stores (shift, scale).

diffusers 0.42 has no SD3 converter for Kohya/Comfy LoRA files (``loaders/lora_conversion_utils.py`` covers
SDXL's U-Net, Flux, Wan, HiDream …; its SD3 loader accepts diffusers/PEFT keys only). It does have the
converter for the *model* weights, ``convert_sd3_transformer_checkpoint_to_diffusers`` (single-file loading),
which knows every rename, the ``qkv`` → ``to_q``/``to_k``/``to_v`` split and the shift/scale swap. We run that
converter on a "tag" checkpoint — each original weight replaced by a column of its own row numbers — and read
off, for every diffusers Linear, which original layer and which of its rows it came from. A LoRA's ``up``
matrix is indexed by output rows exactly like the weight (ΔW = up @ down), so the same rows select its part:
the mapping is diffusers' own, not a second copy of it that could drift.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

_TAG = 1 << 24
"""Tags are ``layer_index * _TAG + row``: rows of one Linear never reach 2^24 (Large's widest has 14 592)."""


@dataclass(frozen=True)
class OriginalRows:
    """A diffusers Linear's weight = rows ``rows`` (in this order) of the original layer ``original``."""

    original: str
    rows: tuple[int, ...]


def _original_layers(transformer) -> dict[str, int]:
    """Original (MMDiT) name → output rows, for every Linear/Conv weight, built from a diffusers transformer."""
    out: dict[str, int] = {
        "x_embedder.proj": transformer.pos_embed.proj.out_channels,
        "context_embedder": transformer.context_embedder.out_features,
        "t_embedder.mlp.0": transformer.time_text_embed.timestep_embedder.linear_1.out_features,
        "t_embedder.mlp.2": transformer.time_text_embed.timestep_embedder.linear_2.out_features,
        "y_embedder.mlp.0": transformer.time_text_embed.text_embedder.linear_1.out_features,
        "y_embedder.mlp.2": transformer.time_text_embed.text_embedder.linear_2.out_features,
        "final_layer.linear": transformer.proj_out.out_features,
        "final_layer.adaLN_modulation.1": transformer.norm_out.linear.out_features,
    }
    for i, block in enumerate(transformer.transformer_blocks):
        x, c, attn = f"joint_blocks.{i}.x_block", f"joint_blocks.{i}.context_block", block.attn
        out[f"{x}.attn.qkv"] = 3 * attn.to_q.out_features
        out[f"{x}.attn.proj"] = attn.to_out[0].out_features
        out[f"{x}.adaLN_modulation.1"] = block.norm1.linear.out_features
        out[f"{x}.mlp.fc1"] = block.ff.net[0].proj.out_features
        out[f"{x}.mlp.fc2"] = block.ff.net[2].out_features
        if getattr(block, "attn2", None) is not None:
            out[f"{x}.attn2.qkv"] = 3 * block.attn2.to_q.out_features
            out[f"{x}.attn2.proj"] = block.attn2.to_out[0].out_features
        out[f"{c}.attn.qkv"] = 3 * attn.add_q_proj.out_features
        out[f"{c}.adaLN_modulation.1"] = block.norm1_context.linear.out_features
        if attn.to_add_out is not None:
            out[f"{c}.attn.proj"] = attn.to_add_out.out_features
        if block.ff_context is not None:
            out[f"{c}.mlp.fc1"] = block.ff_context.net[0].proj.out_features
            out[f"{c}.mlp.fc2"] = block.ff_context.net[2].out_features
    return out


def _tag_checkpoint(transformer, layers: dict[str, int]) -> dict[str, Any]:
    import torch

    ckpt: dict[str, Any] = {"pos_embed": torch.zeros(1)}
    for index, (name, rows) in enumerate(layers.items()):
        tags = torch.arange(rows, dtype=torch.int64) + index * _TAG
        ckpt[f"{name}.weight"] = tags[:, None]
        ckpt[f"{name}.bias"] = tags
    for i, block in enumerate(transformer.transformer_blocks):  # qk-norm weights: popped by the converter
        for part, attn in (("x_block.attn", block.attn), ("context_block.attn", block.attn),
                           ("x_block.attn2", getattr(block, "attn2", None))):
            if attn is not None and getattr(attn, "norm_q", None) is not None:
                for ln in ("ln_q", "ln_k"):
                    ckpt[f"joint_blocks.{i}.{part}.{ln}.weight"] = torch.zeros(1)
    return ckpt


def original_to_diffusers(transformer) -> dict[str, list[tuple[str, OriginalRows]]]:
    """Original layer name → [(diffusers Linear name, the original rows it holds), …] for this transformer.

    Example:
        >>> from sd35fp8_helpers.presets import instantiate_transformer
        >>> m = original_to_diffusers(instantiate_transformer("tiny"))
        >>> [name for name, _ in m["joint_blocks.0.x_block.attn.qkv"]]
        ['transformer_blocks.0.attn.to_q', 'transformer_blocks.0.attn.to_k', 'transformer_blocks.0.attn.to_v']
    """
    key = json.dumps(dict(transformer.config), sort_keys=True, default=str)
    return _cached_map(key, transformer)


_MAPS: dict[str, dict[str, list[tuple[str, OriginalRows]]]] = {}


def _cached_map(key: str, transformer) -> dict[str, list[tuple[str, OriginalRows]]]:
    if key not in _MAPS:
        _MAPS[key] = _build_map(transformer)
    return _MAPS[key]


def _build_map(transformer) -> dict[str, list[tuple[str, OriginalRows]]]:
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    layers = _original_layers(transformer)
    names = list(layers)
    converted = convert_sd3_transformer_checkpoint_to_diffusers(_tag_checkpoint(transformer, layers))
    result: dict[str, list[tuple[str, OriginalRows]]] = {}
    for key, tags in converted.items():
        if not key.endswith(".weight") or tags.dtype != _int64():
            continue
        flat = tags.reshape(-1).tolist()
        originals = {t // _TAG for t in flat}
        if len(originals) != 1:  # pragma: no cover - the converter never mixes layers in one weight
            raise RuntimeError(f"{key} mixes rows of several original layers")
        original = names[originals.pop()]
        result.setdefault(original, []).append(
            (key.removesuffix(".weight"), OriginalRows(original, tuple(t % _TAG for t in flat))))
    return result


@lru_cache(maxsize=1)
def _int64():
    import torch

    return torch.int64


def underscored(name: str) -> str:
    """Kohya's spelling of a module name: dots become underscores (``lora_unet_`` + this)."""
    return name.replace(".", "_")

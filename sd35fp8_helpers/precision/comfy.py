"""Load Comfy-Org "scaled FP8" single files — the FP8 SD3.5 files people actually download — into diffusers.

``Comfy-Org/stable-diffusion-3.5-fp8`` ships one ``.safetensors`` per model in ComfyUI's layout:

* the transformer under ``model.diffusion_model.`` with the *original* SD3 key names
  (``joint_blocks.N.x_block.attn.qkv.weight`` — q, k and v fused), Linear weights in ``float8_e4m3fn``;
* a marker tensor ``model.diffusion_model.scaled_fp8`` (its dtype names the FP8 dtype; float32 means e4m3fn);
* per FP8 Linear a float32 scalar ``<layer>.scale_weight`` (the real weight is ``weight.float() * scale_weight``)
  and optionally ``<layer>.scale_input`` (an activation scale for static FP8 matmuls);
* in all-in-one files, the text encoders under ``text_encoders.clip_l.transformer.``,
  ``text_encoders.clip_g.transformer.`` and ``text_encoders.t5xxl.transformer.`` (transformers' own key
  names below the prefix; T5 may be scaled FP8 too, marker ``text_encoders.t5xxl.transformer.scaled_fp8``).

diffusers' ``from_single_file`` ignores ``scale_weight``: the weights come out hundreds of times too large
or small and the images are white or noise, without any error. :func:`load_comfy_pipeline` applies the
scales and keeps the FP8 bytes (each FP8 Linear becomes a ``Float8StorageLinear`` with a per-tensor scale),
so no bf16 copy of the transformer is ever built. Key names are converted by diffusers' own
``convert_sd3_transformer_checkpoint_to_diffusers``; a probe pass through the same converter tells which
diffusers layer each scale belongs to (qkv's one scale goes to to_q, to_k and to_v).

The configs, tokenizers, scheduler and VAE come from a ``base`` diffusers model (``tiny``, a folder or a
repo id) — the file holds weights only.

Example:
    >>> pipe = load_comfy_pipeline("sd3.5_medium_fp8_scaled.safetensors", base="tiny")  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ComfyFormatError, Sd35fp8Error

if TYPE_CHECKING:  # pragma: no cover
    import torch

TRANSFORMER_PREFIX = "model.diffusion_model."
SCALED_FP8_MARKER = "scaled_fp8"
TEXT_ENCODER_PREFIXES: dict[str, str] = {
    "text_encoder": "text_encoders.clip_l.transformer.",
    "text_encoder_2": "text_encoders.clip_g.transformer.",
    "text_encoder_3": "text_encoders.t5xxl.transformer.",
}
"""diffusers component → ComfyUI's prefix in an all-in-one SD3 file (ComfyUI ``supported_models.SD3``)."""
_IGNORED_SUFFIXES = ("position_ids", "logit_scale")


ARCHITECTURE_BASES: dict[str, str] = {
    "large": "stabilityai/stable-diffusion-3.5-large",
    "medium": "stabilityai/stable-diffusion-3.5-medium",
    "tiny": "tiny",
}
"""Where the configs, tokenizers, scheduler and VAE of each architecture come from when no ``base`` is given
(Large Turbo shares Large's shapes, so a Turbo file also gets Large's — same components, same configs but
the scheduler's defaults; pass ``base=`` the Turbo repo to be exact)."""


@dataclass
class ComfyFileInfo:
    """What a Comfy single file holds, read from its header (no tensors loaded)."""

    path: Path
    components: dict[str, int]  # component -> number of tensors
    scaled: dict[str, str]  # component -> FP8 dtype named by its marker
    scaled_layers: int
    has_scale_input: bool
    size_bytes: int
    fp8_weights: dict[str, int] = field(default_factory=dict)  # component -> float8 weight tensors
    unscaled: dict[str, list[str]] = field(default_factory=dict)  # component -> float8 weights with no scale_weight
    architecture: str = "unknown"  # "large" | "medium" | "tiny" | "unknown"
    num_layers: int = 0
    hidden_size: int = 0

    @property
    def base(self) -> str | None:
        """The base model this file's architecture needs (:data:`ARCHITECTURE_BASES`), None if unknown."""
        return ARCHITECTURE_BASES.get(self.architecture)

    def __str__(self) -> str:
        from ..display import human_bytes

        parts = ", ".join(f"{k} ({n} tensors{', scaled ' + self.scaled[k] if k in self.scaled else ''})"
                          for k, n in self.components.items())
        arch = {"large": "SD3.5 Large", "medium": "SD3.5 Medium", "tiny": "the tiny SD3.5"}.get(
            self.architecture, f"an unrecognised SD3 ({self.num_layers} joint blocks, hidden {self.hidden_size})")
        text = (f"{self.path.name} ({human_bytes(self.size_bytes)}): {parts}; {self.scaled_layers} layers with "
                f"scale_weight{', scale_input too' if self.has_scale_input else ''}; architecture: {arch}"
                f"{f' (base {self.base})' if self.base else ''}")
        for component, layers in self.unscaled.items():
            if component in self.scaled:
                text += (f"; WARNING: {component} is marked scaled FP8 but {len(layers)} float8 weights have no "
                         "scale_weight")
        return text


def _component_of(key: str) -> tuple[str, str] | None:
    if key.startswith(TRANSFORMER_PREFIX):
        return "transformer", TRANSFORMER_PREFIX
    for name, prefix in TEXT_ENCODER_PREFIXES.items():
        if key.startswith(prefix):
            return name, prefix
    return None


_LARGE_KEY = f"{TRANSFORMER_PREFIX}joint_blocks.37.x_block.mlp.fc1.weight"
_ADALN_KEY = f"{TRANSFORMER_PREFIX}joint_blocks.0.context_block.adaLN_modulation.1.bias"


def _architecture(keys: set[str], shapes: dict[str, list[int]]) -> tuple[str, int, int]:
    """(architecture, joint blocks, hidden size) from key names and shapes, as diffusers' ``infer_diffusers_model_type``
    does: Large by its 38th block, Medium by an AdaLN of 6 × 1536 and a 384² position table; tiny by its preset."""
    from ..presets import TINY

    blocks = {int(k[len(TRANSFORMER_PREFIX):].split(".")[1]) for k in keys
              if k.startswith(f"{TRANSFORMER_PREFIX}joint_blocks.")}
    layers = 1 + max(blocks) if blocks else 0
    hidden = shapes.get(f"{TRANSFORMER_PREFIX}x_embedder.proj.weight", [0])[0]
    pos = shapes.get(f"{TRANSFORMER_PREFIX}pos_embed", [0, 0])
    pos_tokens = pos[1] if len(pos) > 1 else 0
    if _LARGE_KEY in keys:
        return "large", layers, hidden
    if shapes.get(_ADALN_KEY, [0])[-1] == 9216 and pos_tokens == 147456:
        return "medium", layers, hidden
    t = TINY.transformer
    if (layers, hidden, pos_tokens) == (t["num_layers"], t["num_attention_heads"] * t["attention_head_dim"],
                                        t["pos_embed_max_size"] ** 2):
        return "tiny", layers, hidden
    return "unknown", layers, hidden


def inspect_comfy_file(path: str | Path) -> ComfyFileInfo:
    """Read the header of a Comfy single file; raise :class:`ComfyFormatError` if it is not an SD3 one."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ComfyFormatError(path, "no such file", fix="check the path (downloads land in the hub cache)")
    try:
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
            slices = {k: f.get_slice(k) for k in keys}
            dtypes = {k: s.get_dtype() for k, s in slices.items()}
            shapes = {k: list(s.get_shape()) for k, s in slices.items()}
    except Exception as e:  # safetensors raises its own error types (HeaderTooLarge for LFS pointers …)
        raise ComfyFormatError(path, f"is not a readable safetensors file ({e})",
                               fix="if it is a few hundred bytes it is a git-lfs pointer: run `git lfs pull`") from e
    markers = {k: dtypes[k] for k in keys if k.endswith(SCALED_FP8_MARKER)}
    components: dict[str, int] = {}
    for k in keys:
        c = _component_of(k)
        if c:
            components[c[0]] = components.get(c[0], 0) + 1
    if f"{TRANSFORMER_PREFIX}joint_blocks.0.x_block.attn.qkv.weight" not in keys:
        raise ComfyFormatError(path, f"has no {TRANSFORMER_PREFIX}joint_blocks.* keys, so it is not an SD3 "
                               "checkpoint in ComfyUI's layout",
                               fix="pass a Comfy-Org SD3.5 file (e.g. sd3.5_large_fp8_scaled.safetensors); "
                                   "diffusers folders load with load_pipeline()")
    scaled = {}
    for k, dtype in markers.items():
        c = _component_of(k)
        if c:
            scaled[c[0]] = "F8_E4M3" if dtype == "F32" else dtype
    key_set = set(keys)
    fp8_weights: dict[str, int] = {}
    unscaled: dict[str, list[str]] = {}
    for k in keys:
        if k.endswith(".weight") and dtypes[k].startswith("F8_"):
            c = _component_of(k)
            if c:
                fp8_weights[c[0]] = fp8_weights.get(c[0], 0) + 1
                if f"{k[: -len('.weight')]}.scale_weight" not in key_set:
                    unscaled.setdefault(c[0], []).append(k[len(c[1]):])
    arch, layers, hidden = _architecture(key_set, shapes)
    return ComfyFileInfo(path, components, scaled, sum(k.endswith(".scale_weight") for k in keys),
                         any(k.endswith(".scale_input") for k in keys), path.stat().st_size, fp8_weights, unscaled,
                         arch, layers, hidden)


def _refuse_unscaled(info: ComfyFileInfo) -> None:
    """A component marked ``scaled_fp8`` whose float8 weights lack ``scale_weight``: refuse, naming the file.

    Loaded as they are, those weights would be off by their missing scales (~150% relative error on the tiny
    model, noise on a real one) — with no error anywhere.
    """
    for component, layers in info.unscaled.items():
        if component not in info.scaled:
            continue  # unscaled FP8 without a marker (a plain cast, e.g. t5xxl_fp8_e4m3fn): scale 1 is right
        prefix = TRANSFORMER_PREFIX if component == "transformer" else TEXT_ENCODER_PREFIXES[component]
        raise ComfyFormatError(info.path, f"marks {component} as scaled FP8 ({prefix}{SCALED_FP8_MARKER}) but "
                               f"{len(layers)} of its {info.fp8_weights[component]} float8 weights have no "
                               f"scale_weight (e.g. {', '.join(layers[:2])}); loaded without them it would be far "
                               "off (~150% on the tiny model) with no error",
                               fix="download the file again (a converter may have dropped the scales, or the "
                                   "file is cut short), or use the original Comfy-Org file; ignore_scales=True "
                                   "loads it anyway, to see the damage")


# --- reading ----------------------------------------------------------------------------------------

def _split_scales(tensors: dict[str, "torch.Tensor"]):
    """weights, {layer: scale_weight}, {layer: scale_input} — marker and unused keys dropped."""
    weights, scale_w, scale_i = {}, {}, {}
    for k, v in tensors.items():
        if k == SCALED_FP8_MARKER or k.endswith(_IGNORED_SUFFIXES):
            continue
        if k.endswith(".scale_weight"):
            scale_w[k[: -len(".scale_weight")]] = v.float().reshape(())
        elif k.endswith(".scale_input"):
            scale_i[k[: -len(".scale_input")]] = v.float().reshape(())
        else:
            weights[k] = v
    return weights, scale_w, scale_i


def _transformer_config(sd: dict[str, "torch.Tensor"], sample_size: int) -> dict[str, Any]:
    """SD3Transformer2DModel config from tensor shapes (as ComfyUI's model_detection does)."""
    import math

    hidden, in_channels, patch, _ = sd["x_embedder.proj.weight"].shape
    layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("joint_blocks."))
    dual = sorted({int(k.split(".")[1]) for k in sd if ".x_block.attn2." in k})
    head_dim = sd["joint_blocks.0.x_block.attn.ln_q.weight"].shape[0] if "joint_blocks.0.x_block.attn.ln_q.weight" \
        in sd else 64
    return dict(sample_size=sample_size, patch_size=patch, in_channels=in_channels,
                out_channels=sd["final_layer.linear.weight"].shape[0] // (patch * patch), num_layers=layers,
                attention_head_dim=head_dim, num_attention_heads=hidden // head_dim,
                joint_attention_dim=sd["context_embedder.weight"].shape[1], caption_projection_dim=hidden,
                pooled_projection_dim=sd["y_embedder.mlp.0.weight"].shape[1],
                pos_embed_max_size=round(math.sqrt(sd["pos_embed"].shape[1])),
                dual_attention_layers=tuple(dual),
                qk_norm="rms_norm" if "joint_blocks.0.x_block.attn.ln_q.weight" in sd else None)


def _convert_transformer(weights: dict, scale_w: dict, scale_i: dict):
    """Original SD3 keys → diffusers keys with diffusers' converter; scales follow their weights."""
    import torch
    from diffusers.loaders.single_file_utils import (
        convert_sd3_transformer_checkpoint_to_diffusers,
    )

    converted = convert_sd3_transformer_checkpoint_to_diffusers(dict(weights))
    # Probe pass: every original tensor becomes a vector of its own id (one entry per row); after the same
    # conversion each diffusers tensor still carries the id of the original it was cut from.
    names = list(weights)
    probe = {k: torch.full((v.shape[0] if v.ndim else 1,), float(i), dtype=torch.float64)
             for i, (k, v) in enumerate(weights.items())}
    origin = {dk: names[int(v[0])] for dk, v in convert_sd3_transformer_checkpoint_to_diffusers(probe).items()}
    for scales, suffix in ((scale_w, "scale_weight"), (scale_i, "scale_input")):
        for dk, ok in origin.items():
            if dk.endswith(".weight") and ok.endswith(".weight") and ok[: -len(".weight")] in scales:
                converted[f"{dk[: -len('.weight')]}.{suffix}"] = scales[ok[: -len(".weight")]]
    return converted


def _build(model_cls, config, state: dict, dtype, *, ignore_scales: bool):
    """Instantiate (meta) and load: layers with a float8 weight become Float8StorageLinear (per-tensor scale)."""
    import torch

    from .checkpoint import build_fp8_module

    fp8_types = (torch.float8_e4m3fn, torch.float8_e5m2)
    layers = [k[: -len(".weight")] for k, v in state.items() if k.endswith(".weight") and v.dtype in fp8_types]
    for layer in layers:
        if ignore_scales or f"{layer}.scale_weight" not in state:  # unscaled FP8 file (or the control)
            state[f"{layer}.scale_weight"] = torch.ones(())
    return build_fp8_module(model_cls, config, layers, state, dtype, per_row=False)


BASE_CONFIG_FILES: tuple[str, ...] = ("model_index.json", "*/*.json", "*/*.txt", "*/*.model")
"""What a Comfy file always needs from its base: every component's config, the scheduler, the tokenizers."""


def base_include(info: ComfyFileInfo) -> tuple[str, ...]:
    """Hub patterns for a base repo: configs and tokenizers, plus the weights of the components the file lacks
    (the VAE; text encoders of a transformer-only file) — never the bf16 transformer the file replaces."""
    lacking = [c for c in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae") if c not in info.components]
    return BASE_CONFIG_FILES + tuple(f"{c}/*.safetensors" for c in lacking)


def _base_source(base: str | Path | None, info: ComfyFileInfo):
    """The base as a local folder: given, or inferred from the file; a hub repo fetched only where needed."""
    from ..pipeline.loading import ModelSource, resolve_model
    from ..vocabulary import classify_model_spec

    spec = base if base is not None else info.base
    if spec is None:
        raise ComfyFormatError(info.path, f"is an SD3 checkpoint of no known SD3.5 architecture ({info.num_layers} "
                               f"joint blocks, hidden size {info.hidden_size}), so its base cannot be inferred",
                               fix="pass base= a diffusers folder or hub repo id of the same architecture")
    if classify_model_spec(str(spec)).kind == "hub":
        from ..weights.hub import download

        result = download(str(spec), include=base_include(info), verify=False, supplied=tuple(info.components))
        return ModelSource(str(spec), "hub", result.path)
    return resolve_model(spec)


def _check_base(info: ComfyFileInfo, base_cfg: dict[str, Any], source) -> None:
    """A base of another architecture would load and then fail inside generation (text width, depth): refuse,
    from the header alone (before any tensor is read)."""
    file = {"num_layers": info.num_layers, "caption_projection_dim": info.hidden_size}
    differ = {k: (v, base_cfg.get(k)) for k, v in file.items() if base_cfg.get(k) not in (None, v)}
    if differ:
        what = ", ".join(f"{k} {a} in the file vs {b}" for k, (a, b) in differ.items())
        inferred = f"leave base out (inferred from the file: {info.base})" if info.base else "pass a base"
        raise ComfyFormatError(info.path, f"does not match its base {source.spec} ({what})",
                               fix=f"{inferred}, or pass the diffusers model of the same SD3.5 architecture")


def load_comfy_pipeline(path: str | Path, base: str | Path | None = None, *, device: str | None = None, dtype=None,
                        mode: str = "storage", ignore_scales: bool = False):
    """A ``StableDiffusion3Pipeline`` from a Comfy scaled-FP8 file, FP8 bytes kept, scales applied.

    ``base`` supplies configs, tokenizers, scheduler, VAE and any text encoder the file lacks; by default it
    is inferred from the file (:data:`ARCHITECTURE_BASES`: the Large or Medium repo, or ``tiny``). From a hub
    repo only that is downloaded (:func:`base_include`) — not the 16 GB bf16 transformer the file replaces.
    A file marked scaled FP8 whose float8 weights lack their ``scale_weight`` is refused (:class:`ComfyFormatError`).
    ``mode="auto"``/``"compute"`` then switches the transformer to FP8 compute where the GPU can
    (see :func:`sd35fp8_helpers.precision.quantize_`); the report still names the text encoders the file
    holds in FP8 as FP8 storage. ``ignore_scales=True`` reproduces what diffusers' ``from_single_file`` does
    (scales dropped) — only useful to see the damage.
    """
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from safetensors import safe_open
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    from ..pipeline.loading import default_device, default_dtype
    from .checkpoint import report_for_loaded
    from .compute import fp8_compute_support
    from .quantize import FP8Config, quantize_

    if mode not in ("storage", "auto", "compute"):
        raise Sd35fp8Error(f"mode={mode!r} is not a mode", fix="use 'storage' (as stored), 'auto' or 'compute'")
    info = inspect_comfy_file(path)
    if not ignore_scales:
        _refuse_unscaled(info)
    device = device or default_device()
    if mode == "compute":  # say so before reading gigabytes, not after
        can, why = fp8_compute_support(device)
        if not can:
            import torch

            from ..errors import FP8ComputeUnavailable

            dev = torch.device(device)
            raise FP8ComputeUnavailable(str(dev), torch.cuda.get_device_capability(dev) if dev.type == "cuda"
                                        else None, why)
    source = _base_source(base, info)
    base_cfg = SD3Transformer2DModel.load_config(source.path / "transformer")
    _check_base(info, base_cfg, source)
    dtype = dtype or default_dtype(device)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(info.path), "pt") as f:
        for k in f.keys():
            c = _component_of(k)
            if c:
                groups.setdefault(c[0], {})[k[len(c[1]):]] = f.get_tensor(k)

    weights, scale_w, scale_i = _split_scales(groups.pop("transformer"))
    config = _transformer_config(weights, base_cfg.get("sample_size", 128))
    components: dict[str, Any] = {"transformer": _build(
        SD3Transformer2DModel, config, _convert_transformer(weights, scale_w, scale_i), dtype,
        ignore_scales=ignore_scales)}
    classes = {"text_encoder": CLIPTextModelWithProjection, "text_encoder_2": CLIPTextModelWithProjection,
               "text_encoder_3": T5EncoderModel}
    for name, tensors in groups.items():
        cls = classes[name]
        weights, scale_w, scale_i = _split_scales(tensors)
        weights.update({f"{k}.scale_weight": v for k, v in scale_w.items()})
        weights.update({f"{k}.scale_input": v for k, v in scale_i.items()})
        config = cls.config_class.from_pretrained(source.path / name)
        components[name] = _build(cls, config, weights, dtype, ignore_scales=ignore_scales)
    pipe = StableDiffusion3Pipeline.from_pretrained(source.path, torch_dtype=dtype, use_safetensors=True,
                                                    **components).to(device)
    pipe.sd35fp8_source = source
    pipe.sd35fp8_fp8 = report_for_loaded(pipe, {"policy": "as stored"}, f"loaded from the Comfy file {info.path.name}"
                                         f"{' WITHOUT its scales' if ignore_scales else ', scales applied'}")
    if mode == "compute" or (mode == "auto" and fp8_compute_support(pipe.transformer.device)[0]):
        quantize_(pipe, FP8Config(mode="compute", text_encoder_3=False))
    return pipe


# --- writing (tests and notebook 02 build Comfy files from the tiny model) ------------------------------

def _diffusers_to_original(sd: dict[str, "torch.Tensor"], num_layers: int) -> dict[str, "torch.Tensor"]:
    """The inverse of diffusers' SD3 converter (qkv fused, AdaLN scale/shift swapped back)."""
    import torch

    def swap(t):
        a, b = t.chunk(2, dim=0)
        return torch.cat([b, a], dim=0)

    out = {"pos_embed": sd["pos_embed.pos_embed"]}
    simple = {"x_embedder.proj": "pos_embed.proj", "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
              "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
              "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
              "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
              "context_embedder": "context_embedder", "final_layer.linear": "proj_out"}
    for i in range(num_layers):
        b, d = f"joint_blocks.{i}.", f"transformer_blocks.{i}."
        last = i == num_layers - 1
        simple.update({b + "x_block.attn.proj": d + "attn.to_out.0", b + "x_block.adaLN_modulation.1": d + "norm1.linear",
                       b + "x_block.mlp.fc1": d + "ff.net.0.proj", b + "x_block.mlp.fc2": d + "ff.net.2"})
        if not last:
            simple.update({b + "context_block.attn.proj": d + "attn.to_add_out",
                           b + "context_block.adaLN_modulation.1": d + "norm1_context.linear",
                           b + "context_block.mlp.fc1": d + "ff_context.net.0.proj",
                           b + "context_block.mlp.fc2": d + "ff_context.net.2"})
        else:
            for p in ("weight", "bias"):
                out[f"{b}context_block.adaLN_modulation.1.{p}"] = swap(sd[f"{d}norm1_context.linear.{p}"])
        fused = {b + "x_block.attn.qkv": [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"],
                 b + "context_block.attn.qkv": [d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"]}
        norms = {b + "x_block.attn.ln_q": d + "attn.norm_q", b + "x_block.attn.ln_k": d + "attn.norm_k",
                 b + "context_block.attn.ln_q": d + "attn.norm_added_q",
                 b + "context_block.attn.ln_k": d + "attn.norm_added_k"}
        if f"{d}attn2.to_q.weight" in sd:
            fused[b + "x_block.attn2.qkv"] = [d + "attn2.to_q", d + "attn2.to_k", d + "attn2.to_v"]
            simple[b + "x_block.attn2.proj"] = d + "attn2.to_out.0"
            norms.update({b + "x_block.attn2.ln_q": d + "attn2.norm_q", b + "x_block.attn2.ln_k": d + "attn2.norm_k"})
        for o, parts in fused.items():
            for p in ("weight", "bias"):
                out[f"{o}.{p}"] = torch.cat([sd[f"{x}.{p}"] for x in parts])
        for o, x in norms.items():
            if f"{x}.weight" in sd:
                out[f"{o}.weight"] = sd[f"{x}.weight"]
    for o, x in simple.items():
        for p in ("weight", "bias"):
            if f"{x}.{p}" in sd:
                out[f"{o}.{p}"] = sd[f"{x}.{p}"]
    for p in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{p}"] = swap(sd[f"norm_out.linear.{p}"])
    return out


def _scale_fp8(sd: dict[str, "torch.Tensor"], is_fp8_layer, *, scale_input: bool) -> dict[str, "torch.Tensor"]:
    """Comfy's scaled FP8: each selected 2-D weight → float8_e4m3fn + float32 scalar ``scale_weight``."""
    import torch

    from .storage import quantize_tensor

    out = {}
    for k, v in sd.items():
        layer = k[: -len(".weight")]
        if k.endswith(".weight") and v.ndim == 2 and is_fp8_layer(layer):
            out[k], scale = quantize_tensor(v, per_row=False)
            out[f"{layer}.scale_weight"] = scale.reshape(())
            if scale_input:
                out[f"{layer}.scale_input"] = torch.ones(())
        else:
            out[k] = v.to(torch.bfloat16) if v.is_floating_point() else v
    out[SCALED_FP8_MARKER] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out


def _original_fp8_layer(layer: str) -> bool:
    """Comfy-Org keeps embedders and the final layer in bf16 and scales the joint blocks' Linears."""
    return layer.startswith("joint_blocks.") and not layer.endswith(("ln_q", "ln_k"))


def _t5_fp8_layer(layer: str) -> bool:
    """T5's Linears inside its blocks (not the relative-attention-bias embedding)."""
    return ".block." in layer and not layer.endswith("relative_attention_bias")


def save_comfy_checkpoint(pipe, path: str | Path, *, text_encoders: bool = False, scale_input: bool = True) -> Path:
    """Write ``pipe`` as a Comfy-Org style scaled-FP8 single file (transformer-only, or all-in-one).

    Joint-block Linears become float8_e4m3fn with a per-tensor ``scale_weight`` (and a ``scale_input``), the
    marker ``model.diffusion_model.scaled_fp8`` is added, everything else is bf16. With ``text_encoders``
    the CLIPs are added in bf16 and T5 in scaled FP8 under ComfyUI's prefixes.
    """
    import torch
    from safetensors.torch import save_file

    tr = {k: v.detach().float().cpu() for k, v in pipe.transformer.state_dict().items()}
    original = _diffusers_to_original(tr, pipe.transformer.config.num_layers)
    tensors = {TRANSFORMER_PREFIX + k: v for k, v in _scale_fp8(original, _original_fp8_layer,
                                                                scale_input=scale_input).items()}
    if text_encoders:
        for name, prefix in TEXT_ENCODER_PREFIXES.items():
            state = {k: v.detach().float().cpu() for k, v in getattr(pipe, name).state_dict().items()}
            if name == "text_encoder_3":
                state.pop("encoder.embed_tokens.weight", None)  # tied to shared.weight
                state = _scale_fp8(state, _t5_fp8_layer, scale_input=False)
            else:
                state = {k: v.to(torch.bfloat16) for k, v in state.items()}
            tensors.update({prefix + k: v for k, v in state.items()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path

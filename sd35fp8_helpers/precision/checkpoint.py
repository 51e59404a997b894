"""FP8 checkpoints: save a storage-quantised pipeline once, load it without re-quantising.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import Sd35fp8Error
from .quantize import ComponentBytes, FP8Report, module_bytes, tensor_bytes
from .storage import is_fp8_storage, patch_t5, replace_module, storage_linear_class

if TYPE_CHECKING:  # pragma: no cover
    import torch


FP8_MANIFEST = "sd35fp8_fp8.json"
"""File at the root of a folder written by :func:`save_quantized`; its presence makes loading FP8-aware."""


# --- FP8 checkpoints: save once, load without re-quantising ---------------------------------------------

_QUANTIZABLE = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


def save_quantized(pipe, out_dir: str | Path) -> Path:
    """Write a storage-quantised pipeline as a diffusers folder whose FP8 weights and scales are safetensors.

    The float8 tensors are stored as ``F8_E4M3`` (bit-exact), each with its ``scale_weight``; a small
    :data:`FP8_MANIFEST` lists the FP8 layers per component so :func:`load_fp8_components` can rebuild the
    modules before loading — no re-quantisation, identical outputs.
    """
    out = Path(out_dir)
    report = getattr(pipe, "sd35fp8_fp8", None)
    if report is None or report.mode != "storage":
        raise Sd35fp8Error("only a pipeline quantised in FP8 *storage* mode can be saved as an FP8 checkpoint",
                           fix="quantize_(pipe, FP8Config(mode='storage')) first (compute mode is a runtime choice)")
    pipe.save_pretrained(out, safe_serialization=True)
    layers = {name: [fqn for fqn, m in getattr(pipe, name).named_modules() if is_fp8_storage(m)]
              for name in _QUANTIZABLE if getattr(pipe, name, None) is not None}
    manifest = {"format": 1, "dtype": "float8_e4m3fn", "scale": "per-row", "policy": report.policy,
                "layers": {k: v for k, v in layers.items() if v}}
    (out / FP8_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return out


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / FP8_MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def _component_class(folder: Path, name: str):
    import importlib

    library, cls = json.loads((folder / "model_index.json").read_text())[name]
    return getattr(importlib.import_module(library), cls)


def _read_state_dict(component_dir: Path) -> dict[str, "torch.Tensor"]:
    from safetensors.torch import load_file

    state: dict = {}
    for f in sorted(component_dir.glob("*.safetensors")):
        state.update(load_file(f))
    return state


def build_fp8_module(model_cls, config, layers: list[str], state: dict, dtype, *, per_row: bool = True):
    """Instantiate ``model_cls`` with no memory (meta), swap ``layers`` for FP8 storage modules, then assign
    ``state`` (float8 and scales kept as stored, everything else cast to ``dtype``)."""
    import torch
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = model_cls.from_config(config) if hasattr(model_cls, "from_config") else model_cls(config)
    cls = storage_linear_class()
    for fqn in layers:
        lin = model.get_submodule(fqn)
        replace_module(model, fqn, cls(lin.in_features, lin.out_features, lin.bias is not None, device="meta",
                                 per_row=per_row))
    state = {k: v if v.dtype == torch.float8_e4m3fn or k.endswith((".scale_weight", ".scale_input"))
             else v.to(dtype) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # T5: encoder.embed_tokens shares shared.weight
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if left or unexpected:
        raise Sd35fp8Error(f"FP8 weights do not match {model_cls.__name__}: missing {left[:3]}, "
                           f"unexpected {list(unexpected)[:3]}", fix="re-create the checkpoint with sd35fp8 quantize")
    patch_t5(model)
    return model.eval()


def report_for_loaded(pipe, manifest: dict[str, Any], reason: str = "loaded from an FP8 checkpoint") -> FP8Report:
    """The :class:`FP8Report` of a pipeline loaded from an FP8 checkpoint ("before" = the same layers unquantised)."""
    report = FP8Report(mode="storage", policy=manifest.get("policy", "?"), reason=reason, device=str(pipe.device))
    for name in ("transformer", "text_encoder_3", "text_encoder", "text_encoder_2", "vae"):
        module = getattr(pipe, name, None)
        if module is None:
            continue
        after = module_bytes(module)
        fp8 = [m for m in module.modules() if is_fp8_storage(m)]
        width = next((p.element_size() for p in module.parameters() if p.is_floating_point()), 2)
        before = after + sum(m.weight.numel() * (width - 1) - tensor_bytes(m.scale_weight) for m in fp8)
        report.components.append(ComponentBytes(name, before, after, len(fp8), "fp8 storage" if fp8 else "unchanged"))
    return report


def load_fp8_components(folder: str | Path, *, dtype, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The FP8 components of a folder written by :func:`save_quantized`, ready to pass to ``from_pretrained``."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    out = {}
    for name, layers in (manifest or {}).get("layers", {}).items():
        if name in skip:
            continue
        cls = _component_class(folder, name)
        sub = folder / name
        config = cls.load_config(sub) if hasattr(cls, "load_config") else cls.config_class.from_pretrained(sub)
        out[name] = build_fp8_module(cls, config, layers, _read_state_dict(sub), dtype)
    return out



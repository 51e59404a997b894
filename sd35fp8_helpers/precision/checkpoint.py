"""FP8 checkpoints: save a storage-quantised pipeline once, load it without re-quantising.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import FP8CheckpointError, Sd35fp8Error
from .quantize import FP8Report, stored_row
from .storage import is_fp8_storage, patch_t5, replace_module, storage_linear_class

if TYPE_CHECKING:  # pragma: no cover
    import torch


FP8_MANIFEST = "sd35fp8_fp8.json"
"""File at the root of a folder written by :func:`save_quantized`; its presence makes loading FP8-aware."""


# --- FP8 checkpoints: save once, load without re-quantising ---------------------------------------------

_QUANTIZABLE = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


STAGING_SUFFIX = ".fp8-partial"
"""``save_quantized(pipe, DIR)`` writes into ``.DIR.fp8-partial`` beside ``DIR`` and renames it into place."""


def _staging(out: Path) -> Path:
    return out.parent / f".{out.name}{STAGING_SUFFIX}"


def _replace_folder(staging: Path, out: Path) -> None:
    """Put the complete ``staging`` folder at ``out``; a previous checkpoint there is swapped out, then removed."""
    import shutil

    if not out.exists():
        staging.rename(out)
        return
    old = out.parent / f".{out.name}.fp8-old"
    if old.exists():
        shutil.rmtree(old)
    out.rename(old)
    staging.rename(out)
    shutil.rmtree(old)


def _copy_model_info(pipe, folder: Path) -> None:
    """Carry the model's own recipe (``sd35fp8_scenes.json``: steps, guidance, size, T5 length) into the copy:
    without it the scene model's FP8 checkpoint would run with 256 T5 tokens instead of 32 — another picture."""
    import shutil

    from ..pipeline.defaults import MODEL_INFO

    source = getattr(pipe, "sd35fp8_source", None)
    info = Path(source.path) / MODEL_INFO if source is not None else None
    if info is not None and info.is_file():
        shutil.copy2(info, folder / MODEL_INFO)


def save_quantized(pipe, out_dir: str | Path) -> Path:
    """Write a storage-quantised pipeline as a diffusers folder whose FP8 weights and scales are safetensors.

    The float8 tensors are stored as ``F8_E4M3`` (bit-exact), each with its ``scale_weight`` (and, after
    :func:`~sd35fp8_helpers.precision.calibration.calibrate_`, its calibrated ``scale_input``); a small
    :data:`FP8_MANIFEST` lists the FP8 layers per component so :func:`load_fp8_components` can rebuild the
    modules before loading — no re-quantisation, identical outputs.

    Nothing is ever half-written: the folder is written as ``.OUT.fp8-partial`` beside ``OUT`` (manifest
    included) and renamed into place only when complete. A failed save leaves ``OUT`` as it was (absent, or the
    previous checkpoint) and removes the partial folder. ``OUT`` may be new, empty, or an earlier FP8
    checkpoint (replaced); any other non-empty folder is refused, since replacing it would delete its files.
    """
    out = Path(out_dir).absolute()
    report = getattr(pipe, "sd35fp8_fp8", None)
    if report is None or report.mode != "storage":
        raise Sd35fp8Error("only a pipeline quantised in FP8 *storage* mode can be saved as an FP8 checkpoint",
                           fix="quantize_(pipe, FP8Config(mode='storage')) first (compute mode is a runtime choice)")
    if out.exists() and not out.is_dir():
        raise FP8CheckpointError(out, "is a file, not a folder", fix="choose a new folder for the checkpoint")
    if out.is_dir() and any(out.iterdir()) and read_manifest(out) is None:
        raise FP8CheckpointError(out, "is a non-empty folder that is not an FP8 checkpoint; saving would replace "
                                 "its files", fix="choose a new or empty folder (or delete this one yourself)")
    layers = {name: [fqn for fqn, m in getattr(pipe, name).named_modules() if is_fp8_storage(m)]
              for name in _QUANTIZABLE if getattr(pipe, name, None) is not None}
    scaled = {name: sum("scale_input" in getattr(pipe, name).get_submodule(f)._buffers for f in fqns)
              for name, fqns in layers.items() if fqns}
    manifest = {"format": 1, "dtype": "float8_e4m3fn", "scale": "per-row", "policy": report.policy,
                "layers": {k: v for k, v in layers.items() if v}}
    if any(scaled.values()):
        manifest["activation_scales"] = {"kind": "static per-tensor (scale_input = amax / 448)",
                                         "layers": {k: n for k, n in scaled.items() if n},
                                         "calibration": report.calibration or {}}
    staging = _staging(out)
    import shutil

    if staging.exists():  # left by a save that was killed: never trusted, always rewritten
        shutil.rmtree(staging)
    try:
        pipe.save_pretrained(staging, safe_serialization=True)
        _copy_model_info(pipe, staging)
        (staging / FP8_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    except Exception as e:
        shutil.rmtree(staging, ignore_errors=True)
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        state = "still holds the previous checkpoint" if out.exists() else "was not created"
        raise FP8CheckpointError(out, f"the FP8 checkpoint could not be written ({type(e).__name__}: {first[:200]}); "
                                 f"nothing was half-written: the folder {state}",
                                 fix="fix the cause above and save again") from e
    _replace_folder(staging, out)
    return out


def float8_files(folder: str | Path) -> dict[str, int]:
    """``{relative path: number of float8 tensors}`` of the component safetensors files, from their headers."""
    from ..weights.verify import InvalidSafetensors, read_safetensors_header

    folder = Path(folder)
    found = {}
    for f in sorted(folder.glob("*/*.safetensors")):
        try:
            header = read_safetensors_header(f)
        except InvalidSafetensors:
            continue  # verify reports broken files on its own
        n = sum(1 for k, v in header.items() if k != "__metadata__" and str(v.get("dtype", "")).startswith("F8_"))
        if n:
            found[f.relative_to(folder).as_posix()] = n
    return found


def require_manifest_if_float8(folder: str | Path) -> None:
    """Refuse a diffusers folder with float8 weights but no :data:`FP8_MANIFEST` (e.g. a save that was cut off).

    Loaded by diffusers as it is, each float8 weight would be cast into a plain Linear with its
    ``scale_weight`` ignored: an image of noise, and no error.
    """
    folder = Path(folder)
    if read_manifest(folder) is not None:
        return
    files = float8_files(folder)
    if files:
        listed = ", ".join(f"{k}: {n} float8 tensors" for k, n in list(files.items())[:3])
        raise FP8CheckpointError(folder, f"holds float8 weights ({listed}) but no {FP8_MANIFEST}, so their scales "
                                 "would be ignored and the model would load wrong (no error, noise images)",
                                 fix=f"write it again with `sd35fp8 quantize MODEL {folder}` (a save that was "
                                     "interrupted leaves such a folder); a Comfy single file loads with "
                                     "load_comfy_pipeline(FILE)")


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
    for fqn in layers:  # a calibrated activation scale (ours) or a Comfy file's: a float32 buffer, as stored
        if f"{fqn}.scale_input" in state:
            model.get_submodule(fqn).register_buffer("scale_input", torch.empty((), device="meta"))
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
    report = FP8Report(mode="storage", policy=manifest.get("policy", "?"), reason=reason, device=str(pipe.device),
                       calibration=(manifest.get("activation_scales") or {}).get("calibration") or None)
    for name in ("transformer", "text_encoder_3", "text_encoder", "text_encoder_2", "vae"):
        module = getattr(pipe, name, None)
        if module is not None:
            report.components.append(stored_row(name, module))
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



"""The verbs: :func:`load_lora_`, :func:`set_lora_scale_`, :func:`unload_lora_` — on BF16, FP8-storage and
FP8-compute transformers alike, merged into the weights or kept on a side path.

**merge** (default): ``W ← Q(deq(W₀) + Σᵢ sᵢ·ΔWᵢ)`` — for FP8 layers the original FP8 weight is dequantised
exactly (float32), every merged LoRA added, and the sum re-quantised once with the layer's own scheme (per-row
scales for FP8 storage; torchao's Float8Tensor for FP8 compute). So the merged layer is exactly what quantising
the LoRA'd weight gives: no error beyond one FP8 rounding, none accumulated across several LoRAs or scale
changes (each recomputation starts from W₀ again). Run time and memory are unchanged; changing a scale
re-quantises the layers the LoRA touches.

**side**: the base layer is left as it is and ``s·(x @ downᵀ) @ upᵀ`` is added in the compute dtype (bf16 on
GPU): see :mod:`.side`. The scale changes instantly; each step pays for two thin matmuls per adapted layer.

Unloading is bit-exact in both modes: merged layers get their saved original tensors back (kept on the CPU:
the bytes of each touched weight, FP8 or BF16), side paths are unwrapped to the untouched module. State lives
in one record on the transformer (:class:`LoraRegistry`, attribute ``sd35fp8_loras``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..errors import LoraError
from .formats import LoraLayer, parse_lora
from .shipped import resolve_lora
from .side import is_side_linear, side_linear_class

if TYPE_CHECKING:  # pragma: no cover
    import torch

Mode = Literal["merge", "side"]
MODES: tuple[str, ...] = ("merge", "side")
REGISTRY_ATTRIBUTE = "sd35fp8_loras"


@dataclass
class LoadedLora:
    name: str
    path: Path
    mode: str
    scale: float
    layers: list[LoraLayer]
    by_settings: bool = False  # loaded by use_lora_ for GenerationSettings.lora (swapped per image)

    @property
    def targets(self) -> list[str]:
        return [layer.target for layer in self.layers]

    def summary(self) -> dict[str, Any]:
        """What PNG metadata and reports record: enough to load the same LoRA the same way again."""
        return {"name": self.name, "path": str(self.path), "mode": self.mode, "scale": self.scale,
                "layers": len(self.layers), "rank": max(layer.rank for layer in self.layers)}


@dataclass
class _Original:
    """A merged layer as it was before any LoRA: its module (identity) and its weight tensors, on the CPU."""

    module: Any
    kind: str  # "linear" | "fp8-storage" | "fp8-compute"
    tensors: dict[str, "torch.Tensor"]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


@dataclass
class LoraRegistry:
    """Every LoRA loaded on one transformer, and the original tensors of every layer a merge has changed."""

    loras: dict[str, LoadedLora] = field(default_factory=dict)
    originals: dict[str, _Original] = field(default_factory=dict)

    @property
    def saved_bytes(self) -> int:
        return sum(o.nbytes for o in self.originals.values())


@dataclass
class LoraReport:
    """What :func:`load_lora_` did: where, how, and what it costs in bytes."""

    name: str
    mode: str
    scale: float
    layers: int
    rank: int
    precision: str
    device_bytes: int       # extra bytes on the model's device (side: the adapters; merge: 0)
    host_bytes: int         # bytes kept on the CPU to unload exactly (merge: the original weights touched)
    seconds: float
    note: str

    def __str__(self) -> str:
        from ..display import human_bytes

        return (f"LoRA {self.name!r}: {self.layers} layers (rank {self.rank}) {self.mode}d on {self.precision}, "
                f"scale {self.scale:g}, in {self.seconds:.2f} s; +{human_bytes(self.device_bytes)} on the device, "
                f"{human_bytes(self.host_bytes)} kept on the CPU for unloading. {self.note}")


# --- helpers --------------------------------------------------------------------------------------------------

def _transformer(pipe):
    return getattr(pipe, "transformer", pipe)


def registry(pipe) -> LoraRegistry:
    """The LoRA record of ``pipe``'s transformer (created empty on first use)."""
    t = _transformer(pipe)
    reg = t.__dict__.get(REGISTRY_ATTRIBUTE)
    if reg is None:
        reg = LoraRegistry()
        t.__dict__[REGISTRY_ATTRIBUTE] = reg  # a plain attribute: not a submodule, not in the state dict
    return reg


def loaded_loras(pipe) -> list[dict[str, Any]]:
    """Summaries of the LoRAs on ``pipe``, in load order (``[]`` for none)."""
    reg = _transformer(pipe).__dict__.get(REGISTRY_ATTRIBUTE)
    return [lora.summary() for lora in reg.loras.values()] if reg else []


def _kind(module) -> str:
    from ..precision.storage import is_fp8_storage

    if is_fp8_storage(module):
        return "fp8-storage"
    if hasattr(module.weight, "qdata") and hasattr(module.weight, "dequantize"):
        return "fp8-compute"
    return "linear"


def _compute_dtype(transformer):
    import torch

    for p in transformer.parameters():
        if p.is_floating_point() and p.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2) \
                and not hasattr(p, "qdata"):
            return p.dtype
    return torch.bfloat16


def _precision_name(transformer) -> str:
    import torch

    from ..precision.storage import is_fp8_storage

    kinds = {_kind(m) for m in transformer.modules() if isinstance(m, torch.nn.Linear) or is_fp8_storage(m)}
    for k in ("fp8-compute", "fp8-storage"):
        if k in kinds:
            return k
    return str(_compute_dtype(transformer)).removeprefix("torch.")


def _base(transformer, target: str):
    module = transformer.get_submodule(target)
    return module.base if is_side_linear(module) else module


def _save_original(module) -> _Original:
    kind = _kind(module)
    if kind == "fp8-storage":
        tensors = {"weight": module.weight.detach().cpu().clone(), "scale_weight": module.scale_weight.detach().cpu().clone()}
    elif kind == "fp8-compute":
        w = module.weight
        tensors = {"qdata": w.qdata.detach().cpu().clone(), "scale": w.scale.detach().cpu().clone()}
    else:
        tensors = {"weight": module.weight.detach().cpu().clone()}
    return _Original(module, kind, tensors)


def _dequantized(original: _Original, device) -> "torch.Tensor":
    import torch

    t = original.tensors
    if original.kind == "fp8-storage":
        return t["weight"].to(device).float() * t["scale_weight"].to(device)
    if original.kind == "fp8-compute":
        return t["qdata"].to(device).float() * t["scale"].to(device).float()
    return t["weight"].to(device, dtype=torch.float32, copy=True)  # a copy: the sum is built in place


def _restore(original: _Original) -> None:
    """Put the original tensors back, in place (same tensor objects: compiled graphs and hooks stay valid)."""
    import torch

    m, t = original.module, original.tensors
    with torch.no_grad():
        if original.kind == "fp8-storage":
            m.weight.copy_(t["weight"])
            m.scale_weight.copy_(t["scale_weight"])
        elif original.kind == "fp8-compute":
            m.weight.qdata.copy_(t["qdata"])
            m.weight.scale.copy_(t["scale"])
        else:
            m.weight.copy_(t["weight"])


def _write(original: _Original, merged: "torch.Tensor") -> None:
    """Store the float32 ``merged`` weight in the layer's own format, in place."""
    import torch

    m = original.module
    with torch.no_grad():
        if original.kind == "fp8-storage":
            from ..precision.storage import quantize_tensor

            q, s = quantize_tensor(merged, per_row=m.scale_weight.ndim > 0)
            m.weight.copy_(q)
            m.scale_weight.copy_(s.reshape(m.scale_weight.shape))
        elif original.kind == "fp8-compute":
            from torchao.quantization import Float8Tensor, PerRow, PerTensor

            w = m.weight
            per_row = list(w.block_size)[0] == 1
            new = Float8Tensor.from_hp(merged.to(w.dtype), float8_dtype=w.qdata.dtype,
                                       granularity=PerRow() if per_row else PerTensor(), mm_config=w.mm_config,
                                       kernel_preference=w.kernel_preference, act_quant_kwargs=w.act_quant_kwargs)
            w.qdata.copy_(new.qdata)
            w.scale.copy_(new.scale.reshape(w.scale.shape))
        else:
            m.weight.copy_(merged.to(m.weight.dtype))


def _remerge(transformer, reg: LoraRegistry, targets: set[str], file: Path) -> None:
    """Recompute every target from its original plus all merged LoRAs on it (or restore it if none remain)."""
    for target in sorted(targets):
        original = reg.originals.get(target)
        current = _base(transformer, target)
        if original is None:
            original = reg.originals[target] = _save_original(current)
        elif current is not original.module:
            raise LoraError(file, f"cannot change {target}: the layer was replaced after a LoRA was merged into "
                                  "it (quantize_ or a precision change after load_lora_)",
                            fix="reload the pipeline; then quantise first and load LoRAs after, or load them "
                                "with mode='side', which survives quantize_")
        deltas = [(lora.scale, layer) for lora in reg.loras.values() if lora.mode == "merge"
                  for layer in lora.layers if layer.target == target]
        if not deltas:
            _restore(original)
            del reg.originals[target]
            continue
        device = current.weight.device
        merged = _dequantized(original, device)
        for scale, layer in deltas:
            merged += scale * layer.delta().to(device)
        _write(original, merged)


def _check_scale(file: Path | str, scale: Any) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise LoraError(file, f"scale={scale!r} is not a finite number",
                        fix="use a number such as 1.0 (full strength), 0.5 (half), 0 (off)")
    return float(scale)


# --- the verbs ------------------------------------------------------------------------------------------------

def load_lora_(pipe, lora: str | Path, *, scale: float = 1.0, mode: Mode = "merge",
               name: str | None = None) -> LoraReport:
    """Apply a LoRA (a safetensors file, or a shipped LoRA's name) to ``pipe``'s transformer, in place.

    Trade-off: ``mode="merge"`` costs nothing per step (the LoRA is inside the weights; FP8 layers are
    re-quantised once, exactly from their original values) but a scale change re-quantises; ``mode="side"``
    keeps the weights untouched and adds a small BF16 path to each adapted layer (scale changes are free,
    each step pays a little). Several LoRAs may be loaded, in either mode; names must differ.

    Example (a runnable one is in :mod:`sd35fp8_helpers.lora`)::

        apply_precision_(pipe, "fp8-storage")
        print(load_lora_(pipe, "style.safetensors", scale=0.8))   # merged, re-quantised; report with bytes
        load_lora_(pipe, "detail.safetensors", mode="side")       # a second one, on a side path
        unload_lora_(pipe)                                        # both gone, weights bit for bit as before
    """
    import torch

    start = time.perf_counter()
    path = resolve_lora(lora)
    scale = _check_scale(path, scale)
    if mode not in MODES:
        raise LoraError(path, f"mode={mode!r} is not a LoRA mode", fix="use mode='merge' or mode='side'")
    transformer = _transformer(pipe)
    reg = registry(pipe)
    name = name or path.stem
    if name in reg.loras:
        raise LoraError(path, f"a LoRA named {name!r} is already loaded",
                        fix=f"unload_lora_(pipe, {name!r}) first, or pass another name=")
    layers = parse_lora(path, transformer)
    seen: dict[str, str] = {}
    for layer in layers:
        if layer.target in seen:
            raise LoraError(path, f"adapts {layer.target} a second time (also {seen[layer.target]!r})",
                            key=layer.key, fix="the file mixes two layouts of one LoRA; keep one")
        seen[layer.target] = layer.key
    precision = _precision_name(transformer)
    loaded = LoadedLora(name, path, mode, scale, layers)
    device_bytes = 0
    with torch.inference_mode(False), torch.no_grad():
        if mode == "side":
            dtype = _compute_dtype(transformer)
            cls = side_linear_class()
            from ..precision.storage import replace_module

            for layer in layers:
                module = transformer.get_submodule(layer.target)
                if not is_side_linear(module):
                    module = cls(module)
                    replace_module(transformer, layer.target, module)
                device = next(iter(module.base.buffers()), None)
                device = (device if device is not None else module.base.weight).device
                module.add(name, layer.down, layer.up * layer.alpha_scale, scale, dtype, device)
                device_bytes += (layer.down.numel() + layer.up.numel()) * torch.finfo(dtype).bits // 8
            reg.loras[name] = loaded
        else:
            before = reg.saved_bytes
            reg.loras[name] = loaded
            try:
                _remerge(transformer, reg, {layer.target for layer in layers}, path)
            except Exception:
                del reg.loras[name]
                raise
            host = reg.saved_bytes - before
    note = ("merged: exact at load (one FP8 rounding of W₀+ΔW, as if the LoRA'd model had been quantised); "
            "a scale change re-quantises" if mode == "merge" else
            "side path: weights untouched, scale changes are free (set_lora_scale_)")
    return LoraReport(name, mode, scale, len(layers), max(x.rank for x in layers), precision, device_bytes,
                      host if mode == "merge" else 0, time.perf_counter() - start, note)


def set_lora_scale_(pipe, name: str, scale: float) -> None:
    """Change a loaded LoRA's strength: instant on a side path; a merged LoRA's layers are re-quantised."""
    import torch

    reg = registry(pipe)
    lora = _loaded(reg, name)
    lora.scale = _check_scale(lora.path, scale)
    transformer = _transformer(pipe)
    with torch.inference_mode(False), torch.no_grad():
        if lora.mode == "side":
            for layer in lora.layers:
                transformer.get_submodule(layer.target).set_scale(name, lora.scale)
        else:
            _remerge(transformer, reg, set(lora.targets), lora.path)


def unload_lora_(pipe, name: str | None = None) -> list[str]:
    """Remove one LoRA (or all, ``name=None``); the layers get their original tensors back, bit for bit.

    Returns the names removed.
    """
    import torch

    reg = registry(pipe)
    names = list(reg.loras) if name is None else [_loaded(reg, name).name]
    transformer = _transformer(pipe)
    from ..precision.storage import replace_module

    with torch.inference_mode(False), torch.no_grad():
        for n in names:
            lora = reg.loras.pop(n)
            if lora.mode == "side":
                for layer in lora.layers:
                    module = transformer.get_submodule(layer.target)
                    module.remove(n)
                    if not len(module.adapters):
                        replace_module(transformer, layer.target, module.base)
            else:
                try:
                    _remerge(transformer, reg, set(lora.targets), lora.path)
                except Exception:
                    reg.loras[n] = lora
                    raise
    return names


def _loaded(reg: LoraRegistry, name: str) -> LoadedLora:
    if name not in reg.loras:
        loaded = ", ".join(reg.loras) or "none"
        raise LoraError(Path(name), "is not loaded on this pipeline", fix=f"loaded LoRAs: {loaded}")
    return reg.loras[name]


def use_lora_(pipe, name: str = "", scale: float = 1.0) -> None:
    """Make ``pipe`` carry exactly the LoRA a :class:`~sd35fp8_helpers.pipeline.generation.GenerationSettings`
    names (``""``: none) — what ``generate`` calls for every image, so the images API and the playground can
    take a LoRA per request.

    Per-request LoRAs go on the side path: switching one on or off never touches the (FP8) weights, and scale
    changes are free. LoRAs loaded by hand with :func:`load_lora_` are left alone. Does nothing (and imports
    nothing heavy) when no LoRA is wanted and none is loaded.
    """
    reg = _transformer(pipe).__dict__.get(REGISTRY_ATTRIBUTE)
    owned = [n for n, lora in reg.loras.items() if lora.by_settings] if reg else []
    key = f"settings:{name}" if name else ""
    for n in owned:
        if n != key:
            unload_lora_(pipe, n)
    if not name:
        return
    if key in owned:
        if registry(pipe).loras[key].scale != scale:
            set_lora_scale_(pipe, key, scale)
        return
    load_lora_(pipe, name, scale=scale, mode="side", name=key)
    registry(pipe).loras[key].by_settings = True

"""The LoRA *side path*: the base layer untouched (BF16, FP8 storage or FP8 compute), plus ``x @ downᵀ @ upᵀ``.

Why a side path at all, when merging is free at run time: the base layer's bytes never change, so the scale
can move (0 → 1.5, per LoRA) without touching FP8 weights or re-quantising, unloading is putting the original
module back, and no rounding of the merged weight to FP8 happens. The cost is two small matmuls per adapted
layer per step and the adapter bytes (rank × (in + out) × 2 bytes in bf16). ``docs/benchmarks.md`` measures
it against merging.

The scale is a 0-d tensor, not a Python float: torch.compile guards on Python attributes (a new scale would
recompile every block), but reads tensors as data.
"""

from __future__ import annotations

from typing import Any

_CLASSES: dict[str, Any] = {}


def _side_linear_class():
    import torch
    from torch import nn

    class LoraSideLinear(nn.Module):
        """``base(x) + Σ scale_i · (x @ down_iᵀ) @ up_iᵀ`` — the adapters stored in the compute dtype."""

        def __init__(self, base: nn.Module) -> None:
            super().__init__()
            self.base = base
            self.adapters = nn.ModuleDict()

        @property
        def in_features(self) -> int:
            return self.base.in_features

        @property
        def out_features(self) -> int:
            return self.base.out_features

        def add(self, name: str, down: torch.Tensor, up: torch.Tensor, scale: float, dtype, device) -> None:
            adapter = nn.Module()
            adapter.register_buffer("down", down.to(device=device, dtype=dtype).contiguous())
            adapter.register_buffer("up", up.to(device=device, dtype=dtype).contiguous())
            adapter.register_buffer("scale", torch.tensor(float(scale), device=device, dtype=dtype))
            self.adapters[_key(name)] = adapter

        def remove(self, name: str) -> None:
            del self.adapters[_key(name)]

        def set_scale(self, name: str, scale: float) -> None:
            self.adapters[_key(name)].scale.fill_(float(scale))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.base(x)
            for adapter in self.adapters.values():
                h = torch.nn.functional.linear(x.to(adapter.down.dtype), adapter.down)
                out = out + (torch.nn.functional.linear(h, adapter.up) * adapter.scale).to(out.dtype)
            return out

        def extra_repr(self) -> str:
            ranks = ", ".join(f"{k}: rank {a.down.shape[0]}" for k, a in self.adapters.items())
            return f"LoRA side path ({ranks})"

    LoraSideLinear.__qualname__ = "LoraSideLinear"
    LoraSideLinear.__module__ = __name__
    return LoraSideLinear


def _key(name: str) -> str:
    """ModuleDict keys cannot contain dots."""
    return name.replace(".", "_")


def side_linear_class() -> type:
    if "side" not in _CLASSES:
        _CLASSES["side"] = _side_linear_class()
    return _CLASSES["side"]


def is_side_linear(module: Any) -> bool:
    return "side" in _CLASSES and isinstance(module, _CLASSES["side"])

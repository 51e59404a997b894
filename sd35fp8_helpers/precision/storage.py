"""FP8 *storage*: float8 weights with per-row scales, upcast per layer (runs anywhere, halves weight bytes).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .policies import FilterFn

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn


E4M3_MAX = 448.0
"""Largest finite float8_e4m3fn value; casting saturates there (NaN stays NaN)."""


# --- the storage module ---------------------------------------------------------------------------------

def _torch_nn():
    import torch
    from torch import nn

    return torch, nn


def _float8_storage_linear_class():
    torch, nn = _torch_nn()

    class Float8StorageLinear(nn.Module):
        """A Linear whose weight is stored as float8_e4m3fn with a float32 scale (per row or per tensor).

        forward: ``F.linear(x, weight.to(x.dtype) * scale_weight, bias)`` — the upcast copy lives only for
        the duration of the call. Buffer names follow the Comfy "scaled FP8" convention (``weight``,
        ``scale_weight``, optional ``scale_input``) so saved files read the same way.
        """

        def __init__(self, in_features: int, out_features: int, bias: bool = True, *, device=None,
                     dtype=None, per_row: bool = True) -> None:
            super().__init__()
            self.in_features, self.out_features = in_features, out_features
            self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn,
                                                       device=device))
            self.register_buffer("scale_weight", torch.ones((out_features, 1) if per_row else (),
                                                            dtype=torch.float32, device=device))
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype),
                                     requires_grad=False) if bias else None

        @classmethod
        def from_linear(cls, linear: "nn.Linear", per_row: bool = True) -> "nn.Module":
            w = linear.weight.detach()
            new = cls(linear.in_features, linear.out_features, linear.bias is not None, device=w.device,
                      dtype=w.dtype, per_row=per_row)
            new.weight, new.scale_weight = quantize_tensor(w, per_row=per_row)
            if linear.bias is not None:
                new.bias.data = linear.bias.detach().clone()
            return new

        def forward(self, x: "torch.Tensor") -> "torch.Tensor":
            w = self.weight.to(x.dtype).mul_(self.scale_weight.to(x.dtype))
            return torch.nn.functional.linear(x, w, self.bias if self.bias is None else self.bias.to(x.dtype))

        def dequantized_weight(self, dtype=None) -> "torch.Tensor":
            return (self.weight.float() * self.scale_weight).to(dtype or torch.float32)

        def _apply(self, fn, recurse=True):
            # Module.to(dtype) would upcast the float8 buffers and silently undo the memory saving, and round
            # the float32 scales (a calibrated scale_input too): keep their dtypes (moving device only), let
            # the bias follow the requested dtype.
            kept = {n: t for n, t in self._buffers.items() if n in ("weight", "scale_weight", "scale_input")}
            super()._apply(fn, recurse)
            for n, t in kept.items():
                if self._buffers[n].dtype != t.dtype:
                    self._buffers[n] = t.to(self._buffers[n].device)
            return self

        def extra_repr(self) -> str:
            kind = "per-row" if self.scale_weight.ndim else "per-tensor"
            return (f"in_features={self.in_features}, out_features={self.out_features}, "
                    f"bias={self.bias is not None}, storage=float8_e4m3fn, scale={kind}")

    Float8StorageLinear.__qualname__ = "Float8StorageLinear"
    Float8StorageLinear.__module__ = __name__
    return Float8StorageLinear


_CLASSES: dict[str, Any] = {}  # lazily built classes (torch/transformers imported on first use)


def storage_linear_class() -> type:
    """The ``Float8StorageLinear`` class (built on first use so importing this module stays free of torch)."""
    if "linear" not in _CLASSES:
        _CLASSES["linear"] = _float8_storage_linear_class()
    return _CLASSES["linear"]


def is_fp8_storage(module: Any) -> bool:
    return "linear" in _CLASSES and isinstance(module, _CLASSES["linear"])


def quantize_tensor(w: "torch.Tensor", *, per_row: bool = True) -> tuple["torch.Tensor", "torch.Tensor"]:
    """``w ≈ q.float() * scale`` with ``q`` float8_e4m3fn: the largest magnitude (per row) maps to 448.

    Without the scale, N(0, 0.02) weights would mostly fall into e4m3's subnormal range (below 2^-6),
    where only 3 bits or fewer are left — or flush to zero.
    """
    import torch

    w32 = w.detach().float()
    amax = w32.abs().amax(dim=1, keepdim=True) if per_row else w32.abs().amax()
    scale = (amax / E4M3_MAX).clamp(min=1e-12)
    q = (w32 / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale.float()


def _t5_ff_patched(module: "nn.Module") -> None:
    """Make T5's feed-forward run with an FP8-stored ``wo``.

    transformers' T5 FF casts its hidden states to ``self.wo.weight.dtype`` before ``wo`` (to keep ``wo`` in
    fp32 for fp16 runs); with ``wo`` stored in float8 that cast would turn activations into float8.
    The patched class runs the same computation without that cast (``wo`` upcasts its own weight).
    """
    from transformers.models.t5.modeling_t5 import T5DenseActDense, T5DenseGatedActDense

    if "t5" not in _CLASSES:
        class Float8T5DenseGatedActDense(T5DenseGatedActDense):
            def forward(self, hidden_states):
                gated = self.act(self.wi_0(hidden_states)) * self.wi_1(hidden_states)
                return self.wo(self.dropout(gated))

        class Float8T5DenseActDense(T5DenseActDense):
            def forward(self, hidden_states):
                return self.wo(self.dropout(self.act(self.wi(hidden_states))))

        _CLASSES["t5"] = {T5DenseGatedActDense: Float8T5DenseGatedActDense, T5DenseActDense: Float8T5DenseActDense}
    patched = _CLASSES["t5"].get(type(module))
    if patched is not None:
        module.__class__ = patched


def replace_module(root: "nn.Module", fqn: str, new: "nn.Module") -> None:
    parent_name, _, child = fqn.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def to_storage(model: "nn.Module", keep: FilterFn, *, per_row: bool = True) -> list[str]:
    """Replace every Linear that ``keep(module, fqn)`` selects by a Float8StorageLinear, one at a time
    (peak extra memory: one layer). Returns the converted names."""
    cls = storage_linear_class()
    names = [fqn for fqn, m in model.named_modules() if keep(m, fqn)]
    for fqn in names:
        replace_module(model, fqn, cls.from_linear(model.get_submodule(fqn), per_row=per_row))
    patch_t5(model)
    return names


def patch_t5(model: "nn.Module") -> None:
    try:
        from transformers.models.t5.modeling_t5 import (
            T5DenseActDense,
            T5DenseGatedActDense,
        )
    except ImportError:  # pragma: no cover
        return
    for m in model.modules():
        if isinstance(m, (T5DenseActDense, T5DenseGatedActDense)) and is_fp8_storage(getattr(m, "wo", None)):
            _t5_ff_patched(m)



"""FP8 compute with calibrated *static* activation scales: quantising an activation becomes a multiply-and-cast.

Why: with torchao's dynamic row-wise scaling, every FP8 matmul first reads its whole activation to find the
largest value of each row (an ``amax`` reduction), then casts it. On the H200 those passes were ~22 ms of a
103 ms SD3.5 Large step (REFERENCE §11). A *static* scale, measured once on calibration prompts
(:mod:`.calibration`) and stored with the checkpoint, turns the cast into ``(x * (1 / scale_input))`` →
float8: a pointwise op that ``torch.compile`` fuses into the kernel that produced ``x`` (the modulated
LayerNorm, the GELU, the attention output reshape), with no reduction pass. A per-tensor activation scale
also allows cuBLAS's *tensor-wise* scaled kernel (``torch._scaled_mm`` with two scalar scales) — measured on
the H200 it was *slower* than the row-wise kernel (per-row weight scales, the static activation scale
repeated per row), so row-wise weights are the default and tensor-wise is the option.

The cost is range: an activation larger than anything seen during calibration saturates at ±448 × scale.
Which layers, and how far off that is on a real model, is for the quality check (notebook 02), not assumed.

The buffer names follow ComfyUI's scaled-FP8 convention — ``weight`` (float8), ``scale_weight``,
``scale_input`` — and so does the arithmetic: ComfyUI's ``fp8_linear`` also computes
``_scaled_mm(x / scale_input, weight.t(), scale_a=scale_input, scale_b=scale_weight)``.

``torch._scaled_mm`` also runs on CPU (slowly, no speed-up), so the math of this path is tested there;
:func:`~sd35fp8_helpers.precision.quantize.quantize_` still refuses *compute mode* on a device without
float8 tensor cores, because there it would only be slower.

Example (CPU: the math, not the speed):
    >>> import torch
    >>> lin = torch.nn.Linear(32, 16)
    >>> lin.register_buffer("scale_input", torch.tensor(2.0 / 448), persistent=False)
    >>> layer = static_linear_class().from_module(lin)
    >>> layer(torch.randn(3, 32)).shape
    torch.Size([3, 16])
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from ..errors import Sd35fp8Error
from .policies import FilterFn
from .storage import E4M3_MAX, is_fp8_storage, quantize_tensor, replace_module

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

WeightScales = Literal["tensor", "row"]
_CLASSES: dict[str, Any] = {}


def _float8_static_linear_class():
    import torch
    from torch import nn

    class Float8StaticLinear(nn.Module):
        """A Linear computed by ``torch._scaled_mm`` on float8 weights and a statically scaled float8 input.

        ``scale_weight``: one per output row (``weight_scales="row"``, the default: the row-wise kernel torchao
        uses, with the calibrated scalar repeated for every input row — on the H200 it measured faster than
        the tensor-wise one, and it is more exact) or one float32 scalar (``"tensor"``: cuBLAS's tensor-wise
        kernel). ``scale_input``: the calibrated activation amax / 448. ``fast_accum``: cuBLAS's fast
        accumulation (fewer promotions of the FP8 partial sums to fp32: faster, a little less exact).
        """

        def __init__(self, in_features: int, out_features: int, bias: bool = True, *, device=None, dtype=None,
                     weight_scales: WeightScales = "row", fast_accum: bool = True) -> None:
            super().__init__()
            self.in_features, self.out_features = in_features, out_features
            self.weight_scales, self.fast_accum = weight_scales, fast_accum
            self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn,
                                                       device=device))
            self.register_buffer("scale_weight", torch.ones((1, out_features) if weight_scales == "row" else (),
                                                            dtype=torch.float32, device=device))
            self.register_buffer("scale_input", torch.ones((), dtype=torch.float32, device=device))
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype),
                                     requires_grad=False) if bias else None

        @classmethod
        def from_module(cls, module: "nn.Module", *, weight_scales: WeightScales = "row",
                        fast_accum: bool = True, dtype=None) -> "nn.Module":
            """From an ``nn.Linear`` or a ``Float8StorageLinear`` that carries a ``scale_input`` buffer."""
            scale_input = getattr(module, "scale_input", None)
            if scale_input is None:
                raise Sd35fp8Error(f"{type(module).__name__} has no calibrated activation scale (scale_input)",
                                   fix="calibrate first (sd35fp8_helpers.precision.calibration.calibrate_)")
            stored = is_fp8_storage(module)
            w = module.dequantized_weight(torch.float32) if stored else module.weight.detach().float()
            bias = module.bias
            dtype = dtype or (bias.dtype if bias is not None else (torch.bfloat16 if stored else module.weight.dtype))
            new = cls(module.in_features, module.out_features, bias is not None, device=w.device, dtype=dtype,
                      weight_scales=weight_scales, fast_accum=fast_accum)
            q, s = quantize_tensor(w, per_row=weight_scales == "row")
            new.weight = q
            new.scale_weight = s.reshape(1, -1) if weight_scales == "row" else s.reshape(())
            new.scale_input = scale_input.detach().float().reshape(()).to(w.device).clone()
            if bias is not None:
                new.bias.data = bias.detach().to(dtype).clone()
            return new

        def forward(self, x: "torch.Tensor") -> "torch.Tensor":
            shape = x.shape
            x2 = x.reshape(-1, self.in_features)
            # The whole activation quantisation: one multiply, a clamp, a cast — pointwise, so under
            # torch.compile it fuses into whatever kernel produced x. No amax reduction.
            xq = (x2.float() * self.scale_input.reciprocal()).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
            scale_a = (self.scale_input.reshape(1, 1).expand(x2.shape[0], 1).contiguous()
                       if self.weight_scales == "row" else self.scale_input)
            # cuBLAS takes no bias with a float32 output: add it afterwards there (CPU tests run in float32).
            fused_bias = self.bias is not None and x.dtype != torch.float32
            out = torch._scaled_mm(xq, self.weight.t(), scale_a=scale_a, scale_b=self.scale_weight,
                                   bias=self.bias.to(x.dtype) if fused_bias else None, out_dtype=x.dtype,
                                   use_fast_accum=self.fast_accum)
            if self.bias is not None and not fused_bias:
                out = out + self.bias.to(x.dtype)
            return out.reshape(*shape[:-1], self.out_features)

        def dequantized_weight(self, dtype=None) -> "torch.Tensor":
            return (self.weight.float() * self.scale_weight.reshape(-1, 1)).to(dtype or torch.float32)

        def _apply(self, fn, recurse=True):
            # Module.to(dtype) must not upcast the float8 weight or round the float32 scales.
            kept = {n: getattr(self, n) for n in ("weight", "scale_weight", "scale_input")}
            super()._apply(fn, recurse)
            for n, t in kept.items():
                if getattr(self, n).dtype != t.dtype:
                    setattr(self, n, t.to(getattr(self, n).device))
            return self

        def extra_repr(self) -> str:
            return (f"in_features={self.in_features}, out_features={self.out_features}, "
                    f"bias={self.bias is not None}, float8_e4m3fn, activation scale static per-tensor, "
                    f"weight scale per-{self.weight_scales}, fast_accum={self.fast_accum}")

    Float8StaticLinear.__qualname__ = "Float8StaticLinear"
    Float8StaticLinear.__module__ = __name__
    return Float8StaticLinear


def static_linear_class() -> type:
    """The ``Float8StaticLinear`` class (built on first use: importing this module needs no torch)."""
    if "linear" not in _CLASSES:
        _CLASSES["linear"] = _float8_static_linear_class()
    return _CLASSES["linear"]


def is_fp8_static(module: Any) -> bool:
    return "linear" in _CLASSES and isinstance(module, _CLASSES["linear"])


def static_candidates(model: "nn.Module", keep: FilterFn) -> list[str]:
    """The layers the static path converts: every FP8-stored layer, and the Linears ``keep`` selects."""
    return [fqn for fqn, m in model.named_modules() if is_fp8_storage(m) or keep(m, fqn)]


def missing_scales(model: "nn.Module", names: list[str]) -> list[str]:
    return [n for n in names if getattr(model.get_submodule(n), "scale_input", None) is None]


def require_static_scales(model: "nn.Module", keep: FilterFn) -> list[str]:
    """The layers ``keep`` selects for static FP8 — or, if any lacks a calibrated ``scale_input``, the error
    naming how many and which (checked before anything changes: a model half in static FP8 helps nobody)."""
    names = static_candidates(model, keep)
    lacking = missing_scales(model, names)
    if lacking:
        raise Sd35fp8Error(f"activation_scales='static': {len(lacking)} of {len(names)} FP8 layers have no "
                           f"calibrated activation scale (e.g. {', '.join(lacking[:3])})",
                           fix="calibrate first: calibrate_(pipe, prompts), or load a checkpoint written by "
                               "`sd35fp8 quantize MODEL OUT --calibrate PROMPTS`; or use activation_scales='dynamic'")
    return names


def to_static_compute(model: "nn.Module", keep: FilterFn, *, weight_scales: WeightScales = "row",
                      fast_accum: bool = True) -> list[str]:
    """Replace the selected layers by :class:`Float8StaticLinear`, one at a time (peak extra memory: one layer).

    Every selected layer must carry a calibrated ``scale_input``; if one does not, nothing is converted and
    the error names how many and which (a model half in static FP8 would be worse than either).
    Runs on any device (CPU: slowly — for tests); capability checks belong to ``quantize_``.
    """
    names = require_static_scales(model, keep)
    cls = static_linear_class()
    for fqn in names:
        replace_module(model, fqn, cls.from_module(model.get_submodule(fqn), weight_scales=weight_scales,
                                                   fast_accum=fast_accum))
    return names

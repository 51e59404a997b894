"""The one in-place verb, :func:`quantize_`, its config and its report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ..errors import FP8ComputeUnavailable, Sd35fp8Error
from ..vocabulary import parse_precision
from .compute import compile_transformer, fp8_compute_support, to_compute
from .policies import TEXT_ENCODER_POLICY, FilterFn, get_policy
from .storage import is_fp8_storage, to_storage

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


Mode = Literal["auto", "storage", "compute"]


# --- config and report ----------------------------------------------------------------------------------

@dataclass
class FP8Config:
    """What :func:`quantize_` should do. ``auto`` = compute where the GPU can (capability >= 8.9), else storage.

    ``compile_scope`` (compute mode): ``"blocks"`` compiles each transformer block (one graph reused 24–38
    times: fast first call), ``"model"`` the whole transformer.

    Compute mode only:

    * ``activation_scales``: ``"dynamic"`` (torchao: one scale per activation row, found by an amax pass
      before every matmul — needs nothing, the fallback) or ``"static"`` (the calibrated ``scale_input`` of
      each layer, see :func:`~sd35fp8_helpers.precision.calibration.calibrate_`: the cast fuses into the
      kernel that produced the activation, no amax pass; per-tensor, so cuBLAS's tensor-wise kernel).
    * ``weight_scales`` (static): ``"row"`` (one scale per output row, as stored: the row-wise GEMM) or
      ``"tensor"`` (one per weight: the tensor-wise GEMM). Row is the default because it measured both faster
      and more exact on the H200 (Large step with fused QKV 94.1 vs 95.8 ms, same run; docs/benchmarks.md).
    * ``fast_accum`` (static): cuBLAS fast accumulation, on by default as in torchao's dynamic path (~3 ms of a
      Large step; its error change was within 0.001 of the step's relative error vs bf16).
    * ``fuse_qkv``: q/k/v as one projection (:mod:`.fusion`): one GEMM and one activation cast instead of three.
    """

    mode: Mode = "auto"
    policy: str | FilterFn = "all-linear"
    text_encoder_3: bool = True
    clip: bool = False
    compile: bool = True
    compile_scope: Literal["blocks", "model"] = "blocks"
    activation_scales: Literal["dynamic", "static"] = "dynamic"
    weight_scales: Literal["tensor", "row"] = "row"
    fast_accum: bool = True
    fuse_qkv: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "storage", "compute"):
            raise Sd35fp8Error(f"FP8Config.mode={self.mode!r} is not a mode", fix="use 'auto', 'storage' or 'compute'")
        if self.compile_scope not in ("blocks", "model"):
            raise Sd35fp8Error(f"FP8Config.compile_scope={self.compile_scope!r} is not valid",
                               fix="use 'blocks' or 'model'")
        if self.activation_scales not in ("dynamic", "static"):
            raise Sd35fp8Error(f"FP8Config.activation_scales={self.activation_scales!r} is not valid",
                               fix="use 'dynamic' (torchao row-wise, no calibration) or 'static' (calibrated)")
        if self.weight_scales not in ("tensor", "row"):
            raise Sd35fp8Error(f"FP8Config.weight_scales={self.weight_scales!r} is not valid", fix="use 'tensor' or 'row'")
        if self.mode == "storage" and (self.activation_scales == "static" or self.fuse_qkv):
            raise Sd35fp8Error("activation_scales='static' and fuse_qkv are FP8 *compute* options; "
                               "storage mode upcasts weights and multiplies in bf16",
                               fix="use mode='compute' (or 'auto'), or drop those options")
        get_policy(self.policy)  # raises on an unknown name

    @property
    def policy_name(self) -> str:
        return self.policy if isinstance(self.policy, str) else getattr(self.policy, "__name__", "custom")

    @property
    def scaling(self) -> str:
        """How compute mode scales activations, in words (the report prints it)."""
        if self.activation_scales == "dynamic":
            return "dynamic row-wise activation scales (torchao)"
        return (f"static per-tensor activation scales, per-{self.weight_scales} weight scales"
                + (", fast accumulation" if self.fast_accum else ""))


@dataclass
class ComponentBytes:
    name: str
    before: int
    after: int
    converted: int
    how: str  # "fp8 storage", "fp8 compute", "unchanged"


@dataclass
class FP8Report:
    """What :func:`quantize_` did: the mode used and why, the policy, and bytes per component."""

    mode: str
    policy: str
    reason: str
    device: str
    compiled: str = "no"
    components: list[ComponentBytes] = field(default_factory=list)
    scaling: str = ""
    """Compute mode: how activations are scaled (dynamic row-wise, or static per-tensor from calibration)."""
    calibration: dict[str, Any] | None = None
    """What the static activation scales were calibrated on, when the pipeline carries them."""

    @property
    def converted(self) -> int:
        return sum(c.converted for c in self.components)

    @property
    def bytes_before(self) -> int:
        return sum(c.before for c in self.components)

    @property
    def bytes_after(self) -> int:
        return sum(c.after for c in self.components)

    def rows(self) -> list[dict[str, Any]]:
        from ..display import human_bytes

        return [{"component": c.name, "precision": c.how, "layers converted": c.converted,
                 "before": human_bytes(c.before), "after": human_bytes(c.after),
                 "saved": f"{1 - c.after / c.before:.0%}" if c.before else "-"} for c in self.components]

    def __str__(self) -> str:
        from ..display import human_bytes, text_table

        how = f", {self.scaling}" if self.scaling else ""
        head = (f"FP8 {self.mode} (policy {self.policy}{how}, compile: {self.compiled}) on {self.device}: "
                f"{self.reason}\n"
                f"{self.converted} Linear layers converted; {human_bytes(self.bytes_before)} -> "
                f"{human_bytes(self.bytes_after)}")
        if self.calibration:
            head += f"\nactivation scales calibrated on {self.calibration.get('source', '?')}"
        return head + "\n" + text_table(self.rows())

    def _repr_html_(self) -> str:
        from html import escape

        from ..display import html_table

        return f"<p>{escape(str(self).splitlines()[0])}</p>" + html_table(self.rows()).data


# --- the public verb ------------------------------------------------------------------------------------

def module_bytes(module: "nn.Module") -> int:
    """Bytes of all parameters and buffers, counting torchao tensor subclasses by their real payload."""
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        total += tensor_bytes(t)
    return total


def tensor_bytes(t) -> int:
    import torch

    if type(t) in (torch.Tensor, torch.nn.Parameter) or not hasattr(t, "__tensor_flatten__"):
        return t.numel() * t.element_size()
    names, _ = t.__tensor_flatten__()
    return sum(tensor_bytes(getattr(t, n)) for n in names)


def _device_of(module: "nn.Module"):
    return next(module.parameters()).device


def apply_precision_(pipe, precision: str) -> FP8Report | None:
    """Put ``pipe`` in a named precision, in place: a :data:`PRECISIONS` key, or ``auto`` (compute where possible).

    ``bf16`` changes nothing and returns None; the FP8 names run :func:`quantize_` (default policy) and return
    its report.

    Example:
        >>> from sd35fp8_helpers import load_pipeline
        >>> apply_precision_(load_pipeline("tiny", device="cpu"), "fp8-storage").mode
        'storage'
    """
    precision = parse_precision(precision, allow_auto=True)
    if precision == "bf16":
        return None
    return quantize_(pipe, FP8Config(mode=precision.removeprefix("fp8-")))


def stored_row(name: str, module: "nn.Module", before: int | None = None) -> ComponentBytes:
    """A report row read from the module itself: how many FP8-stored layers it holds, and its bytes.

    ``before`` defaults to the same module with those layers unquantised (their weights at the width of the
    module's other floating-point parameters), so a component loaded already in FP8 reports what FP8 saved.
    """
    after = module_bytes(module)
    fp8 = [m for m in module.modules() if is_fp8_storage(m)]
    if before is None:
        width = next((p.element_size() for p in module.parameters() if p.is_floating_point()), 2)
        before = after + sum(m.weight.numel() * (width - 1) - tensor_bytes(m.scale_weight) for m in fp8)
    return ComponentBytes(name, before, after, len(fp8), "fp8 storage" if fp8 else "unchanged")


def quantize_(pipe, config: FP8Config | None = None) -> FP8Report:
    """Convert a ``StableDiffusion3Pipeline`` (or a bare SD3 transformer) to FP8 in place.

    Trade-off: storage mode halves weight bytes everywhere at ~10–20% more time per step; compute mode
    (capability >= 8.9) also speeds the transformer up, but only with ``torch.compile`` (first call
    compiles for 15–30 s; a warm inductor cache cuts it to a few seconds). Compute mode scales activations
    dynamically (torchao, the default) or with calibrated static scales (``activation_scales="static"``,
    after :func:`~sd35fp8_helpers.precision.calibration.calibrate_`).
    Text encoders (T5 by default, CLIPs optionally) always use storage: they run once per prompt. A text
    encoder that is already FP8 (an FP8 checkpoint, a Comfy file) is reported as such, converted or not.

    Example:
        >>> from sd35fp8_helpers import load_pipeline
        >>> pipe = load_pipeline("tiny", device="cpu")
        >>> report = quantize_(pipe, FP8Config(mode="storage", policy="hybrid"))
        >>> report.mode, report.policy
        ('storage', 'hybrid')
    """
    config = config or FP8Config()
    transformer = getattr(pipe, "transformer", pipe)
    device = _device_of(transformer)
    can, why = fp8_compute_support(device)
    if config.mode == "compute" and not can:
        import torch

        cap = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        raise FP8ComputeUnavailable(str(device), cap, why)
    mode = "compute" if config.mode == "compute" or (config.mode == "auto" and can) else "storage"
    reason = {"compute": "asked for compute" if config.mode == "compute" else f"auto chose compute: {why}",
              "storage": "asked for storage" if config.mode == "storage" else f"auto chose storage: {why}"}[mode]
    keep = get_policy(config.policy)
    static = mode == "compute" and config.activation_scales == "static"
    if static:  # refuse before anything changes
        from .static import require_static_scales

        require_static_scales(transformer, keep)
    previous = {c.name: c for c in getattr(getattr(pipe, "sd35fp8_fp8", None), "components", [])}
    report = FP8Report(mode=mode, policy=config.policy_name, reason=reason, device=str(device),
                       scaling=config.scaling if mode == "compute" else "",
                       calibration=getattr(getattr(pipe, "sd35fp8_fp8", None), "calibration", None))

    before = previous["transformer"].before if "transformer" in previous else module_bytes(transformer)
    if mode == "compute":
        if config.fuse_qkv:
            from .fusion import fuse_qkv_

            fuse_qkv_(transformer)
        if static:
            from .static import to_static_compute

            names = to_static_compute(transformer, keep, weight_scales=config.weight_scales,
                                      fast_accum=config.fast_accum)
        else:
            names = to_compute(transformer, keep)
        if config.compile:
            report.compiled = compile_transformer(transformer, config.compile_scope)
    else:
        names = to_storage(transformer, keep)
    report.components.append(ComponentBytes("transformer", before, module_bytes(transformer), len(names),
                                            f"fp8 {mode}"))
    if transformer is not pipe:
        for attr, wanted in (("text_encoder_3", config.text_encoder_3), ("text_encoder", config.clip),
                             ("text_encoder_2", config.clip)):
            encoder = getattr(pipe, attr, None)
            if encoder is None:
                continue
            if attr in previous:
                before = previous[attr].before
            else:
                before = module_bytes(encoder) if wanted else None
            if wanted:
                to_storage(encoder, TEXT_ENCODER_POLICY)
            report.components.append(stored_row(attr, encoder, before))
        if getattr(pipe, "vae", None) is not None:
            vae_bytes = module_bytes(pipe.vae)
            report.components.append(ComponentBytes("vae", vae_bytes, vae_bytes, 0, "unchanged"))
        pipe.sd35fp8_fp8 = report
    return report

"""The one in-place verb, :func:`quantize_`, its config and its report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ..errors import FP8ComputeUnavailable, Sd35fp8Error
from ..vocabulary import parse_precision
from .compute import compile_transformer, fp8_compute_support, to_compute
from .policies import TEXT_ENCODER_POLICY, FilterFn, get_policy
from .storage import to_storage

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


Mode = Literal["auto", "storage", "compute"]


# --- config and report ----------------------------------------------------------------------------------

@dataclass
class FP8Config:
    """What :func:`quantize_` should do. ``auto`` = compute where the GPU can (capability >= 8.9), else storage.

    ``compile_scope`` (compute mode): ``"blocks"`` compiles each transformer block (one graph reused 24–38
    times: fast first call), ``"model"`` the whole transformer.
    """

    mode: Mode = "auto"
    policy: str | FilterFn = "all-linear"
    text_encoder_3: bool = True
    clip: bool = False
    compile: bool = True
    compile_scope: Literal["blocks", "model"] = "blocks"

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "storage", "compute"):
            raise Sd35fp8Error(f"FP8Config.mode={self.mode!r} is not a mode", fix="use 'auto', 'storage' or 'compute'")
        if self.compile_scope not in ("blocks", "model"):
            raise Sd35fp8Error(f"FP8Config.compile_scope={self.compile_scope!r} is not valid",
                               fix="use 'blocks' or 'model'")
        get_policy(self.policy)  # raises on an unknown name

    @property
    def policy_name(self) -> str:
        return self.policy if isinstance(self.policy, str) else getattr(self.policy, "__name__", "custom")


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
        from ..display import human_bytes

        head = (f"FP8 {self.mode} (policy {self.policy}, compile: {self.compiled}) on {self.device}: {self.reason}\n"
                f"{self.converted} Linear layers converted; {human_bytes(self.bytes_before)} -> "
                f"{human_bytes(self.bytes_after)}")
        rows = self.rows()
        widths = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in rows[0]} if rows else {}
        lines = ["  ".join(k.ljust(w) for k, w in widths.items())]
        lines += ["  ".join(str(r[k]).ljust(w) for k, w in widths.items()) for r in rows]
        return head + "\n" + "\n".join(lines)

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


def quantize_(pipe, config: FP8Config | None = None) -> FP8Report:
    """Convert a ``StableDiffusion3Pipeline`` (or a bare SD3 transformer) to FP8 in place.

    Trade-off: storage mode halves weight bytes everywhere at ~10–20% more time per step; compute mode
    (capability >= 8.9) also speeds the transformer up, but only with ``torch.compile`` (first call
    compiles for 15–30 s; a warm inductor cache cuts it to a few seconds).
    Text encoders (T5 by default, CLIPs optionally) always use storage: they run once per prompt.

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
    report = FP8Report(mode=mode, policy=config.policy_name, reason=reason, device=str(device))

    before = module_bytes(transformer)
    names = to_compute(transformer, keep) if mode == "compute" else to_storage(transformer, keep)
    if mode == "compute" and config.compile:
        report.compiled = compile_transformer(transformer, config.compile_scope)
    report.components.append(ComponentBytes("transformer", before, module_bytes(transformer), len(names),
                                            f"fp8 {mode}"))
    if transformer is not pipe:
        for attr, wanted in (("text_encoder_3", config.text_encoder_3), ("text_encoder", config.clip),
                             ("text_encoder_2", config.clip)):
            encoder = getattr(pipe, attr, None)
            if encoder is None:
                continue
            before = module_bytes(encoder)
            converted = to_storage(encoder, TEXT_ENCODER_POLICY) if wanted else []
            report.components.append(ComponentBytes(attr, before, module_bytes(encoder), len(converted),
                                                    "fp8 storage" if converted else "unchanged"))
        if getattr(pipe, "vae", None) is not None:
            vae_bytes = module_bytes(pipe.vae)
            report.components.append(ComponentBytes("vae", vae_bytes, vae_bytes, 0, "unchanged"))
        pipe.sd35fp8_fp8 = report
    return report



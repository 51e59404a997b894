"""FP8 for SD3.5, done right: which layers, which mode, and what it cost — in one in-place verb.

"FP8" means two different things that tutorials mix up:

* **storage** — weights are *kept* in ``float8_e4m3fn`` (1 byte) with a float32 scale per output row and
  upcast to bf16 inside each layer's forward. Halves weight memory on any device, CPU included; a little
  slower than bf16 (one extra cast per layer). This is what ``torch_dtype=torch.float8_e4m3fn`` is *not*:
  diffusers cannot run a model whose activations are float8, and without scales most small weights vanish
  (N(0, 0.02) weights: 56% fall below e4m3's smallest normal, 2^-6).
* **compute** — the matrix multiplies themselves run in FP8 on tensor cores (``torch._scaled_mm``, compute
  capability >= 8.9: Ada, Hopper). torchao quantises activations on the fly with one scale per row;
  it only beats bf16 under ``torch.compile`` (eager it is ~2x *slower*: the quantise kernels are unfused).

``quantize_(pipe, FP8Config())`` converts in place and returns an :class:`FP8Report` saying which mode was
used and why, and the bytes per component before and after. Which Linears become FP8 is a *policy*
(:data:`POLICIES`) or your own ``filter_fn(module, fqn) -> bool``.

Example:
    >>> from sd35fp8_helpers import load_pipeline
    >>> from sd35fp8_helpers.fp8 import FP8Config, quantize_
    >>> pipe = load_pipeline("tiny", device="cpu")
    >>> report = quantize_(pipe, FP8Config(mode="auto"))   # CPU: auto picks storage and says why
    >>> report.mode
    'storage'
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Union

from .constants import FP8_COMPUTE_MIN_CAPABILITY
from .errors import FP8ComputeUnavailable, Sd35fp8Error

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

Mode = Literal["auto", "storage", "compute"]
FilterFn = Callable[["nn.Module", str], bool]

E4M3_MAX = 448.0
"""Largest finite float8_e4m3fn value; casting saturates there (NaN stays NaN)."""

FP8_MANIFEST = "sd35fp8_fp8.json"
"""File at the root of a folder written by :func:`save_quantized`; its presence makes loading FP8-aware."""

# --- policies: which Linear layers of the SD3 transformer become FP8 ------------------------------------

ALL_LINEAR_KEEP_BF16: tuple[str, ...] = (r"^pos_embed\.", r"^time_text_embed\.", r"^proj_out$")
"""``all-linear`` keeps these Linears in bf16: patch/positional and timestep/pooled-text embeddings (tiny,
and their error reaches every token) and the final projection to latents. Norms are not Linears, so they
stay bf16 anyway. Everything else — attention, feed-forward, context embedder, and the big AdaLN
modulation linears ``norm1.linear`` / ``norm1_context.linear`` / ``norm_out.linear`` — becomes FP8."""

HYBRID_FP8_ONLY: tuple[str, ...] = (r"\.ff(_context)?\.", r"\.to_out\.0$", r"\.to_add_out$")
"""``hybrid`` converts only feed-forward and attention-output projections; q/k/v and AdaLN stay bf16."""


@functools.lru_cache(maxsize=1)
def _diffusers_default_skips() -> tuple[str, ...]:
    """What ``SD3Transformer2DModel.enable_layerwise_casting()`` skips by default, from diffusers itself.

    Its ``"norm"`` pattern also matches ``norm1.linear`` (AdaLN): 1.5 GB of Medium stays bf16.
    """
    try:
        from diffusers import SD3Transformer2DModel
        from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

        return tuple(DEFAULT_SKIP_MODULES_PATTERN) + tuple(SD3Transformer2DModel._skip_layerwise_casting_patterns or ())
    except ImportError:  # pragma: no cover - diffusers renamed its constant: same values as 0.42
        return ("pos_embed", "patch_embed", "norm", "^proj_in$", "^proj_out$", "pos_embed", "norm")


@dataclass(frozen=True)
class Policy:
    """A named rule for which ``nn.Linear`` layers become FP8 (regexes searched in the module's name)."""

    name: str
    description: str
    skip: tuple[str, ...] | Callable[[], tuple[str, ...]] = ()  # a callable is read on first use
    only: tuple[str, ...] | None = None  # if set, a Linear must match one of these as well

    @property
    def skip_patterns(self) -> tuple[str, ...]:
        return self.skip() if callable(self.skip) else self.skip

    def __call__(self, module: "nn.Module", fqn: str) -> bool:
        from torch import nn

        if type(module) is not nn.Linear:
            return False
        if any(re.search(p, fqn) for p in self.skip_patterns):
            return False
        return self.only is None or any(re.search(p, fqn) for p in self.only)


POLICIES: dict[str, Policy] = {
    "all-linear": Policy("all-linear", "every Linear incl. AdaLN; embeddings and proj_out bf16",
                         skip=ALL_LINEAR_KEEP_BF16),
    "hybrid": Policy("hybrid", "feed-forward and attention outputs FP8; q/k/v and AdaLN bf16",
                     skip=ALL_LINEAR_KEEP_BF16, only=HYBRID_FP8_ONLY),
    "diffusers-default": Policy("diffusers-default", "diffusers' layerwise-casting skips ('norm' keeps AdaLN bf16)",
                                skip=_diffusers_default_skips),  # read from diffusers on first use, not at import
}
TEXT_ENCODER_POLICY = Policy("text-encoder", "every Linear (embeddings and norms are not Linears)")


def get_policy(policy: str | FilterFn) -> FilterFn:
    if callable(policy):
        return policy
    try:
        return POLICIES[policy]
    except KeyError:
        raise Sd35fp8Error(f"unknown FP8 policy {policy!r}",
                           fix=f"choose one of {', '.join(POLICIES)} or pass a filter_fn(module, fqn)") from None


# --- config and report ----------------------------------------------------------------------------------

@dataclass
class FP8Config:
    """What :func:`quantize_` should do. ``auto`` = compute where the GPU can (capability >= 8.9), else storage.

    ``compile_scope`` (compute mode): ``"blocks"`` compiles each transformer block (one graph reused 24–38
    times: fast first call), ``"model"`` the whole transformer.
    """

    mode: Mode = "auto"
    policy: Union[str, FilterFn] = "all-linear"
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
        from .display import human_bytes

        return [{"component": c.name, "precision": c.how, "layers converted": c.converted,
                 "before": human_bytes(c.before), "after": human_bytes(c.after),
                 "saved": f"{1 - c.after / c.before:.0%}" if c.before else "-"} for c in self.components]

    def __str__(self) -> str:
        from .display import human_bytes

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

        from .display import html_table

        return f"<p>{escape(str(self).splitlines()[0])}</p>" + html_table(self.rows()).data


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
            # Module.to(dtype) would upcast the float8 buffers and silently undo the memory saving:
            # keep them (moving device only), let the bias follow the requested dtype.
            w, s = self.weight, self.scale_weight
            super()._apply(fn, recurse)
            if self.weight.dtype != torch.float8_e4m3fn:
                self.weight = w.to(self.weight.device)
                self.scale_weight = s.to(self.weight.device)
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


def _replace(root: "nn.Module", fqn: str, new: "nn.Module") -> None:
    parent_name, _, child = fqn.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def _to_storage(model: "nn.Module", keep: FilterFn, *, per_row: bool = True) -> list[str]:
    """Replace every Linear that ``keep(module, fqn)`` selects by a Float8StorageLinear, one at a time
    (peak extra memory: one layer). Returns the converted names."""
    cls = storage_linear_class()
    names = [fqn for fqn, m in model.named_modules() if keep(m, fqn)]
    for fqn in names:
        _replace(model, fqn, cls.from_linear(model.get_submodule(fqn), per_row=per_row))
    _patch_t5(model)
    return names


def _patch_t5(model: "nn.Module") -> None:
    try:
        from transformers.models.t5.modeling_t5 import T5DenseActDense, T5DenseGatedActDense
    except ImportError:  # pragma: no cover
        return
    for m in model.modules():
        if isinstance(m, (T5DenseActDense, T5DenseGatedActDense)) and is_fp8_storage(getattr(m, "wo", None)):
            _t5_ff_patched(m)


# --- compute mode ---------------------------------------------------------------------------------------

def fp8_compute_support(device: Any) -> tuple[bool, str]:
    """(can FP8 matmuls run on ``device``, a sentence saying why)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return False, (f"{device} has no float8 tensor cores (FP8 compute needs an NVIDIA GPU of capability "
                       f">= {FP8_COMPUTE_MIN_CAPABILITY[0]}.{FP8_COMPUTE_MIN_CAPABILITY[1]})")
    cap = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device)
    need = ".".join(map(str, FP8_COMPUTE_MIN_CAPABILITY))
    if tuple(cap) < FP8_COMPUTE_MIN_CAPABILITY:
        return False, f"{name} has capability {cap[0]}.{cap[1]} < {need} (no float8 tensor cores)"
    try:
        import torchao  # noqa: F401
    except ImportError:
        return False, f"{name} (capability {cap[0]}.{cap[1]}) could, but torchao is not installed"
    return True, f"{name} has capability {cap[0]}.{cap[1]} >= {need}: float8 tensor cores"


def _to_compute(model: "nn.Module", keep: FilterFn) -> list[str]:
    """torchao dynamic FP8 (row-wise scales for weights and activations) on the selected Linears.

    Layers already in FP8 storage (an FP8 checkpoint, a Comfy file) are dequantised one at a time and
    re-quantised by torchao, so no full bf16 copy ever exists.
    """
    import torch
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow
    from torchao.quantization import quantize_ as ao_quantize_

    # set_inductor_config=False: torchao's recommended inductor settings switch on coordinate-descent tuning;
    # with them the first compiled call of SD3.5 Large had not finished after 5 minutes on an H100.
    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.bfloat16)
    stored = [fqn for fqn, m in model.named_modules() if is_fp8_storage(m)]
    for fqn in stored:
        m = model.get_submodule(fqn)
        lin = torch.nn.Linear(m.in_features, m.out_features, m.bias is not None, device=m.weight.device, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(m.dequantized_weight(dtype))
            if m.bias is not None:
                lin.bias.copy_(m.bias)
        _replace(model, fqn, lin)
    names = [fqn for fqn, m in model.named_modules() if keep(m, fqn)]
    ao_quantize_(model, config, filter_fn=lambda m, fqn: fqn in set(names))
    return names


def compile_transformer(transformer: "nn.Module", scope: str = "blocks") -> str:
    """``torch.compile`` per block (one graph, reused by every block: short first call) or the whole model."""
    import torch

    if scope == "model":
        transformer.compile()
    else:
        # One graph serves every block; leave room for the variants (last block, dual-attention blocks).
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        for block in transformer.transformer_blocks:
            block.compile()
    return f"torch.compile per {'model' if scope == 'model' else 'block'}"


# --- the public verb ------------------------------------------------------------------------------------

def module_bytes(module: "nn.Module") -> int:
    """Bytes of all parameters and buffers, counting torchao tensor subclasses by their real payload."""
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        total += _tensor_bytes(t)
    return total


def _tensor_bytes(t) -> int:
    import torch

    if type(t) in (torch.Tensor, torch.nn.Parameter) or not hasattr(t, "__tensor_flatten__"):
        return t.numel() * t.element_size()
    names, _ = t.__tensor_flatten__()
    return sum(_tensor_bytes(getattr(t, n)) for n in names)


def _device_of(module: "nn.Module"):
    return next(module.parameters()).device


PRECISIONS: dict[str, str] = {"bf16": "BF16", "fp8-storage": "FP8 storage", "fp8-compute": "FP8 compute"}
"""The precision names ``sd35fp8 generate``, ``setup``, the playground and the server share (value: display label).

``bf16`` means "the pipeline as loaded, no FP8" (float32 on CPU); ``fp8-storage`` / ``fp8-compute`` are
:func:`quantize_` modes. They are what PNG metadata records, so an image can be re-made in its precision.
"""


def apply_precision_(pipe, precision: str) -> FP8Report | None:
    """Put ``pipe`` in a named precision, in place: a :data:`PRECISIONS` key, or ``auto`` (compute where possible).

    ``bf16`` changes nothing and returns None; the FP8 names run :func:`quantize_` (default policy) and return
    its report.

    Example:
        >>> from sd35fp8_helpers import load_pipeline
        >>> apply_precision_(load_pipeline("tiny", device="cpu"), "fp8-storage").mode
        'storage'
    """
    if precision not in (*PRECISIONS, "auto"):
        raise Sd35fp8Error(f"precision {precision!r} is not one of {', '.join(PRECISIONS)} or auto",
                           fix="use bf16 (as loaded), fp8-storage (any device) or fp8-compute (capability >= 8.9)")
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
    names = _to_compute(transformer, keep) if mode == "compute" else _to_storage(transformer, keep)
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
            converted = _to_storage(encoder, TEXT_ENCODER_POLICY) if wanted else []
            report.components.append(ComponentBytes(attr, before, module_bytes(encoder), len(converted),
                                                    "fp8 storage" if converted else "unchanged"))
        if getattr(pipe, "vae", None) is not None:
            vae_bytes = module_bytes(pipe.vae)
            report.components.append(ComponentBytes("vae", vae_bytes, vae_bytes, 0, "unchanged"))
        pipe.sd35fp8_fp8 = report
    return report


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
        _replace(model, fqn, cls(lin.in_features, lin.out_features, lin.bias is not None, device="meta",
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
    _patch_t5(model)
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
        before = after + sum(m.weight.numel() * (width - 1) - _tensor_bytes(m.scale_weight) for m in fp8)
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


# --- CLI ------------------------------------------------------------------------------------------------

def _quantize_args(p) -> None:
    p.add_argument("model", help="tiny, a diffusers folder, or a hub repo id")
    p.add_argument("out_dir", help="folder to write (diffusers layout + FP8 safetensors + sd35fp8_fp8.json)")
    p.add_argument("--policy", default="all-linear", choices=sorted(POLICIES))
    p.add_argument("--no-t5", action="store_true", help="leave T5-XXL in bf16")
    p.add_argument("--clip", action="store_true", help="CLIP-L/G in FP8 storage too")
    p.add_argument("--device", default="cpu", help="where to quantise (cpu is fine: it is a one-off)")


def _quantize_cmd(args) -> int:
    import torch

    from .models import load_pipeline

    dtype = torch.float32 if args.model == "tiny" else torch.bfloat16
    pipe = load_pipeline(args.model, device=args.device, dtype=dtype)
    report = quantize_(pipe, FP8Config(mode="storage", policy=args.policy, text_encoder_3=not args.no_t5,
                                       clip=args.clip))
    out = save_quantized(pipe, args.out_dir)
    print(report)
    print(f"wrote {out} (load it with load_pipeline({str(out)!r}) or --model {out})")
    return 0


def register_cli(command) -> None:
    command("quantize", "write an FP8 (storage) copy of a model as a diffusers folder", _quantize_args)(_quantize_cmd)


# --- teaching aids for notebook 02 ---------------------------------------------------------------------

def e4m3_facts() -> list[dict[str, Any]]:
    """What float8_e4m3fn can represent, computed from torch itself (not typed in)."""
    import torch

    fi = torch.finfo(torch.float8_e4m3fn)
    grid = e4m3_values()
    between_1_and_2 = grid[(grid >= 1) & (grid < 2)]
    return [{"property": "largest finite value", "value": f"±{fi.max:g}", "why it matters": "casts saturate there"},
            {"property": "smallest normal", "value": f"{fi.smallest_normal:g} (2^-6)",
             "why it matters": "below it precision drops bit by bit"},
            {"property": "smallest subnormal", "value": f"{grid[grid > 0].min():g} (2^-9)",
             "why it matters": "anything under half of it becomes 0"},
            {"property": "values between 1 and 2", "value": ", ".join(f"{v:g}" for v in between_1_and_2),
             "why it matters": "3 mantissa bits: 8 steps per power of two, ~6% apart"},
            {"property": "distinct finite values", "value": str(len(grid)), "why it matters": "bf16 has about 65 000"}]


def e4m3_values() -> "torch.Tensor":
    """Every finite float8_e4m3fn value, sorted (all 256 bit patterns, NaNs and the -0 duplicate removed)."""
    import torch

    values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    return torch.unique(values[~values.isnan()])


def scale_demo(stds: tuple[float, ...] = (0.02, 0.002, 0.0005), seed: int = 0) -> list[dict[str, Any]]:
    """Relative error of a plain float8 cast vs a per-row-scaled one, for weights of decreasing size."""
    import torch

    rows = []
    for std in stds:
        w = torch.randn(256, 256, generator=torch.Generator().manual_seed(seed)) * std
        plain = w.to(torch.float8_e4m3fn).float()
        q, scale = quantize_tensor(w)
        rows.append({"weights": f"N(0, {std:g})", "below 2^-6": f"{(w.abs() < 2**-6).float().mean():.0%}",
                     "plain cast: error": f"{(plain - w).norm() / w.norm():.1%}",
                     "plain cast: zeros": f"{(plain == 0).float().mean():.0%}",
                     "with scale: error": f"{(q.float() * scale - w).norm() / w.norm():.1%}"})
    return rows


def seed_mistakes(model: str = "tiny") -> list[dict[str, str]]:
    """Run the seed guide's three mistakes for real and return what each does, with the fix."""
    import torch
    from diffusers import StableDiffusionPipeline

    from .display import quiet_loading_bars
    from .models import resolve_model

    quiet_loading_bars()
    rows = []
    try:
        torch.nn.functional.linear(torch.randn(1, 4, dtype=torch.bfloat16),
                                   torch.randn(4, 4).to(torch.float8_e4m3fn))
        happened = "ran (unexpected)"
    except Exception as e:  # the exact error differs by torch version and device
        happened = f"{type(e).__name__}: {str(e).splitlines()[0][:110]}"
    rows.append({"mistake": "from_pretrained(..., torch_dtype=torch.float8_e4m3fn)",
                 "what happens": f"activations/weights in float8 cannot be multiplied: {happened}",
                 "fix": "quantize_(pipe, FP8Config()) — FP8 storage with scales, or torchao FP8 compute"})
    try:
        StableDiffusionPipeline.from_pretrained(resolve_model(model).path)
        happened = "loaded (unexpected)"
    except Exception as e:
        message = re.sub(r"<class '[\w.]*\.(\w+)'>", r"\1", str(e).splitlines()[0])
        happened = f"{type(e).__name__}: {message[:200]}"
    rows.append({"mistake": "StableDiffusionPipeline for SD3.5", "what happens": happened,
                 "fix": "StableDiffusion3Pipeline (what load_pipeline uses)"})
    try:
        resolve_model("stabilityai/stable-diffusion-3.5-fp8")
        happened = "resolved (unexpected)"
    except Sd35fp8Error as e:
        happened = str(e).split("\n")[0][:160]
    rows.append({"mistake": "git clone stabilityai/stable-diffusion-3.5-fp8", "what happens": happened,
                 "fix": "Comfy-Org/stable-diffusion-3.5-fp8 (load_comfy_pipeline) or quantise the official repo"})
    return rows

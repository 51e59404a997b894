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
  With *static* activation scales, calibrated once (:func:`calibrate_`, ``sd35fp8 quantize --calibrate``) and
  stored with the checkpoint, quantising an activation is a multiply-and-cast fused into the kernel that
  produced it, and the GEMM is cuBLAS's tensor-wise one (``FP8Config(activation_scales="static")``).

``quantize_(pipe, FP8Config())`` converts in place and returns an :class:`FP8Report` saying which mode was
used and why, and the bytes per component before and after. Which Linears become FP8 is a *policy*
(:data:`POLICIES`) or your own ``filter_fn(module, fqn) -> bool``.

Example:
    >>> from sd35fp8_helpers import load_pipeline
    >>> from sd35fp8_helpers.precision import FP8Config, quantize_
    >>> pipe = load_pipeline("tiny", device="cpu")
    >>> report = quantize_(pipe, FP8Config(mode="auto"))   # CPU: auto picks storage and says why
    >>> report.mode
    'storage'
"""

from .._lazy import lazy_exports

_EXPORTS = {
    "FP8Config": ".quantize",
    "FP8Report": ".quantize",
    "quantize_": ".quantize",
    "apply_precision_": ".quantize",
    "module_bytes": ".quantize",
    "POLICIES": ".policies",
    "Policy": ".policies",
    "get_policy": ".policies",
    "fp8_compute_support": ".compute",
    "calibrate_": ".calibration",
    "Calibration": ".calibration",
    "fuse_qkv_": ".fusion",
    "compile_transformer": ".compute",
    "save_quantized": ".checkpoint",
    "load_fp8_components": ".checkpoint",
    "read_manifest": ".checkpoint",
    "load_comfy_pipeline": ".comfy",
    "inspect_comfy_file": ".comfy",
    "quality_report": ".quality",
    "psnr": ".quality",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

"""Post-training calibration: run prompts through the model, record each FP8 layer's activation range.

The static FP8 path (:mod:`.static`) needs, for every FP8 Linear, the largest magnitude its input reaches
(``amax``); its scale is ``amax / 448`` (e4m3's largest finite value), stored as the layer's ``scale_input``
buffer — saved with the checkpoint by :func:`~sd35fp8_helpers.precision.checkpoint.save_quantized` (ComfyUI's
name for the same thing). What to calibrate on matters: activations change with the timestep, the prompt
and the image size, and an input larger than the calibrated range saturates. So calibrate through the real
sampler — several prompts, every step — at the size you will generate.

Example (CPU, the tiny model):
    >>> from sd35fp8_helpers import load_pipeline
    >>> from sd35fp8_helpers.precision import FP8Config, quantize_
    >>> pipe = load_pipeline("tiny", device="cpu")
    >>> _ = quantize_(pipe, FP8Config(mode="storage"))
    >>> calibrate_(pipe, ["a red fox", "a blue house"], steps=2).layers
    31
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import Sd35fp8Error
from .policies import FilterFn, get_policy
from .storage import E4M3_MAX, is_fp8_storage

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

AMAX_FLOOR = 1e-8
"""A layer whose input was all zeros during calibration gets this amax (a scale of ~2e-11, never 0)."""


@dataclass
class Calibration:
    """What a calibration pass measured: per layer the largest |input| seen, and on what."""

    amax: dict[str, float]
    source: str  # e.g. "2 prompts × 4 steps at 1024×1024 (CFG)" or "3 random-input forward passes"
    calls: int = 0  # forward calls of the model observed (a layer's amax is the max over all of them)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def layers(self) -> int:
        return len(self.amax)

    def summary(self) -> dict[str, Any]:
        """What the manifest records (the scales themselves live in the safetensors files)."""
        values = sorted(self.amax.values())
        return {"source": self.source, "layers": self.layers, "calls": self.calls,
                "amax_min": values[0] if values else None, "amax_median": values[len(values) // 2] if values else None,
                "amax_max": values[-1] if values else None, **self.extra}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _layers(model: "nn.Module", keep: FilterFn | None) -> list[str]:
    """FP8-stored layers, or (a bf16 model about to be quantised) the Linears ``keep`` selects."""
    stored = [fqn for fqn, m in model.named_modules() if is_fp8_storage(m)]
    if stored:
        return stored
    keep = keep or get_policy("all-linear")
    return [fqn for fqn, m in model.named_modules() if keep(m, fqn)]


def record_activation_amax(model: "nn.Module", run: Callable[[], Any], *, keep: FilterFn | None = None,
                           source: str = "custom run") -> Calibration:
    """Hook every FP8 layer of ``model`` (see :func:`_layers`), call ``run()``, return each layer's input amax.

    The running maximum stays on the device (one ``torch.maximum`` per call, no host sync) and is read
    once at the end. Run it *before* ``torch.compile``: hooks on compiled blocks would recompile them.
    """
    import torch

    names = _layers(model, keep)
    running: dict[str, torch.Tensor] = {}
    calls = [0]

    def hook_for(name: str):
        def hook(_module, args):
            x = args[0].detach()
            amax = x.abs().amax().float() if x.numel() else torch.zeros((), device=x.device)
            running[name] = torch.maximum(running[name], amax) if name in running else amax

        return hook

    def count(_module, _args):
        calls[0] += 1

    handles = [model.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in names]
    handles.append(model.register_forward_pre_hook(count))
    try:
        with torch.inference_mode():
            run()
    finally:
        for h in handles:
            h.remove()
    amax = {n: float(v) for n, v in running.items()}
    return Calibration({n: amax[n] for n in names if n in amax}, source, calls[0])


def set_activation_scales_(model: "nn.Module", calibration: Calibration, *, margin: float = 1.0) -> int:
    """Write ``scale_input = margin × amax / 448`` (float32 scalar) on every calibrated layer; returns how many.

    On FP8-stored layers the buffer is persistent (saved with the checkpoint); on plain Linears it is not
    (a bf16 model saved later stays loadable by diffusers as it is).
    """
    import torch

    if margin <= 0:
        raise Sd35fp8Error(f"margin={margin} must be > 0", fix="use 1.0 (the measured range) or a little more")
    for name, amax in calibration.amax.items():
        module = model.get_submodule(name)
        device = next((t.device for t in module.buffers()), None) or next(module.parameters()).device
        scale = torch.tensor(max(amax, AMAX_FLOOR) * margin / E4M3_MAX, dtype=torch.float32, device=device)
        if "scale_input" in module._buffers:
            module._buffers.pop("scale_input")
        module.register_buffer("scale_input", scale, persistent=is_fp8_storage(module))
    return len(calibration.amax)


def calibrate_(pipe, prompts: Sequence[str], *, steps: int = 4, height: int | None = None, width: int | None = None,
               guidance_scale: float | None = None, seed: int = 0, margin: float = 1.0) -> Calibration:
    """Run ``prompts`` through ``pipe`` (every step, CFG as configured), record and set the activation scales.

    In place, like :func:`~sd35fp8_helpers.precision.quantize_`: afterwards each FP8 layer of the transformer
    carries its ``scale_input``; ``save_quantized`` stores them, ``quantize_(pipe, FP8Config(mode="compute",
    activation_scales="static"))`` uses them. Calibrate on the FP8-storage pipeline (the activations it will
    really see) or on the bf16 one before quantising — both work; a compiled pipeline does not.
    """
    import torch

    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise Sd35fp8Error("calibration needs at least one prompt", fix="pass a few prompts like the ones you will use")
    if steps < 1:
        raise Sd35fp8Error(f"steps={steps} must be >= 1", fix="use the steps you generate with (e.g. 28), or 4")
    pipe.set_progress_bar_config(disable=True)
    kwargs: dict[str, Any] = {"num_inference_steps": steps, "output_type": "latent"}
    if height:
        kwargs["height"] = height
    if width:
        kwargs["width"] = width
    if guidance_scale is not None:
        kwargs["guidance_scale"] = guidance_scale

    def run() -> None:
        for i, prompt in enumerate(prompts):
            pipe(prompt=prompt, generator=torch.Generator("cpu").manual_seed(seed + i), **kwargs)

    side = f" at {width}×{height}" if height and width else ""
    cal = record_activation_amax(pipe.transformer, run, source=f"{len(prompts)} prompts × {steps} steps{side}")
    cal.extra.update({"prompts": len(prompts), "steps": steps, "margin": margin})
    set_activation_scales_(pipe.transformer, cal, margin=margin)
    report = getattr(pipe, "sd35fp8_fp8", None)
    if report is not None:
        report.calibration = cal.summary()
    return cal


def read_prompts(path: str) -> list[str]:
    """Prompts for ``sd35fp8 quantize --calibrate FILE``: one per line; blank lines and ``#`` comments skipped."""
    from pathlib import Path

    file = Path(path)
    if not file.is_file():
        raise Sd35fp8Error(f"--calibrate {path}: no such file",
                           fix="pass a text file with one calibration prompt per line")
    prompts = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()
               if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise Sd35fp8Error(f"--calibrate {path}: the file holds no prompts",
                           fix="write one prompt per line (lines starting with # are comments)")
    return prompts

"""Memory strategies that fit SD3.5 on a card: a ladder of diffusers' own levers, measured, with OOM fallback.

A full SD3.5 Large pipeline in bf16 needs about 27 GiB of GPU memory (transformer 15 GiB, T5-XXL 8.9 GiB,
CLIP-G 1.3, the VAE decode 2.6 GiB at 1024²). Each rung of :data:`STRATEGIES` trades speed (or, for
dropping T5, prompt fidelity) for memory, from fastest to leanest:

=============================  ===============================================================================
``resident``                   everything on the GPU in bf16
``fp8``                        transformer + T5 stored in FP8 (``fp8.quantize_``, storage mode), still resident
``fp8_no_t5``                  … and T5-XXL dropped (``text_encoder_3=None``): weaker long-prompt following
``fp8_model_offload``          FP8, one whole component on the GPU at a time (``enable_model_cpu_offload``)
``fp8_group_offload``          FP8, one block at a time (``apply_group_offloading``, block level)
``fp8_group_offload_tiled``    … and the VAE decodes 512 px tiles (``vae.enable_tiling`` + slicing)
``fp8_sequential_offload_tiled``  one layer at a time (accelerate ``cpu_offload``): leanest, slowest
=============================  ===============================================================================

Each strategy is plain data (a frozen dataclass) with an ``apply(pipe)`` that uses diffusers' levers.
Levers only ever get *leaner* when strategies are merged (:meth:`Strategy.merged`), so the OOM fallback
(:func:`generate_with_fallback`) can walk down the ladder without undoing anything; after every step it checks
that no module was left on the wrong device.

Never pass ``device_map="auto"`` to a diffusers *pipeline*: pipelines accept only ``"balanced"`` (spread
whole components over several GPUs) and a device name. ``"auto"`` is a transformers/accelerate idea for one
model; the lever for one GPU is offloading, below.

Example:
    >>> from sd35fp8_helpers.memory.strategies import get_strategy
    >>> get_strategy("fp8_model_offload").offload
    'model'
"""

from __future__ import annotations

import contextlib
import gc
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from ..errors import InvalidPlanInput, OutOfMemoryAfterFallback, PipelinePlacementError
from ..pipeline.decode import VAE_TILE_PX, fit_vae_tiles, latents_to_image
from ..pipeline.generation import text_kwargs

Offload = Literal["none", "model", "group", "sequential"]
OFFLOAD_ORDER: tuple[str, ...] = ("none", "model", "group", "sequential")
"""Offload kinds from fastest to leanest; merging two strategies keeps the leaner one."""

GROUP_BLOCK_MODULES: dict[str, list[str] | None] = {
    "transformer": None,                       # transformer_blocks is already a top-level ModuleList
    "text_encoder": ["text_model", "encoder"],  # CLIP: text_model.encoder.layers
    "text_encoder_2": ["text_model", "encoder"],
    "text_encoder_3": ["encoder"],              # T5: encoder.block
    "vae": ["encoder", "decoder"],              # decoder.up_blocks
}
"""Where each component keeps its block list. diffusers' block-level group offload only groups *top-level*
ModuleLists; without these names whole text encoders would be one group (no saving at all)."""


TILED_QUALITY = "tiles decoded separately and blended: pixels change, seams show when tiles are small"
"""What a tiled VAE decode costs in quality (the reason a ``*_tiled`` rung is not lossless)."""


@dataclass(frozen=True)
class Strategy:
    """One way to fit the pipeline on a card: which levers, and what they cost.

    ``speed`` is the prior relative speed (resident bf16 = 1.0) used until a GPU calibration replaces it;
    ``host_ram`` and ``quality`` say what else it costs.
    """

    name: str
    description: str
    fp8: bool = False
    drop_t5: bool = False
    offload: Offload = "none"
    vae_tiling: bool = False
    speed: float = 1.0
    host_ram: str = "only what loading needs"
    quality: str = "same images"

    @property
    def lossless(self) -> bool:
        """True when the images are exactly those of the same precision kept resident: offloading only moves
        weights, so it is lossless; dropping T5 changes the text conditioning, and a tiled VAE decodes each tile
        on its own and blends the overlaps, so both change pixels (``tests/test_memory.py`` checks each rung;
        the scene-model quality table in docs/benchmarks.md measures by how much)."""
        return not (self.drop_t5 or self.vae_tiling)

    def merged(self, current: "Strategy") -> "Strategy":
        """This strategy on top of ``current``: levers only get leaner (FP8 and a dropped T5 cannot be undone)."""
        levers = dict(fp8=self.fp8 or current.fp8, drop_t5=self.drop_t5 or current.drop_t5,
                      vae_tiling=self.vae_tiling or current.vae_tiling,
                      offload=max(self.offload, current.offload, key=OFFLOAD_ORDER.index))
        if all(getattr(self, k) == v for k, v in levers.items()):
            return self
        extra = [w for w, on in (("no T5", levers["drop_t5"] and not self.drop_t5),
                                 ("VAE tiling", levers["vae_tiling"] and not self.vae_tiling)) if on]
        return replace(self, name=self.name + "".join(f" + {w}" for w in extra), **levers)

    def with_vae_tiling(self) -> "Strategy":
        if self.vae_tiling:
            return self
        return replace(self, name=f"{self.name}_tiled", vae_tiling=True, speed=round(self.speed * 0.97, 3),
                       description=f"{self.description}; VAE decodes in tiles (≤ {VAE_TILE_PX} px)",
                       quality=TILED_QUALITY if self.quality == "same images" else f"{self.quality}; {TILED_QUALITY}")

    def levers(self) -> tuple:
        return (self.fp8, self.drop_t5, self.offload, self.vae_tiling)

    def apply(self, pipe, device: Any = None, *, exact: bool = False) -> list[str]:
        """Put ``pipe`` in this strategy's state on ``device`` (default: CUDA if present); returns what changed.

        Levers already in place are left alone (merged: levers only get leaner); ``exact=True`` also goes back
        to a faster placement or untiled VAE (FP8 and a dropped T5 can never be undone). If placement changes,
        every component is first brought back to the CPU (hooks removed): a pipeline is never left half-moved.
        """
        import torch

        from ..pipeline.loading import default_device

        device = torch.device(device or default_device())
        state = current_strategy(pipe)
        target = self.merged(state)
        if exact:
            if target.fp8 != self.fp8 or target.drop_t5 != self.drop_t5:
                raise InvalidPlanInput("strategy", self.name, f"cannot undo FP8 or a dropped T5 ('{state.name}')",
                                       fix="load the pipeline again to go back to bf16 or to T5")
            target = self
        changes: list[str] = []
        replace_offload = target.offload != state.offload or (target.levers() != state.levers()
                                                              and target.offload != "none")
        hooked = state.offload != "none"
        if replace_offload and hooked:  # hooks hold references to the modules the levers below replace
            _clear_offload(pipe)
        if target.drop_t5 and pipe.text_encoder_3 is not None:
            pipe.text_encoder_3 = None
            pipe.tokenizer_3 = None
            free_memory()
            changes.append("dropped T5-XXL (text_encoder_3=None): -4.8B parameters, weaker long-prompt following")
        if target.fp8 and not state.fp8:
            changes.append(apply_fp8_storage(pipe))
        if target.vae_tiling and not state.vae_tiling:
            pipe.vae.enable_tiling()
            pipe.vae.enable_slicing()
            pipe.vae.tile_sample_min_size = VAE_TILE_PX
            pipe.vae.tile_latent_min_size = VAE_TILE_PX // pipe.vae_scale_factor
            changes.append(f"VAE tiling ({VAE_TILE_PX} px tiles) + slicing")
        if state.vae_tiling and not target.vae_tiling:
            pipe.vae.disable_tiling()
            pipe.vae.disable_slicing()
            changes.append("VAE tiling off")
        if replace_offload and not hooked:  # resident → offloaded: FP8 was applied on the device, now move
            _clear_offload(pipe)
        if replace_offload or target.offload == "none":
            placed = _apply_offload(pipe, target.offload, device)
            changes += placed if replace_offload else []
        pipe._sd35fp8_strategy = target
        pipe._sd35fp8_device = device
        free_memory()
        return [c for c in changes if c]


STRATEGIES: tuple[Strategy, ...] = (
    Strategy("resident", "everything on the GPU in bf16", speed=1.0),
    Strategy("fp8", "transformer + T5 in FP8 storage (all-linear), everything resident", fp8=True, speed=0.87,
             quality="FP8 rounding (~3% per layer)"),
    Strategy("fp8_no_t5", "FP8, T5-XXL dropped (text_encoder_3=None)", fp8=True, drop_t5=True, speed=0.88,
             quality="no T5: weaker prompt following for long prompts, worse text rendering"),
    Strategy("fp8_model_offload", "FP8, one whole component on the GPU at a time (enable_model_cpu_offload)",
             fp8=True, offload="model", speed=0.75, host_ram="all weights (FP8) in host RAM",
             quality="FP8 rounding (~3% per layer)"),
    Strategy("fp8_group_offload", "FP8, one transformer/encoder block at a time (block-level group offload)",
             fp8=True, offload="group", speed=0.25, host_ram="all weights (FP8) in host RAM",
             quality="FP8 rounding (~3% per layer)"),
    Strategy("fp8_group_offload_tiled", f"FP8, block-level group offload, VAE in {VAE_TILE_PX} px tiles",
             fp8=True, offload="group", vae_tiling=True, speed=0.24, host_ram="all weights (FP8) in host RAM",
             quality=f"FP8 rounding; {TILED_QUALITY}"),
    Strategy("fp8_sequential_offload_tiled", "FP8, one layer at a time (sequential CPU offload), VAE tiles",
             fp8=True, offload="sequential", vae_tiling=True, speed=0.1, host_ram="all weights (FP8) in host RAM",
             quality=f"FP8 rounding; {TILED_QUALITY}"),
)
"""The ladder, fastest → leanest (``speed`` values are priors from docs/benchmarks.md and REFERENCE §10)."""


def get_strategy(name: str) -> Strategy:
    for s in STRATEGIES:
        if s.name == name:
            return s
        if s.with_vae_tiling().name == name:
            return s.with_vae_tiling()
    raise InvalidPlanInput("strategy", name, "is not a strategy",
                           fix=f"choose one of {', '.join(s.name for s in STRATEGIES)} (or NAME_tiled)")


DEFAULT_STRATEGY = "resident"
"""What every interface uses when no memory strategy is named: nothing moved, nothing converted."""

LEGACY_NAMES: dict[str, str] = {"none": "resident", "vae-tiling": "resident_tiled"}
"""Names older PNGs and commands used (the playground's former menu), read as the ladder's own names."""


def strategy_names() -> list[str]:
    """Every name :func:`get_strategy` accepts: the ladder's rungs and their ``_tiled`` variants, fastest first."""
    names: list[str] = []
    for s in STRATEGIES:
        names += [s.name] if s.vae_tiling else [s.name, s.with_vae_tiling().name]
    return list(dict.fromkeys(names))  # fp8_group_offload_tiled is a rung and a variant: offer it once


def offered_strategies(device: str) -> list[str]:
    """The names an interface offers on ``device``: offloading needs a GPU to offload *from*."""
    return [n for n in strategy_names() if device.startswith("cuda") or get_strategy(n).offload == "none"]


def parse_strategy(name: str | None, device: str = "cuda") -> Strategy:
    """A strategy from a name an interface received (None: :data:`DEFAULT_STRATEGY`), checked for ``device``."""
    name = LEGACY_NAMES.get(name or DEFAULT_STRATEGY, name or DEFAULT_STRATEGY)
    strategy = get_strategy(name)
    if strategy.offload != "none" and not device.startswith("cuda"):
        raise InvalidPlanInput("memory strategy", name, f"offloads to the CPU, and {device} has no GPU to offload from",
                               fix=f"choose one of {', '.join(offered_strategies(device))}")
    return strategy


def current_strategy(pipe) -> Strategy:
    """The strategy last applied with :meth:`Strategy.apply`, or ``resident`` as loaded."""
    state = getattr(pipe, "_sd35fp8_strategy", None)
    if state is not None:
        return state
    fp8 = getattr(pipe, "sd35fp8_fp8", None) is not None
    return replace(STRATEGIES[0], name="as loaded", fp8=fp8, drop_t5=pipe.text_encoder_3 is None)


# --- levers ---------------------------------------------------------------------------------------------

def apply_fp8_storage(pipe) -> str:
    """FP8 storage for the transformer (all-linear policy) and T5, with :func:`sd35fp8_helpers.precision.fp8.quantize_`
    (scaled FP8, per-row scales, upcast per layer); returns a one-line description."""
    from ..display import human_bytes
    from ..precision.quantize import FP8Config, quantize_

    report = quantize_(pipe, FP8Config(mode="storage", policy="all-linear", text_encoder_3=True))
    return (f"FP8 storage (sd35fp8.fp8, all-linear): {human_bytes(report.bytes_before)} → "
            f"{human_bytes(report.bytes_after)} of weights")


def _clear_offload(pipe) -> None:
    """Remove every offload hook and bring all components to the CPU (the one safe resting place)."""
    import torch
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    pipe.remove_all_hooks()
    for module in _modules(pipe).values():
        if _is_group_offload_enabled(module):
            registry = HookRegistry.check_if_exists_or_initialize(module)
            for name in ("group_offloading", "layer_execution_tracker", "lazy_prefetch_group_offloading"):
                registry.remove_hook(name, recurse=True)
        module.to(torch.device("cpu"))
    free_memory()


def _apply_offload(pipe, offload: str, device) -> list[str]:
    if offload == "none":
        pipe.to(device)
        return [f"all components on {device}"]
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
        return [f"model CPU offload: one component at a time on {device}"]
    if offload == "group":
        from diffusers.hooks import apply_group_offloading

        for name, module in _modules(pipe).items():
            # No CUDA streams: in diffusers 0.42 the stream path moves parameters but not buffers back to the
            # CPU, and FP8-stored weights are buffers (measured: the transformer stayed on the GPU, 9.9 GiB
            # peak for Large). Streams also cannot combine with nested block_modules (tracker hook twice).
            apply_group_offloading(module, onload_device=device, offload_device="cpu", offload_type="block_level",
                                   num_blocks_per_group=1, use_stream=False,
                                   block_modules=GROUP_BLOCK_MODULES.get(name))
        return [f"group offload (block level, no streams) onto {device}"]
    if offload == "sequential":
        # diffusers' enable_sequential_cpu_offload offloads buffers only for components whose top module has
        # parameters of its own — none of SD3's do, so FP8-stored weights (buffers) would stay on the GPU.
        from accelerate import cpu_offload

        for module in _modules(pipe).values():
            cpu_offload(module, device, offload_buffers=True)
        return [f"sequential offload (weights and buffers): one layer at a time on {device}"]
    raise InvalidPlanInput("offload", offload, "is not an offload kind", fix=f"use one of {OFFLOAD_ORDER}")


def _modules(pipe) -> dict[str, Any]:
    import torch

    return {k: v for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}


def free_memory() -> None:
    """Drop Python references and return cached CUDA blocks to the driver."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def misplaced_modules(pipe) -> list[str]:
    """Parameters/buffers not where the pipeline's strategy says they rest between calls ([] = consistent).

    Resident: everything on the device. Model/group offload: everything back on the CPU. Sequential
    offload: on the CPU or ``meta`` (accelerate keeps the real weights in a CPU map). Only floating-point
    tensors (weights) count: accelerate deliberately leaves small integer buffers (CLIP's ``position_ids``)
    on the execution device.
    """
    import torch

    state = current_strategy(pipe)
    device = torch.device(getattr(pipe, "_sd35fp8_device", None) or pipe.device)
    allowed = {"none": {device.type}, "model": {"cpu"}, "group": {"cpu"}, "sequential": {"cpu", "meta"}}[state.offload]
    wrong = []
    for name, module in _modules(pipe).items():
        tensors = list(module.named_parameters()) + list(module.named_buffers())
        places = sorted({t.device.type for _, t in tensors if t.is_floating_point()} - allowed)
        if places:
            wrong.append(f"{name}: on {', '.join(places)} (expected {', '.join(sorted(allowed))})")
    return wrong


def weight_bytes(pipe) -> dict[str, int]:
    """Bytes of parameters + buffers per component, as stored (FP8 layers count 1 byte per weight)."""
    from ..precision.quantize import module_bytes

    return {name: module_bytes(m) for name, m in _modules(pipe).items()}


# --- measurement ----------------------------------------------------------------------------------------

@dataclass
class MemoryReport:
    """Peaks and time of one measured block. GPU fields are None on a machine without CUDA."""

    seconds: float = 0.0
    gpu_peak_allocated: int | None = None
    gpu_peak_reserved: int | None = None
    host_peak_rss: int = 0
    host_start_rss: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"seconds": round(self.seconds, 4), "gpu_peak_allocated": self.gpu_peak_allocated,
                "gpu_peak_reserved": self.gpu_peak_reserved, "host_peak_rss": self.host_peak_rss,
                "host_start_rss": self.host_start_rss}


class _RssSampler(threading.Thread):
    """Samples this process's RSS every ``interval`` s (``getrusage`` peaks cannot be reset; this can)."""

    def __init__(self, interval: float = 0.005) -> None:
        import psutil

        super().__init__(daemon=True)
        self.process, self.interval = psutil.Process(), interval
        self.start_rss = self.peak = self.process.memory_info().rss
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.interval):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def stop(self) -> int:
        self._done.set()
        self.join()
        return max(self.peak, self.process.memory_info().rss)


@contextlib.contextmanager
def measure(device: Any = None) -> Iterator[MemoryReport]:
    """Measure the enclosed block: wall time, GPU peak allocated/reserved (CUDA), host peak RSS.

    Example:
        >>> with measure("cpu") as m:
        ...     _ = bytearray(10_000_000)
        >>> m.host_peak_rss >= m.host_start_rss and m.gpu_peak_allocated is None
        True
    """
    import torch

    cuda = torch.cuda.is_available() and not str(device or "cuda").startswith("cpu")
    report = MemoryReport()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    sampler = _RssSampler()
    sampler.start()
    report.host_start_rss = sampler.start_rss
    start = time.perf_counter()
    try:
        yield report
    finally:
        if cuda:
            torch.cuda.synchronize()
            report.gpu_peak_allocated = torch.cuda.max_memory_allocated()
            report.gpu_peak_reserved = torch.cuda.max_memory_reserved()
        report.seconds = time.perf_counter() - start
        report.host_peak_rss = sampler.stop()


@dataclass
class StagedRun:
    """One image generated stage by stage (encode → denoise → decode), each stage measured."""

    image: Any
    steps: int
    stages: dict[str, MemoryReport] = field(default_factory=dict)
    step_ends: list[float] = field(default_factory=list)  # perf_counter at the end of each step (synchronized)

    @property
    def seconds_per_step(self) -> float:
        """Steady-state seconds per step: the median step after the first (the first carries one-off work,
        e.g. model offload moving the transformer onto the GPU)."""
        import statistics

        gaps = [b - a for a, b in zip(self.step_ends, self.step_ends[1:])]
        return statistics.median(gaps) if gaps else self.stages["denoise"].seconds / self.steps

    def seconds_per_image(self, steps: int) -> float:
        """The measured image, extrapolated to ``steps``: encode + denoise + (steps − measured) × s/step + decode."""
        return (self.stages["encode"].seconds + self.stages["denoise"].seconds
                + (steps - self.steps) * self.seconds_per_step + self.stages["decode"].seconds)

    @property
    def gpu_peak_allocated(self) -> int | None:
        peaks = [s.gpu_peak_allocated for s in self.stages.values() if s.gpu_peak_allocated is not None]
        return max(peaks) if peaks else None

    @property
    def gpu_peak_reserved(self) -> int | None:
        peaks = [s.gpu_peak_reserved for s in self.stages.values() if s.gpu_peak_reserved is not None]
        return max(peaks) if peaks else None

    @property
    def host_peak_rss(self) -> int:
        return max(s.host_peak_rss for s in self.stages.values())

    def rows(self) -> list[dict[str, Any]]:
        from ..display import human_bytes

        def gib(v):
            return human_bytes(v) if v is not None else "—"

        return [{"stage": k, "seconds": f"{v.seconds:.3f}", "GPU peak allocated": gib(v.gpu_peak_allocated),
                 "GPU peak reserved": gib(v.gpu_peak_reserved), "host peak RSS": gib(v.host_peak_rss)}
                for k, v in self.stages.items()]


def generate_by_stage(pipe, settings, *, progress: bool = False) -> StagedRun:
    """Generate with the pipeline's own parts, timing and measuring each stage separately.

    ``encode_prompt`` (CLIP-L, CLIP-G, T5), the denoising loop (``output_type="latent"``), then the VAE
    decode — exactly what ``pipe(...)`` does, split so each stage gets its own peak and time. Works with
    every strategy (offload hooks move components as in a normal call).

    Example:
        >>> from sd35fp8_helpers import load_pipeline, GenerationSettings
        >>> run = generate_by_stage(load_pipeline("tiny", device="cpu"), GenerationSettings("a cat", steps=2))
        >>> list(run.stages), run.image.size
        (['encode', 'denoise', 'decode'], (128, 128))
    """
    import torch

    from ..pipeline.generation import check_settings, pipeline_limits

    multiple, max_side = pipeline_limits(pipe)
    check_settings(settings, multiple=multiple, max_side=max_side)
    pipe.set_progress_bar_config(disable=not progress)
    device = pipe._execution_device
    cfg = settings.guidance_scale > 1
    run = StagedRun(image=None, steps=settings.steps)
    cuda = torch.device(device).type == "cuda"

    def _step_end(_pipe, _i, _t, kwargs):
        if cuda:
            torch.cuda.synchronize()
        run.step_ends.append(time.perf_counter())
        return kwargs
    with torch.no_grad():  # not inference_mode: offload hooks would create inference-only parameters
        with measure(device) as run.stages["encode"]:
            pe, npe, ppe, nppe = pipe.encode_prompt(
                prompt=settings.prompt, prompt_2=None, prompt_3=None,
                negative_prompt=settings.negative_prompt or None, do_classifier_free_guidance=cfg, device=device,
                **text_kwargs(pipe))
        with measure(device) as run.stages["denoise"]:
            latents = pipe(prompt_embeds=pe, negative_prompt_embeds=npe, pooled_prompt_embeds=ppe,
                           negative_pooled_prompt_embeds=nppe, num_inference_steps=settings.steps,
                           guidance_scale=settings.guidance_scale, height=settings.height, width=settings.width,
                           generator=torch.Generator("cpu").manual_seed(settings.seed), output_type="latent",
                           callback_on_step_end=_step_end).images
        with measure(device) as run.stages["decode"]:
            fit_vae_tiles(pipe, settings.height, settings.width)
            run.image = latents_to_image(pipe, latents)[0]
            pipe.maybe_free_model_hooks()
    return run


# --- budget emulation and OOM fallback ------------------------------------------------------------------

def cuda_context_bytes() -> int:
    """GPU memory the driver/context uses outside PyTorch's allocator (counts against the card, not torch)."""
    import torch

    free, total = torch.cuda.mem_get_info()
    return max(0, total - free - torch.cuda.memory_reserved())


@contextlib.contextmanager
def emulated_card(budget_bytes: int, pipe=None) -> Iterator[None]:
    """Run the block as if the card had ``budget_bytes`` of memory.

    On CUDA: ``torch.cuda.set_per_process_memory_fraction`` caps PyTorch's allocator at the budget minus
    the CUDA context, so anything that would not fit a real card of that size raises ``OutOfMemoryError``.
    On CPU (no allocator cap exists), a forward pre-hook on ``pipe.transformer`` raises a real
    ``torch.OutOfMemoryError`` at the first denoising step while the pipeline's *weights* exceed the budget —
    enough to exercise the fallback ladder with FP8 and dropping T5 (offload does not change CPU bytes).
    """
    import torch

    if budget_bytes <= 0:
        raise InvalidPlanInput("budget", budget_bytes, "must be a positive number of bytes")
    if torch.cuda.is_available() and pipe is None:
        free_memory()
        total = torch.cuda.get_device_properties(0).total_memory
        fraction = max(0.0, budget_bytes - cuda_context_bytes()) / total
        torch.cuda.set_per_process_memory_fraction(min(1.0, fraction))
        try:
            yield
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
            free_memory()
        return
    if pipe is None:
        raise InvalidPlanInput("pipe", None, "is needed to emulate a card without CUDA",
                               fix="pass the pipeline: emulated_card(budget, pipe)")

    def _check(_module, _args):
        used = sum(weight_bytes(pipe).values())
        if used > budget_bytes:
            raise torch.OutOfMemoryError(f"emulated card of {budget_bytes:,} bytes: the pipeline's weights "
                                         f"need {used:,} bytes")

    handle = pipe.transformer.register_forward_pre_hook(_check)
    try:
        yield
    finally:
        handle.remove()


@dataclass
class FallbackResult:
    """The image, the strategy that produced it, and every step the ladder took (empty: first try fitted)."""

    result: Any  # GenerationResult
    strategy: Strategy
    steps: list[str] = field(default_factory=list)


def generate_with_fallback(pipe, settings, ladder: tuple[Strategy, ...] | None = None, *, device: Any = None,
                           log: Callable[[str], None] | None = print, progress: bool = False) -> FallbackResult:
    """Generate; on ``torch.OutOfMemoryError`` free memory, step down the ladder, say what changed, retry.

    Each rung is tried once (merged with what is already applied, so nothing is undone). After each step the
    placement of every module is checked against the new strategy; a half-moved pipeline raises
    :class:`PipelinePlacementError` instead of failing later in a confusing way. When the last rung still
    runs out of memory, :class:`OutOfMemoryAfterFallback` says how far the ladder went.

    Example:
        >>> from sd35fp8_helpers import load_pipeline, GenerationSettings
        >>> pipe = load_pipeline("tiny", device="cpu")
        >>> generate_with_fallback(pipe, GenerationSettings("a cat", steps=1), log=None).strategy.name
        'as loaded'
    """
    import torch

    from ..pipeline.generation import generate
    from ..pipeline.loading import default_device

    device = torch.device(device or getattr(pipe, "_sd35fp8_device", None) or default_device())
    ladder = STRATEGIES if ladder is None else ladder
    steps: list[str] = []
    pending = list(ladder)
    while True:
        state = current_strategy(pipe)
        try:
            result = generate(pipe, settings, progress=progress)
            return FallbackResult(result, state, steps)
        except torch.OutOfMemoryError as exc:
            failure = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'out of memory'}"
        # Outside the except block on purpose: there the traceback still holds the failed attempt's frames, and
        # with them every activation it allocated. Only now can free_memory() give that memory back, before
        # the next rung moves weights around.
        free_memory()
        while pending and pending[0].merged(state).levers() == state.levers():
            pending.pop(0)  # already implied by what is applied
        if not pending:
            raise OutOfMemoryAfterFallback(state.name, steps) from MemoryError(failure)
        nxt = pending.pop(0).merged(state)
        changes = nxt.apply(pipe, device)
        wrong = misplaced_modules(pipe)
        if wrong:
            raise PipelinePlacementError(nxt.name, wrong) from MemoryError(failure)
        line = f"out of memory with '{state.name}' → '{nxt.name}': {'; '.join(changes)}"
        steps.append(line)
        if log:
            log(line)

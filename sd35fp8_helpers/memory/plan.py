"""Which memory strategy fits *your* card: peak GPU memory predicted from the real configs, calibrated on a GPU.

The prediction has two parts:

* **weights**, exact from the architectures (:data:`ARCHITECTURE`, counted on the ``meta`` device from
  ``presets``): 2 bytes per bf16 element; FP8 storage turns each converted Linear weight into 1 byte plus
  a float32 scale per output row (policy ``all-linear`` for the transformer, every Linear of T5);
* **activations**, calibrated on the GPU machine (:data:`CALIBRATION`, with its device and date): the
  transformer's peak above its weights grows with the number of tokens, the VAE decode's with the pixels
  (or the tile, when tiling), each text encoder's is a constant per prompt.

Each strategy then combines them the way diffusers places weights: all resident (sum of weights + the
largest stage), model offload (the largest component + its stage), group offload (non-block weights in bf16 +
one block + the stage), sequential offload (the largest single layer + the stage).

``sd35fp8 plan --vram 12 --preset large`` ranks every strategy, marks what fits with a safety margin, and
recommends the fastest that keeps image quality.

Example:
    >>> p = plan(12, "large", 1024, 1024)
    >>> p.recommended.fits, p.recommended.lossless
    (True, True)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import InvalidPlanInput
from .strategies import STRATEGIES, VAE_TILE_PX, Strategy, get_strategy

GIB = 2 ** 30
PLAN_PRESETS = ("large", "medium", "large-turbo")
"""Large Turbo shares Large's weights' shapes (so its memory terms) but runs without CFG: batch 1 per step."""
TEXT_TOKENS = 77 + 256
"""Text tokens the SD3 transformer attends to: CLIP (77) + T5 (256, ``max_sequence_length``)."""
DEFAULT_MARGIN = 0.10
"""Safety margin on the predicted allocator peak: fragmentation (reserved > allocated) and other processes."""


@dataclass(frozen=True)
class ComponentStats:
    """Element counts of one component (parameters + floating buffers), from a meta-device instance."""

    elements: int        # all floating parameters and buffers (SD3's pos_embed buffer included)
    fp8_weights: int     # elements of the Linear weights the FP8 policy converts
    fp8_rows: int        # output rows of those Linears (one float32 scale each)
    block_elements: int  # elements inside the block lists group offload moves one at a time
    max_block: int       # elements of the largest block
    max_leaf: int        # elements of the largest single module (what sequential offload holds)

    def weight_bytes(self, fp8: bool = False) -> int:
        """bf16 bytes, or FP8-storage bytes: exactly the converted weights shrink (2 → 1 byte) + their scales."""
        return 2 * self.elements - ((self.fp8_weights - 4 * self.fp8_rows) if fp8 else 0)


# Counted by count_architecture() on the meta device (tests/test_memory.py recomputes them).
_SHARED = {
    "clip_l": ComponentStats(123_650_304, 0, 0, 85_054_464, 7_087_872, 37_945_344),
    "clip_g": ComponentStats(694_659_840, 0, 0, 629_678_080, 19_677_440, 63_242_240),
    "t5": ComponentStats(4_762_310_656, 4_630_511_616, 983_040, 4_630_710_272, 192_948_224, 131_596_288),
    "vae": ComponentStats(83_819_683, 0, 0, 62_599_680, 16_524_800, 2_359_808),
}
ARCHITECTURE: dict[str, dict[str, ComponentStats]] = {
    "large": {"transformer": ComponentStats(8_146_280_768, 8_036_106_240, 2_755_456, 8_017_073_408,
                                            212_999_680, 89_653_248), **_SHARED},
    "medium": {"transformer": ComponentStats(2_469_663_936, 2_233_466_880, 1_234_944, 2_223_694_976,
                                             101_506_944, 226_492_416), **_SHARED},
}
PIPELINE_NAMES = {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5": "text_encoder_3",
                  "transformer": "transformer", "vae": "vae"}
FP8_COMPONENTS = ("transformer", "t5")


def count_architecture(preset: str) -> dict[str, ComponentStats]:
    """Recount :data:`ARCHITECTURE` from the preset's configs on the meta device (no memory, ~4 s)."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    from ..precision.policies import POLICIES, TEXT_ENCODER_POLICY
    from ..presets import get_preset, instantiate_transformer
    from .strategies import GROUP_BLOCK_MODULES

    p = get_preset(preset)
    with torch.device("meta"):
        models = {"clip_l": (CLIPTextModelWithProjection(CLIPTextConfig(**p.clip_l)), None),
                  "clip_g": (CLIPTextModelWithProjection(CLIPTextConfig(**p.clip_g)), None),
                  "t5": (T5EncoderModel(T5Config(**p.t5)), TEXT_ENCODER_POLICY),
                  "vae": (AutoencoderKL(**p.vae), None),
                  "transformer": (instantiate_transformer(p), POLICIES["all-linear"])}
    return {name: _count(model, policy, GROUP_BLOCK_MODULES[PIPELINE_NAMES[name]])
            for name, (model, policy) in models.items()}


def _count(model, policy, block_modules) -> ComponentStats:
    import torch

    def elements(m, recurse=True) -> int:
        tensors = list(m.parameters(recurse=recurse)) + list(m.buffers(recurse=recurse))
        return sum(t.numel() for t in tensors if t.is_floating_point())

    converted = [m for fqn, m in model.named_modules() if policy is not None and policy(m, fqn)]
    blocks: list = []

    def walk(module) -> None:  # diffusers' block-level rule: top-level lists, recursing into block_modules
        for name, child in module.named_children():
            if block_modules and name in block_modules:
                walk(child)
            elif isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential)):
                blocks.extend(child)

    walk(model)
    return ComponentStats(elements(model), sum(m.weight.numel() for m in converted),
                          sum(m.out_features for m in converted), sum(elements(b) for b in blocks),
                          max((elements(b) for b in blocks), default=0),
                          max(elements(m, recurse=False) for m in model.modules()))


@dataclass(frozen=True)
class Calibration:
    """Activation terms and timings measured on one GPU, with their provenance."""

    device: str
    date: str
    versions: dict[str, str]
    command: str
    transformer_act_base: dict[str, float]       # bytes above the weights during a denoising step, per preset
    transformer_act_per_token: dict[str, float]  # … plus bytes per token (image + text tokens, × batch × CFG)
    vae_decode_base: float                       # bytes above VAE weights during decode …
    vae_decode_per_pixel: float                  # … plus bytes per decoded pixel (untiled)
    encoder_act: dict[str, float]                # bytes above weights while encoding one prompt with CFG
    cuda_context: float                          # driver/context memory outside PyTorch's allocator
    host_baseline: float                         # RSS of a process with torch + diffusers imported
    seconds_per_image: dict[str, dict[str, float]] = field(default_factory=dict)  # preset → strategy → s (28 steps)


PRIOR_CALIBRATION = Calibration(
    device="NVIDIA H100 80GB HBM3 (REFERENCE §10 anchors; prior before the memory benchmark)",
    date="2026-11-24", versions={"torch": "2.11.0+cu130", "diffusers": "0.42.1"},
    command="REFERENCE.md §10",
    transformer_act_base={"large": 0.0, "medium": 0.0},
    transformer_act_per_token={"large": 0.53 * GIB / 8858, "medium": 0.53 * GIB / 8858 * 1536 / 2432},
    vae_decode_base=0.0, vae_decode_per_pixel=(2.57 - 0.16) * GIB / 1024 ** 2,
    encoder_act={"clip_l": 0.02 * GIB, "clip_g": 0.05 * GIB, "t5": 0.2 * GIB},
    cuda_context=0.5 * GIB, host_baseline=1.0 * GIB,
)
# Measured by sd35fp8_helpers/memory_bench.py on the GPU machine (docs/benchmarks.md, ## Memory);
# memory_bench.calibration_literal(results) prints this block from a new run's JSON.
# host_baseline: RSS after building Large (first preset of the process); seconds: 1024², 28 steps (extrapolated).
CALIBRATION = Calibration(
    device='NVIDIA H100 80GB HBM3',
    date='2026-11-24',
    versions={'torch': '2.11.0+cu130', 'diffusers': '0.42.1', 'transformers': '5.17.0', 'torchao': '0.18.0'},
    command='python3 -m sd35fp8_helpers.benchmarks.memory --steps 4 --out docs/benchmarks/memory.json',
    transformer_act_base={'large': -28806485, 'medium': -21991424},
    transformer_act_per_token={'large': 62890.7, 'medium': 43008.0},
    vae_decode_base=2097152.0,
    vae_decode_per_pixel=2432.0,
    encoder_act={'clip_l': 40753152, 'clip_g': 16685056, 't5': 142639616},
    cuda_context=728563712.0,
    host_baseline=2039574528.0,
    seconds_per_image={
        'large': {'resident': 5.62, 'fp8': 6.92, 'fp8_no_t5': 6.87, 'fp8_model_offload': 14.71,
                  'fp8_group_offload': 94.67, 'fp8_group_offload_tiled': 91.66, 'fp8_sequential_offload_tiled': 60.76},
        'medium': {'resident': 2.85, 'fp8': 3.13, 'fp8_no_t5': 3.19, 'fp8_model_offload': 7.97,
                   'fp8_group_offload': 43.91, 'fp8_group_offload_tiled': 57.05, 'fp8_sequential_offload_tiled': 34.34}},
)
"""The calibration in use: activation terms measured on the GPU machine (provenance in its fields)."""


@dataclass(frozen=True)
class Prediction:
    """Predicted peaks of one strategy for one run. Bytes; ``card_needed`` includes margin and CUDA context."""

    preset: str
    strategy: str
    description: str
    height: int
    width: int
    batch: int
    gpu_peak: int
    stage_peaks: dict[str, int]
    host_ram: int
    card_needed: int
    relative_speed: float
    seconds_per_image: float | None
    lossless: bool
    quality: str
    fits: bool | None = None


def predict(preset: str, strategy: str | Strategy, height: int = 1024, width: int = 1024, batch: int = 1, *,
            precision: str = "bf16", guidance: bool | None = None, margin: float = DEFAULT_MARGIN,
            calibration: Calibration | None = None) -> Prediction:
    """Peak GPU memory (allocator) and host RAM of ``strategy`` for one generation.

    ``precision="fp8"`` means the pipeline was already loaded in FP8 storage; strategies with ``fp8`` use it
    regardless. Example:

        >>> p = predict("large", "resident")
        >>> round(p.stage_peaks["weights"] / 2**30, 1)   # bf16 weights of the whole pipeline
        25.7
    """
    _check_inputs(preset, height, width, batch, margin)
    from ..presets import get_preset

    p = get_preset(preset)
    guidance = p.uses_cfg if guidance is None else guidance  # Large Turbo: no CFG → half the activations
    arch_name = p.arch
    if precision not in ("bf16", "fp8"):
        raise InvalidPlanInput("precision", precision, "is not a precision policy", fix="use 'bf16' or 'fp8'")
    cal = calibration or CALIBRATION
    s = get_strategy(strategy) if isinstance(strategy, str) else strategy
    fp8 = s.fp8 or precision == "fp8"
    arch = {k: v for k, v in ARCHITECTURE[arch_name].items() if not (s.drop_t5 and k == "t5")}
    w = {k: v.weight_bytes(fp8 and k in FP8_COMPONENTS) for k, v in arch.items()}
    cfg = 2 if guidance else 1
    tokens = batch * cfg * (height // 16 * (width // 16) + TEXT_TOKENS)
    act = {k: cal.encoder_act[k] * batch for k in ("clip_l", "clip_g", "t5") if k in arch}
    act["transformer"] = cal.transformer_act_base[arch_name] + cal.transformer_act_per_token[arch_name] * tokens
    tiled = s.vae_tiling and max(height, width) > VAE_TILE_PX
    pixels = min(height, VAE_TILE_PX) * min(width, VAE_TILE_PX) if tiled else height * width * batch
    act["vae"] = cal.vae_decode_base + cal.vae_decode_per_pixel * pixels + (3 * 4 * height * width * batch if tiled else 0)
    if s.offload == "sequential":  # one layer (or the pos-embed table) at a time, never with the full activations
        stages = {k: int(max(2 * arch[k].max_leaf, act[k])) for k in arch}
    else:
        resident = {  # weights on the GPU while component k runs
            "none": lambda k: sum(w.values()),
            # the negative prompt is encoded after the positive one: CLIP is on the GPU again while T5
            # still is (accelerate offloads a component only when the *next* one in the chain starts)
            "model": lambda k: w[k] + (w["t5"] if cfg == 2 and k in ("clip_l", "clip_g") and "t5" in w else 0),
            # outside the blocks: embeddings, pos-embed table, norms — FP8 leaves them bf16 (2 bytes) — plus,
            # for the transformer, a second, transient copy of the pos-embed table: measured on the H100 the
            # tiled group-offload step exceeds the rest of this model by 0.18 GiB (Large) / 0.46 GiB (Medium),
            # one bf16 table each (0.17 / 0.42 GiB). Invisible untiled: the VAE decode is the larger stage there.
            "group": lambda k: (2 * (arch[k].elements - arch[k].block_elements)
                                + _bytes_per_element(w, arch, k) * arch[k].max_block
                                + (2 * _pos_embed_elements(preset) if k == "transformer" else 0)),
        }[s.offload]
        stages = {k: int(resident(k) + act[k]) for k in arch}
    peak = max(stages.values())
    stage_peaks = {"weights": int(sum(w.values())), **stages}  # all weights, wherever they rest
    offloaded = 0 if s.offload == "none" else sum(w.values())
    speed, seconds = _speed(preset, s, cal)
    return Prediction(preset, s.name, s.description, height, width, batch, peak, stage_peaks,
                      int(cal.host_baseline + offloaded), int(peak * (1 + margin) + cal.cuda_context), speed,
                      seconds, s.lossless, s.quality)


def _pos_embed_elements(preset: str) -> int:
    """Elements of SD3's sin-cos pos-embed table: (pos_embed_max_size)² × hidden size."""
    from ..presets import get_preset

    t = get_preset(preset).transformer
    return t["pos_embed_max_size"] ** 2 * t["num_attention_heads"] * t["attention_head_dim"]


def _bytes_per_element(w: dict[str, int], arch: dict[str, ComponentStats], k: str) -> float:
    return w[k] / arch[k].elements


def _speed(preset: str, s: Strategy, cal: Calibration) -> tuple[float, float | None]:
    from ..presets import get_preset

    arch = get_preset(preset).arch
    measured = cal.seconds_per_image.get(arch, {})
    base = measured.get("resident")
    own = measured.get(s.name)
    if own is None and s.vae_tiling and s.name.endswith("_tiled"):
        untiled = measured.get(s.name[: -len("_tiled")])
        own = untiled / 0.97 if untiled else None
    if base and own:
        # Large Turbo: the strategies rank as for Large (same weights); its s/image (28-step CFG calibration) is
        # not Turbo's, so none is shown — docs/benchmarks.md measures Turbo's transformer loop.
        return round(base / own, 3), (own if arch == preset else None)
    return s.speed, None


def candidates() -> list[Strategy]:
    """Every ladder rung, plus the same with VAE tiling (what large images need)."""
    seen: dict[str, Strategy] = {}
    for s in STRATEGIES:
        for v in (s, s.with_vae_tiling()):
            seen.setdefault(v.name, v)
    return list(seen.values())


def _check_inputs(preset: str, height: int, width: int, batch: int, margin: float) -> None:
    if preset not in PLAN_PRESETS:
        raise InvalidPlanInput("preset", preset, "is not a preset the planner knows",
                               fix=f"choose one of {', '.join(PLAN_PRESETS)}")
    from ..presets import get_preset

    p = get_preset(preset)
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or value < p.size_multiple:
            raise InvalidPlanInput(name, value, f"must be a whole number of pixels >= {p.size_multiple}")
        if value % p.size_multiple:
            low = value // p.size_multiple * p.size_multiple
            raise InvalidPlanInput(name, value, f"is not a multiple of {p.size_multiple}; nearest valid: "
                                   f"{low} or {low + p.size_multiple}")
        if value > p.max_side_px:
            raise InvalidPlanInput(name, value, f"is over SD3.5 {preset}'s single-pass limit of {p.max_side_px} px",
                                   fix="plan for a size at or below the limit; tiled generation (notebook 04) goes larger")
    if not isinstance(batch, int) or batch < 1:
        raise InvalidPlanInput("batch", batch, "must be a whole number >= 1")
    if not 0 <= margin < 1:
        raise InvalidPlanInput("margin", margin, "must be a fraction in [0, 1), e.g. 0.1 for 10%")


@dataclass
class Plan:
    """Every candidate strategy for one card, ranked by speed; which fit; the recommendation."""

    preset: str
    vram_gib: float
    ram_gib: float | None
    height: int
    width: int
    batch: int
    margin: float
    rows: list[Prediction]
    recommended: Prediction | None
    note: str
    calibration: str

    @property
    def fitting(self) -> list[Prediction]:
        return [r for r in self.rows if r.fits]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    def table_rows(self) -> list[dict[str, Any]]:
        return [{"strategy": r.strategy, "fits": "yes" if r.fits else "no",
                 "predicted peak GiB": f"{r.gpu_peak / GIB:.2f}", "card needed GiB": f"{r.card_needed / GIB:.1f}",
                 "relative speed": f"{r.relative_speed:.2f}",
                 "s/image": f"{r.seconds_per_image:.1f}" if r.seconds_per_image else "—",
                 "host RAM GiB": f"{r.host_ram / GIB:.1f}", "quality": r.quality} for r in self.rows]

    def to_text(self) -> str:
        ram = f", host RAM {self.ram_gib:g} GiB" if self.ram_gib else ""
        head = (f"SD3.5 {self.preset}, {self.width}x{self.height}, batch {self.batch}, card {self.vram_gib:g} GiB "
                f"(margin {self.margin:.0%} + CUDA context){ram}")
        cols = ["strategy", "fits", "predicted peak GiB", "card needed GiB", "relative speed", "s/image",
                "host RAM GiB", "quality"]
        rows = self.table_rows()
        widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
        lines = [head, "  ".join(c.ljust(widths[c]) for c in cols)]
        lines += ["  ".join(r[c].ljust(widths[c]) for c in cols) for r in rows]
        return "\n".join(lines + ["", self.note, f"calibration: {self.calibration}"])


def plan(vram_gib: float, preset: str = "large", height: int = 1024, width: int = 1024, batch: int = 1, *,
         ram_gib: float | None = None, margin: float = DEFAULT_MARGIN,
         calibration: Calibration | None = None) -> Plan:
    """Rank the strategies for a card of ``vram_gib`` GiB; recommend the fastest that fits without quality loss.

    ``ram_gib`` (host RAM) also rules out offloading that would not fit in the computer's memory. When
    nothing fits, :attr:`Plan.note` says what is impossible and the nearest thing that works (the smallest
    card for this preset, or Medium on this card).
    """
    for name, value in (("vram", vram_gib), ("ram", ram_gib)):
        if value is None and name == "ram":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise InvalidPlanInput(name, value, "must be a positive number of GiB",
                                   fix=f"pass your {'card' if name == 'vram' else 'computer'}'s memory, e.g. "
                                       f"--{name} {12 if name == 'vram' else 32} "
                                       f"({'nvidia-smi' if name == 'vram' else 'free -g'} shows it)")
    cal = calibration or CALIBRATION
    budget = vram_gib * GIB
    rows = []
    for s in candidates():
        p = predict(preset, s, height, width, batch, margin=margin, calibration=cal)
        fits = p.card_needed <= budget and (ram_gib is None or p.host_ram <= ram_gib * GIB)
        rows.append(Prediction(**{**asdict(p), "fits": fits}))
    rows.sort(key=lambda r: (-r.relative_speed, r.gpu_peak))
    fitting = [r for r in rows if r.fits]
    lossless = [r for r in fitting if r.lossless]
    recommended = (lossless or fitting or [None])[0]
    if recommended is None:
        leanest = min(rows, key=lambda r: r.card_needed)
        ram = f" and {ram_gib:g} GiB of host RAM" if ram_gib else ""
        note = (f"IMPOSSIBLE: SD3.5 {preset} at {width}x{height} does not fit a {vram_gib:g} GiB card{ram} with "
                f"any strategy. Nearest that works: a card of at least {leanest.card_needed / GIB:.1f} GiB "
                f"({leanest.strategy}, predicted peak {leanest.gpu_peak / GIB:.2f} GiB, host RAM "
                f"{leanest.host_ram / GIB:.1f} GiB)")
        if preset == "large":
            medium = plan(vram_gib, "medium", height, width, batch, ram_gib=ram_gib, margin=margin, calibration=cal)
            if medium.recommended is not None:
                note += f", or --preset medium, which fits this card with {medium.recommended.strategy}"
        note += "."
    else:
        note = (f"RECOMMENDED: {recommended.strategy} — {recommended.description}; predicted peak "
                f"{recommended.gpu_peak / GIB:.2f} GiB, relative speed {recommended.relative_speed:.2f}.")
        if fitting[0] is not recommended:
            note += (f" Faster but changes images: {fitting[0].strategy} ({fitting[0].quality}).")
        if not recommended.lossless:
            note += f" Only strategies that change images fit: {recommended.quality}."
        faster = [r for r in rows if not r.fits and r.relative_speed > recommended.relative_speed]
        if faster:  # say plainly what this card rules out, and what the next tier needs
            nearest = min(faster, key=lambda r: r.card_needed)
            note += (f"\nNOT POSSIBLE on {vram_gib:g} GiB: {len(faster)} faster strategies "
                     f"({', '.join(r.strategy for r in faster)}). The nearest faster one, {nearest.strategy} "
                     f"(relative speed {nearest.relative_speed:.2f}"
                     + (f", ~{nearest.seconds_per_image:.0f} s/image" if nearest.seconds_per_image else "")
                     + f"), needs a card of {nearest.card_needed / GIB:.1f} GiB.")
    return Plan(preset, vram_gib, ram_gib, height, width, batch, margin, rows, recommended, note,
                f"{cal.device}, {cal.date}")

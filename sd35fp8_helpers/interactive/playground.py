"""An interactive prompt playground (ipywidgets): type, press Generate, watch the steps, keep a history.

Why a package module and not notebook cells: widget plumbing is long, stateful and easy to get subtly
wrong (a button left disabled after an exception, a progress bar that never moves), so it lives here, is
tested by driving the real widget objects (``button.click()``) and in a real browser, and notebook 05
shows it in two lines::

    from sd35fp8_helpers.interactive.playground import Playground
    Playground(load_pipeline("tiny"))          # the last expression of a cell renders the widget

Design rules:

* **Every image is reproducible.** Each result is saved as a PNG whose metadata carries the settings,
  the model, the precision and the memory strategy; "load settings from PNG" (or a click on a history
  thumbnail) puts them back into the controls; Generate then renders the same pixels, and so does
  ``sd35fp8 generate --from-png FILE`` (which re-applies the precision and memory strategy).
* **The user's pipeline is never changed.** FP8 precisions and CPU offload run on *other* pipelines,
  loaded lazily from the same weights and cached (one per precision and offload choice); VAE tiling is
  switched on only for the duration of one generation.
* **Bad input never breaks the session.** An empty prompt, a size over the model's limit or an
  exception inside the pipeline becomes a message in the widget; the Generate button comes back, the
  history stays, the kernel lives.
* Generation runs synchronously in the click handler: simple and testable. The progress bar still moves,
  because ipywidgets sends every value change to the browser at once, even while the handler runs.
"""

from __future__ import annotations

import io
import math
import random
import time
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

from ..display import human_bytes, images_dir
from ..errors import Sd35fp8Error
from ..memory.strategies import DEFAULT_STRATEGY, LEGACY_NAMES, offered_strategies, strategy_names
from ..pipeline.cache import PipelineCache
from ..pipeline.generation import (
    GenerationResult,
    GenerationSettings,
    StepCallback,
    compute_dtype,
    generate,
    native_size,
    pipeline_limits,
    read_png_metadata,
)
from ..precision.quality import psnr
from ..vocabulary import PRECISIONS, precision_label  # precision keys (stored in PNG metadata) and their labels

SIZE_SHAPES: dict[str, tuple[int, int]] = {"square": (1, 1), "landscape 4:3": (4, 3), "portrait 3:4": (3, 4),
                                           "wide 16:9": (16, 9)}
SIZE_SCALES: tuple[float, ...] = (0.5, 1.0, 2.0)
"""Size presets: each shape at these multiples of the model's native side (same pixel count as a square)."""

HISTORY_LIMIT = 24
THUMBNAIL_PX = 96
DISPLAY_MIN_PX = 256
"""Images smaller than this are shown scaled up (the tiny model renders 128 px)."""

CUSTOM_SIZE = "custom"
_CSS = "sd35fp8-"  # prefix of the CSS classes the browser test finds the widgets by


# --- what this machine offers ---------------------------------------------------------------------

def available_precisions(device: str) -> list[str]:
    """bf16 and FP8 storage everywhere; FP8 compute where float8 matmuls run (CUDA capability >= 8.9)."""
    from ..precision.compute import fp8_compute_support

    compute = device == "cuda" and fp8_compute_support(device)[0]
    return ["bf16", "fp8-storage"] + (["fp8-compute"] if compute else [])


def size_presets(multiple: int, max_side: int, native: int) -> dict[str, tuple[int, int]]:
    """``"256×192 (landscape 4:3)" -> (width, height)``: multiples of ``multiple`` within ``max_side``.

    Example (the tiny model: multiple 16, limit 256, native 128):
        >>> list(size_presets(16, 256, 128))[-3:]
        ['128×128 (square)', '176×96 (wide 16:9)', '256×256 (square)']
    """
    found: dict[tuple[int, int], str] = {}
    for scale in SIZE_SCALES:
        for name, (a, b) in SIZE_SHAPES.items():
            side = native * scale
            w, h = (max(multiple, round(side * math.sqrt(r) / multiple) * multiple) for r in (a / b, b / a))
            if w <= max_side and h <= max_side:
                found.setdefault((w, h), name)
    return {f"{w}×{h} ({name})": (w, h) for (w, h), name in sorted(found.items(), key=lambda kv: kv[0][0] * kv[0][1])}


# --- measurements ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class PeakMemory:
    """Peak memory of one generation and what was measured (GPU allocations or the process's RSS)."""

    bytes: int
    kind: str

    def __str__(self) -> str:
        return f"{human_bytes(self.bytes)} ({self.kind})"


def _peak(report) -> PeakMemory:
    """The peak that matters from a ``memory.measure`` report: GPU allocations on CUDA, else the process RSS."""
    if report.gpu_peak_allocated is not None:
        return PeakMemory(report.gpu_peak_allocated, "CUDA max_memory_allocated")
    return PeakMemory(report.host_peak_rss, "process peak RSS")


def difference_heatmap(a, b, cmap: str = "inferno"):
    """``(heat-map image, largest difference)``: per-pixel |a − b| averaged over RGB, scaled to its maximum."""
    import numpy as np
    from matplotlib import colormaps
    from PIL import Image

    diff = np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).mean(axis=-1)
    largest = float(diff.max())
    rgba = colormaps[cmap](diff / largest if largest > 0 else diff)
    return Image.fromarray((rgba[..., :3] * 255).astype(np.uint8)), largest


def side_by_side(images, gap: int = 4):
    """One image holding ``images`` left to right (for a static view of compare mode, e.g. under papermill)."""
    from PIL import Image

    strip = Image.new("RGB", (sum(i.width for i in images) + gap * (len(images) - 1), max(i.height for i in images)),
                      "white")
    x = 0
    for image in images:
        strip.paste(image, (x, 0))
        x += image.width + gap
    return strip


def _png_bytes(image, max_side: int | None = None) -> bytes:
    if max_side is not None:
        image = image.copy()
        image.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# --- the playground -------------------------------------------------------------------------------

@dataclass
class PlaygroundEntry:
    """One image in the history: the result, where its PNG is, and how much memory it took."""

    result: GenerationResult
    path: Path
    peak: PeakMemory

    @property
    def precision(self) -> str:
        return self.result.precision

    @property
    def memory(self) -> str:
        return self.result.extra["memory"]

    def describe(self) -> str:
        s = self.result.settings
        lora = f" · LoRA {s.lora} ×{s.lora_scale:g}" if s.lora else ""
        return (f"seed {s.seed} · {s.steps} steps · guidance {s.guidance_scale:g}{lora} · {s.width}×{s.height} · "
                f"{precision_label(self.precision, self.result.extra['compute_dtype'])} · memory: "
                f"{self.memory} · {self.result.seconds:.2f} s · peak {self.peak} · "
                f"{self.path.name}")


class Playground:
    """The widget: controls, Generate, progress, the image and its settings, history, compare mode.

    ``pipe`` is used as loaded for ``bf16`` and never modified; other precisions load their own copy.
    ``on_step(step, total)`` is called after every denoising step (after the progress bar moved);
    raising in it aborts that generation, and the error shows in the widget like any other.

    Example:
        >>> from sd35fp8_helpers import load_pipeline, settings_from_png
        >>> pg = Playground(load_pipeline("tiny", device="cpu"))
        >>> pg.prompt.value = "a lighthouse at dusk"
        >>> pg.generate_button.click()
        >>> pg.progress.value, len(pg.history)                    # 4 steps done, one image kept
        (4, 1)
        >>> settings_from_png(pg.history[-1].path).prompt         # saved with its settings
        'a lighthouse at dusk'
    """

    def __init__(self, pipe, *, output_dir: str | Path | None = None, on_step: StepCallback | None = None) -> None:
        import ipywidgets as w

        self.pipe = pipe
        self.device = pipe.device.type
        self.out = images_dir(output_dir) / "playground"
        self.history: list[PlaygroundEntry] = []
        self._on_step = on_step
        self._pipes = PipelineCache(device=self.device, dtype=pipe.transformer.dtype, first=pipe)
        self.last_psnr: float | None = None  # compare mode's latest PSNR (dB) and BF16 | FP8 | heat-map image
        self.last_comparison = None
        self.multiple, self.max_side = pipeline_limits(pipe)
        native = native_size(pipe)
        self.sizes = size_presets(self.multiple, self.max_side, native)

        from ..pipeline.defaults import model_defaults

        defaults = model_defaults(pipe)  # the model's own recipe (the scene model: 16 steps, guidance 4)
        self.prompt = w.Textarea(placeholder="describe the image you want", description="prompt",
                                 layout=w.Layout(width="100%", height="4em"))
        self.negative_prompt = w.Text(placeholder="what to avoid (optional)", description="negative",
                                      layout=w.Layout(width="100%"))
        self.seed = w.IntText(value=0, description="seed", layout=w.Layout(width="14em"))
        self.random_seed_button = w.Button(description="random", icon="dice", tooltip="pick a random seed",
                                           layout=w.Layout(width="7em"))
        self.steps = w.IntSlider(value=defaults.steps, min=1, max=60, description="steps")
        self.guidance = w.FloatSlider(value=defaults.guidance_scale, min=0.0, max=15.0, step=0.5,
                                      description="guidance")
        self.size = w.Dropdown(options=[*self.sizes.items(), (CUSTOM_SIZE, CUSTOM_SIZE)], value=(native, native),
                               description="size")
        self.width = w.IntText(value=native, description="width", layout=w.Layout(width="12em"))
        self.height = w.IntText(value=native, description="height", layout=w.Layout(width="12em"))
        labels = {k: precision_label(k, compute_dtype(pipe)) for k in PRECISIONS}
        self.precision = w.Dropdown(options=[(labels[k], k) for k in available_precisions(self.device)],
                                    value="bf16", description="precision")
        self.memory = w.Dropdown(options=[(n, n) for n in offered_strategies(self.device)], value=DEFAULT_STRATEGY,
                                 description="memory")  # the ladder's own names (sd35fp8 plan ranks them)
        from ..lora.shipped import named_loras

        # LoRAs by name (shipped, $SD35FP8_HOME/loras); on a side path per image (generate → use_lora_)
        self.lora = w.Dropdown(options=[("none", ""), *((n, n) for n in named_loras())], value="",
                               description="LoRA")
        self.lora_scale = w.FloatSlider(value=1.0, min=0.0, max=2.0, step=0.1, description="LoRA scale")
        self.compare = w.Checkbox(value=False, description="compare BF16 with FP8 (same seed)", indent=False)
        self.generate_button = w.Button(description="Generate", button_style="primary", icon="paint-brush")
        self.upload = w.FileUpload(accept=".png", multiple=False, description="load settings from PNG",
                                   layout=w.Layout(width="16em"))
        self.progress = w.IntProgress(value=0, min=0, max=self.steps.value, description="steps")
        self.progress_text = w.Label(value="")
        self.message = w.HTML(value="")
        self.status = ""  # the message line as plain text ("" when all is well)
        self.image = w.Image(format="png")
        self.info = w.HTML(value="")
        self.compare_images = [w.Image(format="png") for _ in range(3)]
        self.compare_captions = [w.HTML(value="") for _ in range(3)]
        self.compare_box = w.HBox([w.VBox([img, cap]) for img, cap in zip(self.compare_images, self.compare_captions)])
        self.gallery = w.HBox(layout=w.Layout(flex_flow="row wrap"))
        for widget, name in [(self.prompt, "prompt"), (self.seed, "seed"), (self.size, "size"),
                             (self.generate_button, "generate"), (self.progress, "progress"),
                             (self.progress_text, "progress-text"), (self.message, "message"),
                             (self.image, "image"), (self.info, "info"), (self.compare_box, "compare"),
                             (self.gallery, "gallery")]:
            widget.add_class(_CSS + name)
        self._show_compare(False)

        self.random_seed_button.on_click(lambda _b: setattr(self.seed, "value", random.randrange(2 ** 32)))
        self.size.observe(self._size_chosen, names="value")
        self.width.observe(self._size_typed, names="value")
        self.height.observe(self._size_typed, names="value")
        self.upload.observe(self._uploaded, names="value")
        self.generate_button.on_click(lambda _b: self.run())

        controls = w.VBox([
            self.prompt, self.negative_prompt,
            w.HBox([self.seed, self.random_seed_button, self.steps, self.guidance]),
            w.HBox([self.size, self.width, self.height]),
            w.HBox([self.precision, self.memory, self.compare]),
            w.HBox([self.lora, self.lora_scale]),
            w.HBox([self.generate_button, self.progress, self.progress_text, self.upload]),
            self.message,
        ])
        self.widget = w.VBox([controls, self.image, self.compare_box, self.info,
                              w.HTML("<b>History</b> — click a thumbnail's button to restore its settings"),
                              self.gallery])
        self.widget.add_class(_CSS + "playground")

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    # --- reading and writing the controls ---------------------------------------------------------

    def current_settings(self) -> GenerationSettings:
        return GenerationSettings(prompt=self.prompt.value, negative_prompt=self.negative_prompt.value,
                                  seed=self.seed.value, steps=self.steps.value, guidance_scale=self.guidance.value,
                                  height=self.height.value, width=self.width.value, lora=self.lora.value,
                                  lora_scale=self.lora_scale.value)

    def apply_metadata(self, meta: dict[str, Any]) -> None:
        """Put the settings of a saved image (PNG metadata, see ``GenerationResult.metadata``) into the controls."""
        s = GenerationSettings(**meta["settings"])
        self.prompt.value, self.negative_prompt.value, self.seed.value = s.prompt, s.negative_prompt, s.seed
        self.steps.max, self.guidance.max = max(self.steps.max, s.steps), max(self.guidance.max, s.guidance_scale)
        self.steps.value, self.guidance.value = s.steps, s.guidance_scale  # sliders clamp: widen them first
        self.width.value, self.height.value = s.width, s.height
        self.lora_scale.max = max(self.lora_scale.max, s.lora_scale)
        self.lora_scale.value = s.lora_scale
        notes = []
        if s.lora in dict(self.lora.options).values():
            self.lora.value = s.lora
        else:
            notes.append(f"LoRA {s.lora!r} is not available here; kept {self.lora.value or 'none'!r}")
        for control, key, names in [(self.precision, meta.get("precision", "bf16"), PRECISIONS),
                                    (self.memory, LEGACY_NAMES.get(meta.get("memory"), meta.get("memory", DEFAULT_STRATEGY)),
                                     {n: n for n in strategy_names()})]:
            if key in dict(control.options).values():
                control.value = key
            else:
                notes.append(f"{control.description} {names.get(key, key)!r} is not available on this machine; "
                             f"kept {dict((v, k) for k, v in control.options)[control.value]!r}")
        self._say("; ".join(notes), error=bool(notes))

    def load_png(self, png: str | Path | bytes, name: str | None = None) -> None:
        """Restore the controls from a PNG saved by sd35fp8 (a path, or the file's bytes from an upload)."""
        name = name or (Path(png).name if not isinstance(png, bytes) else "upload")
        try:
            meta = read_png_metadata(io.BytesIO(png) if isinstance(png, bytes) else png)
            self.apply_metadata(meta)
        except OSError as exc:  # missing file, or not an image (PIL's UnidentifiedImageError)
            self._say(f"{name}: {exc.strerror or 'not an image file'}; choose a PNG saved by sd35fp8", error=True)
        except (ValueError, KeyError, TypeError):
            self._say(f"{name} carries no sd35fp8 settings: only PNGs saved by sd35fp8 (this playground, "
                      "`sd35fp8 generate`, the notebooks) can be restored", error=True)
        else:
            if not self.message.value:
                self._say(f"settings restored from {name}")

    def restore(self, index: int) -> None:
        """Put the settings of ``history[index]`` back into the controls."""
        self.apply_metadata(self.history[index].result.metadata())
        if not self.message.value:
            self._say(f"settings restored from {self.history[index].path.name}")

    def _size_chosen(self, change) -> None:
        if change["new"] != CUSTOM_SIZE:
            self.width.value, self.height.value = change["new"]

    def _size_typed(self, _change) -> None:
        wh = (self.width.value, self.height.value)
        self.size.value = wh if wh in self.sizes.values() else CUSTOM_SIZE

    def _uploaded(self, change) -> None:
        if change["new"]:
            upload = change["new"][0]
            self.load_png(bytes(upload["content"]), upload["name"])

    def _say(self, text: str, *, error: bool = False) -> None:
        self.status = text
        colour = "#b00020" if error else "#1b5e20"
        self.message.value = (f"<span class='{_CSS}{'error' if error else 'note'}' style='color:{colour}'>"
                              f"{'⚠ ' if error else ''}{escape(text)}</span>") if text else ""

    def _show_compare(self, on: bool) -> None:
        self.compare_box.layout.display = "flex" if on else "none"
        self.image.layout.display = "none" if on else "block"

    # --- generating -------------------------------------------------------------------------------

    def run(self) -> list[PlaygroundEntry]:
        """What Generate does: one image (or a BF16/FP8 pair in compare mode); errors become a message."""
        self.generate_button.disabled = True
        self._say("")
        try:
            settings = self.current_settings()
            if self.compare.value:
                other = self.precision.value if self.precision.value != "bf16" else "fp8-storage"
                entries = [self._generate(settings, p, offset=i * settings.steps, total=2 * settings.steps)
                           for i, p in enumerate(("bf16", other))]
                self._show_pair(*entries)
            else:
                entries = [self._generate(settings, self.precision.value)]
                self._show_one(entries[0])
            return entries
        except Sd35fp8Error as exc:
            self._say(exc.one_line, error=True)
        except Exception as exc:  # anything the pipeline raised: report it, keep the session usable
            self._say(f"generation failed: {type(exc).__name__}: {exc}. The playground is still usable: "
                      f"change a setting and press Generate again", error=True)
        finally:
            self.generate_button.disabled = False
        return []

    def _generate(self, settings: GenerationSettings, precision: str, *, offset: int = 0,
                  total: int | None = None) -> PlaygroundEntry:
        memory = self.memory.value
        pipe = self._pipes.get(precision, memory)
        total = total or settings.steps
        self.progress.max, self.progress.value, self.progress.bar_style = total, offset, ""
        self.progress_text.value = f"{PRECISIONS[precision]}: step {offset}/{total}"

        def on_step(step: int, steps: int) -> None:
            self.progress.value = offset + step
            self.progress_text.value = f"{PRECISIONS[precision]}: step {offset + step}/{total}"
            if self._on_step is not None:
                self._on_step(step, steps)

        from ..memory.strategies import measure

        with measure(self.device) as report:
            result = generate(pipe, settings, on_step=on_step, progress=False, precision=precision)
        peak = _peak(report)
        self.progress.bar_style = "success" if self.progress.value == self.progress.max else ""
        result.extra.update(memory=memory, peak_memory={"bytes": peak.bytes, "kind": peak.kind})
        path = result.save(self.out / f"{time.strftime('%Y%m%d-%H%M%S')}_{len(self.history) + 1:03d}_"
                                      f"seed{settings.seed}_{precision}.png")
        entry = PlaygroundEntry(result, path, peak)
        self.history.append(entry)
        self._add_thumbnail(len(self.history) - 1)
        return entry

    # --- showing results --------------------------------------------------------------------------

    def _display_width(self, image) -> str:
        return str(max(image.width, DISPLAY_MIN_PX))

    def _show_one(self, entry: PlaygroundEntry) -> None:
        image = entry.result.image
        self._show_compare(False)
        self.image.value, self.image.width = _png_bytes(image), self._display_width(image)
        self.info.value = f"<span class='{_CSS}meta'>{escape(entry.describe())}</span>"

    def _show_pair(self, bf16: PlaygroundEntry, fp8: PlaygroundEntry) -> None:
        a, b = bf16.result.image, fp8.result.image
        heat, largest = difference_heatmap(a, b)
        db = psnr(a, b, peak=255.0)
        self.last_psnr, self.last_comparison = db, side_by_side([a, b, heat])
        for img, cap, pic, text in zip(self.compare_images, self.compare_captions, (a, b, heat), (
                PRECISIONS["bf16"], PRECISIONS[fp8.precision], f"|difference|, scaled to its max ({largest:.0f}/255)")):
            img.value, img.width = _png_bytes(pic), self._display_width(pic)
            cap.value = f"<center>{escape(text)}</center>"
        self._show_compare(True)
        verdict = "identical" if math.isinf(db) else "higher is closer"
        self.info.value = (f"<span class='{_CSS}meta'>PSNR {db:.1f} dB ({verdict})<br>{escape(bf16.describe())}"
                           f"<br>{escape(fp8.describe())}</span>")

    def _add_thumbnail(self, index: int) -> None:
        import ipywidgets as w

        entry = self.history[index]
        button = w.Button(description=f"#{index + 1} seed {entry.result.settings.seed}",
                          tooltip=f"restore: {entry.result.settings.prompt[:80]}",
                          layout=w.Layout(width=f"{THUMBNAIL_PX + 24}px"))
        button.on_click(lambda _b: self.restore(index))
        thumb = w.Image(value=_png_bytes(entry.result.image, THUMBNAIL_PX), format="png")
        self.gallery.children = (w.VBox([thumb, button]), *self.gallery.children)[:HISTORY_LIMIT]

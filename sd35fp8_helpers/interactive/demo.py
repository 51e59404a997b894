"""``sd35fp8 demo``: a Gradio page for one person — prompt, seed, steps, size, precision → image.

It renders through :class:`~sd35fp8_helpers.serving.engine.ImageEngine`, the same object the images API's worker
uses, so the demo and the API cannot drift apart (same checks, same pipeline loading, same precision
conversion). Gradio's queue runs one generation at a time, like the API's single worker; for a team, with
keys, limits and metrics, use ``sd35fp8 serve``.

Example:
    >>> from sd35fp8_helpers.serving.engine import ImageEngine
    >>> engine = ImageEngine("tiny", device="cpu")
    >>> image, info = demo_generate(engine, "a red fox", 0, 2, "64×64 (square)")
    >>> image.size
    (64, 64)
"""

from __future__ import annotations

from ..errors import Sd35fp8Error
from ..pipeline.generation import GenerationSettings
from ..vocabulary import precision_label
from .playground import available_precisions, size_presets

DEFAULT_DEMO_PORT = 7860


def demo_sizes(engine) -> dict[str, tuple[int, int]]:
    """Size choices for the served model: playground's presets plus small squares (fast on CPU)."""
    multiple, max_side = engine.limits()
    native, _ = engine.defaults()
    sizes = {f"{s}×{s} (square)": (s, s) for s in (64, native // 2) if multiple <= s <= max_side}
    return {**sizes, **size_presets(multiple, max_side, native)}


def demo_generate(engine, prompt: str, seed: int, steps: int, size: str, precision: str | None = None):
    """One image and a line describing it. Bad input raises ``gradio.Error`` (shown in the page) when
    Gradio is running, else the :class:`~sd35fp8_helpers.errors.Sd35fp8Error` itself."""
    sizes = demo_sizes(engine)
    if size not in sizes:
        raise Sd35fp8Error(f"size {size!r} is not offered", fix=f"choose one of: {', '.join(sizes)}")
    width, height = sizes[size]
    settings = GenerationSettings(prompt, seed=int(seed), steps=int(steps), height=height, width=width)
    result = engine.render([settings], precision=precision)[0]
    return result.image, (f"{width}×{height}, {settings.steps} steps, seed {settings.seed}, "
                          f"{precision_label(result.precision, result.extra.get('compute_dtype'))} on {result.device}, "
                          f"{result.seconds:.2f} s")


def build_demo(engine):
    """The Gradio Blocks page (not launched). Errors become ``gr.Error`` messages; the page stays usable."""
    import gradio as gr

    sizes = list(demo_sizes(engine))
    native, steps = engine.defaults()
    precisions = available_precisions(str(engine.device).split(":")[0])

    def on_generate(prompt, seed, n_steps, size, precision):
        try:
            return demo_generate(engine, prompt, seed, n_steps, size, precision)
        except Sd35fp8Error as exc:
            raise gr.Error(exc.one_line) from exc

    with gr.Blocks(title="sd35fp8 demo", analytics_enabled=False) as page:
        gr.Markdown(f"## SD3.5 in FP8 — `{engine.model}` on {engine.device}")
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="prompt", value="a watercolor painting of a red fox", lines=2)
                seed = gr.Number(label="seed", value=0, precision=0, minimum=0)
                n_steps = gr.Slider(1, 50, value=steps, step=1, label="steps")
                size = gr.Dropdown(sizes, value=next((s for s in sizes if s.startswith(f"{native}×{native}")),
                                                     sizes[0]), label="size")
                dtype = "float32" if str(engine.device).startswith("cpu") else "bfloat16"
                precision = gr.Dropdown([(precision_label(p, dtype), p) for p in precisions], value=engine.precision,
                                        label="precision")
                button = gr.Button("Generate", variant="primary")
            with gr.Column():
                image = gr.Image(label="image", type="pil")
                info = gr.Markdown()
        button.click(on_generate, [prompt, seed, n_steps, size, precision], [image, info])
    page.sd35fp8_generate = on_generate  # what the button calls, for tests and scripts
    return page

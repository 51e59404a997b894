"""The shared generation function: one resident pipeline per precision, used by the API worker and the Gradio demo.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from ..constants import DEFAULT_MODEL
from ..errors import Sd35fp8Error
from ..pipeline.cache import PipelineCache
from ..pipeline.generation import (
    GenerationResult,
    GenerationSettings,
    generate,
    pipeline_limits,
)
from ..vocabulary import PRECISIONS

# --- the shared generation function (API worker and Gradio demo) -----------------------------------------

class JobCancelled(Exception):
    """Raised from the step callback when the client has gone or the deadline passed (control flow only)."""


class ImageEngine:
    """The resident pipeline(s) and the one function that turns settings into images.

    The API worker and the Gradio demo both call :meth:`render`; a lock makes sure only one generation
    uses a pipeline at a time, whoever asks. Pipelines are loaded on first use and kept, one per precision
    (the API uses only its start-up precision; the demo may ask for another).

    Example:
        >>> engine = ImageEngine("tiny", device="cpu")
        >>> engine.render([GenerationSettings("a cat", steps=2, height=64, width=64)])[0].image.size
        (64, 64)
    """

    def __init__(self, model: str = DEFAULT_MODEL, *, precision: str = "bf16", device: str | None = None,
                 memory_strategy: str | None = None, pipe=None) -> None:
        check_precision(precision)
        self.model = model
        self.precision = precision
        self.memory_strategy = memory_strategy
        self._cache = PipelineCache(model, device=device, first=pipe,
                                    first_key=(precision, memory_strategy or "resident"))
        self._lock = threading.RLock()  # one generation at a time, whoever asks

    @property
    def device(self) -> str | None:
        return self._cache.device

    def pipeline(self, precision: str | None = None):
        """The pipeline for ``precision`` (default: the engine's), loaded and converted on first use."""
        precision = precision or self.precision
        check_precision(precision)
        return self._cache.get(precision, self.memory_strategy)

    def limits(self, precision: str | None = None) -> tuple[int, int]:
        """(size multiple, largest side) of one pass, from the pipeline itself."""
        return pipeline_limits(self.pipeline(precision))

    def defaults(self, precision: str | None = None) -> tuple[int, int]:
        """(native side in px, default steps) of the served model: what a request without size/steps gets."""
        from ..pipeline.defaults import model_defaults

        d = model_defaults(self.pipeline(precision))
        return d.height, d.steps

    def render(self, settings: Sequence[GenerationSettings], *, precision: str | None = None,
               should_stop: Callable[[], bool] = lambda: False,
               on_progress: Callable[[int, int, int], bool] | None = None) -> list[GenerationResult]:
        """Generate one image per settings, in order; ``should_stop()`` is asked before each step.

        When it says True, :class:`JobCancelled` is raised from the pipeline's step callback, which ends
        the denoising loop at once (``pipe._interrupt`` would still run the VAE decode for nobody).
        ``on_progress(image, step, steps)`` is told every step (the queue worker publishes it); returning True
        from it stops the job the same way (one Redis round trip answers both).
        """
        index = [0]

        def on_step(step: int, total: int) -> None:
            stop = on_progress(index[0], step, total) if on_progress is not None else False
            if stop or should_stop():
                raise JobCancelled()

        precision = precision or self.precision
        with self._lock:
            pipe = self.pipeline(precision)
            results = []
            for i, s in enumerate(settings):
                index[0] = i
                on_step(0, s.steps)  # a job cancelled between two images stops here
                results.append(generate(pipe, s, on_step=on_step, progress=False, precision=precision))
            return results  # PNG metadata names the precision key, as `sd35fp8 generate` does

    def default_guidance(self, precision: str | None = None) -> float:
        """The guidance scale a request without one gets: the model's own (the scenes model ships its recipe)."""
        from ..pipeline.defaults import model_defaults

        return model_defaults(self.pipeline(precision)).guidance_scale

    def served_model(self, precision: str | None = None):
        """What a request is checked against (:class:`~sd35fp8_helpers.serving.jobstore.ServedModel`)."""
        from .jobstore import ServedModel

        (native, steps), (multiple, max_side) = self.defaults(precision), self.limits(precision)
        return ServedModel(self.model, native, steps, multiple, max_side, precision or self.precision,
                           self.default_guidance(precision))


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise Sd35fp8Error(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}",
                           fix="use --precision bf16 (as loaded), fp8-storage or fp8-compute")



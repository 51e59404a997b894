"""One loaded pipeline per (precision, memory strategy), loaded on first use and kept — shared by the images API
engine and the playground, so both answer "which copy renders this?" the same way.

Why copies: FP8 conversion, a dropped T5 and offload hooks change a pipeline for good, so comparing BF16 with
FP8 (the playground) or serving another precision (the Gradio demo) needs a pipeline of its own for each.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from ..errors import UnsupportedEnvironment


class PipelineCache:
    """``cache.get(precision, strategy)`` → a pipeline in exactly that state (thread-safe; loads at most once).

    ``first`` is an already loaded pipeline, stored under ``first_key``; ``model`` is what to load the others
    from (a model spec or folder; ``None``: taken from ``first``'s ``sd35fp8_source``).

    Example:
        >>> cache = PipelineCache("tiny", device="cpu")
        >>> cache.get("fp8-storage").sd35fp8_fp8.mode
        'storage'
    """

    def __init__(self, model: str | Path | None = None, *, device: str | None = None, dtype: Any = None,
                 first: Any = None, first_key: tuple[str, str] = ("bf16", "resident")) -> None:
        if model is None and first is not None and getattr(first, "sd35fp8_source", None) is not None:
            model = str(first.sd35fp8_source.path)
        self.model = model
        self.device = device or (str(first.device) if first is not None else None)
        self.dtype = dtype
        self._pipes: dict[tuple[str, str], Any] = {} if first is None else {first_key: first}
        self._lock = threading.RLock()

    def keys(self) -> list[tuple[str, str]]:
        return list(self._pipes)

    def get(self, precision: str = "bf16", strategy: str | None = None):
        from ..memory.strategies import DEFAULT_STRATEGY, LEGACY_NAMES
        from ..vocabulary import parse_precision

        key = (parse_precision(precision), LEGACY_NAMES.get(strategy or DEFAULT_STRATEGY, strategy or DEFAULT_STRATEGY))
        pipe = self._pipes.get(key)  # no lock once loaded: a request check never waits for a generation
        if pipe is not None:
            return pipe
        with self._lock:
            if key not in self._pipes:
                self._pipes[key] = self._load(*key)
            return self._pipes[key]

    def _load(self, precision: str, strategy_name: str):
        from ..memory.strategies import parse_strategy
        from ..precision.quantize import apply_precision_
        from ..vocabulary import precision_label
        from .loading import default_device, load_pipeline

        if self.model is None:
            label = precision_label(precision) + ("" if strategy_name == "resident" else f" with {strategy_name}")
            raise UnsupportedEnvironment(
                f"{label} needs a second copy of the pipeline, and this one was not loaded by sd35fp8", fix="load it with sd35fp8_helpers.load_pipeline(model), which "
                                                 "remembers where its weights are")
        self.device = self.device or default_device()
        strategy = parse_strategy(strategy_name, self.device)
        # With offload, load (and quantise for storage) on the CPU: the whole model may not fit on the GPU.
        # FP8 compute is the exception: its float8 layers are built where they will run.
        on_gpu = strategy.offload == "none" or precision == "fp8-compute"
        kwargs = {"dtype": self.dtype} if self.dtype is not None else {}
        pipe = load_pipeline(self.model, device=self.device if on_gpu else "cpu", **kwargs)
        apply_precision_(pipe, precision)
        if strategy.name != "resident":
            strategy.apply(pipe, self.device)
        return pipe

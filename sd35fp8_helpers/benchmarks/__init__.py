"""Measurement scripts run on the GPU machine (``sd35fp8 bench``, memory and tiling ladders): each prints a
table and writes JSON to ``docs/benchmarks/``. Apart from the library: notebooks only *read* their results.
"""

from .._lazy import lazy_exports

_EXPORTS = {
    "run_bench": ".fp8",
    "load_results": ".fp8",
    "plot_results": ".fp8",
    "run_pipeline_bench": ".pipeline",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

"""Fitting a card: the memory-strategy ladder, its OOM fallback, and the planner that predicts each peak.
"""

from .._lazy import lazy_exports

_EXPORTS = {
    "Strategy": ".strategies",
    "STRATEGIES": ".strategies",
    "get_strategy": ".strategies",
    "generate_with_fallback": ".strategies",
    "generate_by_stage": ".strategies",
    "measure": ".strategies",
    "plan": ".plan",
    "predict": ".plan",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

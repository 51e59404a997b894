"""From a bare machine to a proven setup: ``setup``, the shareable ``report``, the notebook runner.
"""

from .._lazy import lazy_exports

_EXPORTS = {
    "run_setup": ".setup",
    "SetupConfig": ".setup",
    "build_report": ".report",
    "run_all": ".notebooks",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

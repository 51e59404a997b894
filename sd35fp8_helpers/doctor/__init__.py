"""What this machine can do for SD3.5 in FP8: Python, torch float8, CUDA capability, git-lfs, disk, token.
"""

from .._lazy import lazy_exports

_EXPORTS = {
    "run_doctor": ".checks",
    "DoctorReport": ".checks",
    "Check": ".checks",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

"""Getting weights and proving them whole: Git LFS, the hub (with a disk preflight), verification.
"""

from .._lazy import lazy_exports

_EXPORTS = {
    "download": ".hub",
    "verify_model": ".verify",
    "VerifyConfig": ".verify",
    "VerifyReport": ".verify",
    "require_loadable": ".verify",
    "clone": ".lfs",
    "pull": ".lfs",
    "read_pointer": ".lfs",
    "sha256_file": ".lfs",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

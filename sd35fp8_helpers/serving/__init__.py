"""From notebook to service: the OpenAI-style images API, its queue, keys, metrics and logs.
"""

from .._lazy import lazy_exports

_EXPORTS = {
    "ServeConfig": ".config",
    "ImageEngine": ".engine",
    "create_app": ".app",
    "run_server": ".app",
    "KeyStore": ".auth",
    "hash_api_key": ".auth",
    "new_api_key": ".auth",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

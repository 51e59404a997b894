"""Loading SD3.5 pipelines and making images: the model sources, the embedded tiny model, ``generate``.
"""

from .._lazy import lazy_exports

_EXPORTS = {
    "load_pipeline": ".loading",
    "resolve_model": ".loading",
    "ModelSource": ".loading",
    "default_device": ".loading",
    "generate": ".generation",
    "GenerationSettings": ".generation",
    "GenerationResult": ".generation",
    "check_settings": ".generation",
    "read_png_metadata": ".generation",
    "settings_from_png": ".generation",
    "build_tiny_pipeline": ".tiny",
    "save_tiny_model": ".tiny",
    "tiny_model_path": ".tiny",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

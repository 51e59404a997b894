"""For people trying prompts: the ipywidgets playground and the Gradio demo.
"""

from .._lazy import lazy_exports

_EXPORTS = {
    "Playground": ".playground",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

"""Training the embedded scene model (``sd35fp8 train-tiny``): the recipe in :mod:`.train_tiny`,
its tokenizers and frozen text encoders in :mod:`.text`, and its evaluation in :mod:`.evaluate`.

Names are imported on first use, so ``python -m sd35fp8_helpers.training.train_tiny`` runs its module once.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PhaseLog", "TrainConfig", "TrainResult", "load_scene_record", "train_tiny"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        import importlib

        module = importlib.import_module(".train_tiny", __name__)
        # importing the submodule binds the package attribute ``train_tiny`` to it: rebind to the function
        globals().update({n: getattr(module, n) for n in __all__})
        return globals()[name]
    raise AttributeError(name)

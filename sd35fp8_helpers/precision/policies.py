"""Which Linear layers become FP8: named policies (data) and the filter they turn into.

A policy is torchao's ``filter_fn(module, fqn) -> bool``; :data:`POLICIES` names the three this project
measures (``all-linear``, ``hybrid``, ``diffusers-default``) so every interface offers the same choice.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import Sd35fp8Error

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


FilterFn = Callable[["nn.Module", str], bool]


# --- policies: which Linear layers of the SD3 transformer become FP8 ------------------------------------

ALL_LINEAR_KEEP_BF16: tuple[str, ...] = (r"^pos_embed\.", r"^time_text_embed\.", r"^proj_out$")
"""``all-linear`` keeps these Linears in bf16: patch/positional and timestep/pooled-text embeddings (tiny,
and their error reaches every token) and the final projection to latents. Norms are not Linears, so they
stay bf16 anyway. Everything else — attention, feed-forward, context embedder, and the big AdaLN
modulation linears ``norm1.linear`` / ``norm1_context.linear`` / ``norm_out.linear`` — becomes FP8."""

HYBRID_FP8_ONLY: tuple[str, ...] = (r"\.ff(_context)?\.", r"\.to_out\.0$", r"\.to_add_out$")
"""``hybrid`` converts only feed-forward and attention-output projections; q/k/v and AdaLN stay bf16."""


@functools.lru_cache(maxsize=1)
def _diffusers_default_skips() -> tuple[str, ...]:
    """What ``SD3Transformer2DModel.enable_layerwise_casting()`` skips by default, from diffusers itself.

    Its ``"norm"`` pattern also matches ``norm1.linear`` (AdaLN): 1.5 GB of Medium stays bf16.
    """
    try:
        from diffusers import SD3Transformer2DModel
        from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

        return tuple(DEFAULT_SKIP_MODULES_PATTERN) + tuple(SD3Transformer2DModel._skip_layerwise_casting_patterns or ())
    except ImportError:  # pragma: no cover - diffusers renamed its constant: same values as 0.42
        return ("pos_embed", "patch_embed", "norm", "^proj_in$", "^proj_out$", "pos_embed", "norm")


@dataclass(frozen=True)
class Policy:
    """A named rule for which ``nn.Linear`` layers become FP8 (regexes searched in the module's name)."""

    name: str
    description: str
    skip: tuple[str, ...] | Callable[[], tuple[str, ...]] = ()  # a callable is read on first use
    only: tuple[str, ...] | None = None  # if set, a Linear must match one of these as well

    @property
    def skip_patterns(self) -> tuple[str, ...]:
        return self.skip() if callable(self.skip) else self.skip

    def __call__(self, module: "nn.Module", fqn: str) -> bool:
        from torch import nn

        if type(module) is not nn.Linear:
            return False
        if any(re.search(p, fqn) for p in self.skip_patterns):
            return False
        return self.only is None or any(re.search(p, fqn) for p in self.only)


POLICIES: dict[str, Policy] = {
    "all-linear": Policy("all-linear", "every Linear incl. AdaLN; embeddings and proj_out bf16",
                         skip=ALL_LINEAR_KEEP_BF16),
    "hybrid": Policy("hybrid", "feed-forward and attention outputs FP8; q/k/v and AdaLN bf16",
                     skip=ALL_LINEAR_KEEP_BF16, only=HYBRID_FP8_ONLY),
    "diffusers-default": Policy("diffusers-default", "diffusers' layerwise-casting skips ('norm' keeps AdaLN bf16)",
                                skip=_diffusers_default_skips),  # read from diffusers on first use, not at import
}
TEXT_ENCODER_POLICY = Policy("text-encoder", "every Linear (embeddings and norms are not Linears)")


def get_policy(policy: str | FilterFn) -> FilterFn:
    if callable(policy):
        return policy
    try:
        return POLICIES[policy]
    except KeyError:
        raise Sd35fp8Error(f"unknown FP8 policy {policy!r}",
                           fix=f"choose one of {', '.join(POLICIES)} or pass a filter_fn(module, fqn)") from None



"""Teaching aids for notebook 02: what e4m3 can hold, why scales exist, the seed guide's mistakes run for real.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from ..errors import Sd35fp8Error
from .storage import quantize_tensor

if TYPE_CHECKING:  # pragma: no cover
    import torch



# --- teaching aids for notebook 02 ---------------------------------------------------------------------

def e4m3_facts() -> list[dict[str, Any]]:
    """What float8_e4m3fn can represent, computed from torch itself (not typed in)."""
    import torch

    fi = torch.finfo(torch.float8_e4m3fn)
    grid = e4m3_values()
    between_1_and_2 = grid[(grid >= 1) & (grid < 2)]
    return [{"property": "largest finite value", "value": f"±{fi.max:g}", "why it matters": "casts saturate there"},
            {"property": "smallest normal", "value": f"{fi.smallest_normal:g} (2^-6)",
             "why it matters": "below it precision drops bit by bit"},
            {"property": "smallest subnormal", "value": f"{grid[grid > 0].min():g} (2^-9)",
             "why it matters": "anything under half of it becomes 0"},
            {"property": "values between 1 and 2", "value": ", ".join(f"{v:g}" for v in between_1_and_2),
             "why it matters": "3 mantissa bits: 8 steps per power of two, ~6% apart"},
            {"property": "distinct finite values", "value": str(len(grid)), "why it matters": "bf16 has about 65 000"}]


def e4m3_values() -> "torch.Tensor":
    """Every finite float8_e4m3fn value, sorted (all 256 bit patterns, NaNs and the -0 duplicate removed)."""
    import torch

    values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    return torch.unique(values[~values.isnan()])


def scale_errors(stds: tuple[float, ...] = (0.02, 0.002, 0.0005), seed: int = 0) -> list[dict[str, float]]:
    """For N(0, std) weights: the share below e4m3's smallest normal, and the relative error (and share of zeros)
    of a plain float8 cast against a per-row-scaled one — as numbers, for a cell to assert on."""
    import torch

    rows = []
    for std in stds:
        w = torch.randn(256, 256, generator=torch.Generator().manual_seed(seed)) * std
        plain = w.to(torch.float8_e4m3fn).float()
        q, scale = quantize_tensor(w)
        rows.append({"std": std, "below_normal": float((w.abs() < 2**-6).float().mean()),
                     "plain_error": float((plain - w).norm() / w.norm()), "plain_zeros": float((plain == 0).float().mean()),
                     "scaled_error": float((q.float() * scale - w).norm() / w.norm())})
    return rows


def scale_demo(stds: tuple[float, ...] = (0.02, 0.002, 0.0005), seed: int = 0) -> list[dict[str, Any]]:
    """:func:`scale_errors` as table rows: relative error of a plain float8 cast vs a per-row-scaled one."""
    return [{"weights": f"N(0, {r['std']:g})", "below 2^-6": f"{r['below_normal']:.0%}",
             "plain cast: error": f"{r['plain_error']:.1%}", "plain cast: zeros": f"{r['plain_zeros']:.0%}",
             "with scale: error": f"{r['scaled_error']:.1%}"} for r in scale_errors(stds, seed)]


def seed_mistakes(model: str = "tiny") -> list[dict[str, str]]:
    """Run the seed guide's three mistakes for real and return what each does, with the fix."""
    import torch
    from diffusers import StableDiffusionPipeline

    from ..display import quiet_loading_bars
    from ..pipeline.loading import resolve_model

    quiet_loading_bars()
    rows = []
    try:
        torch.nn.functional.linear(torch.randn(1, 4, dtype=torch.bfloat16),
                                   torch.randn(4, 4).to(torch.float8_e4m3fn))
        happened = "ran (unexpected)"
    except Exception as e:  # the exact error differs by torch version and device
        happened = f"{type(e).__name__}: {str(e).splitlines()[0][:110]}"
    rows.append({"mistake": "from_pretrained(..., torch_dtype=torch.float8_e4m3fn)",
                 "what happens": f"activations/weights in float8 cannot be multiplied: {happened}",
                 "fix": "quantize_(pipe, FP8Config()) — FP8 storage with scales, or torchao FP8 compute"})
    try:
        StableDiffusionPipeline.from_pretrained(resolve_model(model).path)
        happened = "loaded (unexpected)"
    except Exception as e:
        message = re.sub(r"<class '[\w.]*\.(\w+)'>", r"\1", str(e).splitlines()[0])
        happened = f"{type(e).__name__}: {message[:200]}"
    rows.append({"mistake": "StableDiffusionPipeline for SD3.5", "what happens": happened,
                 "fix": "StableDiffusion3Pipeline (what load_pipeline uses)"})
    try:
        resolve_model("stabilityai/stable-diffusion-3.5-fp8")
        happened = "resolved (unexpected)"
    except Sd35fp8Error as e:
        happened = str(e).split("\n")[0][:160]
    rows.append({"mistake": "git clone stabilityai/stable-diffusion-3.5-fp8", "what happens": happened,
                 "fix": "Comfy-Org/stable-diffusion-3.5-fp8 (load_comfy_pipeline) or quantise the official repo"})
    return rows

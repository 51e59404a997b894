"""Notebook 03's experiment: moving weights around (offloading) must not change a single pixel.

Offloading only changes *where* a weight waits between uses; the arithmetic is the same, so an offloaded
pipeline must give the same image, bit for bit, as the resident one at the same seed. :func:`placement_check`
renders one prompt resident in FP8 storage and then with each placement this device can run, and compares
the bytes:

* on CUDA, the ladder's own offload rungs ``fp8_model_offload`` and ``fp8_group_offload``: weights wait in
  host RAM (the sequential rung also tiles the VAE, which is not a placement);
* on a CPU there is no device memory to offload *from*, so the weights go one step further: block-level group
  offload to **disk** (diffusers' ``offload_to_disk_path``) — each block's weights are written to a safetensors
  file, dropped from RAM, and read back just before the block runs.

Example:
    >>> check = placement_check("scenes", "a large red circle on the left, on a blue background")
    >>> check.all_identical, check.rows[0].compared_with
    (True, 'fp8')
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def apply_disk_group_offload(pipe, folder: str | Path) -> list[str]:
    """Block-level group offload of every component onto the CPU, with the offloaded weights on *disk* under
    ``folder`` (not in RAM) between uses. Returns what changed (one line)."""
    import torch
    from diffusers.hooks import apply_group_offloading

    from .strategies import GROUP_BLOCK_MODULES, _modules

    cpu = torch.device("cpu")
    for name, module in _modules(pipe).items():
        apply_group_offloading(module, onload_device=cpu, offload_device=cpu, offload_type="block_level",
                               num_blocks_per_group=1, use_stream=False, block_modules=GROUP_BLOCK_MODULES.get(name),
                               offload_to_disk_path=str(Path(folder) / name))
    return [f"group offload (block level) to disk: {folder}"]


@dataclass
class PlacementRow:
    placement: str
    compared_with: str
    identical: bool
    max_abs_diff: int  # 0–255
    how: str
    image: Any = field(repr=False)


@dataclass
class PlacementCheck:
    """The resident FP8 image and, per placement, whether its image is the same bytes."""

    prompt: str
    seed: int
    reference: Any = field(repr=False)
    rows: list[PlacementRow] = field(default_factory=list)

    @property
    def all_identical(self) -> bool:
        return bool(self.rows) and all(r.identical for r in self.rows)

    def table_rows(self) -> list[dict[str, str]]:
        return [{"placement": r.placement, "compared with": r.compared_with, "what moved": r.how,
                 "bit for bit": "yes" if r.identical else "NO", "max |Δ| (0–255)": str(r.max_abs_diff)}
                for r in self.rows]

    def _repr_html_(self) -> str:
        from ..display import html_table

        return html_table(self.table_rows()).data


def placement_check(model: str, prompt: str, seed: int = 0, *, device: str | None = None) -> PlacementCheck:
    """Render ``prompt`` resident in FP8 storage, then with every offload placement ``device`` can run (see the
    module docstring), each on a freshly loaded pipeline, and compare the images byte for byte."""
    import numpy as np

    from ..pipeline.defaults import default_settings
    from ..pipeline.generation import generate
    from ..pipeline.loading import default_device, load_pipeline
    from .strategies import get_strategy

    device = device or default_device()

    def render(setup) -> tuple[Any, list[str]]:
        pipe = load_pipeline(model, device="cpu")
        changes = setup(pipe)
        image = generate(pipe, default_settings(pipe, prompt, seed), progress=False).image
        return np.asarray(image), changes

    reference, _ = render(lambda p: get_strategy("fp8").apply(p, device))
    check = PlacementCheck(prompt, seed, reference)
    if device.startswith("cuda"):
        placements = {name: (lambda p, n=name: get_strategy(n).apply(p, device))
                      for name in ("fp8_model_offload", "fp8_group_offload")}
    else:
        folder = Path(tempfile.mkdtemp(prefix="sd35fp8-offload-"))
        placements = {"fp8 + group offload to disk":
                      lambda p: get_strategy("fp8").apply(p, device) + apply_disk_group_offload(p, folder)}
    for name, setup in placements.items():
        image, changes = render(setup)
        diff = int(np.abs(image.astype(np.int16) - reference.astype(np.int16)).max())
        check.rows.append(PlacementRow(name, "fp8", bool(np.array_equal(image, reference)), diff,
                                       changes[-1] if changes else "", image))
    return check

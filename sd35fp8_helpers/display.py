"""Notebook plumbing: one set-up call, quiet libraries, and small tables — so chapters stay short.

Chapters open with ``from sd35fp8_helpers.display import setup_notebook; setup_notebook()``. Everything
that draws or formats lives here (or in the feature modules), not in notebook cells.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path


def quiet_libraries() -> None:
    """Silence start-up chatter that is not the reader's problem.

    On a CPU machine torchao logs that its CUDA kernels failed to load, torch warns about enum
    registration, diffusers warns that torchao tensors are unavailable, and transformers that
    torchvision is missing. None of it affects SD3.5; all of it hides the output that matters.
    Call before importing diffusers (it is idempotent and cheap).
    """
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("torchao", "torch.utils._pytree", "diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    warnings.filterwarnings("ignore", category=FutureWarning)


def quiet_loading_bars() -> None:
    """Hide diffusers'/transformers' per-component "Loading weights" bars (a tiny model loads in 0.1 s).

    Our own bars — denoising steps, downloads, hashing — are unaffected.
    """
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def setup_notebook() -> None:
    """The one set-up cell of every chapter: quiet logs, readable plots."""
    quiet_libraries()
    try:
        import matplotlib

        matplotlib.rcParams.update({"figure.dpi": 100, "figure.figsize": (7, 3.5), "axes.grid": True,
                                    "grid.alpha": 0.3})
    except ImportError:  # plots are optional for the CLI
        pass


def images_dir(output_dir: str | os.PathLike | None = None) -> Path:
    """Where a notebook saves images: its ``output_dir`` parameter, else ``$SD35FP8_OUTPUT_DIR/images``."""
    from pathlib import Path

    from .constants import settings

    path = Path(output_dir) if output_dir else settings().output_dir / "images"
    path.mkdir(parents=True, exist_ok=True)
    return path


def raised(fn, *args, **kwargs) -> Exception | None:
    """Call ``fn(*args, **kwargs)`` and return the exception it raised, or ``None`` if it returned.

    A notebook cell that demonstrates an error shows it *and* asserts it happened, in three short lines:
    ``error = raised(load_file, path)``, ``print(error)``, ``assert "header too large" in str(error)``.

    Example:
        >>> raised(int, "x").__class__.__name__, raised(int, "1")
        ('ValueError', None)
    """
    try:
        fn(*args, **kwargs)
    except Exception as exc:  # the point is to hand it back, whatever it is
        return exc
    return None


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'; 16_106_127_360 -> '15.0 GiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def html_table(rows: list[dict], columns: list[str] | None = None) -> "object":
    """A list of dicts as an HTML table (an IPython ``HTML`` object), left-aligned text."""
    from html import escape

    from IPython.display import HTML

    columns = columns or list(rows[0])
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td style='text-align:left'>{escape(str(r.get(c, '')))}</td>"
                                    for c in columns) + "</tr>" for r in rows)
    return HTML(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


def text_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A list of dicts as aligned plain-text columns (what ``print(report)`` shows); missing cells are blank."""
    columns = columns or (list(rows[0]) if rows else [])
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(w) for c, w in widths.items())]
    lines += ["  ".join(str(r.get(c, "")).ljust(w) for c, w in widths.items()) for r in rows]
    return "\n".join(lines)


def disk_needs() -> list[dict]:
    """Disk each real model needs, computed from parameter counts (bf16 as distributed), per component."""
    from .presets import PARAMETER_COUNTS

    rows = []
    for preset, counts in PARAMETER_COUNTS.items():
        row = {"model": f"SD3.5 {preset}"}
        row.update({k: human_bytes(v * 2) for k, v in counts.items()})
        row["total (bf16)"] = human_bytes(sum(counts.values()) * 2)
        row["without T5"] = human_bytes((sum(counts.values()) - counts["t5"]) * 2)
        rows.append(row)
    return rows

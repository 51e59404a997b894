"""Run every notebook in order with papermill — the project's main job, and the basis of notebook CI.

Each notebook has a cell tagged ``parameters`` (``model``, ``output_dir`` and its own knobs); the runner
injects the model and the output folder, writes the executed copy under ``<out>/notebooks/``, prints one
progress line per notebook and a closing summary, and names the failing cell when one raises. Executed
copies live in the output folder (git ignores it); the committed notebooks stay output-free.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..constants import DEFAULT_MODEL, REPO_ROOT, settings


@dataclass
class NotebookRun:
    notebook: str
    seconds: float
    status: str  # "ok" | "failed"
    output: str
    error: str = ""


def find_notebooks(folder: str | Path | None = None, only: list[str] | None = None) -> list[Path]:
    """The numbered notebooks (``NN_*.ipynb``) in order; ``only`` keeps those whose name contains a filter."""
    folder = Path(folder) if folder else REPO_ROOT / "notebooks"
    found = sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))
    if only:
        found = [p for p in found if any(o in p.name for o in only)]
    if not found:
        raise FileNotFoundError(f"no numbered notebooks (NN_name.ipynb) in {folder}"
                                + (f" matching {only}" if only else ""))
    return found


def describe_failure(exc: Exception) -> str:
    """'cell 7 (In [5]: `pipe = load_pipeline(model)`) raised ValueError: …' from a papermill error."""
    cell_index = getattr(exc, "cell_index", None)
    if cell_index is None:
        return f"{type(exc).__name__}: {exc}"
    first = next((line for line in (getattr(exc, "source", "") or "").splitlines() if line.strip()), "")
    return (f"cell {cell_index + 1} (In [{getattr(exc, 'exec_count', '?')}]: `{first[:80]}`) raised "
            f"{getattr(exc, 'ename', '?')}: {getattr(exc, 'evalue', '')}")


def _ipc_kernel_manager(sockets: Path):
    """A kernel manager that talks to the kernel over local IPC sockets instead of TCP on 127.0.0.1.

    Nothing listens on a port (no other local user can connect to the kernel) and the kernel does not print
    its "running over TCP without encryption" warning into every run.
    """
    from jupyter_client.manager import AsyncKernelManager

    class IpcKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs):
            super().__init__(transport="ipc", ip=str(sockets / "kernel"), **kwargs)

    return IpcKernelManager


def run_notebook(path: Path, out_dir: Path, parameters: dict[str, Any], *, timeout: int = 1800) -> NotebookRun:
    import papermill

    out_dir.mkdir(parents=True, exist_ok=True)
    output = out_dir / path.name
    start = time.perf_counter()
    sockets = Path(tempfile.mkdtemp(prefix="sd35fp8-kernel-"))  # IPC socket files: not in the notebook's folder
    try:
        papermill.execute_notebook(str(path), str(output), parameters=parameters, kernel_name="python3",
                                   cwd=str(path.parent), progress_bar=False, log_output=False,
                                   execution_timeout=timeout, kernel_manager_class=_ipc_kernel_manager(sockets))
    except Exception as exc:  # papermill wraps cell errors; anything else (kernel death) is reported too
        return NotebookRun(path.name, time.perf_counter() - start, "failed", str(output), describe_failure(exc))
    finally:
        shutil.rmtree(sockets, ignore_errors=True)
    return NotebookRun(path.name, time.perf_counter() - start, "ok", str(output))


def run_all(*, model: str = DEFAULT_MODEL, out: str | Path | None = None, folder: str | Path | None = None,
            only: list[str] | None = None, extra: dict[str, Any] | None = None,
            echo: Callable[[str], None] = print) -> list[NotebookRun]:
    """Execute every notebook in order; echo a progress line each; return the runs (failures included)."""
    out = Path(out) if out else settings().output_dir
    notebooks = find_notebooks(folder, only)
    images = (out / "images").absolute()
    images.mkdir(parents=True, exist_ok=True)
    # The kernel papermill starts must be this interpreter (the project's venv), even if it is not activated.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    runs = []
    for i, nb in enumerate(notebooks, 1):
        echo(f"[{i}/{len(notebooks)}] {nb.name} ...")
        params = {"model": model, "output_dir": str(images), **(extra or {})}
        run = run_notebook(nb, (out / "notebooks").absolute(), params)
        echo(f"[{i}/{len(notebooks)}] {nb.name}: {run.status} in {run.seconds:.1f} s"
             + (f"\n      {run.error}" if run.error else ""))
        runs.append(run)
    (out / "summary.json").write_text(json.dumps([asdict(r) for r in runs], indent=2) + "\n")
    return runs


def summary_table(runs: list[NotebookRun]) -> str:
    width = max(len(r.notebook) for r in runs)
    lines = [f"{'notebook':<{width}}  {'seconds':>8}  status", "-" * (width + 18)]
    lines += [f"{r.notebook:<{width}}  {r.seconds:8.1f}  {r.status}" for r in runs]
    failed = [r for r in runs if r.status != "ok"]
    lines.append(f"{len(runs) - len(failed)} ok, {len(failed)} failed; executed copies in "
                 f"{Path(runs[0].output).parent}" if runs else "no notebooks")
    return "\n".join(lines)

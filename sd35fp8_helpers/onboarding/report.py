"""``sd35fp8 report``: a shareable environment report, and what differs between two of them.

"It works on my machine" becomes checkable: a report holds the OS, Python, the pinned packages' versions,
the GPU (name, capability, driver, CUDA), the doctor's results, the model (source, revision, sha256 of every
weight file), the precision mode and the smoke image's pixel hash — everything ``sd35fp8 setup`` proved.
Two people compare their JSON with ``sd35fp8 report --compare THEIRS.json`` and see the differences that
explain different behaviour: versions, hashes, capability.

No secret goes into a report: whether a hub token is configured is a yes/no from the doctor, and no
environment variable's value is copied except the documented cache paths.
"""

from __future__ import annotations

import json
import platform
import subprocess
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

REPORT_PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "safetensors", "huggingface_hub",
                   "tokenizers", "torchao", "numpy", "pillow")
"""Packages whose versions change numerics or loading; all of them are pinned in pyproject.toml."""

# Keys whose differences matter, with the reason shown to the user (prefix match on the flattened key).
_WHY: tuple[tuple[str, str], ...] = (
    ("packages.", "library versions change numerics and loading"),
    ("python", "a different Python can pull other wheels"),
    ("gpu.capability", "decides FP8 compute (>= 8.9) vs FP8 storage"),
    ("gpu.name", "speed and memory differ"),
    ("gpu.driver", "old drivers can lack kernels torch needs"),
    ("gpu.cuda", "torch built for another CUDA"),
    ("model.files.", "different weight files: not the same model"),
    ("model.revision", "another revision of the weights"),
    ("model.source", "weights from another place"),
    ("precision", "another precision mode gives other numbers"),
    ("smoke.image_sha256", "the same settings gave different pixels"),
)


def _pkg(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _gpu() -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        return {"available": False}
    if not torch.cuda.is_available():
        return {"available": False, "cuda": torch.version.cuda}
    driver = None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        driver = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        pass
    cap = torch.cuda.get_device_capability(0)
    return {"available": True, "name": torch.cuda.get_device_name(0), "capability": f"{cap[0]}.{cap[1]}",
            "driver": driver, "cuda": torch.version.cuda,
            "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)}


def build_report(setup_dir: str | Path | None = None) -> dict[str, Any]:
    """Collect the report as plain data. ``setup_dir``: a folder written by ``sd35fp8 setup``."""
    from ..doctor.checks import run_doctor
    from .setup import STATE_FILE

    state: dict[str, Any] = {}
    if setup_dir is not None:
        path = Path(setup_dir) / STATE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run `sd35fp8 setup MODEL --dir {setup_dir}` first")
        state = json.loads(path.read_text())
    doctor = run_doctor(state.get("model", "tiny"))
    smoke = state.get("stages", {}).get("smoke", {})
    return {
        "sd35fp8_report": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "os": platform.platform(),
        "python": platform.python_version(),
        "packages": {name: _pkg(name) for name in REPORT_PACKAGES},
        "gpu": _gpu(),
        "doctor": {c.name: {"status": c.status, "value": c.value} for c in doctor.checks},
        "model": {"source": state.get("model"), "kind": state.get("source"), "revision": state.get("revision"),
                  "files": state.get("files", {})},
        "precision": state.get("precision_used"),
        "smoke": {"image_sha256": smoke.get("image_sha256")},
    }


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): data}


@dataclass(frozen=True)
class Difference:
    key: str
    mine: Any
    theirs: Any
    why: str

    def __str__(self) -> str:
        return f"{self.key}: {self.mine!r} here, {self.theirs!r} there — {self.why}"


def compare(mine: dict[str, Any], theirs: dict[str, Any]) -> list[Difference]:
    """The differences that matter (see ``_WHY``), most important first; timestamps and OS strings are ignored."""
    a, b = _flatten(mine), _flatten(theirs)
    diffs = []
    for prefix, why in _WHY:
        for key in sorted(set(a) | set(b)):
            if key.startswith(prefix) and a.get(key) != b.get(key):
                diffs.append(Difference(key, a.get(key), b.get(key), why))
    return diffs


def to_markdown(report: dict[str, Any]) -> str:
    gpu = report["gpu"]
    gpu_line = (f"{gpu['name']} (capability {gpu['capability']}, driver {gpu['driver']}, CUDA {gpu['cuda']})"
                if gpu.get("available") else "none (CPU only)")
    lines = [f"# sd35fp8 environment report ({report['created']})", "",
             f"- OS: {report['os']}", f"- Python: {report['python']}", f"- GPU: {gpu_line}",
             f"- Model: {report['model']['source']} ({report['model']['kind']}), revision "
             f"{report['model']['revision'] or 'n/a'}", f"- Precision: {report['precision'] or 'n/a'}",
             f"- Smoke image pixels sha256: {report['smoke']['image_sha256'] or 'n/a'}", "",
             "| package | version |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report["packages"].items()]
    lines += ["", "| check | status | value |", "|---|---|---|"]
    lines += [f"| {k} | {v['status']} | {v['value']} |" for k, v in report["doctor"].items()]
    if report["model"]["files"]:
        lines += ["", "| weight file | sha256 |", "|---|---|"]
        lines += [f"| {k} | `{v}` |" for k, v in sorted(report["model"]["files"].items())]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    """Write ``OUT.json`` and ``OUT.md`` (``out`` with or without a suffix)."""
    base = Path(out)
    base = base.with_suffix("") if base.suffix in (".json", ".md") else base
    base.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = base.with_suffix(".json"), base.with_suffix(".md")
    json_path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    md_path.write_text(to_markdown(report))
    return json_path, md_path

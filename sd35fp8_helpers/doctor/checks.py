"""The environment doctor: what this machine can do for SD3.5 in FP8, and the exact fix for what it can't.

Each check is a pure function of the facts it needs (versions, a compute capability, free bytes …) and
returns a :class:`Check` — status ``ok`` / ``warn`` / ``fail``, the measured value, and the fix. That keeps
every rule unit-testable with a table of cases; :func:`gather_facts` is the only part that looks at the
machine. The checks follow the classic pitfalls:

* ``module 'torch' has no attribute 'float8_e4m3fn'`` — torch older than 2.1 (2.3 for FP8 single files);
* "my GPU can't do FP8" — FP8 *storage* works anywhere, FP8 *compute* needs capability >= 8.9;
* "git clone gave me a 130-byte file" — git-lfs missing or ``git lfs install`` never run;
* downloads that die half-way — too little disk where the hub cache lives;
* a token pasted into a notebook — we only ever say whether one is configured.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Literal

from ..constants import (
    DISK_SAFETY_FACTOR,
    FP8_COMPUTE_MIN_CAPABILITY,
    MIN_PYTHON,
    MIN_TORCH_FP8,
    MIN_VERSIONS,
    Settings,
    settings,
)

Status = Literal["ok", "warn", "fail"]
TORCH_INSTALL = "pip install torch==2.13.0"


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    value: str
    fix: str = ""


@dataclass
class Facts:
    """Everything the checks need, gathered once from the machine (or written by hand in tests)."""

    python: tuple[int, int, int]
    torch_version: str | None
    has_float8_e4m3fn: bool
    has_float8_e5m2: bool
    cuda_available: bool
    gpu_name: str | None = None
    capability: tuple[int, int] | None = None
    gpu_total_bytes: int | None = None
    gpu_free_bytes: int | None = None
    packages: dict[str, str | None] = field(default_factory=dict)
    git_version: str | None = None
    git_lfs_version: str | None = None
    git_lfs_hooked: bool = False
    cache_dir: str = ""
    disk_free_bytes: int | None = None
    hf_home: str = ""
    transformers_cache: str | None = None
    token_source: str | None = None  # "HF_TOKEN" / "login file" / None — never the token
    xformers_version: str | None = None
    platform: str = ""


# --- helpers --------------------------------------------------------------------------------------

def parse_version(text: str | None) -> tuple[int, ...]:
    """Leading numeric part of a version: '2.13.0+cpu' -> (2, 13, 0); '0.42.1.dev0' -> (0, 42, 1)."""
    if not text:
        return ()
    parts = []
    for piece in re.split(r"[.+-]", text):
        if not piece.isdigit():
            break
        parts.append(int(piece))
    return tuple(parts)


def _gib(n: int | float) -> str:
    from ..display import human_bytes

    return human_bytes(n)


# --- checks (pure) --------------------------------------------------------------------------------

def check_python(version: tuple[int, int, int]) -> Check:
    value = ".".join(map(str, version))
    if version[:2] >= MIN_PYTHON:
        return Check("python", "ok", value)
    return Check("python", "fail", value,
                 f"use Python >= {'.'.join(map(str, MIN_PYTHON))} (e.g. `python3.11 -m venv .venv`)")


def check_torch(version: str | None, has_e4m3: bool, has_e5m2: bool) -> Check:
    if version is None:
        return Check("torch", "fail", "not installed", TORCH_INSTALL)
    if not (has_e4m3 and has_e5m2):
        return Check("torch float8", "fail", f"{version}: torch.float8_e4m3fn missing",
                     f"this torch is too old for FP8 (AttributeError ... float8_e4m3fn); {TORCH_INSTALL}")
    if parse_version(version)[:2] < MIN_TORCH_FP8:
        return Check("torch float8", "warn", f"{version}: float8 dtypes present",
                     f"diffusers documents torch >= {'.'.join(map(str, MIN_TORCH_FP8))} for FP8 single files; "
                     f"{TORCH_INSTALL}")
    return Check("torch float8", "ok", f"{version}: float8_e4m3fn and float8_e5m2 available")


def check_cuda(available: bool, name: str | None, capability: tuple[int, int] | None) -> Check:
    if not available:
        return Check("cuda", "warn", "no CUDA device: CPU only",
                     "fine for the tiny model and learning; real SD3.5 needs an NVIDIA GPU "
                     "(install the CUDA build of torch there: pip install torch==2.13.0 on a CUDA machine)")
    cap = f"{capability[0]}.{capability[1]}" if capability else "?"
    return Check("cuda", "ok", f"{name} (compute capability {cap})")


def check_fp8_compute(available: bool, capability: tuple[int, int] | None) -> Check:
    """FP8 *compute* (float8 tensor-core matmuls) needs capability >= 8.9 — Ada or Hopper."""
    need = ".".join(map(str, FP8_COMPUTE_MIN_CAPABILITY))
    if not available or capability is None:
        return Check("fp8 compute", "warn", "unavailable (no CUDA device)",
                     f"FP8 compute needs an NVIDIA GPU with capability >= {need} (RTX 40xx, L4/L40, H100/H200); "
                     "use FP8 storage here")
    cap = f"{capability[0]}.{capability[1]}"
    if tuple(capability) >= FP8_COMPUTE_MIN_CAPABILITY:
        return Check("fp8 compute", "ok", f"available (capability {cap} >= {need}); pays off with torch.compile")
    return Check("fp8 compute", "warn", f"unavailable (capability {cap} < {need})",
                 "use FP8 storage (halves weight memory, runs at about bf16 speed); FP8 compute needs "
                 "Ada (RTX 40xx) or Hopper (H100/H200)")


def check_fp8_storage(has_e4m3: bool) -> Check:
    if has_e4m3:
        return Check("fp8 storage", "ok", "available: weights kept in float8_e4m3fn, upcast per layer (any device)")
    return Check("fp8 storage", "fail", "unavailable: torch has no float8_e4m3fn", TORCH_INSTALL)


def check_gpu_memory(total: int | None, free: int | None, need_bytes: int | None = None) -> Check:
    if total is None:
        return Check("gpu memory", "warn", "no GPU",
                     "without a GPU only the tiny model is practical; SD3.5 Medium in FP8 fits an 8 GB card")
    value = f"{_gib(free or 0)} free of {_gib(total)}"
    if need_bytes is not None and (free or 0) < need_bytes:
        return Check("gpu memory", "warn", value,
                     f"less than {_gib(need_bytes)} free: use FP8 and CPU offload (notebook 03)")
    return Check("gpu memory", "ok", value)


def check_package(name: str, version: str | None, minimum: str) -> Check:
    pin = f"pip install -e . (pins {name}); or pip install '{name}>={minimum}'"
    if version is None:
        return Check(name, "fail", "not installed", pin)
    if parse_version(version) < parse_version(minimum):
        return Check(name, "fail", f"{version} < {minimum}", pin)
    return Check(name, "ok", version)


def check_git(version: str | None) -> Check:
    if version is None:
        return Check("git", "fail", "not installed", "sudo apt-get install git (macOS: xcode-select --install)")
    return Check("git", "ok", version)


def check_git_lfs(version: str | None, hooked: bool) -> Check:
    """Without git-lfs (or without ``git lfs install``) a clone gives ~130-byte pointer files, not weights."""
    if version is None:
        return Check("git-lfs", "fail", "not installed — `git clone` would give pointer files, not weights",
                     "sudo apt-get install git-lfs && git lfs install (macOS: brew install git-lfs)")
    if not hooked:
        return Check("git-lfs", "warn", f"{version}, but `git lfs install` not run for this user",
                     "git lfs install")
    return Check("git-lfs", "ok", version)


def check_disk(free_bytes: int | None, need_bytes: int, path: str, model: str) -> Check:
    want = int(need_bytes * DISK_SAFETY_FACTOR)
    if free_bytes is None:
        return Check("disk", "warn", f"cannot read free space at {path}", "check it by hand: df -h")
    value = f"{_gib(free_bytes)} free at {path}; {model} needs ~{_gib(want)}"
    if free_bytes < want:
        return Check("disk", "fail", value,
                     f"free {_gib(want - free_bytes)} or set HF_HUB_CACHE to a larger (fast, local SSD) disk")
    return Check("disk", "ok", value)


def check_cache(hf_home: str, hub_cache: str, transformers_cache: str | None) -> Check:
    value = f"HF_HUB_CACHE={hub_cache}"
    if transformers_cache:
        return Check("cache", "warn", f"{value}; TRANSFORMERS_CACHE={transformers_cache} is set",
                     "TRANSFORMERS_CACHE is deprecated: unset it and set HF_HUB_CACHE (or HF_HOME) instead")
    return Check("cache", "ok", value)


def check_token(source: str | None) -> Check:
    """Only *whether* a token is configured — never any character of it."""
    if source is None:
        return Check("hub token", "warn", "not configured",
                     "only needed for gated repos (SD3.5): accept the licence on the model page, then "
                     "`hf auth login` or export HF_TOKEN")
    return Check("hub token", "ok", f"configured (from {source})")


def check_xformers(version: str | None) -> Check:
    if version is None:
        return Check("xformers", "ok", "not installed — not needed: PyTorch SDPA is used")
    return Check("xformers", "ok", f"{version} installed, but not needed: PyTorch SDPA is used")


# --- gathering (the only part that looks at the machine) ------------------------------------------

def _pkg_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _run(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _token_source(s: Settings) -> str | None:
    if s.token_in_env:
        return "HF_TOKEN"
    try:
        from huggingface_hub import get_token

        return "hub login" if get_token() else None
    except Exception:  # an unreadable token file is "not configured", not a crash
        return None


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def gather_facts(s: Settings | None = None) -> Facts:
    s = s or settings()
    try:
        import torch

        torch_version: str | None = torch.__version__
        e4m3, e5m2 = hasattr(torch, "float8_e4m3fn"), hasattr(torch, "float8_e5m2")
        cuda = torch.cuda.is_available()
    except ImportError:
        torch_version, e4m3, e5m2, cuda = None, False, False, False
    facts = Facts(python=tuple(sys.version_info[:3]), torch_version=torch_version, has_float8_e4m3fn=e4m3,
                  has_float8_e5m2=e5m2, cuda_available=cuda, platform=platform.platform())
    if cuda:
        facts.gpu_name = torch.cuda.get_device_name(0)
        facts.capability = tuple(torch.cuda.get_device_capability(0))
        facts.gpu_free_bytes, facts.gpu_total_bytes = torch.cuda.mem_get_info(0)
    facts.packages = {name: _pkg_version(name) for name in MIN_VERSIONS}
    git = _run(["git", "--version"])
    facts.git_version = git.replace("git version ", "") if git else None
    lfs = _run(["git", "lfs", "version"]) if git else None
    facts.git_lfs_version = lfs.split(" ")[0].replace("git-lfs/", "") if lfs else None
    facts.git_lfs_hooked = bool(lfs and _run(["git", "config", "--get", "filter.lfs.process"]))
    facts.cache_dir = str(s.hf_hub_cache)
    facts.disk_free_bytes = shutil.disk_usage(_existing_parent(s.hf_hub_cache)).free
    facts.hf_home = str(s.hf_home)
    facts.transformers_cache = s.transformers_cache
    facts.token_source = _token_source(s)
    facts.xformers_version = _pkg_version("xformers")
    return facts


# --- the report -----------------------------------------------------------------------------------

def model_disk_bytes(model: str) -> int:
    """Bytes a model needs on disk, computed from the preset's parameter counts (bf16 as distributed)."""
    from ..presets import PARAMETER_COUNTS, model_bytes

    for preset in PARAMETER_COUNTS:
        if preset in model.lower():
            return model_bytes(preset)
    return 10 * 2**20  # tiny / a local folder: a few MB


@dataclass(repr=False)
class DoctorReport:
    checks: list[Check]
    model: str

    def __repr__(self) -> str:  # plain-text notebooks and the REPL show the same table as the CLI
        return self.to_text()

    @property
    def ok(self) -> bool:
        return all(c.status != "fail" for c in self.checks)

    def by_name(self, name: str) -> Check:
        return next(c for c in self.checks if c.name == name)

    def to_json(self) -> str:
        return json.dumps({"ok": self.ok, "model": self.model, "checks": [asdict(c) for c in self.checks]},
                          indent=2)

    def to_text(self) -> str:
        mark = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}
        width = max(len(c.name) for c in self.checks)
        lines = []
        for c in self.checks:
            lines.append(f"[{mark[c.status]}] {c.name:<{width}}  {c.value}")
            if c.fix and c.status != "ok":
                lines.append(f"       {'':<{width}}  fix: {c.fix}")
        verdict = "ready" if self.ok else "not ready: fix the FAIL lines above"
        lines.append(f"\n{verdict} ({sum(c.status == 'warn' for c in self.checks)} warnings)")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        from html import escape

        colour = {"ok": "#1a7f37", "warn": "#9a6700", "fail": "#cf222e"}
        rows = "".join(
            f"<tr><td style='color:{colour[c.status]};font-weight:bold'>{c.status}</td><td>{escape(c.name)}</td>"
            f"<td style='text-align:left'>{escape(c.value)}</td>"
            f"<td style='text-align:left'>{escape(c.fix) if c.status != 'ok' else ''}</td></tr>"
            for c in self.checks)
        return ("<table><thead><tr><th>status</th><th>check</th><th>value</th><th>fix</th></tr></thead>"
                f"<tbody>{rows}</tbody></table>")


def evaluate(facts: Facts, *, model: str = "tiny", s: Settings | None = None) -> DoctorReport:
    """Apply every check to ``facts``. Pure: tests call it with hand-written facts."""
    s = s or Settings.from_env()
    checks = [
        check_python(facts.python),
        check_torch(facts.torch_version, facts.has_float8_e4m3fn, facts.has_float8_e5m2),
        check_fp8_storage(facts.has_float8_e4m3fn),
        check_cuda(facts.cuda_available, facts.gpu_name, facts.capability),
        check_fp8_compute(facts.cuda_available, facts.capability),
        check_gpu_memory(facts.gpu_total_bytes, facts.gpu_free_bytes),
        *[check_package(n, facts.packages.get(n), m) for n, m in MIN_VERSIONS.items()],
        check_git(facts.git_version),
        check_git_lfs(facts.git_lfs_version, facts.git_lfs_hooked),
        check_disk(facts.disk_free_bytes, model_disk_bytes(model), facts.cache_dir, model),
        check_cache(facts.hf_home, facts.cache_dir, facts.transformers_cache),
        check_token(facts.token_source),
        check_xformers(facts.xformers_version),
    ]
    return DoctorReport(checks, model)


def run_doctor(model: str = "tiny") -> DoctorReport:
    """Look at this machine and report what it can do (the notebook's and ``sd35fp8 doctor``'s entry point)."""
    s = settings()
    return evaluate(gather_facts(s), model=model, s=s)


def fp8_mode_available(facts: Facts) -> str:
    """'compute' where float8 matmuls run (capability >= 8.9), else 'storage' (or 'none' with no float8)."""
    if not facts.has_float8_e4m3fn:
        return "none"
    if facts.cuda_available and facts.capability and tuple(facts.capability) >= FP8_COMPUTE_MIN_CAPABILITY:
        return "compute"
    return "storage"


def environment_variables_in_use() -> dict[str, str]:
    """The documented variables that are set, with token values masked (for display)."""
    names = ["SD35FP8_HOME", "SD35FP8_OUTPUT_DIR", "HF_HOME", "HF_HUB_CACHE", "TRANSFORMERS_CACHE",
             "HF_HUB_OFFLINE", "HF_TOKEN"]
    return {n: ("<set>" if "TOKEN" in n else os.environ[n]) for n in names if os.environ.get(n)}

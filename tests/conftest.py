"""Shared fixtures: a session-wide tiny model, a loaded tiny pipeline, and a CLI runner.

Tests use real components — the tiny pipeline is a real ``StableDiffusion3Pipeline``, the CLI runs as a real
subprocess. ``SD35FP8_HOME`` and ``SD35FP8_OUTPUT_DIR`` point into a per-session temporary folder so a test
run never touches the user's cache or ``outputs/``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="sd35fp8-tests-"))
os.environ["SD35FP8_HOME"] = str(_SESSION_DIR / "home")
os.environ["SD35FP8_OUTPUT_DIR"] = str(_SESSION_DIR / "outputs")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach a real hub
os.environ.pop("HF_TOKEN", None)  # tests that need a token set a fake one themselves

from sd35fp8_helpers.display import quiet_libraries  # noqa: E402

quiet_libraries()


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The tiny SD3.5 pipeline in diffusers layout, built once per test session (seed 0)."""
    from sd35fp8_helpers.pipeline.tiny import tiny_model_path

    return tiny_model_path(seed=0)


@pytest.fixture(scope="session")
def tiny_pipe(tiny_model_dir):
    """A loaded tiny pipeline (CPU, float32). Shared: tests must not modify it — load their own to mutate."""
    from sd35fp8_helpers import load_pipeline

    return load_pipeline(str(tiny_model_dir), device="cpu")


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
            timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``sd35fp8 ARGS`` as a real subprocess of this interpreter; returns stdout/stderr as text."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "sd35fp8_helpers.cli", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd or REPO, timeout=timeout)


@pytest.fixture
def cli():
    return run_cli

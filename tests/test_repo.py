"""The repository's promises to a newcomer: same pins everywhere, two README commands, CI runs the test one."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parent.parent


def _pyproject_pins() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return set(project["dependencies"]) | {p for extra in project["optional-dependencies"].values() for p in extra}


def _pip_section(path: Path) -> set[str]:
    return {m.group(1) for m in re.finditer(r"^\s+- ([A-Za-z0-9_.\-\[\]]+==\S+)\s*$", path.read_text(), re.M)}


def test_every_dependency_is_pinned_exactly():
    pins = _pyproject_pins()
    assert all("==" in p for p in pins), [p for p in pins if "==" not in p]
    assert "torch==2.13.0" in pins  # a looser range pulls a multi-gigabyte CUDA build on CPU machines


@pytest.mark.parametrize("env_file", ["environment.yml", "binder/environment.yml"])
def test_conda_and_binder_install_the_same_set(env_file):
    assert _pip_section(REPO / env_file) == _pyproject_pins()


def test_installed_versions_are_the_pinned_ones():
    from importlib.metadata import version

    for pin in _pyproject_pins():
        name, want = pin.split("==")
        name = name.split("[")[0]  # "celery[redis]": the extra installs other packages, pinned by celery itself
        assert version(name).split("+")[0] == want, f"{name}: installed {version(name)}, pinned {want}"


def _readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    commands = [c for c in _readme_commands() if c.startswith("./bootstrap.sh")]
    assert commands == ["./bootstrap.sh notebooks", "./bootstrap.sh test"]
    ci = [line.strip() for line in (REPO / ".ci/run").read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert "./bootstrap.sh test" in ci
    assert os.access(REPO / ".ci/run", os.X_OK) and os.access(REPO / "bootstrap.sh", os.X_OK)
    assert "jupyter lab" in (REPO / "README.md").read_text()


def test_outputs_are_ignored_by_git():
    result = subprocess.run(["git", "check-ignore", "outputs/images/x.png", ".venv/bin/python"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.stdout.split() == ["outputs/images/x.png", ".venv/bin/python"]


def test_bootstrap_second_run_skips_finished_steps():
    """Running set-up again on a ready environment installs nothing (the stamp matches pyproject.toml)."""
    venv = Path(sys.prefix)
    if not (venv / ".sd35fp8-installed").is_file():
        pytest.skip(f"tests not running inside a bootstrap.sh environment ({venv})")
    result = subprocess.run(["./bootstrap.sh", "setup"], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "SD35FP8_VENV": str(venv)})
    assert result.returncode == 0, result.stderr
    assert "is up to date" in result.stdout and "installing" not in result.stdout


def test_bootstrap_rejects_an_unknown_job():
    result = subprocess.run(["./bootstrap.sh", "deploy"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and "usage: ./bootstrap.sh notebooks|test|setup" in result.stderr

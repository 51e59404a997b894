"""The doctor: every rule as a table of cases, then the real report on this machine (CLI, JSON, exit code)."""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest

from sd35fp8_helpers.constants import Settings
from sd35fp8_helpers.doctor import checks as env
from sd35fp8_helpers.doctor.checks import Facts, evaluate, fp8_mode_available, parse_version


@pytest.mark.parametrize("text,expected", [
    ("2.13.0+cpu", (2, 13, 0)), ("0.42.1.dev0", (0, 42, 1)), ("2.1", (2, 1)), ("", ()), (None, ()),
])
def test_parse_version(text, expected):
    assert parse_version(text) == expected


@pytest.mark.parametrize("version,status", [((3, 11, 7), "ok"), ((3, 10, 0), "ok"), ((3, 9, 18), "fail")])
def test_python(version, status):
    assert env.check_python(version).status == status


@pytest.mark.parametrize("version,e4m3,e5m2,status,needle", [
    ("2.13.0", True, True, "ok", "float8_e4m3fn and float8_e5m2 available"),
    ("2.2.2", True, True, "warn", ">= 2.3"),
    ("2.0.1", False, False, "fail", "float8_e4m3fn"),
    (None, False, False, "fail", "not installed"),
])
def test_torch_float8(version, e4m3, e5m2, status, needle):
    check = env.check_torch(version, e4m3, e5m2)
    assert check.status == status
    assert needle in check.value + check.fix
    if status != "ok":
        assert "pip install torch==2.13.0" in check.fix


@pytest.mark.parametrize("available,capability,status,needle", [
    (False, None, "warn", "no CUDA device"),
    (True, (7, 5), "warn", "capability 7.5 < 8.9"),   # T4
    (True, (8, 0), "warn", "capability 8.0 < 8.9"),   # A100: FP8 storage only
    (True, (8, 6), "warn", "capability 8.6 < 8.9"),   # RTX 30xx
    (True, (8, 9), "ok", "capability 8.9 >= 8.9"),    # RTX 40xx, L4
    (True, (9, 0), "ok", "capability 9.0 >= 8.9"),    # H100
    (True, (12, 0), "ok", "capability 12.0 >= 8.9"),  # Blackwell
])
def test_fp8_compute_needs_capability_8_9(available, capability, status, needle):
    check = env.check_fp8_compute(available, capability)
    assert (check.status, needle in check.value) == (status, True)
    if status == "warn":
        assert "FP8 storage" in check.fix or "use FP8 storage" in check.fix


@pytest.mark.parametrize("has_e4m3,status", [(True, "ok"), (False, "fail")])
def test_fp8_storage(has_e4m3, status):
    assert env.check_fp8_storage(has_e4m3).status == status


@pytest.mark.parametrize("version,minimum,status", [
    ("0.42.1", "0.32.0", "ok"), ("0.31.0", "0.32.0", "fail"), (None, "0.32.0", "fail"), ("1.0.0", "0.32.0", "ok"),
])
def test_package_minimums(version, minimum, status):
    check = env.check_package("diffusers", version, minimum)
    assert check.status == status
    if status == "fail":
        assert "pip install" in check.fix


@pytest.mark.parametrize("version,hooked,status,needle", [
    ("3.3.0", True, "ok", ""),
    ("3.3.0", False, "warn", "git lfs install"),
    (None, False, "fail", "apt-get install git-lfs"),
])
def test_git_lfs(version, hooked, status, needle):
    check = env.check_git_lfs(version, hooked)
    assert check.status == status and needle in check.fix
    if version is None:
        assert "pointer files" in check.value  # says *why* it matters


@pytest.mark.parametrize("free_gib,status", [(100, "ok"), (30, "ok"), (20, "fail"), (None, "warn")])
def test_disk_for_large(free_gib, status):
    need = env.model_disk_bytes("stabilityai/stable-diffusion-3.5-large")
    check = env.check_disk(None if free_gib is None else free_gib * 2**30, need, "/cache", "large")
    assert check.status == status
    if status == "fail":
        assert "HF_HUB_CACHE" in check.fix


def test_disk_need_is_computed_per_model():
    large, medium, tiny = (env.model_disk_bytes(m) for m in ("sd3.5-large", "stable-diffusion-3.5-medium", "tiny"))
    assert 27 * 2**30 > large > 25 * 2**30      # 13.7B params in bf16 ≈ 25.6 GiB
    assert 17 * 2**30 > medium > 14 * 2**30
    assert tiny < 100 * 2**20


def test_deprecated_transformers_cache_warns():
    assert env.check_cache("/h", "/h/hub", None).status == "ok"
    check = env.check_cache("/h", "/h/hub", "/old")
    assert check.status == "warn" and "deprecated" in check.fix and "HF_HUB_CACHE" in check.fix


def test_token_check_says_only_whether():
    assert env.check_token(None).status == "warn"
    check = env.check_token("HF_TOKEN")
    assert check.status == "ok" and check.value == "configured (from HF_TOKEN)"


def _facts(**changes) -> Facts:
    base = dict(python=(3, 11, 7), torch_version="2.13.0", has_float8_e4m3fn=True, has_float8_e5m2=True,
                cuda_available=False, packages={"diffusers": "0.42.1", "transformers": "5.23.0",
                                                "accelerate": "1.15.0", "huggingface_hub": "2.4.0",
                                                "safetensors": "0.8.0"},
                git_version="2.39.5", git_lfs_version="3.3.0", git_lfs_hooked=True, cache_dir="/c",
                disk_free_bytes=500 * 2**30, hf_home="/h")
    return Facts(**{**base, **changes})


def test_evaluate_cpu_machine_is_ready_with_warnings():
    report = evaluate(_facts(), s=Settings.from_env({}))
    assert report.ok
    assert report.by_name("fp8 storage").status == "ok"
    assert report.by_name("fp8 compute").status == "warn"
    assert fp8_mode_available(_facts()) == "storage"


def test_evaluate_h100():
    facts = _facts(cuda_available=True, gpu_name="NVIDIA H100 80GB HBM3", capability=(9, 0),
                   gpu_total_bytes=80 * 2**30, gpu_free_bytes=79 * 2**30)
    report = evaluate(facts, model="large", s=Settings.from_env({}))
    assert report.ok and report.by_name("fp8 compute").status == "ok"
    assert fp8_mode_available(facts) == "compute"


def test_evaluate_old_torch_fails_and_names_the_fix():
    facts = _facts(torch_version="2.0.1", has_float8_e4m3fn=False, has_float8_e5m2=False)
    report = evaluate(facts, s=Settings.from_env({}))
    assert not report.ok
    assert "pip install torch==2.13.0" in report.to_text()
    assert fp8_mode_available(facts) == "none"


def test_report_renders_as_text_json_and_html():
    report = evaluate(_facts(git_lfs_version=None), s=Settings.from_env({}))
    text, html = report.to_text(), report._repr_html_()
    assert "[FAIL] git-lfs" in text and "not ready" in text
    assert json.loads(report.to_json())["ok"] is False
    assert "<table>" in html and "git-lfs" in html


# --- the real machine, through the CLI ---------------------------------------------------------------

FAKE_TOKEN = "hf_sd35fp8FakeTokenForTests0123456789"


def test_doctor_json_on_this_machine_and_no_token_characters(cli):
    result = cli("doctor", "--json", env={"HF_TOKEN": FAKE_TOKEN})
    assert result.returncode == 0, result.stderr
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["cuda"]["status"] == "warn" and "no CUDA" in checks["cuda"]["value"]
    assert checks["fp8 compute"]["value"].startswith("unavailable")
    assert checks["fp8 storage"]["status"] == "ok"
    assert checks["fp8 compute"]["fix"] and checks["cuda"]["fix"]
    assert checks["hub token"]["value"] == "configured (from HF_TOKEN)"
    for piece in (FAKE_TOKEN, FAKE_TOKEN[3:12], FAKE_TOKEN[-8:]):
        assert piece not in result.stdout + result.stderr


def test_doctor_exit_code_is_1_when_a_check_fails(cli, tmp_path):
    # A PATH with python but without git: the git and git-lfs checks fail for real.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    os.symlink(sys.executable, bin_dir / "python")
    assert shutil.which("git", path=str(bin_dir)) is None
    result = cli("doctor", env={"PATH": str(bin_dir)})
    assert result.returncode == 1
    assert "[FAIL] git " in result.stdout and "apt-get install git-lfs" in result.stdout
    assert "not ready" in result.stdout


def test_doctor_reports_deprecated_cache_variable(cli, tmp_path):
    result = cli("doctor", "--json", env={"TRANSFORMERS_CACHE": str(tmp_path), "HF_HUB_CACHE": str(tmp_path / "hub")})
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["cache"]["status"] == "warn"
    assert str(tmp_path / "hub") in checks["cache"]["value"]

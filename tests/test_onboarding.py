"""`sd35fp8 setup` and `sd35fp8 report`, end to end on real sources: a Git LFS repository over file://, the
tiny model, a local folder; each stage's failure with its message and exit code; the report's round trip."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sd35fp8_helpers.onboarding.report import build_report, compare, write_report
from sd35fp8_helpers.onboarding.setup import EXIT_CODES, SetupConfig, image_sha256, run_setup
from sd35fp8_helpers.pipeline.generation import read_png_metadata

FAKE_TOKEN = "hf_sd35fp8OnboardingFakeToken987654321"


def _statuses(result) -> dict[str, str]:
    return {s.stage: s.status for s in result.stages}


def _quiet(config: SetupConfig):
    lines: list[str] = []
    return run_setup(config, echo=lines.append), lines


@pytest.fixture
def lfs_remote(tiny_model_dir, tmp_path) -> str:
    """A real Git LFS repository of the tiny model, reached by a file:// URL (no server needed)."""
    from sd35fp8_helpers.weights.lfs import init_lfs_repo

    return (init_lfs_repo(tiny_model_dir, tmp_path / "remote")).as_uri()


def test_lfs_repo_fresh_run_second_run_corruption_and_resume(lfs_remote, tmp_path):
    config = SetupConfig(lfs_remote, tmp_path / "setup", precision="bf16")

    first, lines = _quiet(config)
    assert first.exit_code == 0, lines
    assert set(_statuses(first).values()) == {"ok"}
    assert all(line.startswith(f"== {i}/7 ") for i, line in enumerate(lines, 1))
    image = tmp_path / "setup" / "smoke.png"
    assert read_png_metadata(image)["model"] == lfs_remote
    digest = image_sha256(image)

    second, lines = _quiet(config)
    assert second.exit_code == 0
    assert _statuses(second) == {"doctor": "ok", "disk": "skipped", "fetch": "skipped", "verify": "skipped",
                                 "load": "skipped", "smoke": "skipped", "summary": "ok"}
    assert "unchanged since verified" in lines[3]

    weight = tmp_path / "setup" / "model" / "transformer" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weight.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte inside a tensor: headers still valid, only the sha256 can tell
    weight.write_bytes(bytes(data))
    third, lines = _quiet(config)
    assert third.exit_code == EXIT_CODES["verify"] == 13
    failed = third.failed
    assert failed.stage == "verify" and "transformer/diffusion_pytorch_model.safetensors: sha256" in failed.detail
    assert f"delete {weight}" in failed.fix
    assert "FAILED" in lines[-1] and "fix:" in lines[-1]

    weight.unlink()  # the fix, as printed
    fourth, lines = _quiet(config)
    assert fourth.exit_code == 0, lines
    assert "restored 1 deleted file" in lines[2]
    assert image_sha256(image) == digest  # same files, same settings: the same pixels


def test_tiny_and_local_folder_sources(tiny_model_dir, tmp_path):
    tiny, _ = _quiet(SetupConfig("tiny", tmp_path / "t", precision="fp8-storage"))
    assert tiny.exit_code == 0 and (tmp_path / "t" / "model" / "model_index.json").is_file()
    assert "FP8 storage" in tiny.stages[4].detail and "→" in tiny.stages[4].detail  # bytes before → after

    local, lines = _quiet(SetupConfig(str(tiny_model_dir), tmp_path / "l", precision="auto"))
    assert local.exit_code == 0, lines
    assert _statuses(local)["disk"] == _statuses(local)["fetch"] == "skipped"
    assert local.model_path == tiny_model_dir and not (tmp_path / "l" / "model").exists()


def test_comfy_single_file_source(tiny_model_dir, tmp_path):
    comfy = pytest.importorskip("sd35fp8_helpers.precision.comfy")
    from sd35fp8_helpers import load_pipeline

    path = comfy.save_comfy_checkpoint(load_pipeline(str(tiny_model_dir), device="cpu"), tmp_path / "sd3_fp8.safetensors")
    result, lines = _quiet(SetupConfig(str(path), tmp_path / "c", base=str(tiny_model_dir)))
    assert result.exit_code == 0, lines
    assert result.source == "comfy-file" and "scales applied" in result.stages[4].detail


def test_doctor_stage_fails_for_fp8_compute_on_cpu_and_for_nonsense(tmp_path):
    result, lines = _quiet(SetupConfig("tiny", tmp_path / "d", precision="fp8-compute"))
    assert result.exit_code == EXIT_CODES["doctor"] == 10
    assert "fp8-compute asked for" in result.failed.detail and "--precision auto" in result.failed.fix
    assert not (tmp_path / "d").exists()  # nothing written before the stage that writes

    result, _ = _quiet(SetupConfig("not a model!", tmp_path / "d"))
    assert result.exit_code == 10 and "is neither 'tiny', an existing folder" in result.failed.detail


def test_disk_stage_refuses_before_downloading(lfs_remote, tmp_path):
    result, _ = _quiet(SetupConfig(lfs_remote, tmp_path / "s", free_bytes=1000))
    assert result.exit_code == EXIT_CODES["disk"] == 11
    assert "GB free" in result.failed.detail or "free at" in result.failed.detail
    pointers = list((tmp_path / "s" / "model").rglob("*.safetensors"))
    assert pointers and all(p.stat().st_size < 200 for p in pointers)  # only pointers: nothing was pulled


def test_fetch_stage_fails_when_the_remote_lost_its_objects(lfs_remote, tmp_path):
    config = SetupConfig(lfs_remote, tmp_path / "s", precision="bf16")
    assert _quiet(config)[0].exit_code == 0
    shutil.rmtree(Path(lfs_remote.removeprefix("file://")) / ".git" / "lfs")  # the server lost the weights …
    shutil.rmtree(tmp_path / "s" / "model" / ".git" / "lfs" / "objects")  # … and the clone's local copy is gone
    (tmp_path / "s" / "model" / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    result, _ = _quiet(config)
    assert result.exit_code == EXIT_CODES["fetch"] == 12
    assert "git lfs pull" in result.failed.detail or "lfs" in result.failed.detail.lower()
    assert result.failed.fix


def test_load_stage_fails_on_a_config_that_does_not_match_its_weights(tiny_model_dir, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, folder)
    cfg = json.loads((folder / "transformer" / "config.json").read_text())
    cfg["num_layers"] = 3  # weights hold 2 layers
    (folder / "transformer" / "config.json").write_text(json.dumps(cfg))
    result, lines = _quiet(SetupConfig(str(folder), tmp_path / "s", precision="bf16"))
    assert result.exit_code == EXIT_CODES["load"] == 14, lines
    assert "sd35fp8 verify" in result.failed.fix
    assert "Traceback" not in "\n".join(lines)


def test_smoke_stage_fails_when_the_image_cannot_be_written(tmp_path):
    (tmp_path / "s" / "smoke.png").mkdir(parents=True)  # a folder where the image should go
    result, _ = _quiet(SetupConfig("tiny", tmp_path / "s", precision="bf16"))
    assert result.exit_code == EXIT_CODES["smoke"] == 15
    assert "writable" in result.failed.fix


def test_dry_run_writes_nothing(lfs_remote, tmp_path):
    for model in (lfs_remote, "tiny"):
        result, lines = _quiet(SetupConfig(model, tmp_path / "dry", dry_run=True))
        assert result.exit_code == 0, lines
        assert not (tmp_path / "dry").exists()
    assert "would clone" in lines[1] or "a few MB" in lines[1]
    git_run, lines = _quiet(SetupConfig(lfs_remote, tmp_path / "dry", dry_run=True))
    assert "5 LFS files" in lines[1] and "would clone" in lines[1]


def test_cli_json_and_exit_code(cli, tmp_path):
    result = cli("setup", "tiny", "--dir", str(tmp_path / "s"), "--precision", "fp8-compute", "--json")
    assert result.returncode == 10
    data = json.loads(result.stdout)
    assert data["stages"][0]["stage"] == "doctor" and data["stages"][0]["status"] == "failed"


def test_report_round_trip_compare_and_no_secrets(cli, tmp_path, monkeypatch):
    assert _quiet(SetupConfig("tiny", tmp_path / "s", precision="bf16"))[0].exit_code == 0
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    result = cli("report", "--dir", str(tmp_path / "s"), "--out", str(tmp_path / "mine"), env={"HF_TOKEN": FAKE_TOKEN})
    assert result.returncode == 0, result.stderr
    mine = json.loads((tmp_path / "mine.json").read_text())
    assert mine["smoke"]["image_sha256"] and mine["model"]["files"] and mine["packages"]["torch"]
    assert "| torch |" in (tmp_path / "mine.md").read_text()
    for text in (result.stdout, result.stderr, (tmp_path / "mine.json").read_text(), (tmp_path / "mine.md").read_text()):
        assert FAKE_TOKEN not in text and FAKE_TOKEN[3:15] not in text

    theirs = json.loads(json.dumps(mine))
    theirs["packages"]["diffusers"] = "0.41.0"
    some_file = next(iter(theirs["model"]["files"]))
    theirs["model"]["files"][some_file] = "0" * 64
    theirs["created"] = "another day"  # not a difference that matters
    write_report(theirs, tmp_path / "theirs")
    diffs = compare(mine, theirs)
    assert [d.key for d in diffs] == ["packages.diffusers", f"model.files.{some_file}"]
    result = cli("report", "--dir", str(tmp_path / "s"), "--compare", str(tmp_path / "theirs.json"))
    assert result.returncode == 1
    assert "packages.diffusers: '0.42.1' here, '0.41.0' there" in result.stdout
    assert compare(mine, build_report(tmp_path / "s")) == []  # the same machine twice: nothing to report


def test_report_without_setup_dir_says_what_to_run(cli, tmp_path):
    result = cli("report", "--dir", str(tmp_path / "nothing"))
    assert result.returncode == 1 and "run `sd35fp8 setup MODEL --dir" in result.stderr


def test_setup_of_the_embedded_scene_model_draws_a_scene_at_its_own_recipe_and_reads_it(tmp_path):
    from sd35fp8_helpers.onboarding.setup import SCENE_SMOKE_PROMPT

    result, lines = _quiet(SetupConfig("scenes", tmp_path / "s", precision="fp8-storage"))
    assert result.exit_code == 0, lines
    meta = read_png_metadata(tmp_path / "s" / "smoke.png")
    assert meta["settings"]["prompt"] == SCENE_SMOKE_PROMPT
    assert (meta["settings"]["steps"], meta["settings"]["height"]) == (16, 128)  # its recipe, not 4 steps
    assert meta["precision"] == "fp8-storage"
    smoke = next(s for s in result.stages if s.stage == "smoke")
    assert "judge: asked large red circle at centre, saw" in smoke.detail

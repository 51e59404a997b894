"""The ``sd35fp8`` command line, run as a real subprocess: tiny, generate, errors as one line + fix."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sd35fp8_helpers.pipeline.generation import read_png_metadata


def test_console_script_is_installed():
    exe = Path(sys.executable).parent / "sd35fp8"
    assert exe.is_file() or shutil.which("sd35fp8"), "pip install -e . should create the sd35fp8 command"
    result = subprocess.run([str(exe) if exe.is_file() else "sd35fp8", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for name in ("doctor", "tiny", "generate", "notebooks"):
        assert name in result.stdout


def test_tiny_then_from_pretrained_generates(cli, tmp_path):
    import torch
    from diffusers import StableDiffusion3Pipeline

    result = cli("tiny", str(tmp_path / "tiny"))
    assert result.returncode == 0, result.stderr
    assert "tiny SD3.5 pipeline at" in result.stdout and "MB" in result.stdout
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path / "tiny")
    image = pipe("a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (128, 128)
    again = cli("tiny", str(tmp_path / "tiny"))
    assert "reused cached copy" in again.stdout


def test_generate_then_reproduce_from_png(cli, tiny_model_dir, tmp_path):
    first = tmp_path / "a.png"
    result = cli("generate", "--model", str(tiny_model_dir), "--prompt", "a red fox", "--seed", "3",
                 "--height", "96", "--width", "128", "--out", str(first))
    assert result.returncode == 0, result.stderr
    meta = read_png_metadata(first)
    assert meta["settings"] == {"prompt": "a red fox", "negative_prompt": "", "seed": 3, "steps": 4,
                                "guidance_scale": 4.5, "height": 96, "width": 128,
                                "lora": "", "lora_scale": 1.0}
    again = tmp_path / "b.png"
    result = cli("generate", "--model", str(tiny_model_dir), "--from-png", str(first), "--out", str(again))
    assert result.returncode == 0, result.stderr
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))


def test_fp8_image_reproduces_from_png_with_its_precision(cli, tiny_model_dir, tmp_path):
    first, again, plain = tmp_path / "fp8.png", tmp_path / "again.png", tmp_path / "bf16.png"
    base = ["generate", "--model", str(tiny_model_dir)]
    assert cli(*base, "--prompt", "a fox", "--precision", "fp8-storage", "--out", str(first)).returncode == 0
    assert read_png_metadata(first)["precision"] == "fp8-storage"
    assert cli(*base, "--from-png", str(first), "--out", str(again)).returncode == 0
    assert cli(*base, "--from-png", str(first), "--precision", "bf16", "--out", str(plain)).returncode == 0
    pixels = lambda p: np.asarray(Image.open(p))
    assert np.array_equal(pixels(first), pixels(again))  # FP8 settings were re-applied
    assert not np.array_equal(pixels(first), pixels(plain))  # and they matter: bf16 differs


@pytest.mark.parametrize("args,needle", [
    (["--prompt", "x", "--height", "100"], "height=100 is not a multiple of 16; nearest valid: 96 or 112"),
    (["--prompt", "x", "--width", "512"], "width=512 is over this model's single-pass limit of 256 px"),
    (["--prompt", ""], "--prompt is required"),
    (["--prompt", "x", "--model", "stabilityai/stable-diffusion-3.5-fp8"], "does not exist"),
    (["--prompt", "x", "--model", "./no/such/folder/"], "is neither 'tiny', an existing folder or .safetensors file, a git URL, nor a hub repo id"),
])
def test_generate_errors_are_one_line_with_exit_1(cli, tiny_model_dir, args, needle):
    if "--model" not in args:
        args = [*args, "--model", str(tiny_model_dir)]
    result = cli("generate", *args)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("sd35fp8 generate: error:")]
    assert len(lines) == 1 and needle in lines[0]
    assert "Traceback" not in result.stderr


def test_a_folder_that_is_not_a_pipeline(cli, tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"")
    result = cli("generate", "--model", str(tmp_path), "--prompt", "x")
    assert result.returncode == 1
    assert "has no model_index.json" in result.stderr and "fix:" in result.stderr


def test_usage_error_exits_2(cli):
    result = cli("no-such-command")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


@pytest.mark.parametrize("kind", ["no metadata", "foreign metadata"])
def test_generate_from_someone_elses_png_is_one_line_not_a_traceback(cli, tmp_path, kind):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if kind == "foreign metadata":
        info.add_text("sd35fp8", "not json at all")
    Image.new("RGB", (8, 8)).save(tmp_path / "theirs.png", pnginfo=info)
    r = cli("generate", "--from-png", str(tmp_path / "theirs.png"))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("sd35fp8 generate: error: png=") and "fix:" in r.stderr


def test_a_closed_pipe_ends_quietly():
    """`sd35fp8 doctor | head -1` used to end with a BrokenPipeError traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "sd35fp8_helpers.cli", "doctor"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the command writes a byte
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert proc.returncode in (0, 1)  # the doctor's own verdict, not a crash


def test_generate_memory_strategies_are_the_ladder_and_tiling_engages_at_native_size(cli, tiny_model_dir, tmp_path):
    """`--memory vae-tiling` used to call diffusers' tiling, which never engaged at the model's native size."""
    base = ["generate", "--model", str(tiny_model_dir), "--prompt", "a red circle", "--steps", "2", "--device", "cpu"]
    plain, tiled = tmp_path / "plain.png", tmp_path / "tiled.png"
    assert cli(*base, "--out", str(plain)).returncode == 0
    r = cli(*base, "--memory", "resident_tiled", "--out", str(tiled))
    assert r.returncode == 0, r.stderr
    assert read_png_metadata(tiled)["memory"] == "resident_tiled"
    assert not np.array_equal(np.asarray(Image.open(plain)), np.asarray(Image.open(tiled)))  # tiles really ran
    again = tmp_path / "again.png"
    assert cli("generate", "--from-png", str(tiled), "--device", "cpu", "--out", str(again)).returncode == 0
    assert np.array_equal(np.asarray(Image.open(tiled)), np.asarray(Image.open(again)))  # strategy re-applied
    r = cli(*base, "--memory", "fp8_model_offload")
    assert r.returncode == 1 and "has no GPU to offload from" in r.stderr and "Traceback" not in r.stderr

"""Folder verification: every bad input gets its exact message; the good folder passes; loading uses it."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest

from sd35fp8_helpers.errors import ModelVerificationFailed
from sd35fp8_helpers.weights.lfs import format_pointer
from sd35fp8_helpers.weights.verify import (
    MANIFEST_NAME,
    InvalidSafetensors,
    VerifyConfig,
    read_safetensors_header,
    verify_model,
    write_manifest,
)

VAE = "vae/diffusion_pytorch_model.safetensors"


@pytest.fixture
def model(tiny_model_dir, tmp_path) -> Path:
    """A private copy of the tiny model to break."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def _safetensors(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _only_problem(folder: Path, **config) -> str:
    report = verify_model(folder, VerifyConfig(**config))
    assert not report.ok and len(report.problems) == 1, report.to_text()
    return str(report.problems[0])


REDOWNLOAD = "delete it and download it again (a cut-off download or a disk error); sd35fp8 download resumes partial files"


def test_good_folder_is_loadable(model, cli):
    report = verify_model(model)
    assert report.ok and report.layout == "diffusers" and len(report.files) == 5
    assert sum(f.tensors for f in report.files) == 356
    result = cli("verify", str(model), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["ok"] is True


def test_pointer_file_is_reported_as_a_pointer(model):
    real = model / VAE
    size = real.stat().st_size
    real.write_text(format_pointer(hashlib.sha256(real.read_bytes()).hexdigest(), size))
    assert _only_problem(model) == (
        f"{VAE}: Git LFS pointer ({real.stat().st_size} bytes), not the weights (real size 355.2 KiB) — fix: this "
        f"folder was copied without its LFS contents: download {VAE} again (sd35fp8 download REPO_ID --include "
        f"'{VAE}'), or re-clone with git-lfs installed")


def test_truncated_safetensors(model):
    real = model / VAE
    data = real.read_bytes()
    real.write_bytes(data[: len(data) // 2])
    (length,) = struct.unpack("<Q", data[:8])
    tensors = {k: v for k, v in json.loads(data[8:8 + length]).items() if k != "__metadata__"}
    need = max(v["data_offsets"][1] for v in tensors.values())
    holds = len(data) // 2 - 8 - length
    beyond = [k for k, v in tensors.items() if v["data_offsets"][1] > holds]
    assert _only_problem(model) == (
        f"{VAE}: truncated: tensors need {need} bytes of data, the file holds {holds} ({len(beyond)} of "
        f"{len(tensors)} tensors, e.g. {beyond[0]!r}, lie beyond the end) — fix: {REDOWNLOAD}")


@pytest.mark.parametrize("content, message", [
    (b"\x00\x01", "truncated: 2 bytes, shorter than the 8-byte header length"),
    (struct.pack("<Q", 1000) + b"{}" + b" " * 8,
     "header length 1000 bytes is larger than the file (18 bytes): truncated, or not a safetensors file"),
    (struct.pack("<Q", 5) + b"nope!", "header is not valid JSON (JSONDecodeError: Expecting value: line 1 column 1 "
                                      "(char 0))"),
    (struct.pack("<Q", 2) + b"[]", "header is JSON but not an object of tensors"),
])
def test_broken_headers(model, content, message):
    (model / VAE).write_bytes(content)
    assert _only_problem(model) == f"{VAE}: {message} — fix: {REDOWNLOAD}"


@pytest.mark.parametrize("entry, data, message", [
    ({"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, b"\0" * 8,
     "truncated: tensors need 16 bytes of data, the file holds 8 (1 of 1 tensors, e.g. 'w', lie beyond the end)"),
    ({"dtype": "F7", "shape": [4], "data_offsets": [0, 4]}, b"\0" * 4, "tensor 'w' has unknown dtype 'F7'"),
    ({"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}, b"\0" * 8,
     "tensor 'w' is [4] F32 = 16 bytes, but its data_offsets span 8"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, b"\0" * 12,
     "4 bytes after the last tensor: safetensors refuses such files (MetadataIncompleteBuffer)"),
    ({"dtype": "F32", "shape": [2]}, b"\0" * 8, "tensor 'w': entry lacks dtype/shape/data_offsets"),
])
def test_bad_tensor_entries(model, entry, data, message):
    _safetensors(model / VAE, {"w": entry}, data)
    assert _only_problem(model) == f"{VAE}: {message} — fix: {REDOWNLOAD}"


def test_fp8_dtypes_are_known(tmp_path):
    header = {"__metadata__": {"format": "pt"},
              "a": {"dtype": "F8_E4M3", "shape": [2, 3], "data_offsets": [0, 6]},
              "b": {"dtype": "F8_E5M2", "shape": [2], "data_offsets": [6, 8]},
              "scale": {"dtype": "F32", "shape": [], "data_offsets": [8, 12]}}
    path = _safetensors(tmp_path / "fp8.safetensors", header, b"\0" * 12)
    assert set(read_safetensors_header(path)) == set(header)
    report = verify_model(tmp_path)
    assert report.ok and report.layout == "files" and report.files[0].dtypes == ("F32", "F8_E4M3", "F8_E5M2")
    import safetensors.torch  # the real library agrees

    assert set(safetensors.torch.load_file(path)) == {"a", "b", "scale"}


def test_wrong_sha256(model):
    good = {VAE: hashlib.sha256((model / VAE).read_bytes()).hexdigest()}
    write_manifest(model, good)
    report = verify_model(model)
    assert report.ok and report.hashed == 1 and (model / MANIFEST_NAME).read_text() == f"{good[VAE]}  {VAE}\n"
    write_manifest(model, {VAE: "0" * 64})
    assert _only_problem(model) == (
        f"{VAE}: sha256 {good[VAE][:12]}… differs from the expected 000000000000…: the file is corrupt or was "
        "changed — fix: delete it and download it again (git lfs pull, or sd35fp8 download)")
    assert verify_model(model, VerifyConfig(check_hashes=False)).ok  # load_pipeline's fast path skips hashing


def test_missing_component_folder(model):
    shutil.rmtree(model / "vae")
    assert _only_problem(model) == (
        "vae/: component folder named in model_index.json (AutoencoderKL) is missing — fix: download it again "
        "(e.g. sd35fp8 download REPO_ID --include 'vae/*'), or git lfs pull")


def test_missing_config(model):
    (model / "transformer/config.json").unlink()
    assert _only_problem(model) == (
        "transformer/: no config.json for SD3Transformer2DModel — fix: download it again "
        "(e.g. sd35fp8 download REPO_ID --include 'transformer/*'), or git lfs pull")


class _Boom:
    def __reduce__(self):  # unpickling this would create a file
        return (Path.touch, (Path("/tmp/sd35fp8-pickle-was-loaded"),))


def test_pickle_weights_are_flagged_and_never_loaded(model):
    import pickle

    marker = Path("/tmp/sd35fp8-pickle-was-loaded")
    marker.unlink(missing_ok=True)
    (model / "vae/diffusion_pytorch_model.bin").write_bytes(pickle.dumps(_Boom()))
    report = verify_model(model)  # beside safetensors: loadable (we load safetensors only), but noted
    assert report.ok and report.notes == ["vae/diffusion_pytorch_model.bin: pickle weights, never loaded "
                                          "(sd35fp8 loads safetensors only)"]
    (model / VAE).unlink()
    assert _only_problem(model) == (
        "vae/diffusion_pytorch_model.bin: only pickle weights: loading them can run arbitrary code, so sd35fp8 "
        "never loads them — fix: download vae/*.safetensors instead (most hub repos have both), or convert the "
        "pickle with a tool you trust on a machine you trust")
    assert not marker.exists()


def test_not_a_model_folder(tmp_path):
    assert _only_problem(tmp_path) == (
        "model_index.json: no model_index.json and no weight files: not a model folder — fix: point at the folder "
        "that holds model_index.json, or download one: sd35fp8 download REPO_ID")


def test_cli_prints_one_line_per_problem_and_exits_1(model, cli):
    shutil.rmtree(model / "vae")
    (model / "transformer/diffusion_pytorch_model.safetensors").write_text(format_pointer("a" * 64, 403000))
    result = cli("verify", str(model))
    assert result.returncode == 1
    lines = result.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["transformer/diffusion_pytorch_model.safetensors", "vae/",
                                                      "NOT LOADABLE"]
    assert lines[-1] == f"NOT LOADABLE: {model} has 2 problems"


def test_load_pipeline_verifies_first(model):
    """safetensors on a pointer file: "header too large"; load_pipeline: our message, before any load."""
    import safetensors.torch
    from safetensors import SafetensorError

    from sd35fp8_helpers import load_pipeline

    real = model / VAE
    real.write_text(format_pointer(hashlib.sha256(real.read_bytes()).hexdigest(), real.stat().st_size))
    with pytest.raises(SafetensorError, match="header too large"):
        safetensors.torch.load_file(real)
    with pytest.raises(ModelVerificationFailed) as exc:
        load_pipeline(str(model), device="cpu")
    assert exc.value.one_line.startswith(f"{model} cannot be loaded (1 problem): {VAE}: Git LFS pointer (")
    assert exc.value.one_line.endswith(f"fix: fix the files above, then check with: sd35fp8 verify {model}")
    assert isinstance(exc.value, ValueError) and exc.value.problems[0].kind == "pointer"


def test_invalid_safetensors_is_a_value_error():
    assert issubclass(InvalidSafetensors, ValueError)


def test_single_file_and_missing_path(model, tmp_path):
    report = verify_model(model / VAE)  # one checkpoint file, checked alone
    assert report.ok and report.layout == "files" and [f.file for f in report.files] == [VAE.split("/")[1]]
    assert _only_problem(tmp_path / "nowhere") == (
        f"{tmp_path / 'nowhere'}: does not exist — fix: check the path, or download the model: "
        "sd35fp8 download REPO_ID")

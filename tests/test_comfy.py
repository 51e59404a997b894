"""Comfy-Org "scaled FP8" single files: built from the tiny model in that exact format, then loaded back."""

from __future__ import annotations

import pytest
import torch
from latents import rel_error, tiny_latents

from sd35fp8_helpers.errors import ComfyFormatError
from sd35fp8_helpers.precision.comfy import (
    SCALED_FP8_MARKER,
    TRANSFORMER_PREFIX,
    _diffusers_to_original,
    inspect_comfy_file,
    load_comfy_pipeline,
    save_comfy_checkpoint,
)
from sd35fp8_helpers.precision.storage import is_fp8_storage


@pytest.fixture(scope="module")
def reference(tiny_pipe):
    return tiny_latents(tiny_pipe)


@pytest.fixture(scope="module")
def comfy_files(tiny_pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("comfy")
    return (save_comfy_checkpoint(tiny_pipe, folder / "tiny_fp8_scaled.safetensors"),
            save_comfy_checkpoint(tiny_pipe, folder / "tiny_incl_clips_t5xxlfp8scaled.safetensors", text_encoders=True))


def test_inverse_key_mapping_matches_diffusers_converter(tiny_pipe):
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    sd = tiny_pipe.transformer.state_dict()
    original = _diffusers_to_original(sd, tiny_pipe.transformer.config.num_layers)
    assert "joint_blocks.0.x_block.attn.qkv.weight" in original and "joint_blocks.0.x_block.attn2.qkv.weight" in original
    back = convert_sd3_transformer_checkpoint_to_diffusers(dict(original))
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


def test_file_is_in_comfy_scaled_fp8_layout(comfy_files):
    from safetensors import safe_open

    with safe_open(str(comfy_files[0]), "pt") as f:
        keys = set(f.keys())
        assert f.get_slice(f"{TRANSFORMER_PREFIX}joint_blocks.0.x_block.attn.qkv.weight").get_dtype() == "F8_E4M3"
        scale = f.get_tensor(f"{TRANSFORMER_PREFIX}joint_blocks.0.x_block.attn.qkv.scale_weight")
    assert scale.dtype == torch.float32 and scale.ndim == 0
    assert f"{TRANSFORMER_PREFIX}{SCALED_FP8_MARKER}" in keys
    assert f"{TRANSFORMER_PREFIX}joint_blocks.0.x_block.attn.qkv.scale_input" in keys
    info = inspect_comfy_file(comfy_files[1])
    assert set(info.components) == {"transformer", "text_encoder", "text_encoder_2", "text_encoder_3"}
    assert info.scaled == {"transformer": "F8_E4M3", "text_encoder_3": "F8_E4M3"}
    assert info.scaled_layers == 19 + 14 and info.has_scale_input


def test_transformer_only_file_loads_close_and_the_no_scales_control_is_far(comfy_files, reference):
    pipe = load_comfy_pipeline(comfy_files[0], base="tiny", device="cpu", dtype=torch.float32)
    tr = pipe.transformer
    for name in ("to_q", "to_k", "to_v"):  # qkv was split; its one scale went to all three
        layer = getattr(tr.transformer_blocks[0].attn, name)
        assert is_fp8_storage(layer) and layer.scale_weight.ndim == 0
        assert layer.scale_weight == tr.transformer_blocks[0].attn.to_q.scale_weight
    assert hasattr(tr.transformer_blocks[0].attn.to_q, "scale_input")
    assert not is_fp8_storage(tr.proj_out)  # stored bf16 in the file, loaded as a plain Linear
    assert rel_error(tiny_latents(pipe), reference) < 0.02
    ignored = load_comfy_pipeline(comfy_files[0], base="tiny", device="cpu", dtype=torch.float32, ignore_scales=True)
    assert rel_error(tiny_latents(ignored), reference) > 0.5  # what from_single_file does: far off, no error


def test_all_in_one_file_brings_its_text_encoders(comfy_files, reference, tiny_pipe):
    pipe = load_comfy_pipeline(comfy_files[1], base="tiny", device="cpu", dtype=torch.float32)
    t5 = pipe.text_encoder_3
    assert is_fp8_storage(t5.encoder.block[0].layer[0].SelfAttention.q)
    assert t5.encoder.embed_tokens.weight.data_ptr() == t5.shared.weight.data_ptr()  # tied again
    clip_g = tiny_pipe.text_encoder_2.text_projection.weight
    assert torch.allclose(pipe.text_encoder_2.text_projection.weight, clip_g.to(torch.bfloat16).float())
    assert rel_error(tiny_latents(pipe), reference) < 0.03
    report = pipe.sd35fp8_fp8
    assert {c.name: c.converted for c in report.components}["text_encoder_3"] == 14


def test_files_that_are_not_comfy_sd3_are_refused(tmp_path, tiny_model_dir):
    with pytest.raises(ComfyFormatError, match="no such file"):
        inspect_comfy_file(tmp_path / "missing.safetensors")
    pointer = tmp_path / "sd3.5_large_fp8_scaled.safetensors"
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 14900000000\n")
    with pytest.raises(ComfyFormatError, match=r"(?s)not a readable safetensors file .*header too large.*git lfs pull") as err:
        inspect_comfy_file(pointer)
    assert err.value.file == pointer
    diffusers_file = tiny_model_dir / "transformer" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(ComfyFormatError, match=r"has no model\.diffusion_model\.joint_blocks\.\* keys"):
        load_comfy_pipeline(diffusers_file, base="tiny", device="cpu")


def test_cli_comfy_inspect(cli, comfy_files):
    proc = cli("comfy-inspect", str(comfy_files[1]))
    assert proc.returncode == 0, proc.stderr
    assert "text_encoder_3 (36 tensors, scaled F8_E4M3)" in proc.stdout and "33 layers with scale_weight" in proc.stdout
    bad = cli("comfy-inspect", "nope.safetensors")
    assert bad.returncode == 1 and "error: nope.safetensors: no such file" in bad.stderr


# --- issue 12: refuse scale-less "scaled" files; a hub base fetches only what the file lacks; infer the base --

def _without_scale_weights(src, dst):
    from safetensors.torch import load_file, save_file

    tensors = {k: v for k, v in load_file(str(src)).items() if not k.endswith(".scale_weight")}
    save_file(tensors, str(dst))
    return dst


def test_a_scaled_marker_without_scale_weights_is_refused_naming_the_file(comfy_files, tmp_path, reference, cli):
    broken = _without_scale_weights(comfy_files[0], tmp_path / "sd3.5_tiny_fp8_scaled.safetensors")
    info = inspect_comfy_file(broken)
    assert info.scaled == {"transformer": "F8_E4M3"} and len(info.unscaled["transformer"]) == info.fp8_weights[
        "transformer"] == 19
    with pytest.raises(ComfyFormatError, match=r"(?s)sd3\.5_tiny_fp8_scaled\.safetensors: marks transformer as scaled "
                                               r"FP8 .* 19 of its 19 float8 weights have no scale_weight.*download the "
                                               r"file again") as err:
        load_comfy_pipeline(broken, device="cpu", dtype=torch.float32)
    assert err.value.file == broken
    # What loading it anyway gives: the damage the refusal prevents (the measured figure in the message).
    damaged = load_comfy_pipeline(broken, device="cpu", dtype=torch.float32, ignore_scales=True)
    assert rel_error(tiny_latents(damaged), reference) > 0.5
    proc = cli("comfy-inspect", str(broken))
    assert proc.returncode == 0 and "WARNING: transformer is marked scaled FP8 but 19 float8 weights have no" in proc.stdout


def _sparse_safetensors(path, shapes: dict[str, list[int]]):
    """A valid safetensors file with these tensor shapes (bf16 zeros), written sparse: a real-size header
    (SD3.5 Large/Medium shapes) without gigabytes on disk. Only its header is read by the code under test."""
    import json
    import math
    import struct

    header, offset = {}, 0
    for key, shape in shapes.items():
        size = 2 * math.prod(shape)
        header[key] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return path


def _sd3_header(path, *, layers: int, hidden: int, pos: int):
    p = TRANSFORMER_PREFIX
    return _sparse_safetensors(path, {
        f"{p}pos_embed": [1, pos * pos, hidden], f"{p}x_embedder.proj.weight": [hidden, 16, 2, 2],
        f"{p}joint_blocks.0.x_block.attn.qkv.weight": [3 * hidden, hidden],
        f"{p}joint_blocks.0.context_block.adaLN_modulation.1.bias": [6 * hidden],
        f"{p}joint_blocks.{layers - 1}.x_block.mlp.fc1.weight": [4 * hidden, hidden]})


def test_the_base_architecture_is_inferred_from_the_file(tmp_path, comfy_files, tiny_model_dir):
    from sd35fp8_helpers.errors import HubOffline

    large = inspect_comfy_file(_sd3_header(tmp_path / "large.safetensors", layers=38, hidden=2432, pos=192))
    medium = inspect_comfy_file(_sd3_header(tmp_path / "medium.safetensors", layers=24, hidden=1536, pos=384))
    odd = _sd3_header(tmp_path / "odd.safetensors", layers=12, hidden=768, pos=64)
    assert (large.architecture, large.base) == ("large", "stabilityai/stable-diffusion-3.5-large")
    assert (medium.architecture, medium.base) == ("medium", "stabilityai/stable-diffusion-3.5-medium")
    assert "architecture: SD3.5 Large (base stabilityai/stable-diffusion-3.5-large)" in str(large)
    assert inspect_comfy_file(comfy_files[0]).base == "tiny"
    # No base given: the Medium repo is asked for (offline here, so the hub error names it) — never tiny.
    with pytest.raises(HubOffline, match="stabilityai/stable-diffusion-3.5-medium"):
        load_comfy_pipeline(medium.path, device="cpu")
    with pytest.raises(ComfyFormatError, match=r"(?s)odd\.safetensors: is an SD3 checkpoint of no known SD3\.5 "
                                               r"architecture \(12 joint blocks, hidden size 768\).*pass base="):
        load_comfy_pipeline(odd, device="cpu")
    # A base of another architecture is refused from the header, before any tensor is read.
    with pytest.raises(ComfyFormatError, match=r"(?s)large\.safetensors: does not match its base .*num_layers 38 in "
                                               r"the file vs 2.*leave base out \(inferred from the file: "
                                               r"stabilityai/stable-diffusion-3\.5-large\)"):
        load_comfy_pipeline(large.path, base=str(tiny_model_dir), device="cpu")


HUB_DRIVER = r"""
import sys, torch
sys.path.insert(0, "tests")
from latents import tiny_latents
from sd35fp8_helpers.precision.comfy import load_comfy_pipeline
pipe = load_comfy_pipeline(sys.argv[1], base="test/tiny", device="cpu", dtype=torch.float32)
torch.save(tiny_latents(pipe), sys.argv[2])
"""


def test_a_hub_base_downloads_only_what_the_file_lacks(comfy_files, tiny_model_dir, tmp_path, reference):
    """Through the real hub client against a local server that answers like the hub (tests/fake_hub.py)."""
    import os
    import subprocess
    import sys

    from conftest import REPO
    from fake_hub import FakeHub, repo_files

    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    env.pop("HF_TOKEN", None)
    fetched = {}
    with FakeHub(repo_files(tiny_model_dir)) as hub:
        env["HF_ENDPOINT"] = hub.url
        for name, file in (("transformer-only", comfy_files[0]), ("all-in-one", comfy_files[1])):
            seen = len(hub.requests)
            env["HF_HOME"] = str(tmp_path / f"hf-{name}")  # an empty cache each: every file is fetched
            out = tmp_path / f"{name}.pt"
            proc = subprocess.run([sys.executable, "-c", HUB_DRIVER, str(file), str(out)], capture_output=True,
                                  text=True, env=env, cwd=REPO, timeout=300)
            assert proc.returncode == 0, proc.stderr[-3000:]
            fetched[name] = {p.split("/resolve/", 1)[1].split("/", 1)[1] for method, p, _ in hub.requests[seen:]
                             if method == "GET" and "/resolve/" in p and p.endswith(".safetensors")}
            assert rel_error(torch.load(out), reference) < 0.03
    assert fetched["transformer-only"] == {"vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                                           "text_encoder_2/model.safetensors", "text_encoder_3/model.safetensors"}
    assert fetched["all-in-one"] == {"vae/diffusion_pytorch_model.safetensors"}  # the file brings the rest


def test_compute_mode_is_refused_on_cpu_before_reading_the_file(comfy_files):
    from sd35fp8_helpers.errors import FP8ComputeUnavailable

    with pytest.raises(FP8ComputeUnavailable, match="not possible on cpu"):
        load_comfy_pipeline(comfy_files[1], base="tiny", device="cpu", mode="compute")


def test_report_after_a_comfy_load_and_a_second_quantize_names_t5_fp8(comfy_files):
    """What a compute-mode Comfy load does after loading — quantize_ again with text_encoder_3=False — run in
    storage mode (CPU): T5, stored FP8 in the file, must stay reported as FP8 storage."""
    from sd35fp8_helpers.precision.quantize import FP8Config, quantize_

    pipe = load_comfy_pipeline(comfy_files[1], base="tiny", device="cpu", dtype=torch.float32)
    loaded = {c.name: c for c in pipe.sd35fp8_fp8.components}
    report = quantize_(pipe, FP8Config(mode="storage", text_encoder_3=False))
    rows = {c.name: c for c in report.components}
    assert (rows["text_encoder_3"].how, rows["text_encoder_3"].converted) == ("fp8 storage", 14)
    assert rows["text_encoder_3"].before == loaded["text_encoder_3"].before
    assert rows["transformer"].before == loaded["transformer"].before  # unquantised size, not the stored one

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

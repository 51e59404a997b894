"""The embedded tiny model: real SD3.5 classes, diffusers layout, deterministic, cached, written atomically."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file

from sd35fp8_helpers.pipeline.tiny import TINY_MARKER, build_tiny_pipeline, save_tiny_model

COMPONENTS = ["transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"]


def test_layout_is_standard_diffusers(tiny_model_dir):
    index = json.loads((tiny_model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    for name in COMPONENTS:
        assert (tiny_model_dir / name / "config.json").is_file(), name
        assert list((tiny_model_dir / name).glob("*.safetensors")), f"{name} has no safetensors"
    weights = [p.suffix for p in tiny_model_dir.rglob("*") if p.suffix in {".bin", ".pt", ".ckpt", ".pth"}]
    assert weights == []  # safetensors only: nothing that unpickles
    assert (tiny_model_dir / TINY_MARKER).is_file()


def test_from_pretrained_loads_and_generates(tiny_model_dir):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_model_dir)
    image = pipe("a cat", num_inference_steps=2, height=128, width=128,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (128, 128)
    assert list(pipe.transformer.config.dual_attention_layers) == [0]
    assert pipe.vae.config.latent_channels == 16


def test_tokenizers_behave_like_clip_and_t5(tiny_pipe):
    clip = tiny_pipe.tokenizer("a photo of a cat", padding="max_length", max_length=77)
    assert len(clip.input_ids) == 77
    assert clip.input_ids[0] == tiny_pipe.tokenizer.bos_token_id
    assert tiny_pipe.tokenizer.model_max_length == 77
    ids = tiny_pipe.tokenizer("a photo of a cat").input_ids
    assert tiny_pipe.tokenizer.unk_token_id not in ids[1:-1]  # corpus words are in the vocabulary
    t5 = tiny_pipe.tokenizer_3("a photo of a cat").input_ids
    assert t5[-1] == tiny_pipe.tokenizer_3.eos_token_id


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    a = save_tiny_model(tmp_path / "a", seed=5)
    b = save_tiny_model(tmp_path / "b", seed=5)
    c = save_tiny_model(tmp_path / "c", seed=6)
    wa, wb, wc = (load_file(next((m.path / "transformer").glob("*.safetensors"))) for m in (a, b, c))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)
    assert json.loads((a.path / TINY_MARKER).read_text())["seed"] == 5


def test_two_processes_build_byte_identical_folders(cli, tmp_path):
    """Seed for seed, every file — weights, configs, tokenizers — is identical across processes."""
    for name in ("p1", "p2"):
        assert cli("tiny", str(tmp_path / name), "--seed", "3").returncode == 0
    digest = lambda root: {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                           for p in sorted(root.rglob("*")) if p.is_file()}
    first, second = digest(tmp_path / "p1"), digest(tmp_path / "p2")
    assert "tokenizer/tokenizer.json" in first and "tokenizer_3/tokenizer.json" in first
    assert first == second


def test_build_leaves_global_rng_untouched():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_pipeline(seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_second_save_reuses_the_folder(tmp_path):
    first = save_tiny_model(tmp_path / "m")
    second = save_tiny_model(tmp_path / "m")
    assert not first.cached and second.cached
    assert first.size_bytes == second.size_bytes
    assert first.size_bytes < 5_000_000  # a few MB: fits in any CI cache


def test_refuses_to_overwrite_an_unrelated_folder(tmp_path):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a tiny model folder"):
        save_tiny_model(target)
    assert (target / "notes.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["precious"]  # no staging folder left behind


def test_a_failed_build_leaves_nothing_that_looks_complete(tmp_path):
    # A seed torch rejects makes the real build fail half-way (tokenizers trained, weights not yet made);
    # the target must not appear and the staging folder must be gone.
    with pytest.raises(ValueError, match="Overflow"):
        save_tiny_model(tmp_path / "m", seed=2**70)
    assert list(tmp_path.iterdir()) == []

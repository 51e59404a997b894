"""FP8 storage/compute on the tiny pipeline: policies, bytes, errors, T5, and FP8 checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from latents import rel_error, tiny_latents

from sd35fp8_helpers import load_pipeline
from sd35fp8_helpers.errors import FP8ComputeUnavailable, Sd35fp8Error
from sd35fp8_helpers.precision.checkpoint import FP8_MANIFEST, save_quantized
from sd35fp8_helpers.precision.policies import POLICIES
from sd35fp8_helpers.precision.quantize import FP8Config, module_bytes, quantize_
from sd35fp8_helpers.precision.storage import is_fp8_storage, quantize_tensor


@pytest.fixture(scope="module")
def reference(tiny_pipe):
    return tiny_latents(tiny_pipe)


@pytest.fixture(scope="module")
def quantized(tiny_model_dir):
    """(pipe, report): the tiny pipeline in FP8 storage, all-linear, T5 included (not shared outside here)."""
    pipe = load_pipeline(str(tiny_model_dir), device="cpu")
    return pipe, quantize_(pipe, FP8Config(mode="auto"))


def test_policies_select_the_intended_linears(tiny_pipe):
    tr = tiny_pipe.transformer
    chosen = {name: {fqn for fqn, m in tr.named_modules() if policy(m, fqn)} for name, policy in POLICIES.items()}
    linears = {fqn for fqn, m in tr.named_modules() if type(m) is torch.nn.Linear}
    assert len(linears) == 36
    # all-linear: everything but the 4 time/pooled-text embedding Linears and proj_out — AdaLN included.
    assert len(chosen["all-linear"]) == 31
    assert {"transformer_blocks.0.norm1.linear", "transformer_blocks.1.norm1_context.linear",
            "norm_out.linear", "context_embedder"} <= chosen["all-linear"]
    assert not {"proj_out", "time_text_embed.timestep_embedder.linear_1"} & chosen["all-linear"]
    # hybrid: feed-forward (6) + attention outputs (4); no q/k/v, no AdaLN.
    assert len(chosen["hybrid"]) == 10
    assert all(".ff" in f or "to_out" in f or "to_add_out" in f for f in chosen["hybrid"])
    # diffusers-default: its "norm" pattern keeps the 5 AdaLN Linears in bf16, but converts time embeddings.
    assert len(chosen["diffusers-default"]) == 30
    assert "transformer_blocks.0.norm1.linear" not in chosen["diffusers-default"]
    assert "time_text_embed.timestep_embedder.linear_1" in chosen["diffusers-default"]


def test_bad_config_values_are_named():
    with pytest.raises(Sd35fp8Error, match=r"(?s)unknown FP8 policy .all..*all-linear, hybrid, diffusers-default"):
        FP8Config(policy="all")
    with pytest.raises(Sd35fp8Error, match=r"(?s)mode=.fast. is not a mode.*'auto', 'storage' or 'compute'"):
        FP8Config(mode="fast")


def test_scales_keep_small_weights_that_a_plain_cast_loses():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * 0.002
    q, scale = quantize_tensor(w)
    scaled_err = rel_error(q.float() * scale, w)
    plain = w.to(torch.float8_e4m3fn).float()
    assert scaled_err < 0.03 and rel_error(plain, w) > 0.2  # 2.6% vs 28%: below 2^-6 only subnormals are left
    assert (plain == 0).float().mean() > 0.3  # and a third of the weights flush to zero
    assert q.float().abs().max() == 448  # with the scale, the largest weight uses e4m3's whole range


def test_storage_halves_linear_weight_bytes_and_reports_it(tiny_model_dir):
    pipe = load_pipeline(str(tiny_model_dir), device="cpu", dtype=torch.bfloat16)
    tr = pipe.transformer
    names = [f for f, m in tr.named_modules() if POLICIES["all-linear"](m, f)]
    before = sum(tr.get_submodule(f).weight.numel() * 2 for f in names)
    report = quantize_(pipe, FP8Config(mode="storage", text_encoder_3=False))
    layers = [tr.get_submodule(f) for f in names]
    assert all(is_fp8_storage(m) and m.weight.dtype == torch.float8_e4m3fn for m in layers)
    assert sum(m.weight.numel() * m.weight.element_size() for m in layers) * 2 == before  # payload exactly halves
    assert report.mode == "storage" and report.converted == 31
    row = next(c for c in report.components if c.name == "transformer")
    assert row.after < 0.7 * row.before  # whole transformer, incl. per-row scales and bf16 norms/embeddings
    assert "fp8 storage" in str(report) and "<table>" in report._repr_html_()


def test_auto_picks_storage_on_cpu_and_says_why(quantized, reference):
    pipe, report = quantized
    assert report.mode == "storage"
    assert report.reason.startswith("auto chose storage: cpu has no float8 tensor cores")
    assert 0 < rel_error(tiny_latents(pipe), reference) < 0.05  # changed (FP8 is lossy), but close


def test_compute_refuses_on_cpu_naming_the_device(tiny_model_dir):
    pipe = load_pipeline(str(tiny_model_dir), device="cpu")
    with pytest.raises(FP8ComputeUnavailable, match=r"not possible on cpu: .*capability >= 8\.9") as err:
        quantize_(pipe, FP8Config(mode="compute"))
    assert err.value.device == "cpu" and 'mode="storage"' in err.value.fix
    assert not any(is_fp8_storage(m) for m in pipe.transformer.modules())  # nothing half-converted


def test_t5_in_fp8_storage_runs_and_stays_close(quantized, tiny_pipe):
    pipe, report = quantized
    t5 = pipe.text_encoder_3
    assert is_fp8_storage(t5.encoder.block[0].layer[1].DenseReluDense.wo)  # wo too: the FF is patched
    assert t5.shared.weight.dtype == torch.float32  # embeddings stay
    ids = pipe.tokenizer_3("a red fox in the snow", return_tensors="pt").input_ids
    with torch.no_grad():
        out = t5(ids).last_hidden_state
        ref = tiny_pipe.text_encoder_3(ids).last_hidden_state
    assert out.dtype == torch.float32 and 0 < rel_error(out, ref) < 0.05
    t5_row = next(c for c in report.components if c.name == "text_encoder_3")
    assert t5_row.converted == 14 and t5_row.after < t5_row.before


def test_to_dtype_keeps_fp8_bytes(tiny_model_dir):
    pipe = load_pipeline(str(tiny_model_dir), device="cpu")
    quantize_(pipe, FP8Config(mode="storage", text_encoder_3=False))
    before = module_bytes(pipe.transformer)
    pipe.transformer.to(torch.bfloat16)
    assert pipe.transformer.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    assert module_bytes(pipe.transformer) < before  # bias/norms went to bf16, FP8 stayed FP8


def test_save_and_reload_is_bit_identical(quantized, tmp_path):
    from safetensors import safe_open

    pipe, _ = quantized
    out = save_quantized(pipe, tmp_path / "fp8")
    manifest = json.loads((out / FP8_MANIFEST).read_text())
    assert manifest["policy"] == "all-linear" and len(manifest["layers"]["transformer"]) == 31
    with safe_open(str(out / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_slice("transformer_blocks.0.attn.to_q.weight").get_dtype() == "F8_E4M3"
        assert f.get_slice("transformer_blocks.0.attn.to_q.scale_weight").get_dtype() == "F32"
    again = load_pipeline(str(out), device="cpu")
    assert is_fp8_storage(again.transformer.transformer_blocks[0].attn.to_q)
    assert again.sd35fp8_fp8.reason == "loaded from an FP8 checkpoint"
    assert torch.equal(tiny_latents(again), tiny_latents(pipe))


def test_save_refuses_an_unquantised_pipeline(tiny_pipe, tmp_path):
    with pytest.raises(Sd35fp8Error, match=r"only a pipeline quantised in FP8 \*storage\* mode"):
        save_quantized(tiny_pipe, tmp_path / "x")


def test_cli_quantize_writes_a_loadable_fp8_folder(cli, tmp_path):
    proc = cli("quantize", "tiny", str(tmp_path / "q"), "--policy", "hybrid", "--no-t5")
    assert proc.returncode == 0, proc.stderr
    assert "FP8 storage (policy hybrid" in proc.stdout
    manifest = json.loads((tmp_path / "q" / FP8_MANIFEST).read_text())
    assert manifest["policy"] == "hybrid" and set(manifest["layers"]) == {"transformer"}
    bad = cli("quantize", "tiny", str(tmp_path / "r"), "--policy", "everything")
    assert bad.returncode == 2 and "invalid choice: 'everything'" in bad.stderr


def test_real_size_fp8_bytes_meet_the_targets():
    from sd35fp8_helpers.benchmarks.fp8 import real_size_bytes

    sizes = real_size_bytes("large")  # exact byte counts on the meta device: no memory needed
    large = sizes["transformer all-linear"]
    assert large["bf16_gib"] > 15 and large["fp8_gib"] <= 8.0
    assert sizes["transformer diffusers-default"]["fp8_gib"] > 10  # its "norm" skip keeps AdaLN bf16
    t5 = sizes["text_encoder_3 (T5-XXL)"]
    assert t5["bf16_gib"] > 8.8 and t5["fp8_gib"] <= 4.7 and t5["layers"] == 24 * 7


# --- issue 12: checkpoints are never half-written, and never load unscaled ------------------------------

def _share_memory(pipe) -> None:
    """Make two layers share one float8 buffer (as tied weights do): safetensors refuses to write that, so the
    save fails after diffusers has already written the text encoders — a real failure, midway."""
    attn = pipe.transformer.transformer_blocks[0].attn
    attn.to_k.weight = attn.to_q.weight[:, :]


def test_a_failed_save_leaves_nothing_half_written(tiny_model_dir, quantized, tmp_path):
    from sd35fp8_helpers.errors import FP8CheckpointError

    fresh = tmp_path / "fresh"
    pipe = load_pipeline(str(tiny_model_dir), device="cpu")
    quantize_(pipe, FP8Config(mode="storage"))
    _share_memory(pipe)
    with pytest.raises(FP8CheckpointError, match=r"(?s)could not be written \(RuntimeError: .*share memory.*"
                                                 r"nothing was half-written: the folder was not created") as err:
        save_quantized(pipe, fresh)
    assert err.value.folder == fresh.absolute() and "save again" in err.value.fix
    assert not fresh.exists() and list(tmp_path.iterdir()) == []  # no partial folder left beside it either
    # Over an existing checkpoint: the failed save leaves the previous one whole and loadable.
    good, _ = quantized
    save_quantized(good, tmp_path / "ckpt")
    before = tiny_latents(load_pipeline(str(tmp_path / "ckpt"), device="cpu"))
    with pytest.raises(FP8CheckpointError, match="still holds the previous checkpoint"):
        save_quantized(pipe, tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert torch.equal(tiny_latents(load_pipeline(str(tmp_path / "ckpt"), device="cpu")), before)


def test_save_refuses_to_replace_a_folder_that_is_not_a_checkpoint(quantized, tmp_path):
    from sd35fp8_helpers.errors import FP8CheckpointError

    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.png").write_bytes(b"\x89PNG")
    with pytest.raises(FP8CheckpointError, match="non-empty folder that is not an FP8 checkpoint"):
        save_quantized(quantized[0], folder)
    assert [p.name for p in folder.iterdir()] == ["holiday.png"]  # nothing lost


def test_float8_folder_without_manifest_is_refused_naming_folder_and_fix(quantized, tmp_path):
    import shutil

    from sd35fp8_helpers.errors import FP8CheckpointError

    out = save_quantized(quantized[0], tmp_path / "fp8")
    cut = tmp_path / "cut"
    shutil.copytree(out, cut)
    (cut / FP8_MANIFEST).unlink()  # what an interrupted in-place save used to leave
    with pytest.raises(FP8CheckpointError, match=r"(?s)cut: holds float8 weights \(text_encoder_3/model\.safetensors: "
                                                 r"\d+ float8 tensors.*but no sd35fp8_fp8\.json.*sd35fp8 quantize MODEL"):
        load_pipeline(str(cut), device="cpu")
    assert load_pipeline(str(out), device="cpu").sd35fp8_fp8.mode == "storage"  # with its manifest it loads


def test_report_keeps_text_encoders_already_in_fp8(tiny_model_dir, quantized, tmp_path):
    """A pipeline loaded with T5 in FP8 (checkpoint or Comfy file), then quantised again without T5 — what a
    compute-mode load does — must still report T5 as FP8 storage, with its layers and the bytes it saved."""
    out = save_quantized(quantized[0], tmp_path / "fp8")
    pipe = load_pipeline(str(out), device="cpu")
    loaded = {c.name: c for c in pipe.sd35fp8_fp8.components}
    report = quantize_(pipe, FP8Config(mode="storage", text_encoder_3=False))
    t5 = next(c for c in report.components if c.name == "text_encoder_3")
    assert (t5.how, t5.converted) == ("fp8 storage", 14)
    assert t5.before == loaded["text_encoder_3"].before > t5.after


def test_a_saved_fp8_scene_model_keeps_its_recipe(tmp_path):
    """The copy must run at the scene model's own settings — above all 32 T5 tokens, without which every
    embedding changes (diffusers' default is 256) — so ``sd35fp8_scenes.json`` travels with it."""
    from sd35fp8_helpers.pipeline.defaults import MODEL_INFO, model_defaults

    pipe = load_pipeline("scenes", device="cpu")
    quantize_(pipe, FP8Config(mode="storage"))
    out = save_quantized(pipe, tmp_path / "fp8")
    assert (out / MODEL_INFO).is_file() and (out / FP8_MANIFEST).is_file()
    again = load_pipeline(str(out), device="cpu")
    assert model_defaults(again) == model_defaults(pipe) and model_defaults(again).max_sequence_length == 32

"""LoRA on BF16 / FP8 storage / FP8 compute (issue 17): real safetensors files written here, real transformers
(the trained scene model, the random tiny one), torch.equal for every "exact" claim."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from sd35fp8_helpers.errors import LoraError
from sd35fp8_helpers.lora import load_lora_, loaded_loras, set_lora_scale_, unload_lora_
from sd35fp8_helpers.precision.quantize import FP8Config, quantize_

ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
             "attn.add_v_proj", "attn.to_add_out")


def _linears(t, suffixes=ATTENTION):
    return [(n, m) for n, m in t.named_modules() if n.endswith(suffixes) and hasattr(m, "in_features")]


def write_peft_lora(t, path, *, std=0.2, rank=4, seed=0, prefix="transformer.", metadata=None):
    """A diffusers/PEFT-layout LoRA on every attention projection of ``t``: down N(0, 1/in), up N(0, std)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, m in _linears(t):
        sd[f"{prefix}{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g) / m.in_features ** 0.5
        sd[f"{prefix}{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g) * std
    save_file(sd, str(path), metadata=metadata)
    return path


def step_inputs(t, seed=1):
    g = torch.Generator().manual_seed(seed)
    c = t.config
    return dict(hidden_states=torch.randn(2, 16, c.sample_size, c.sample_size, generator=g),
                encoder_hidden_states=torch.randn(2, 40, c.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(2, c.pooled_projection_dim, generator=g),
                timestep=torch.tensor([500.0, 200.0]), return_dict=False)


def forward(t, x):
    with torch.inference_mode():
        return t(**x)[0].float()


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def snapshot(t) -> dict[str, torch.Tensor]:
    """Every parameter and buffer payload (torchao tensors by qdata and scale), as raw bytes where 1-byte."""
    out = {}
    for name, v in list(t.named_parameters()) + list(t.named_buffers()):
        parts = {".qdata": v.qdata, ".scale": v.scale} if hasattr(v, "qdata") else {"": v}
        for suffix, tensor in parts.items():
            tensor = tensor.detach().clone()
            out[name + suffix] = tensor.view(torch.uint8) if tensor.element_size() == 1 else tensor
    return out


def assert_same(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"changed: {different[:5]}"


@pytest.fixture
def scenes_transformer():
    """The trained scene model's transformer (float32, CPU): real weights, so a LoRA's effect is realistic."""
    from sd35fp8_helpers import load_pipeline

    return load_pipeline("scenes", device="cpu").transformer


def torchao_fp8(t):
    """FP8 compute's weight format (torchao Float8Tensor, row-wise) on CPU: torchao's weight-only config builds
    the same tensor type that Float8DynamicActivationFloat8WeightConfig builds on an Ada/Hopper GPU."""
    from torchao.quantization import Float8WeightOnlyConfig
    from torchao.quantization import quantize_ as ao_quantize_

    ao_quantize_(t, Float8WeightOnlyConfig(), filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear)
                 and fqn.startswith("transformer_blocks"))
    return t


# --- FP8 + LoRA ≈ BF16 + LoRA -------------------------------------------------------------------------

# Measured on the scene model v2 (CPU, float32 reference, this LoRA: std 0.2, rank 4, 47 attention Linears;
# 2026-12-02): the LoRA changes the step's output by 11.9%; FP8 storage alone is off by 0.92%; FP8 storage +
# LoRA merged (W + ΔW re-quantised: one rounding of the sum) by 1.22% (1.32× FP8 alone), on the side path
# (ΔW in BF16 beside the FP8 weight) by 1.00% (1.09×). A LoRA that was ignored would be off by ~12%.
# (v1, 2026-12-01: 14.6%, 1.71%, 1.98%, 1.85%.)
LORA_EFFECT_MIN = 0.10
FP8_ERROR_MAX = 0.025
FP8_LORA_VS_FP8_ALONE_MAX = 1.5


@pytest.mark.parametrize("mode", ["merge", "side"])
def test_lora_on_fp8_storage_matches_bf16_lora_within_fp8_error(scenes_transformer, tmp_path, mode):
    t = scenes_transformer
    lora = write_peft_lora(t, tmp_path / "style.safetensors")
    x = step_inputs(t)
    base = forward(t, x)
    report = load_lora_(t, lora, mode=mode)
    reference = forward(t, x)  # full precision + LoRA
    unload_lora_(t)
    quantize_(t, FP8Config(mode="storage"))
    fp8_alone = rel(forward(t, x), base)
    report = load_lora_(t, lora, mode=mode)
    fp8_lora = rel(forward(t, x), reference)
    # 8 attention projections per block (both streams), the last block 7 (it keeps no text output: no to_add_out)
    assert report.layers == len(_linears(t)) == 8 * t.config.num_layers - 1 and report.precision == "fp8-storage"
    assert rel(reference, base) > LORA_EFFECT_MIN          # the LoRA matters …
    assert fp8_lora < FP8_ERROR_MAX                         # … and FP8 + LoRA is BF16 + LoRA within FP8's error
    assert fp8_lora < FP8_LORA_VS_FP8_ALONE_MAX * fp8_alone  # the LoRA adds (almost) no error of its own


@pytest.mark.parametrize("mode", ["merge", "side"])
def test_lora_on_fp8_compute_weights(scenes_transformer, tmp_path, mode):
    t = scenes_transformer
    lora = write_peft_lora(t, tmp_path / "style.safetensors")
    x = step_inputs(t)
    load_lora_(t, lora)
    reference = forward(t, x)
    unload_lora_(t)
    torchao_fp8(t)
    before = snapshot(t)
    report = load_lora_(t, lora, mode=mode)
    assert report.precision == "fp8-compute"
    assert rel(forward(t, x), reference) < FP8_ERROR_MAX
    unload_lora_(t)
    assert_same(before, snapshot(t))


# --- exact unloading, several LoRAs, scales ----------------------------------------------------------------

@pytest.mark.parametrize("precision", ["float32", "fp8-storage"])
def test_several_loras_then_unload_restores_every_weight_bit_for_bit(scenes_transformer, tmp_path, precision):
    t = scenes_transformer
    if precision == "fp8-storage":
        quantize_(t, FP8Config(mode="storage"))
    a = write_peft_lora(t, tmp_path / "a.safetensors", seed=1)
    b = write_peft_lora(t, tmp_path / "b.safetensors", seed=2)
    before = snapshot(t)
    load_lora_(t, a, mode="merge", scale=0.7)
    load_lora_(t, b, mode="side", scale=1.3)
    assert [(x["name"], x["mode"], x["scale"]) for x in loaded_loras(t)] == [("a", "merge", 0.7), ("b", "side", 1.3)]
    set_lora_scale_(t, "a", 0.2)
    set_lora_scale_(t, "b", 0.5)
    assert unload_lora_(t, "a") == ["a"]
    assert unload_lora_(t) == ["b"]
    assert_same(before, snapshot(t))
    assert loaded_loras(t) == []
    assert all(type(m).__name__ != "LoraSideLinear" for m in t.modules())


def test_two_merged_loras_add_up_and_order_does_not_matter(scenes_transformer, tmp_path):
    t = scenes_transformer
    a = write_peft_lora(t, tmp_path / "a.safetensors", seed=1)
    b = write_peft_lora(t, tmp_path / "b.safetensors", seed=2)
    x = step_inputs(t)
    load_lora_(t, a)
    load_lora_(t, b)
    ab = forward(t, x)
    unload_lora_(t)
    load_lora_(t, b)
    load_lora_(t, a)
    assert torch.allclose(forward(t, x), ab, rtol=1e-5, atol=1e-5)
    unload_lora_(t, "b")
    only_a = forward(t, x)
    unload_lora_(t)
    load_lora_(t, a, mode="side")
    assert torch.allclose(forward(t, x), only_a, rtol=1e-4, atol=1e-5)  # merged == side in float32


def test_side_path_scale_zero_is_the_base_model_exactly(scenes_transformer, tmp_path):
    t = scenes_transformer
    quantize_(t, FP8Config(mode="storage"))
    x = step_inputs(t)
    base = forward(t, x)
    load_lora_(t, write_peft_lora(t, tmp_path / "a.safetensors"), mode="side")
    assert not torch.equal(forward(t, x), base)
    set_lora_scale_(t, "a", 0.0)
    assert torch.equal(forward(t, x), base)


def test_merged_scale_change_requantises_from_the_original(scenes_transformer, tmp_path):
    """Scale 1 → 0.5 by re-merging equals loading at 0.5 directly: no rounding error accumulates."""
    t = scenes_transformer
    quantize_(t, FP8Config(mode="storage"))
    lora = write_peft_lora(t, tmp_path / "a.safetensors")
    load_lora_(t, lora, scale=0.5)
    direct = snapshot(t)
    unload_lora_(t)
    load_lora_(t, lora, scale=1.0)
    set_lora_scale_(t, "a", 0.5)
    assert_same(direct, snapshot(t))


def test_merge_survives_no_precision_change_it_did_not_see(scenes_transformer, tmp_path):
    t = scenes_transformer
    load_lora_(t, write_peft_lora(t, tmp_path / "a.safetensors"))
    quantize_(t, FP8Config(mode="storage"))  # the merged Linears are replaced by FP8 ones
    with pytest.raises(LoraError, match="replaced after a LoRA was merged") as e:
        unload_lora_(t)
    assert "mode='side'" in e.value.fix


def test_side_path_survives_quantize(scenes_transformer, tmp_path):
    t = scenes_transformer
    lora = write_peft_lora(t, tmp_path / "a.safetensors")
    x = step_inputs(t)
    load_lora_(t, lora, mode="side")
    reference = forward(t, x)
    quantize_(t, FP8Config(mode="storage"))  # converts the wrapped base layers, keeps the side paths
    assert rel(forward(t, x), reference) < FP8_ERROR_MAX
    unload_lora_(t)
    assert all(type(m).__name__ != "LoraSideLinear" for m in t.modules())


# --- key layouts ----------------------------------------------------------------------------------------

def _kohya_and_peft(t, tmp_path, *, comfy=False):
    """The same LoRA twice: original MMDiT names (fused qkv, final AdaLN as shift/scale) and diffusers names."""
    from sd35fp8_helpers.lora.keymap import original_to_diffusers, underscored

    g = torch.Generator().manual_seed(3)
    rank, alpha = 4, 2.0
    originals = original_to_diffusers(t)
    linears = dict(t.named_modules())
    kohya, peft = {}, {}
    for orig in ("joint_blocks.0.x_block.attn.qkv", "joint_blocks.0.context_block.attn.qkv",
                 "joint_blocks.1.x_block.attn2.qkv", "final_layer.adaLN_modulation.1", "joint_blocks.2.x_block.mlp.fc1"):
        targets = originals[orig]
        in_f = linears[targets[0][0]].in_features
        out_rows = max(max(r.rows) for _, r in targets) + 1
        down = torch.randn(rank, in_f, generator=g) * 0.1
        up = torch.randn(out_rows, rank, generator=g) * 0.1
        key = f"diffusion_model.{orig}" if comfy else f"lora_unet_{underscored(orig)}"
        kohya[f"{key}.lora_down.weight"], kohya[f"{key}.lora_up.weight"] = down, up
        kohya[f"{key}.alpha"] = torch.tensor(alpha)
        for target, rows in targets:
            peft[f"transformer.{target}.lora_A.weight"] = down.clone()
            peft[f"transformer.{target}.lora_B.weight"] = up[list(rows.rows)]
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    save_file(peft, str(tmp_path / "peft.safetensors"),
              metadata={"lora_adapter_metadata": json.dumps({"transformer.r": rank, "transformer.lora_alpha": alpha})})
    return tmp_path / "kohya.safetensors", tmp_path / "peft.safetensors"


@pytest.mark.parametrize("layout", ["kohya", "comfy"])
def test_kohya_and_comfy_layouts_equal_the_diffusers_layout(scenes_transformer, tmp_path, layout):
    t = scenes_transformer
    kohya, peft = _kohya_and_peft(t, tmp_path, comfy=layout == "comfy")
    before = snapshot(t)
    report = load_lora_(t, kohya)
    assert report.layers == 3 + 3 + 3 + 1 + 1  # each fused qkv is three diffusers Linears
    via_original = snapshot(t)
    unload_lora_(t)
    load_lora_(t, peft)
    assert_same(via_original, snapshot(t))
    assert not torch.equal(via_original["norm_out.linear.weight"], before["norm_out.linear.weight"])


def test_qkv_rows_and_adaln_swap_come_from_diffusers_converter(scenes_transformer):
    from sd35fp8_helpers.lora.keymap import original_to_diffusers

    m = original_to_diffusers(scenes_transformer)
    inner = scenes_transformer.config.num_attention_heads * scenes_transformer.config.attention_head_dim
    qkv = dict(m["joint_blocks.3.x_block.attn.qkv"])
    assert qkv["transformer_blocks.3.attn.to_k"].rows == tuple(range(inner, 2 * inner))
    (name, rows), = m["final_layer.adaLN_modulation.1"]
    assert name == "norm_out.linear" and rows.rows[:3] == (inner, inner + 1, inner + 2)  # (shift, scale) → (scale, shift)


# --- bad files ------------------------------------------------------------------------------------------

def _bad(t, tmp_path, tensors, name="bad.safetensors"):
    path = tmp_path / name
    save_file(tensors, str(path))
    return path


def test_bad_files_are_refused_naming_the_first_bad_key_and_change_nothing(scenes_transformer, tmp_path):
    t = scenes_transformer
    before = snapshot(t)
    q = t.get_submodule("transformer_blocks.0.attn.to_q")
    w = q.in_features  # the model's width (192 in v2)
    good = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, q.in_features),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(q.out_features, 4)}
    cases = {
        "no match": ({"transformer.transformer_blocks.99.attn.to_q.lora_A.weight": torch.zeros(4, w),
                      "transformer.transformer_blocks.99.attn.to_q.lora_B.weight": torch.zeros(w, 4)},
                     "key 'transformer.transformer_blocks.99.attn.to_q.lora_A.weight' matches no Linear layer"),
        "wrong shape": ({**good, "transformer.transformer_blocks.1.attn.to_k.lora_A.weight": torch.zeros(4, 64),
                         "transformer.transformer_blocks.1.attn.to_k.lora_B.weight": torch.zeros(w, 4)},
                        rf"to_k.lora_B.weight' has shapes down \(4, 64\) / up \({w}, 4\) but "
                        rf"transformer_blocks.1.attn.to_k is {w} -> {w} features"),
        "rank": ({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, q.in_features),
                  "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(q.out_features, 8)},
                 "has rank 8 but its down weight"),
        "text encoder": ({**good, "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 8)},
                         "belongs to a text encoder"),
        "dora": ({**good, "transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector.weight": torch.ones(w)},
                 "is a DoRA weight"),
        "not a lora": ({**good, "transformer_blocks.0.attn.to_q.weight": torch.zeros(w, w)},
                       "is not a LoRA weight"),
        "half": ({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, q.in_features)},
                 "has no matching up weight"),
    }
    for label, (tensors, message) in cases.items():
        with pytest.raises(LoraError, match=message) as e:
            load_lora_(t, _bad(t, tmp_path, tensors, f"{label.replace(' ', '_')}.safetensors"))
        assert e.value.fix, label
    assert_same(before, snapshot(t))
    assert loaded_loras(t) == []


def test_pickle_files_are_refused_whatever_their_name(scenes_transformer, tmp_path):
    t = scenes_transformer
    state = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 160)}
    torch.save(state, tmp_path / "lora.bin")
    torch.save(state, tmp_path / "renamed.safetensors")
    for name in ("lora.bin", "renamed.safetensors"):
        with pytest.raises(LoraError, match="is a pickle .* only safetensors LoRA files are accepted"):
            load_lora_(t, tmp_path / name)
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(LoraError, match="is not a readable safetensors file"):
        load_lora_(t, tmp_path / "junk.safetensors")
    with pytest.raises(LoraError, match="neither a file nor the name of a LoRA"):
        load_lora_(t, "no-such-lora")


def test_bad_arguments_are_refused(scenes_transformer, tmp_path):
    t = scenes_transformer
    lora = write_peft_lora(t, tmp_path / "a.safetensors")
    with pytest.raises(LoraError, match="mode='fuse' is not a LoRA mode"):
        load_lora_(t, lora, mode="fuse")
    with pytest.raises(LoraError, match="scale=nan is not a finite number"):
        load_lora_(t, lora, scale=float("nan"))
    load_lora_(t, lora)
    with pytest.raises(LoraError, match="a LoRA named 'a' is already loaded"):
        load_lora_(t, lora)
    with pytest.raises(LoraError, match="is not loaded on this pipeline"):
        unload_lora_(t, "b")


# --- a LoRA by name: generate, the images API, the playground -----------------------------------------------

@pytest.fixture
def scenes_pipe():
    from sd35fp8_helpers import load_pipeline

    return load_pipeline("scenes", device="cpu")


@pytest.fixture
def named_lora(scenes_pipe):
    """A real LoRA for the scene model, dropped into ``$SD35FP8_HOME/loras`` (the tests' own temporary home)."""
    from sd35fp8_helpers.lora.shipped import user_lora_dir

    folder = user_lora_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = write_peft_lora(scenes_pipe.transformer, folder / "wavy.safetensors", std=0.3)
    yield "wavy"
    path.unlink()


def test_generate_applies_a_lora_by_name_and_takes_it_off_again(scenes_pipe, named_lora):
    from dataclasses import replace

    import numpy as np

    from sd35fp8_helpers.pipeline.defaults import default_settings
    from sd35fp8_helpers.pipeline.generation import generate

    plain = default_settings(scenes_pipe, "a large red circle in the centre, on a white background", steps=4)
    before = snapshot(scenes_pipe.transformer)
    without = np.asarray(generate(scenes_pipe, plain, progress=False).image)
    result = generate(scenes_pipe, replace(plain, lora=named_lora), progress=False)
    assert not np.array_equal(np.asarray(result.image), without)
    meta = result.metadata()
    assert meta["settings"]["lora"] == "wavy" and meta["loras"][0]["mode"] == "side"
    again = generate(scenes_pipe, plain, progress=False)  # no LoRA asked: the side path is gone
    assert np.array_equal(np.asarray(again.image), without) and "loras" not in again.metadata()
    assert_same(before, snapshot(scenes_pipe.transformer))


def test_cli_generate_takes_a_lora_by_name_and_from_png_reproduces_it(cli, named_lora, tmp_path):
    import numpy as np
    from PIL import Image

    from sd35fp8_helpers.pipeline.generation import read_png_metadata

    base = ("generate", "--device", "cpu", "--steps", "4", "--prompt",
            "a large red circle in the centre, on a white background")
    plain, lora, again = (tmp_path / f"{n}.png" for n in ("plain", "lora", "again"))
    assert cli(*base, "--out", str(plain)).returncode == 0
    r = cli(*base, "--lora", named_lora, "--lora-scale", "0.8", "--out", str(lora))
    assert r.returncode == 0, r.stderr
    assert "LoRA wavy × 0.8" in r.stdout
    meta = read_png_metadata(lora)
    assert (meta["settings"]["lora"], meta["settings"]["lora_scale"]) == ("wavy", 0.8) and meta["loras"]
    pixels = np.asarray(Image.open(lora))
    assert not np.array_equal(pixels, np.asarray(Image.open(plain)))
    r = cli("generate", "--device", "cpu", "--from-png", str(lora), "--out", str(again))
    assert r.returncode == 0, r.stderr
    assert np.array_equal(pixels, np.asarray(Image.open(again)))  # the LoRA came back from the PNG
    r = cli(*base, "--lora", "sparkles", "--out", str(tmp_path / "x.png"))
    assert r.returncode != 0 and "Traceback" not in r.stderr and "wavy" in r.stderr
    assert not (tmp_path / "x.png").exists()


def test_unknown_lora_name_is_refused_before_any_model_work(named_lora):
    from sd35fp8_helpers.errors import InvalidGenerationInput
    from sd35fp8_helpers.pipeline.generation import GenerationSettings, check_settings

    with pytest.raises(InvalidGenerationInput, match="lora='sparkles' is not the name of a LoRA") as e:
        check_settings(GenerationSettings("a cat", lora="sparkles"))
    assert "wavy" in e.value.fix and "loras" in e.value.fix
    with pytest.raises(InvalidGenerationInput, match="lora_scale=inf must be a finite number"):
        check_settings(GenerationSettings("a cat", lora="wavy", lora_scale=float("inf")))


def test_images_api_takes_a_lora_by_name_never_a_path(named_lora, tmp_path):
    from sd35fp8_helpers.serving.app import ApiError, parse_request
    from sd35fp8_helpers.serving.jobstore import ServedModel

    served = ServedModel("scenes", 128, 16, 16, 512, guidance_scale=4.0)
    (s,) = parse_request(json.dumps({"prompt": "a red circle", "lora": "wavy", "lora_scale": 0.8}).encode(), served)
    assert (s.lora, s.lora_scale) == ("wavy", 0.8)
    for bad in ("sparkles", str(tmp_path / "x.safetensors")):
        with pytest.raises(ApiError) as e:
            parse_request(json.dumps({"prompt": "a red circle", "lora": bad}).encode(), served)
        assert e.value.status == 400 and e.value.body()["error"]["param"] == "lora"


def test_playground_offers_named_loras_and_restores_them_from_png(scenes_pipe, named_lora):
    from dataclasses import asdict

    from sd35fp8_helpers.interactive.playground import Playground

    pg = Playground(scenes_pipe)
    assert ("wavy", "wavy") in pg.lora.options
    pg.lora.value, pg.lora_scale.value = "wavy", 0.6
    s = pg.current_settings()
    assert (s.lora, s.lora_scale) == ("wavy", 0.6)
    pg.lora.value = ""
    pg.apply_metadata({"settings": asdict(s), "precision": "bf16"})
    assert (pg.lora.value, pg.lora_scale.value) == ("wavy", 0.6)


# --- the concept a LoRA should teach the scene model (lora/concepts.py) ------------------------------------

def _vae_round_trip(pipe, images):
    from sd35fp8_helpers.lora.train import _encode_images

    cfg = pipe.vae.config
    with torch.inference_mode():
        decoded = pipe.vae.decode(_encode_images(pipe, images) / cfg.scaling_factor + cfg.shift_factor).sample
    return pipe.image_processor.postprocess(decoded, output_type="pil")


def test_the_judge_tells_a_diamond_from_the_scene_shapes_and_the_vae_keeps_it(scenes_pipe):
    from sd35fp8_helpers.lora.concepts import concept_adherence, evaluation_scenes, read_shape, render_concept
    from sd35fp8_helpers.scenes.dataset import evaluation_prompts
    from sd35fp8_helpers.scenes.render import render

    truth = [scene for _, scene in evaluation_scenes(12)]
    drawn = [render_concept(s, seed=i) for i, s in enumerate(truth)]
    assert concept_adherence(drawn, truth).shape == 1.0
    # through the scene model's own VAE (what any LoRA'd image goes through) most stay diamonds: measured 9 of 12
    # (the 3 others, small ones, come back rounded and read as circles) — the ceiling for a LoRA, judged this way
    assert concept_adherence(_vae_round_trip(scenes_pipe, drawn), truth).shape >= 0.7
    singles = evaluation_prompts("single")[:24]
    assert [read_shape(render(p.spec, seed=i).image) for i, p in enumerate(singles)] == \
        [p.spec.objects[0].shape for p in singles]  # no scene shape is read as a diamond


def test_why_not_a_colour_the_scene_vae_cannot_reproduce_one(scenes_pipe):
    """Measured 2026-12-01: brown (130, 80, 40) comes back purple or red from the VAE — a transformer LoRA
    could never teach it (a LoRA trained on it on the H200 drew purple)."""
    from PIL import Image, ImageDraw

    from sd35fp8_helpers.scenes.colour import nearest_name
    from sd35fp8_helpers.scenes.judge import read_scene
    from sd35fp8_helpers.scenes.vocabulary import COLOURS

    image = Image.new("RGB", (128, 128), (245, 245, 245))
    ImageDraw.Draw(image).ellipse((34, 34, 94, 94), fill=(130, 80, 40))
    (back,) = _vae_round_trip(scenes_pipe, [image])
    assert nearest_name(read_scene(back).objects[0].lab, {**COLOURS, "brown": (130, 80, 40)}) != "brown"
    assert nearest_name(read_scene(image).objects[0].lab, {**COLOURS, "brown": (130, 80, 40)}) == "brown"


def test_concept_report_and_gallery_run_the_three_pipelines(named_lora, tmp_path):
    """``lora/evaluate``: without the LoRA, with it in BF16, with it over FP8 storage (what the concept test and the
    notebook section use); a strong random LoRA must change the picture, and FP8 must not change it much more."""
    import numpy as np

    from sd35fp8_helpers.lora.concepts import evaluation_scenes
    from sd35fp8_helpers.lora.evaluate import VARIANTS, evaluate_concept, load_concept_report, lora_gallery
    from sd35fp8_helpers.precision.quality import psnr

    gallery = lora_gallery(named_lora, [text for text, _ in evaluation_scenes(2)])
    plain, bf16, fp8 = (np.asarray(gallery.images[v][0], dtype=np.float64) / 255 for v in VARIANTS)
    assert not np.array_equal(plain, bf16)  # the LoRA acts
    assert psnr(bf16, fp8) > psnr(plain, bf16) + 3  # FP8 + LoRA stays near BF16 + LoRA
    assert all(len(s) == 2 for s in gallery.shapes.values())
    report = evaluate_concept(named_lora, n=2, regular=2, seeds=(0,))
    assert [r.variant for r in report.rows] == list(VARIANTS)
    path = tmp_path / "r.json"
    path.write_text(json.dumps(report.to_json()))
    assert load_concept_report(path).table() == report.table()


def test_the_shipped_diamond_lora_teaches_the_shape_in_bf16_and_over_fp8():
    """Issue 17's concept, re-measured on the CPU: 16 diamond prompts (paraphrased, seed 0) and 8 ordinary ones,
    through the three pipelines. Thresholds from the full GPU run (96 images: 1.0% → 94.8% → 94.8%;
    docs/benchmarks/lora-diamond-h200.json) and a CPU run of 24 prompts (0% → 87.5% → 83.3%), with room for
    a few images' noise; without the LoRA the word "diamond" means nothing to the model."""
    import hashlib

    from sd35fp8_helpers.constants import EMBEDDED_MODEL_DIR
    from sd35fp8_helpers.lora.evaluate import evaluate_concept
    from sd35fp8_helpers.lora.shipped import shipped_lora_info, shipped_loras

    assert "diamond" in shipped_loras()
    info = shipped_lora_info("diamond")
    assert info["base_model"]["name"] == "sd35-scenes v2" and info["training"]["device"] == "NVIDIA H200"
    weights = EMBEDDED_MODEL_DIR / "transformer" / "diffusion_pytorch_model.safetensors"
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == info["base_model"]["transformer_sha256"], \
        "the scene model was retrained: retrain and re-measure the diamond LoRA for it"
    report = evaluate_concept("diamond", n=16, regular=8, seeds=(0,), batch_size=16)
    without, bf16, fp8 = (report.row(v).concept["shape"] for v in ("without LoRA", "LoRA, bf16", "LoRA, fp8-storage"))
    assert without <= 2 / 16, report
    assert bf16 >= 12 / 16 and fp8 >= 11 / 16, report
    assert abs(fp8 - bf16) <= 2 / 16, report  # FP8 storage under the LoRA: within two images of BF16
    assert report.row("LoRA, bf16").regular["single.position"] >= 7 / 8  # the rest of the model still works
    assert report.row("LoRA, bf16").regular["single.shape"] >= 6 / 8


def test_lora_training_writes_a_peft_file_that_loads_and_acts(tmp_path):
    """``lora.train`` (a few CPU steps): the file is PEFT layout with rank and alpha in its metadata, ``load_lora_``
    takes it, it changes the picture (``up`` left zero would not), and unloading restores the image exactly."""
    import numpy as np
    from safetensors import safe_open

    from sd35fp8_helpers import load_pipeline
    from sd35fp8_helpers.lora.train import LoraTrainConfig, train_lora
    from sd35fp8_helpers.pipeline.defaults import default_settings
    from sd35fp8_helpers.pipeline.generation import generate

    pipe = load_pipeline("scenes", device="cpu", dtype=torch.float32)
    cfg = LoraTrainConfig(steps=6, batch=4, n_concept=6, n_regular=6, lr=2e-2)
    result = train_lora(pipe, cfg, tmp_path / "d.safetensors", log=lambda m: None)
    assert result.steps == 6 and len(result.losses) == 6 and all(math.isfinite(v) for v in result.losses)
    with safe_open(str(tmp_path / "d.safetensors"), "pt") as f:
        keys, meta = list(f.keys()), json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["transformer.r"] == 4 and all(k.startswith("transformer.") for k in keys)
    assert any(k.endswith("attn.to_q.lora_B.weight") for k in keys)
    settings = default_settings(pipe, "a large red diamond on the left, on a blue background", 0, steps=4)
    before = np.asarray(generate(pipe, settings, progress=False).image)
    load_lora_(pipe, tmp_path / "d.safetensors", scale=4.0, mode="merge")
    assert not np.array_equal(np.asarray(generate(pipe, settings, progress=False).image), before)
    unload_lora_(pipe)
    assert np.array_equal(np.asarray(generate(pipe, settings, progress=False).image), before)

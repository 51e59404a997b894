"""SD3.5 Large Turbo as a preset (issue 17): its defaults, how it is recognised, and that generating with them
really runs a guidance-free (batch-1) transformer step — counted on a real pipeline with a forward hook."""

from __future__ import annotations

import shutil

import pytest

from sd35fp8_helpers.presets import LARGE, LARGE_TURBO, PARAMETER_COUNTS, PRESETS, recognise_preset


def test_turbo_preset_defaults():
    assert PRESETS["large-turbo"] is LARGE_TURBO
    assert (LARGE_TURBO.default_steps, LARGE_TURBO.default_guidance) == (4, 0.0)
    assert not LARGE_TURBO.uses_cfg and LARGE_TURBO.step_batch == 1
    assert LARGE.uses_cfg and LARGE.step_batch == 2
    assert LARGE_TURBO.component_configs() == LARGE.component_configs()  # same architecture …
    assert LARGE_TURBO.arch == "large" and PARAMETER_COUNTS["large-turbo"] == PARAMETER_COUNTS["large"]
    assert LARGE_TURBO.scheduler == {"shift": 3.0}


@pytest.mark.parametrize("name", [
    "stabilityai/stable-diffusion-3.5-large-turbo",
    "/root/.cache/huggingface/hub/models--stabilityai--stable-diffusion-3.5-large-turbo/snapshots/0123abcd",
    "/data/models/stable-diffusion-3.5-large-turbo/",
])
def test_turbo_is_recognised_by_name(name):
    assert recognise_preset(name) is LARGE_TURBO


def test_large_is_not_mistaken_for_turbo_and_config_alone_gives_the_depth():
    assert recognise_preset("stabilityai/stable-diffusion-3.5-large").name == "large"
    assert recognise_preset("", {"_name_or_path": "stabilityai/stable-diffusion-3.5-large-turbo",
                                 "num_layers": 38}) is LARGE_TURBO
    assert recognise_preset("", {"num_layers": 38}).name == "large"  # identical configs: only a name tells Turbo
    assert recognise_preset("my-model") is None


@pytest.fixture
def turbo_pipe(tiny_model_dir, tmp_path):
    """The tiny pipeline in a folder named like the Turbo repo (no tiny marker): recognised as Large Turbo."""
    from sd35fp8_helpers import load_pipeline
    from sd35fp8_helpers.pipeline.tiny import TINY_MARKER

    folder = tmp_path / "stable-diffusion-3.5-large-turbo"
    shutil.copytree(tiny_model_dir, folder)
    (folder / TINY_MARKER).unlink(missing_ok=True)
    return load_pipeline(str(folder), device="cpu")


def _batches(pipe, settings):
    from sd35fp8_helpers.pipeline.generation import generate

    seen: list[int] = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda _m, _args, kwargs: seen.append(kwargs["hidden_states"].shape[0]), with_kwargs=True)
    try:
        generate(pipe, settings, progress=False)
    finally:
        handle.remove()
    return seen


def test_generate_with_turbo_defaults_runs_batch_1_without_cfg(turbo_pipe):
    from sd35fp8_helpers.pipeline.defaults import default_settings, model_defaults, preset_for

    assert preset_for(turbo_pipe) is LARGE_TURBO
    d = model_defaults(turbo_pipe)
    assert (d.steps, d.guidance_scale) == (4, 0.0)
    turbo = default_settings(turbo_pipe, "a red circle", height=64, width=64)
    assert _batches(turbo_pipe, turbo) == [1, 1, 1, 1]  # 4 steps, one batch-1 pass each: no negative pass
    with_cfg = default_settings(turbo_pipe, "a red circle", height=64, width=64, guidance_scale=4.5, steps=2)
    assert _batches(turbo_pipe, with_cfg) == [2, 2]


def test_serving_and_playground_start_from_turbo_defaults(turbo_pipe):
    from sd35fp8_helpers.interactive.playground import Playground
    from sd35fp8_helpers.serving.engine import ImageEngine

    engine = ImageEngine("turbo", device="cpu", pipe=turbo_pipe)
    assert engine.defaults()[1] == 4 and engine.default_guidance() == 0.0
    pg = Playground(turbo_pipe)
    assert (pg.steps.value, pg.guidance.value) == (4, 0.0)


def test_plan_knows_turbo_without_cfg():
    from sd35fp8_helpers.memory.plan import plan, predict

    turbo, large = predict("large-turbo", "resident"), predict("large", "resident")
    assert turbo.stage_peaks["weights"] == large.stage_peaks["weights"]      # same weights
    assert turbo.stage_peaks["transformer"] < large.stage_peaks["transformer"]  # half the activations
    assert plan(12, "large-turbo").recommended is not None


def test_bench_cli_offers_turbo(cli):
    out = cli("bench", "--help")
    assert out.returncode == 0 and "large-turbo" in out.stdout and "batch 1" in out.stdout


def test_bench_step_of_turbo_is_batch_1():
    import torch

    from sd35fp8_helpers.benchmarks.fp8 import step_inputs
    from sd35fp8_helpers.presets import instantiate_transformer

    model = instantiate_transformer("large-turbo", device="meta", dtype=torch.bfloat16)
    inputs = step_inputs(model, 1024, 1024, "meta", batch=LARGE_TURBO.step_batch)
    assert inputs["hidden_states"].shape == (1, 16, 128, 128)
    assert inputs["encoder_hidden_states"].shape == (1, 333, 4096)

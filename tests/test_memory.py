"""Memory strategies, measurement, OOM fallback and the planner — on the real tiny pipeline and real configs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sd35fp8_helpers import GenerationSettings, load_pipeline
from sd35fp8_helpers.errors import InvalidPlanInput, OutOfMemoryAfterFallback
from sd35fp8_helpers.memory.plan import ARCHITECTURE, GIB, count_architecture, plan, predict
from sd35fp8_helpers.memory.strategies import (
    STRATEGIES,
    emulated_card,
    generate_by_stage,
    generate_with_fallback,
    get_strategy,
    measure,
    misplaced_modules,
    strategy_names,
    weight_bytes,
)

SETTINGS = GenerationSettings("a red fox in the snow", steps=2, height=128, width=128)


@pytest.fixture
def pipe(tiny_model_dir):
    """A private tiny pipeline (tests here mutate it)."""
    return load_pipeline(str(tiny_model_dir), device="cpu")


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s.name)
def test_strategy_applies_and_pipeline_still_generates(pipe, strategy):
    before = sum(weight_bytes(pipe).values())
    changes = strategy.apply(pipe, "cpu")
    run = generate_by_stage(pipe, SETTINGS)
    assert run.image.size == (128, 128)
    assert list(run.stages) == ["encode", "denoise", "decode"]
    assert all(s.seconds > 0 and s.host_peak_rss > 0 for s in run.stages.values())
    assert misplaced_modules(pipe) == []
    after = sum(weight_bytes(pipe).values())
    assert (after < before) == strategy.fp8
    assert (pipe.text_encoder_3 is None) == strategy.drop_t5
    assert pipe.vae.use_tiling == strategy.vae_tiling
    if strategy.offload != "none":
        assert any("offload" in c for c in changes)


@pytest.fixture(scope="module")
def resident_pixels(tiny_model_dir):
    """The image of a resident pipeline, unquantised and FP8 (the references a lossless strategy must match)."""
    out = {}
    for fp8 in (False, True):
        p = load_pipeline(str(tiny_model_dir), device="cpu")
        get_strategy("fp8" if fp8 else "resident").apply(p, "cpu")
        out[fp8] = np.asarray(generate_by_stage(p, SETTINGS).image)
    return out


@pytest.mark.parametrize("name", strategy_names())
def test_lossless_means_the_same_pixels_as_resident_at_that_precision(tiny_model_dir, resident_pixels, name):
    strategy = get_strategy(name)
    p = load_pipeline(str(tiny_model_dir), device="cpu")
    strategy.apply(p, "cpu")
    pixels = np.asarray(generate_by_stage(p, SETTINGS).image)
    same = np.array_equal(pixels, resident_pixels[strategy.fp8])
    assert same == strategy.lossless, (f"{name}: lossless={strategy.lossless} but the image is "
                                       f"{'identical' if same else 'different'} (max |Δ| "
                                       f"{np.abs(pixels.astype(int) - resident_pixels[strategy.fp8]).max()})")
    if not strategy.lossless:
        assert strategy.quality != "same images"


def test_merge_only_gets_leaner_and_exact_refuses_to_undo_fp8(pipe):
    merged = get_strategy("fp8_model_offload").merged(get_strategy("fp8_no_t5"))
    assert (merged.fp8, merged.drop_t5, merged.offload) == (True, True, "model")
    assert merged.name == "fp8_model_offload + no T5"
    get_strategy("fp8").apply(pipe, "cpu")
    with pytest.raises(InvalidPlanInput, match="cannot undo FP8"):
        get_strategy("resident").apply(pipe, "cpu", exact=True)


def test_measure_reports_host_peak_of_an_allocation():
    with measure("cpu") as m:
        block = torch.ones(64 * 2 ** 20 // 4)  # 64 MiB, touched
        del block
    assert m.gpu_peak_allocated is None
    assert m.host_peak_rss - m.host_start_rss > 32 * 2 ** 20


def test_oom_in_generation_walks_the_ladder_and_nothing_is_left_on_the_wrong_device(pipe):
    """A real torch.OutOfMemoryError raised by a hook inside the real denoising step (emulated small card)."""
    full = sum(weight_bytes(pipe).values())
    messages = []
    with emulated_card(full - 1, pipe):  # everything but one byte fits: bf16 weights do not, FP8 does
        out = generate_with_fallback(pipe, SETTINGS, device="cpu", log=messages.append)
    assert out.strategy.name == "fp8"
    assert out.result.image.size == (128, 128)
    assert len(out.steps) == 1 and "out of memory with 'as loaded' → 'fp8'" in messages[0]
    assert "FP8 storage" in messages[0]
    assert misplaced_modules(pipe) == []
    assert pipe.transformer.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn


def test_oom_ladder_drops_t5_when_fp8_is_not_enough(pipe):
    w = weight_bytes(pipe)
    fp8_bytes = sum(w.values()) * 0.6  # below what FP8 alone gives on tiny, above FP8 without T5
    with emulated_card(int(fp8_bytes), pipe):
        out = generate_with_fallback(pipe, SETTINGS, device="cpu", log=None)
    assert out.strategy.name == "fp8_no_t5"
    assert pipe.text_encoder_3 is None and misplaced_modules(pipe) == []
    assert [s.split("→")[1].split(":")[0].strip() for s in out.steps] == ["'fp8'", "'fp8_no_t5'"]


def test_oom_on_every_rung_raises_a_typed_error(pipe):
    ladder = (get_strategy("fp8"), get_strategy("fp8_model_offload"))
    with emulated_card(1, pipe), pytest.raises(OutOfMemoryAfterFallback) as info:
        generate_with_fallback(pipe, SETTINGS, ladder, device="cpu", log=None)
    assert "fp8_model_offload" in str(info.value) and "sd35fp8 plan" in str(info.value)
    assert len(info.value.steps) == 2
    assert misplaced_modules(pipe) == []


def test_oom_fallback_frees_the_failed_attempt_before_the_next_rung(pipe):
    """The failed attempt's activations must be gone before the next rung moves weights: inside the ``except``
    block the traceback still holds them (on a real card that is the memory the next rung needs)."""
    import dataclasses
    import weakref

    activations: list[weakref.ref] = []
    alive_when_next_rung_applied: list[bool] = []

    def run_out_once(_module, _args):
        if not activations:
            big = torch.empty(16 * 2**20 // 4)  # what the failed step had allocated, held by this frame only
            activations.append(weakref.ref(big))
            raise torch.OutOfMemoryError("CUDA out of memory (emulated in a test)")

    @dataclasses.dataclass(frozen=True)
    class Probe(type(get_strategy("fp8"))):
        def apply(self, pipe, device=None, *, exact=False):
            alive_when_next_rung_applied.append(activations[0]() is not None)
            return super().apply(pipe, device, exact=exact)

    handle = pipe.transformer.register_forward_pre_hook(run_out_once)
    try:
        probe = Probe(**{f.name: getattr(get_strategy("fp8"), f.name) for f in dataclasses.fields(Probe)})
        out = generate_with_fallback(pipe, SETTINGS, (probe,), device="cpu", log=None)
    finally:
        handle.remove()
    assert alive_when_next_rung_applied == [False]
    assert out.strategy.fp8 and len(out.steps) == 1


# --- predictor arithmetic -------------------------------------------------------------------------------

def test_architecture_constants_match_the_configs():
    for preset in ("large", "medium"):
        assert count_architecture(preset) == ARCHITECTURE[preset]


def test_bf16_weights_are_two_bytes_per_element_and_fp8_removes_exactly_the_converted_bytes():
    arch = ARCHITECTURE["large"]
    p = predict("large", "resident")
    assert p.stage_peaks["weights"] == 2 * sum(c.elements for c in arch.values())
    q = predict("large", "fp8")
    saved = sum(arch[c].fp8_weights - 4 * arch[c].fp8_rows for c in ("transformer", "t5"))
    assert p.stage_peaks["weights"] - q.stage_peaks["weights"] == saved
    # the transformer's parameters are exactly presets.PARAMETER_COUNTS plus the pos_embed buffer
    from sd35fp8_helpers.presets import PARAMETER_COUNTS

    pos_embed = 192 * 192 * 2432
    assert arch["transformer"].elements == PARAMETER_COUNTS["large"]["transformer"] + pos_embed


def test_prediction_orders_strategies_by_memory():
    peaks = [predict("large", s).gpu_peak for s in ("resident", "fp8", "fp8_model_offload", "fp8_group_offload")]
    assert peaks == sorted(peaks, reverse=True)
    assert predict("large", "fp8_no_t5").gpu_peak < predict("large", "fp8").gpu_peak
    assert predict("large", "resident", 2048, 2048).gpu_peak > predict("large", "resident").gpu_peak
    assert predict("large", "fp8_tiled", 2048, 2048).gpu_peak < predict("large", "fp8", 2048, 2048).gpu_peak


def test_plan_recommends_a_fitting_lossless_strategy():
    p = plan(12, "large", 1024, 1024)
    assert p.recommended is not None and p.recommended.fits and p.recommended.lossless
    assert p.recommended.card_needed <= 12 * GIB
    assert p.rows == sorted(p.rows, key=lambda r: (-r.relative_speed, r.gpu_peak))


@pytest.mark.parametrize("kwargs, match", [
    (dict(vram_gib=-4), "vram=-4 must be a positive number of GiB"),
    (dict(vram_gib=12, preset="xl"), "preset='xl' is not a preset the planner knows"),
    (dict(vram_gib=12, height=1000), "height=1000 is not a multiple of 16; nearest valid: 992 or 1008"),
    (dict(vram_gib=12, width=4000), "width=4000 is over SD3.5 large's single-pass limit of 3072 px"),
    (dict(vram_gib=12, batch=0), "batch=0 must be a whole number >= 1"),
    (dict(vram_gib=12, margin=1.5), "margin=1.5 must be a fraction"),
    (dict(vram_gib=12, ram_gib=0), "ram=0 must be a positive number of GiB"),
])
def test_invalid_plan_inputs_raise_clear_errors(kwargs, match):
    with pytest.raises(InvalidPlanInput, match=match):
        plan(**kwargs)


def test_host_ram_rules_out_offloading_that_would_not_fit_in_ram():
    roomy = plan(4, "large", ram_gib=256)
    tight = plan(4, "large", ram_gib=8)  # every offload keeps the ~14 GiB of FP8 weights in host RAM
    assert roomy.recommended is not None and roomy.recommended.host_ram > 8 * GIB
    assert tight.recommended is None
    assert "does not fit a 4 GiB card and 8 GiB of host RAM" in tight.note


def test_unknown_strategy_names_the_choices():
    with pytest.raises(InvalidPlanInput, match="(?s)strategy=.fastest. is not a strategy.*resident"):
        get_strategy("fastest")


# --- CLI ------------------------------------------------------------------------------------------------

def test_plan_cli_text_and_json(cli):
    text = cli("plan", "--vram", "12", "--preset", "large", "--height", "1024", "--width", "1024")
    assert text.returncode == 0, text.stderr
    assert "RECOMMENDED: " in text.stdout and "fp8_model_offload" in text.stdout
    js = cli("plan", "--vram", "12", "--preset", "medium", "--json")
    data = json.loads(js.stdout)
    assert data["recommended"]["fits"] and data["preset"] == "medium"
    assert {r["strategy"] for r in data["rows"]} >= {s.name for s in STRATEGIES}


def test_plan_cli_impossible_budget_says_so_and_names_the_nearest(cli):
    out = cli("plan", "--vram", "0.5", "--preset", "large")
    assert out.returncode == 1
    assert "IMPOSSIBLE: SD3.5 large at 1024x1024 does not fit a 0.5 GiB card" in out.stdout
    assert "Nearest that works: a card of at least" in out.stdout


def test_plan_cli_bad_input_is_one_line_with_the_fix(cli):
    out = cli("plan", "--vram", "-4")
    assert out.returncode == 1
    assert "sd35fp8 plan: error: vram=-4.0 must be a positive number of GiB fix: pass your card's memory" in out.stderr
    out = cli("plan", "--vram", "12", "--height", "1000")
    assert "height=1000 is not a multiple of 16; nearest valid: 992 or 1008" in out.stderr


def test_emulated_card_needs_a_positive_budget(tiny_pipe):
    with pytest.raises(InvalidPlanInput, match="budget=0 must be a positive number of bytes"):
        with emulated_card(0, tiny_pipe):
            pass


def test_predictions_within_10_percent_of_every_committed_gpu_measurement():
    """The planner against what the H100 measured (docs/benchmarks/memory*.json): every rung, Large and Medium."""
    from sd35fp8_helpers.benchmarks.memory import BENCHMARK_JSON, load_results, predicted_now_gib

    rows = [r for path in sorted(BENCHMARK_JSON.parent.glob("memory*.json"))
            for r in load_results(path)["ladder"] if "error" not in r]
    assert {r["preset"] for r in rows} == {"large", "medium"} and len(rows) >= 14
    misses = {f"{r['preset']}/{r['strategy']}": round(predicted_now_gib(r) / r["measured_gib"] - 1, 3)
              for r in rows if abs(predicted_now_gib(r) / r["measured_gib"] - 1) > 0.10}
    assert misses == {}


def test_a_4_gib_card_for_large_says_what_is_impossible_and_what_the_next_tier_needs(cli):
    from sd35fp8_helpers.memory.plan import plan

    result = plan(4, "large")
    ruled_out = [r.strategy for r in result.rows if not r.fits]
    assert "resident" in ruled_out and "fp8" in ruled_out and "fp8_model_offload" in ruled_out
    assert f"NOT POSSIBLE on 4 GiB: {len(ruled_out)} faster strategies" in result.note
    nearest = next(r for r in result.rows if r.strategy == "fp8_model_offload")
    assert f"needs a card of {nearest.card_needed / 2**30:.1f} GiB" in result.note
    out = cli("plan", "--vram", "4", "--preset", "large", "--height", "1024", "--width", "1024")
    assert out.returncode == 0 and "NOT POSSIBLE on 4 GiB" in out.stdout

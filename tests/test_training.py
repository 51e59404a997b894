"""Training the scene model: the CPU smoke run learns, and the shipped model loads, verifies and draws."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sd35fp8_helpers.training.train_tiny import SCENE_MARKER, load_scene_record

SHIPPED = Path(__file__).resolve().parents[1] / "sd35fp8_helpers" / "models" / "sd35-scenes"


def _mean(values):
    return sum(values) / len(values)


@pytest.fixture(scope="module")
def smoke_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smoke") / "model"
    proc = subprocess.run([sys.executable, "-m", "sd35fp8_helpers.training.train_tiny", str(out), "--smoke"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out


def test_smoke_training_runs_in_under_a_minute_and_both_losses_fall(smoke_model):
    """Under a minute of this process's own CPU time per thread: what the run takes on idle cores (wall-clock
    time on a shared machine measures the neighbours too)."""
    training = load_scene_record(smoke_model)["training"]
    assert training["cpu_seconds"] / max(1, min(training["threads"], 2)) < 60, training
    losses = json.loads((smoke_model / "loss.json").read_text())
    for phase in ("vae", "transformer"):
        curve = losses[phase]["losses"]
        third = max(1, len(curve) // 3)
        assert len(curve) >= 10
        assert _mean(curve[-third:]) < 0.85 * _mean(curve[:third]), (phase, curve)
    assert (smoke_model / "loss.png").stat().st_size > 1000


def test_smoke_model_is_a_diffusers_folder_that_generates_non_square(smoke_model):
    import torch
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(str(smoke_model))
    record = load_scene_record(smoke_model)
    assert pipe.vae.config.shift_factor == pytest.approx(record["training"]["shift_factor"])
    assert pipe.vae.config.scaling_factor == pytest.approx(record["training"]["scaling_factor"])
    assert pipe.transformer.config.qk_norm == "rms_norm" and list(pipe.transformer.config.dual_attention_layers)
    image = pipe("a small red circle on the left, on a blue background", num_inference_steps=2, height=32, width=48,
                 max_sequence_length=record["inference"]["max_sequence_length"],
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (48, 32)


def test_tokenizers_spell_every_scene_word_as_one_token(tmp_path):
    from sd35fp8_helpers.scenes.vocabulary import caption_words
    from sd35fp8_helpers.training.text import build_clip_tokenizer, build_t5_tokenizer

    clip, t5 = build_clip_tokenizer(), build_t5_tokenizer(tmp_path)
    for word in caption_words():
        assert clip.tokenize(word) == [f"{word}</w>"]
        assert t5.tokenize(word) == [f"\u2581{word}"]


def test_shipped_model_matches_its_manifest_and_size_budget():
    lines = (SHIPPED / "sha256sums.txt").read_text().split("\n")
    listed = dict(reversed(line.split("  ", 1)) for line in lines if line and not line.startswith("#"))
    files = {p.relative_to(SHIPPED).as_posix() for p in SHIPPED.rglob("*") if p.is_file()} - {"sha256sums.txt"}
    assert set(listed) == files
    for name, digest in listed.items():
        assert hashlib.sha256((SHIPPED / name).read_bytes()).hexdigest() == digest, name
    weights = [p for p in SHIPPED.rglob("*") if p.suffix in (".safetensors", ".bin", ".pt", ".ckpt", ".pth")]
    assert weights and all(p.suffix == ".safetensors" for p in weights)
    assert sum(p.stat().st_size for p in weights) <= 30_000_000
    assert (SHIPPED / SCENE_MARKER).is_file() and (SHIPPED / "README.md").is_file()


def test_shipped_model_draws_what_the_prompt_places():
    """Shape, position and size are what the shipped v2 does reliably (98–100% on the full set); six prompts."""
    import torch
    from diffusers import StableDiffusion3Pipeline

    from sd35fp8_helpers.scenes import evaluation_prompts, judge

    record = load_scene_record(SHIPPED)["inference"]
    pipe = StableDiffusion3Pipeline.from_pretrained(str(SHIPPED), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    prompts = evaluation_prompts("single")[::40]
    verdicts = []
    for p in prompts:
        image = pipe(p.text, num_inference_steps=record["steps"], guidance_scale=record["guidance_scale"],
                     max_sequence_length=record["max_sequence_length"],
                     generator=torch.Generator().manual_seed(0)).images[0]
        assert image.size == (record["width"], record["height"])
        verdicts.append(judge(image, p.spec))
    assert sum(v.objects[0].ok("position") for v in verdicts) >= len(prompts) - 1
    assert sum(v.objects[0].ok("shape") for v in verdicts) >= len(prompts) - 1
    assert sum(v.objects[0].ok("size") for v in verdicts) >= len(prompts) - 2


def test_colour_mixups_counts_an_exchange_of_object_and_background_colour_only():
    from sd35fp8_helpers.scenes import evaluation_prompts
    from sd35fp8_helpers.training.evaluate import colour_mixups, model_colour_mixups

    a, b, c = evaluation_prompts("single")[:3]
    other = next(x for x in ("red", "orange", "pink", "cyan") if x not in (c.spec.objects[0].colour, c.spec.background))
    records = [{"id": a.id, "seen": [{"colour": a.spec.objects[0].colour}], "background": a.spec.background},
               {"id": b.id, "seen": [{"colour": b.spec.background}], "background": b.spec.objects[0].colour},
               {"id": c.id, "seen": [{"colour": other}], "background": c.spec.background},
               {"id": "t000", "seen": [], "background": "white"}]  # two-object records are not counted
    m = colour_mixups(records)
    assert (m.images, m.wrong, m.swapped) == (3, 2, 1) and m.swapped_share == 0.5
    shipped = model_colour_mixups()  # what the model card and notebook 02 say: most wrong colours are swaps
    assert shipped.images == 480 and shipped.swapped <= shipped.wrong and shipped.swapped_share > 0.9

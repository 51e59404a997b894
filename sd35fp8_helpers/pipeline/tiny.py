"""The embedded default model: a tiny, randomly initialised SD3.5 pipeline, built offline in seconds.

No model hub is reachable in CI (and often not on a laptop on a train). Every notebook, the CLI and the
tests therefore run on a pipeline that has the *real* SD3.5 architecture — ``SD3Transformer2DModel`` with
RMS qk-norm and a dual-attention layer, the 16-channel SD3 VAE with its shift/scaling factors, CLIP-L and
CLIP-G with projections, a T5 encoder, the flow-matching Euler scheduler — at a size that builds in well
under a second once the libraries are imported. Its tokenizers (``tokenizers`` BPE and Unigram models, as in
the real CLIP and T5) are learned here from a small built-in corpus, deterministically: the same seed gives
byte-identical files in every process.

It is saved in standard diffusers layout (``model_index.json``, one sub-folder per component, safetensors),
so ``StableDiffusion3Pipeline.from_pretrained(folder)`` loads it exactly as it loads a real download: the
code path after "resolve the model" is the same for tiny and for SD3.5 Large.

Images from random weights are noise-like; that is expected. What matters is that every tensor has the
shape, dtype and wiring of the real thing.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import string
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..constants import settings
from ..presets import TINY

TINY_MARKER = "sd35fp8_tiny.json"
"""Marker file that says 'this folder is the embedded tiny model' (and with which seed)."""

TINY_FORMAT_VERSION = 2
"""Bump when the builder changes what it writes: the cache key includes it."""

_CORPUS = """
a photo of an astronaut riding a horse on the moon
a watercolor painting of a red fox in a snowy forest at dawn
a cinematic portrait of an old fisherman, soft light, 85mm lens, shallow depth of field
an isometric illustration of a tiny city on a floating island, vibrant colors
a bowl of ramen on a wooden table, steam rising, studio lighting, high detail
a cat wearing a wizard hat reading a book in a cozy library
a futuristic car in the rain at night, neon reflections, ultra detailed
an oil painting of sunflowers in a blue vase, thick brush strokes
a minimalist poster of a mountain landscape with a sun, flat design
a macro photograph of a dew drop on a green leaf, bokeh background
a robot playing chess in a park, autumn leaves, golden hour
a castle on a cliff above the sea, dramatic clouds, fantasy art
a close up of a hummingbird drinking from a flower, sharp focus
a cozy cabin in the mountains at night with warm windows and stars
a bustling market street in the old town, people, lanterns, evening
a sketch of a dragon, pencil on paper, detailed line art
text that says hello world on a chalkboard
blurry, low quality, watermark, deformed hands, extra fingers, jpeg artifacts
""".strip().splitlines()


@dataclass(frozen=True)
class TinyModelInfo:
    """What :func:`save_tiny_model` wrote."""

    path: Path
    seed: int
    build_seconds: float
    size_bytes: int
    cached: bool

    def __str__(self) -> str:
        how = "reused cached copy" if self.cached else f"built in {self.build_seconds:.2f} s"
        return f"tiny SD3.5 pipeline at {self.path} ({self.size_bytes / 1e6:.1f} MB, seed {self.seed}; {how})"


_CLIP_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-:;()"
_CLIP_MERGES = 300
_T5_SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5


def _corpus_words(pattern: str) -> Counter:
    return Counter(w for line in _CORPUS for w in re.findall(pattern, line.lower()))


def learn_bpe(words: Counter, merges: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Byte-pair merges learned from word counts, ties broken alphabetically.

    Why not ``tokenizers.trainers.BpeTrainer``? It breaks ties between equally frequent pairs in hash-map
    order, which changes from one process to the next: the same seed would give different tokenizers,
    and so different images. This is the same algorithm with a deterministic tie-break.
    """
    splits = {w: [*w[:-1], w[-1] + "</w>"] for w in sorted(words)}
    symbols = sorted({c for c in _CLIP_ALPHABET} | {c + "</w>" for c in _CLIP_ALPHABET})
    learned: list[tuple[str, str]] = []
    for _ in range(merges):
        pairs: Counter = Counter()
        for w, parts in splits.items():
            for pair in zip(parts, parts[1:]):
                pairs[pair] += words[w]
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        learned.append(best)
        for w, parts in splits.items():
            i, merged = 0, []
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            splits[w] = merged
    return symbols + [a + b for a, b in learned], learned


def _train_clip_tokenizer():
    """A CLIP BPE tokenizer (``</w>`` end-of-word suffix, CLIP's special tokens, 77 tokens), learned from the corpus."""
    from transformers import CLIPTokenizer

    # The same word split as CLIPTokenizer's pre-tokenizer: letters, single digits, runs of punctuation.
    symbols, merges = learn_bpe(_corpus_words(r"[a-z]+|[0-9]|[^\sa-z0-9]+"), _CLIP_MERGES)
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(["<|startoftext|>", "<|endoftext|>", *symbols]))}
    # model_max_length must be explicit: SD3 truncates CLIP input at 77 tokens.
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, pad_token="<|endoftext|>")


def _train_t5_tokenizer(workdir: Path):
    """A T5-style Unigram tokenizer (``<pad>``=0, ``</s>``=1, ``<unk>``=2, Metaspace) from corpus word statistics.

    Pieces are whole words (``▁word``) scored by log frequency, plus single characters as a fallback, built
    deterministically (see :func:`learn_bpe` for why not the library's trainer).
    """
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from transformers import T5TokenizerFast

    words = _corpus_words(r"[^\s]+")
    total = sum(words.values())
    pieces = [(f"\u2581{w}", math.log(c / total)) for w, c in sorted(words.items())]
    chars = sorted(set(string.ascii_letters + string.digits + string.punctuation + "\u2581")
                   | {ch for w in words for ch in w})
    pieces += [(ch, math.log(1 / total) - 5.0) for ch in chars]  # rarer than any word: used only as fallback
    uni = Tokenizer(models.Unigram([(t, 0.0) for t in _T5_SPECIALS] + pieces, unk_id=2))
    uni.normalizer = normalizers.NFKC()
    uni.pre_tokenizer = pre_tokenizers.Metaspace()
    uni.decoder = decoders.Metaspace()
    uni.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    path = workdir / "t5-tokenizer.json"
    uni.save(str(path))
    return T5TokenizerFast(tokenizer_file=str(path), pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=256)


def build_tiny_pipeline(seed: int = 0):
    """Build the tiny SD3.5 ``StableDiffusion3Pipeline`` in memory (float32, CPU), deterministic for ``seed``.

    Example:
        >>> pipe = build_tiny_pipeline(seed=0)
        >>> type(pipe).__name__, list(pipe.transformer.config.dual_attention_layers)
        ('StableDiffusion3Pipeline', [0])
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    cfg = TINY.component_configs()
    with tempfile.TemporaryDirectory() as tmp:
        clip_tok = _train_clip_tokenizer()
        t5_tok = _train_t5_tokenizer(Path(tmp))
        clip_ids = dict(vocab_size=len(clip_tok), bos_token_id=clip_tok.bos_token_id,
                        eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id)
        # Each component gets its own seed so that changing one does not reshuffle the others,
        # and the caller's global RNG state is left untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            transformer = SD3Transformer2DModel(**cfg["transformer"])
            torch.manual_seed(seed + 1)
            vae = AutoencoderKL(**cfg["vae"])
            torch.manual_seed(seed + 2)
            clip_l = CLIPTextModelWithProjection(CLIPTextConfig(**cfg["clip_l"], **clip_ids))
            torch.manual_seed(seed + 3)
            clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**cfg["clip_g"], **clip_ids))
            torch.manual_seed(seed + 4)
            t5 = T5EncoderModel(T5Config(**cfg["t5"], vocab_size=len(t5_tok), pad_token_id=t5_tok.pad_token_id,
                                         eos_token_id=t5_tok.eos_token_id, decoder_start_token_id=0))
        scheduler = FlowMatchEulerDiscreteScheduler(**TINY.scheduler)
        pipe = StableDiffusion3Pipeline(
            transformer=transformer, scheduler=scheduler, vae=vae,
            text_encoder=clip_l, tokenizer=clip_tok, text_encoder_2=clip_g, tokenizer_2=clip_tok,
            text_encoder_3=t5, tokenizer_3=t5_tok,
        )
    for module in (transformer, vae, clip_l, clip_g, t5):
        module.eval()
    return pipe


def _cache_key(seed: int) -> str:
    import diffusers
    import transformers

    blob = json.dumps([TINY_FORMAT_VERSION, seed, TINY.component_configs(), _CORPUS,
                       diffusers.__version__, transformers.__version__], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def save_tiny_model(out_dir: str | os.PathLike, seed: int = 0, *, overwrite: bool = False) -> TinyModelInfo:
    """Write the tiny pipeline to ``out_dir`` in diffusers layout, atomically.

    The folder is built beside ``out_dir`` and renamed into place only when complete, so an interrupted
    build never leaves a half-written model that later looks valid.
    """
    out = Path(out_dir).absolute()
    if (out / "model_index.json").is_file() and not overwrite:
        return TinyModelInfo(out, seed, 0.0, _folder_size(out), cached=True)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not a tiny model folder; choose an empty or new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        from ..display import quiet_loading_bars

        quiet_loading_bars()  # a 1.5 MB save needs no "Writing model shards" bars
        build_tiny_pipeline(seed).save_pretrained(staging, safe_serialization=True)
        seconds = time.perf_counter() - start
        (staging / TINY_MARKER).write_text(json.dumps(
            {"seed": seed, "format": TINY_FORMAT_VERSION, "preset": "tiny"}, indent=2) + "\n")
        if (out / "model_index.json").is_file() and not overwrite:
            # another process (a second `sd35fp8 worker` starting at the same time) finished first: keep its
            # folder — removing it would pull the files from under a process that is loading them
            return TinyModelInfo(out, seed, seconds, _folder_size(out), cached=True)
        if out.exists():
            shutil.rmtree(out)
        try:
            staging.rename(out)
        except OSError:  # another process finished the same build first: keep theirs
            if not (out / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return TinyModelInfo(out, seed, seconds, _folder_size(out), cached=False)


def tiny_model_path(seed: int = 0) -> Path:
    """The cached tiny model folder (built on first use under ``SD35FP8_HOME``)."""
    path = settings().home / f"tiny-{_cache_key(seed)}"
    return save_tiny_model(path, seed).path

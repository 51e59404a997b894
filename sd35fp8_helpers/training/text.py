"""Tokenizers and frozen text encoders for the scene model, built from the scene vocabulary.

The trained model reads its prompts through the real SD3.5 text path — CLIP-L, CLIP-G and T5 classes
from ``transformers``, their tokenizers, ``StableDiffusion3Pipeline.encode_prompt`` — at a tiny size and
with random, frozen weights. Random is enough: the transformer learns to read whatever fixed embedding each
word gets, and a frozen encoder keeps training cheap (every caption is encoded once). The tokenizers'
vocabularies are the scene words (:func:`~sd35fp8_helpers.scenes.vocabulary.caption_words`) so each word is
one token; any other word still tokenizes, into characters, and simply means nothing to the model.
"""

from __future__ import annotations

import math
import string
from collections import Counter
from pathlib import Path
from typing import Any

CLIP_CONFIG: dict[str, Any] = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   projection_dim=64, max_position_embeddings=77)
"""Both CLIPs (L with quick-gelu, G with gelu): 64 + 64 hidden fills T5's 128 (SD3 pads CLIP up to T5's width)."""

T5_CONFIG: dict[str, Any] = dict(d_model=128, d_ff=256, d_kv=32, num_layers=2, num_heads=4,
                                 feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
"""The T5 encoder; its ``d_model`` is the transformer's ``joint_attention_dim``."""

T5_TOKENS = 32
"""T5 sequence length the model is trained with (``max_sequence_length``): the longest caption is ~25 tokens.
Inference must pass the same value, because SD3's T5 runs without an attention mask: a different padding
length changes every embedding."""

_CLIP_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-:;()"
_T5_SPECIALS = ("<pad>", "</s>", "<unk>")


def _word_counts() -> Counter:
    from ..scenes.vocabulary import caption_words

    return Counter({w: 1 for w in caption_words()} | {c: 1 for c in ",:"})


def build_clip_tokenizer():
    """A CLIP BPE tokenizer whose merges spell every scene word as one token (deterministic tie-breaks)."""
    from transformers import CLIPTokenizer

    from ..pipeline.tiny import learn_bpe

    words = _word_counts()
    symbols, merges = learn_bpe(words, sum(len(w) for w in words))  # enough merges for whole words
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(["<|startoftext|>", "<|endoftext|>", *symbols]))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, pad_token="<|endoftext|>")


def build_t5_tokenizer(workdir: Path):
    """A T5-style Unigram tokenizer: one piece per scene word, single characters as the fallback."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    words = _word_counts()
    pieces = [(f"\u2581{w}", math.log(1 / len(words))) for w in sorted(words)]
    chars = sorted(set(string.ascii_letters + string.digits + string.punctuation + "\u2581"))
    pieces += [(ch, math.log(1 / len(words)) - 5.0) for ch in chars]
    uni = Tokenizer(models.Unigram([(t, 0.0) for t in _T5_SPECIALS] + pieces, unk_id=2))
    uni.normalizer = normalizers.NFKC()
    uni.pre_tokenizer = pre_tokenizers.Metaspace()
    uni.decoder = decoders.Metaspace()
    uni.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    path = Path(workdir) / "t5-tokenizer.json"
    uni.save(str(path))
    return T5TokenizerFast(tokenizer_file=str(path), pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=T5_TOKENS)


def build_text_components(seed: int, workdir: Path) -> dict[str, Any]:
    """Tokenizers and frozen, randomly initialised CLIP-L, CLIP-G and T5 encoders (float32, eval mode),
    as ``StableDiffusion3Pipeline`` keyword arguments."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    clip_tok, t5_tok = build_clip_tokenizer(), build_t5_tokenizer(workdir)
    ids = dict(vocab_size=len(clip_tok), bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id,
               pad_token_id=clip_tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 2)
        clip_l = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_CONFIG, hidden_act="quick_gelu", **ids))
        torch.manual_seed(seed + 3)
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_CONFIG, hidden_act="gelu", **ids))
        torch.manual_seed(seed + 4)
        t5 = T5EncoderModel(T5Config(**T5_CONFIG, vocab_size=len(t5_tok), pad_token_id=t5_tok.pad_token_id,
                                     eos_token_id=t5_tok.eos_token_id, decoder_start_token_id=0))
    for m in (clip_l, clip_g, t5):
        m.eval().requires_grad_(False)
    return dict(text_encoder=clip_l, tokenizer=clip_tok, text_encoder_2=clip_g, tokenizer_2=clip_tok,
                text_encoder_3=t5, tokenizer_3=t5_tok)

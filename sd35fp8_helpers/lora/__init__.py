"""LoRA on SD3.5 — BF16, FP8 storage and FP8 compute alike: merged and re-quantised, or on a BF16 side path.

``load_lora_(pipe, "style.safetensors", scale=0.8, mode="merge")`` reads diffusers/PEFT, Kohya and Comfy key
layouts (original MMDiT names are mapped through diffusers' own SD3 converter), refuses a file that does not
fit this transformer naming the first bad key, and returns a :class:`~.apply.LoraReport`.
``unload_lora_(pipe)`` restores every weight bit for bit. Which mode to use, measured: ``docs/benchmarks.md``.

Example (a real rank-4 LoRA on one layer of the embedded scene model, in the diffusers/PEFT layout):
    >>> import tempfile, torch
    >>> from safetensors.torch import save_file
    >>> from sd35fp8_helpers import load_pipeline
    >>> from sd35fp8_helpers.lora import load_lora_, unload_lora_
    >>> pipe = load_pipeline("scenes", device="cpu")
    >>> q = pipe.transformer.transformer_blocks[0].attn.to_q
    >>> path = tempfile.mkdtemp() + "/style.safetensors"
    >>> save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.full((4, q.in_features), 0.01),
    ...            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.full((q.out_features, 4), 0.01)},
    ...           path)
    >>> load_lora_(pipe, path, mode="side").layers
    1
    >>> unload_lora_(pipe)
    ['style']
"""

from .._lazy import lazy_exports

_EXPORTS = {
    "load_lora_": ".apply",
    "unload_lora_": ".apply",
    "set_lora_scale_": ".apply",
    "loaded_loras": ".apply",
    "resolve_lora": ".shipped",
    "LoraReport": ".apply",
    "LoraRegistry": ".apply",
    "MODES": ".apply",
    "parse_lora": ".formats",
    "read_safetensors": ".formats",
    "LoraLayer": ".formats",
    "shipped_loras": ".shipped",
    "named_loras": ".shipped",
    "user_lora_dir": ".shipped",
    "shipped_lora_path": ".shipped",
    "shipped_lora_info": ".shipped",
    "SHIPPED_DIR": ".shipped",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

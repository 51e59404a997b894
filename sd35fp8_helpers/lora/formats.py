"""Read a LoRA file into one form — a list of :class:`LoraLayer` (target Linear, ``down``, ``up``, scale) —
whatever its key layout, refusing anything that cannot be placed.

Layouts understood (the name part and the suffix part are read independently):

* **diffusers / PEFT**: ``transformer.transformer_blocks.0.attn.to_q.lora_A.weight`` / ``lora_B`` (also with
  ``base_model.model.`` or no prefix, and the older ``.lora.down`` / ``.lora_linear_layer.down`` suffixes);
  alpha from the file's ``lora_adapter_metadata`` (what diffusers writes), else ``.alpha`` keys, else rank;
* **Kohya** (sd-scripts): ``lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight`` / ``lora_up`` /
  ``.alpha``, with the original MMDiT names underscored (diffusers names underscored work too);
* **Comfy**: the original names with dots, ``diffusion_model.joint_blocks.0.x_block.attn.qkv.lora_up.weight``.

Original-name layers map through diffusers' own SD3 checkpoint converter (:mod:`.keymap`): a fused ``qkv``
LoRA becomes three (shared ``down``, a third of ``up`` each); the final AdaLN's rows are swapped.

Only safetensors files load: pickle files (``.bin``, ``.pt``, ``.ckpt``) can run code when opened.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import LoraError
from .keymap import original_to_diffusers, underscored

if TYPE_CHECKING:  # pragma: no cover
    import torch

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
PREFIXES = ("base_model.model.", "transformer.", "model.diffusion_model.", "diffusion_model.", "lora_unet_",
            "lora_transformer_", "unet.")
"""Name prefixes stripped before a module is looked up (longest first among those that overlap)."""

_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".alpha", "alpha"),
)
_TEXT_ENCODER = re.compile(r"^(lora_te\d?_|text_encoder(_\d)?\.|lora_te_text_model)")
_UNSUPPORTED = {"dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", "hada_": "LoHa", "lokr_": "LoKr",
                ".lora_mid.": "LoCon mid", ".diff": "full-weight diff"}


@dataclass
class LoraLayer:
    """One low-rank update of one Linear: ``ΔW = scale · up @ down``, with ``scale = alpha / rank``."""

    target: str            # diffusers module name inside the transformer, e.g. transformer_blocks.0.attn.to_q
    down: "torch.Tensor"   # (rank, in_features)
    up: "torch.Tensor"     # (out_features, rank)
    alpha_scale: float     # alpha / rank (1.0 without alpha)
    key: str               # the file's key for ``up``: what an error names

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self, dtype=None) -> "torch.Tensor":
        """ΔW in float32 (or ``dtype``), before the user's scale."""
        import torch

        d = (self.up.float() @ self.down.float()) * self.alpha_scale
        return d if dtype in (None, torch.float32) else d.to(dtype)

    @property
    def nbytes(self) -> int:
        return self.down.numel() * self.down.element_size() + self.up.numel() * self.up.element_size()


def read_safetensors(path: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Tensors and metadata of a LoRA file; anything but a readable safetensors file is a :class:`LoraError`."""
    path = Path(path)
    if not path.is_file():
        raise LoraError(path, "does not exist", fix="check the path, or pass the name of a shipped LoRA "
                                                    "(sd35fp8_helpers.lora.shipped_loras())")
    with path.open("rb") as f:
        head = f.read(64)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise _pickle_refused(path)
    if head.startswith(b"version https://git-lfs"):
        raise LoraError(path, "is a Git LFS pointer file, not the LoRA", fix="run `git lfs pull` in its repository")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        # torch.save writes a zip (PK\x03\x04) or, in old versions, a bare pickle (\x80 + protocol 2-5)
        if head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04",
                                                                                    b"\x05")):
            raise _pickle_refused(path) from exc
        raise LoraError(path, f"is not a readable safetensors file ({exc})",
                        fix="download it again (a truncated download looks like this), and check it is a LoRA "
                            ".safetensors file") from exc
    if not tensors:
        raise LoraError(path, "holds no tensors", fix="this is not a LoRA file")
    return tensors, metadata


def _pickle_refused(path: Path) -> LoraError:
    return LoraError(path, "is a pickle (PyTorch .bin/.pt/.ckpt) file, which can run arbitrary code when loaded; "
                           "only safetensors LoRA files are accepted",
                     fix="get the .safetensors release of this LoRA, or convert it once in a sandbox you trust: "
                         "torch.load(f, weights_only=True), then safetensors.torch.save_file(sd, 'lora.safetensors')")


def _split_key(key: str) -> tuple[str, str] | None:
    for suffix, role in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def _strip(name: str) -> str:
    for prefix in PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _metadata_alphas(metadata: dict[str, str]) -> tuple[float | None, dict[str, float]]:
    """(lora_alpha, alpha_pattern) from diffusers' ``lora_adapter_metadata`` (keys may carry ``transformer.``)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None, {}
    try:
        meta = json.loads(raw)
    except ValueError:
        return None, {}
    meta = {k.removeprefix("transformer."): v for k, v in meta.items()}
    alpha = meta.get("lora_alpha")
    return (float(alpha) if alpha is not None else None), {k: float(v) for k, v in
                                                           (meta.get("alpha_pattern") or {}).items()}


class _Resolver:
    """Module-name lookup: diffusers names, original names (dotted and underscored), diffusers underscored."""

    def __init__(self, transformer) -> None:
        import torch

        from .side import is_side_linear

        modules = dict(transformer.named_modules())
        wrapped = {f"{n}.base" for n, m in modules.items() if is_side_linear(m)}  # inside a side path: not targets
        self.linears = {n: m for n, m in modules.items() if n not in wrapped and _is_linear(m, torch)}
        self.originals = original_to_diffusers(transformer)
        self.by_underscore: dict[str, tuple[str, str]] = {}
        for name in self.linears:
            self.by_underscore.setdefault(underscored(name), ("diffusers", name))
        for name in self.originals:
            self.by_underscore.setdefault(underscored(name), ("original", name))

    def resolve(self, name: str) -> tuple[str, str] | None:
        name = _strip(name)
        if name in self.linears:
            return "diffusers", name
        if name in self.originals:
            return "original", name
        return self.by_underscore.get(name)


def _is_linear(module, torch) -> bool:
    from ..precision.storage import is_fp8_storage
    from .side import is_side_linear

    return isinstance(module, torch.nn.Linear) or is_fp8_storage(module) or is_side_linear(module)


def parse_lora(path: str | Path, transformer, tensors: dict[str, Any] | None = None,
               metadata: dict[str, str] | None = None) -> list[LoraLayer]:
    """Every layer of the LoRA at ``path`` placed on ``transformer``'s Linears, or a :class:`LoraError` that
    names the first key that cannot be placed (no match, text encoder, unsupported kind, wrong shape).

    Example::

        layers = parse_lora("style.safetensors", pipe.transformer)   # [LoraLayer(target=…, down, up, …), …]
    """
    path = Path(path)
    if tensors is None:
        tensors, metadata = read_safetensors(path)
    metadata = metadata or {}
    meta_alpha, alpha_pattern = _metadata_alphas(metadata)
    groups: dict[str, dict[str, tuple[str, Any]]] = {}
    for key in sorted(tensors):
        for marker, kind in _UNSUPPORTED.items():
            if marker in key:
                raise LoraError(path, f"is a {kind} weight; only plain LoRA (down/up, optional alpha) is supported",
                                key=key, fix="use a plain LoRA export of this adapter")
        if _TEXT_ENCODER.match(key):
            raise LoraError(path, "belongs to a text encoder; sd35fp8 applies LoRA to the transformer only",
                            key=key, fix="use a transformer-only LoRA (or strip the text-encoder keys from "
                                         "the file)")
        split = _split_key(key)
        if split is None:
            raise LoraError(path, "is not a LoRA weight (expected …lora_A/lora_B.weight, "
                                  "…lora_down/lora_up.weight or …alpha)", key=key,
                            fix="check that this file is a LoRA for SD3.5 (a full checkpoint is not a LoRA)")
        module, role = split
        groups.setdefault(module, {})[role] = (key, tensors[key])
    resolver = _Resolver(transformer)
    layers: list[LoraLayer] = []
    for module, parts in groups.items():
        first_key = min(k for k, _ in parts.values())
        if "down" not in parts or "up" not in parts:
            missing = "up" if "down" in parts else "down"
            raise LoraError(path, f"has no matching {missing} weight", key=first_key,
                            fix="the file is incomplete or not a LoRA; re-export it")
        where = resolver.resolve(module)
        if where is None:
            raise LoraError(path, "matches no Linear layer of this transformer", key=first_key,
                            fix="this LoRA was made for another model (SD3.5 Large vs Medium, or not SD3 at "
                                "all); use one trained for this pipeline")
        (down_key, down), (up_key, up) = parts["down"], parts["up"]
        _check_rank(path, down_key, down, up_key, up)
        rank = down.shape[0]
        alpha = float(parts["alpha"][1].item()) if "alpha" in parts else None
        kind, name = where
        if kind == "diffusers":
            targets = [(name, None)]
        else:
            targets = [(t, rows.rows) for t, rows in resolver.originals[name]]
        for target, rows in targets:
            if alpha is None:
                a = next((v for pat, v in alpha_pattern.items() if target.endswith(pat)), meta_alpha)
            else:
                a = alpha
            layer_up = up if rows is None else _rows(path, up_key, up, rows)
            linear = resolver.linears.get(target)
            if linear is None:
                raise LoraError(path, f"maps to {target}, which is not a Linear layer (LoRA on convolutions "
                                      "or embeddings is not supported)", key=up_key,
                                fix="use a LoRA that adapts Linear layers only")
            out_f, in_f = _features(linear)
            if down.shape[1] != in_f or layer_up.shape[0] != out_f:
                raise LoraError(path, f"has shapes down {tuple(down.shape)} / up {tuple(layer_up.shape)} but "
                                      f"{target} is {in_f} -> {out_f} features", key=up_key,
                                fix="this LoRA was trained for another model size (SD3.5 Medium vs Large?); "
                                    "use one made for this pipeline")
            layers.append(LoraLayer(target, down, layer_up, (a / rank) if a is not None else 1.0, up_key))
    if not layers:  # pragma: no cover - read_safetensors refuses empty files
        raise LoraError(path, "has no LoRA layers", fix="this is not a LoRA file")
    return layers


def _check_rank(path: Path, down_key: str, down, up_key: str, up) -> None:
    if down.ndim != 2 or up.ndim != 2:
        raise LoraError(path, f"is {down.ndim if down.ndim != 2 else up.ndim}-dimensional; LoRA on Linear layers "
                              "has 2-D down/up matrices", key=down_key if down.ndim != 2 else up_key,
                        fix="convolution LoRAs are not supported for SD3 transformers")
    if up.shape[1] != down.shape[0]:
        raise LoraError(path, f"has rank {up.shape[1]} but its down weight {down_key!r} has rank "
                              f"{down.shape[0]}", key=up_key, fix="the file is corrupt or mixes two LoRAs")


def _rows(path: Path, key: str, up, rows: tuple[int, ...]):
    import torch

    if max(rows) >= up.shape[0]:
        raise LoraError(path, f"has {up.shape[0]} output rows; the original layer has at least {max(rows) + 1}",
                        key=key, fix="this LoRA was trained for another model size; use one made for this pipeline")
    return up.index_select(0, torch.tensor(rows, dtype=torch.long))


def _features(module) -> tuple[int, int]:
    from .side import is_side_linear

    if is_side_linear(module):
        module = module.base
    return int(module.out_features), int(module.in_features)

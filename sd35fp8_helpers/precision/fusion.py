"""Fewer passes: q, k and v as one projection (one GEMM, one activation cast) instead of three.

``to_q``, ``to_k`` and ``to_v`` read the same normalised input; three FP8 GEMMs mean three quantised copies
of it (dynamic: three amax reductions) and three smaller matmuls. :func:`fuse_qkv_` concatenates them into
``to_qkv`` (and the context stream's ``add_*_proj`` into ``to_added_qkv``) and installs a processor that
splits the result.

Why not diffusers' ``fuse_qkv_projections()``: its ``FusedJointAttnProcessor2_0`` (diffusers 0.42) skips the
RMS q/k norms that SD3.5 has (``qk_norm="rms_norm"``), so it computes a different function — faster partly
because it does less — and it fails on Medium's dual-attention layers (``attn2`` gets no text stream:
``AttributeError: 'NoneType' object has no attribute 'ndim'`` on the tiny model). It also keeps the separate
projections (+1.2 GiB on Large, REFERENCE §10). The processor here is ``JointAttnProcessor2_0`` with the
projections fused, norms kept; on the H200 fusion saved 1.0–2.8 ms of a Large step (docs/benchmarks.md).

Works on plain Linears and on FP8-stored ones (float8 rows and their per-row scales concatenate exactly);
a calibrated ``scale_input`` is carried over (the three layers share one input, so one range).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .storage import is_fp8_storage, storage_linear_class

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


def _concat(parts: list["nn.Module"]) -> "nn.Module":
    import torch
    from torch import nn

    first = parts[0]
    rows = sum(p.out_features for p in parts)
    has_bias = first.bias is not None
    if is_fp8_storage(first):
        per_row = first.scale_weight.ndim > 0
        fused = storage_linear_class()(first.in_features, rows, has_bias, device=first.weight.device,
                                       dtype=first.bias.dtype if has_bias else None, per_row=True)
        fused.weight = torch.cat([p.weight for p in parts])
        fused.scale_weight = torch.cat([p.scale_weight if per_row else p.scale_weight.reshape(1, 1).expand(
            p.out_features, 1) for p in parts]).contiguous()
    else:
        fused = nn.Linear(first.in_features, rows, has_bias, device=first.weight.device, dtype=first.weight.dtype)
        with torch.no_grad():
            fused.weight.copy_(torch.cat([p.weight for p in parts]))
    if has_bias:
        with torch.no_grad():
            fused.bias.data = torch.cat([p.bias.detach() for p in parts]).clone()
    scales = [getattr(p, "scale_input", None) for p in parts]
    if all(s is not None for s in scales):
        fused.register_buffer("scale_input", torch.stack([s.reshape(()) for s in scales]).amax(),
                              persistent=is_fp8_storage(fused))
    return fused


def _processor_class():
    import torch.nn.functional as F

    class FusedQKVJointAttnProcessor:
        """``JointAttnProcessor2_0`` with fused projections (``to_qkv``, ``to_added_qkv``); q/k norms kept."""

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
            import torch

            residual = hidden_states
            batch = hidden_states.shape[0]
            heads = attn.heads

            def split(t):
                q, k, v = t.chunk(3, dim=-1)
                head_dim = q.shape[-1] // heads
                return [x.view(batch, -1, heads, head_dim).transpose(1, 2) for x in (q, k, v)]

            query, key, value = split(attn.to_qkv(hidden_states))
            if attn.norm_q is not None:
                query = attn.norm_q(query)
            if attn.norm_k is not None:
                key = attn.norm_k(key)
            if encoder_hidden_states is not None:
                cq, ck, cv = split(attn.to_added_qkv(encoder_hidden_states))
                if attn.norm_added_q is not None:
                    cq = attn.norm_added_q(cq)
                if attn.norm_added_k is not None:
                    ck = attn.norm_added_k(ck)
                query, key, value = (torch.cat([a, b], dim=2) for a, b in ((query, cq), (key, ck), (value, cv)))
            out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
            out = out.transpose(1, 2).reshape(batch, -1, out.shape[1] * out.shape[3]).to(query.dtype)
            if encoder_hidden_states is not None:
                out, context = out[:, : residual.shape[1]], out[:, residual.shape[1]:]
                if not attn.context_pre_only:
                    context = attn.to_add_out(context)
            out = attn.to_out[1](attn.to_out[0](out))
            return (out, context) if encoder_hidden_states is not None else out

    return FusedQKVJointAttnProcessor


def fuse_qkv_(transformer: "nn.Module") -> int:
    """Fuse q/k/v (and the context stream's) of every SD3 attention in place; returns how many were fused.

    The separate projections are removed (no extra memory, unlike diffusers' version, which keeps both).
    Call it before FP8 compute conversion: the fused Linears are converted like any other.
    """
    from diffusers.models.attention_processor import Attention

    processor = _processor_class()()
    fused = 0
    for module in transformer.modules():
        if not isinstance(module, Attention) or getattr(module, "to_qkv", None) is not None:
            continue
        if not all(getattr(module, n, None) is not None for n in ("to_q", "to_k", "to_v")):
            continue
        module.to_qkv = _concat([module.to_q, module.to_k, module.to_v])
        del module.to_q, module.to_k, module.to_v
        if all(getattr(module, n, None) is not None for n in ("add_q_proj", "add_k_proj", "add_v_proj")):
            module.to_added_qkv = _concat([module.add_q_proj, module.add_k_proj, module.add_v_proj])
            del module.add_q_proj, module.add_k_proj, module.add_v_proj
        module.set_processor(processor)
        fused += 1
    return fused

"""FP8 *compute*: torchao float8 matmuls on capability >= 8.9, and the per-block compile that makes them pay.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..constants import FP8_COMPUTE_MIN_CAPABILITY
from .policies import FilterFn
from .storage import is_fp8_storage, replace_module

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn



# --- compute mode ---------------------------------------------------------------------------------------

def fp8_compute_support(device: Any) -> tuple[bool, str]:
    """(can FP8 matmuls run on ``device``, a sentence saying why)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return False, (f"{device} has no float8 tensor cores (FP8 compute needs an NVIDIA GPU of capability "
                       f">= {FP8_COMPUTE_MIN_CAPABILITY[0]}.{FP8_COMPUTE_MIN_CAPABILITY[1]})")
    cap = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device)
    need = ".".join(map(str, FP8_COMPUTE_MIN_CAPABILITY))
    if tuple(cap) < FP8_COMPUTE_MIN_CAPABILITY:
        return False, f"{name} has capability {cap[0]}.{cap[1]} < {need} (no float8 tensor cores)"
    try:
        import torchao  # noqa: F401
    except ImportError:
        return False, f"{name} (capability {cap[0]}.{cap[1]}) could, but torchao is not installed"
    return True, f"{name} has capability {cap[0]}.{cap[1]} >= {need}: float8 tensor cores"


def to_compute(model: "nn.Module", keep: FilterFn) -> list[str]:
    """torchao dynamic FP8 (row-wise scales for weights and activations) on the selected Linears.

    Layers already in FP8 storage (an FP8 checkpoint, a Comfy file) are dequantised one at a time and
    re-quantised by torchao, so no full bf16 copy ever exists.
    """
    import torch
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow
    from torchao.quantization import quantize_ as ao_quantize_

    # set_inductor_config=False: torchao's recommended inductor settings switch on coordinate-descent tuning;
    # with them the first compiled call of SD3.5 Large had not finished after 5 minutes on an H100.
    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.bfloat16)
    stored = [fqn for fqn, m in model.named_modules() if is_fp8_storage(m)]
    for fqn in stored:
        m = model.get_submodule(fqn)
        lin = torch.nn.Linear(m.in_features, m.out_features, m.bias is not None, device=m.weight.device, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(m.dequantized_weight(dtype))
            if m.bias is not None:
                lin.bias.copy_(m.bias)
        replace_module(model, fqn, lin)
    names = [fqn for fqn, m in model.named_modules() if keep(m, fqn)]
    ao_quantize_(model, config, filter_fn=lambda m, fqn: fqn in set(names))
    return names


def compile_transformer(transformer: "nn.Module", scope: str = "blocks") -> str:
    """``torch.compile`` per block (one graph, reused by every block: short first call) or the whole model."""
    import torch

    if scope == "model":
        transformer.compile()
    else:
        # One graph serves every block; leave room for the variants (last block, dual-attention blocks).
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        for block in transformer.transformer_blocks:
            block.compile()
    return f"torch.compile per {'model' if scope == 'model' else 'block'}"



"""Float dtypes by name: the one table, the one "cast floats, keep the rest" rule, and the one reader of
the dtype a config.json declares."""
from __future__ import annotations

import torch

# The float dtypes checkpoints, bitsandbytes quant states and config.json name.
FLOAT_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16,
                                        "float32": torch.float32}


def cast_floats(stored: torch.dtype, target: torch.dtype | None) -> torch.dtype:
    """`target` for a floating-point tensor, `stored` for anything else (integer ids, masks, uint8 codes)
    or when there is no target."""
    return target if target is not None and stored.is_floating_point else stored


def declared_dtype(config: dict | None):
    """The dtype config.json declares, as written: transformers 5 writes `dtype`, older ones `torch_dtype`."""
    cfg = config or {}
    return cfg.get("dtype") or cfg.get("torch_dtype")


def declared_float_dtype(config: dict | None) -> str | None:
    """The declared dtype's name when it is one of FLOAT_DTYPES ("auto", absent or anything else: None)."""
    name = declared_dtype(config)
    return name if isinstance(name, str) and name in FLOAT_DTYPES else None


__all__ = ["FLOAT_DTYPES", "cast_floats", "declared_dtype", "declared_float_dtype"]

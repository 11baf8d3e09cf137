"""`loratools convert`: rewrite a checkpoint tensor by tensor (reshard, change float dtype).

The plainest use of the I/O core, and the one the memory benchmark measures: read one tensor, cast,
write it, drop it.
"""
from __future__ import annotations

import torch

from .dtypes import FLOAT_DTYPES, cast_floats
from .errors import InputError
from .io import Checkpoint, TensorSpec, config_with_dtype, provenance
from .io.output import write_checkpoint


def target_dtype(src: torch.dtype, dtype: str) -> torch.dtype:
    return cast_floats(src, None if dtype == "auto" else FLOAT_DTYPES[dtype])


def convert_checkpoint(src, output, *, dtype: str = "auto", max_shard_size: int, force: bool = False,
                       on_tensor=None) -> dict:
    ck = Checkpoint(src)
    if ck.is_quantized:
        raise InputError("this is a 4-bit quantized checkpoint; use `loratools dequantize` to get a dense one",
                         path=src)
    specs = [TensorSpec(n, target_dtype(i.dtype, dtype), i.shape) for n, i in ck.tensors.items()]
    plan = {s.name: s for s in specs}
    config = config_with_dtype(ck.config, dtype) if ck.config is not None and dtype != "auto" else None

    def tensors():
        for name, t in ck.iter_tensors():
            yield name, t.to(plan[name].dtype)

    summary = write_checkpoint(
        output, inputs=[src], force=force, specs=specs, tensors=tensors(), side_files=ck.non_weight_files(),
        config=config, provenance=provenance("convert", {"dtype": dtype, "max_shard_size": max_shard_size},
                                           {"checkpoint": src}),
        max_shard_size=max_shard_size, on_tensor=on_tensor)
    summary["tensors"] = len(specs)
    return summary

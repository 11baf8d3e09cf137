"""`loratools convert`: rewrite a checkpoint tensor by tensor (reshard, change float dtype).

The plainest use of the I/O core, and the one the memory benchmark measures: read one tensor, cast,
write it, drop it.
"""
from __future__ import annotations

import os
from typing import Callable

import torch

from . import parallel
from .device import torch_threads
from .dtypes import FLOAT_DTYPES, cast_floats
from .errors import InputError
from .io import Checkpoint, TensorSpec, config_with_dtype, provenance
from .io.output import write_checkpoint


def target_dtype(src: torch.dtype, dtype: str) -> torch.dtype:
    """The dtype a tensor is written in: `dtype` for floating tensors, unless "auto"; others keep theirs."""
    return cast_floats(src, None if dtype == "auto" else FLOAT_DTYPES[dtype])


def convert_checkpoint(src: str | os.PathLike, output: str | os.PathLike, *, dtype: str = "auto",
                       max_shard_size: int, force: bool = False,
                       on_tensor: Callable[[str], None] | None = None) -> dict:
    """Rewrite a dense checkpoint tensor by tensor into `output`.

    Args:
        src: a checkpoint (file, directory or sharded directory).
        output: the directory to create (an io.OutputPath carries its durability).
        dtype: "auto" (each tensor keeps its dtype), "float16", "bfloat16" or "float32" for the
            floating tensors; config.json then declares it.
        max_shard_size, force, on_tensor: as for io.output.write_checkpoint.
    Returns:
        write_checkpoint's summary plus "tensors".
    Example:
        >>> convert_checkpoint("fixtures/tiny-llama", "/tmp/tiny-bf16", dtype="bfloat16", max_shard_size=200_000)
    """
    ck = Checkpoint(src)
    if ck.is_quantized:
        raise InputError("this is a 4-bit quantized checkpoint; use `loratools dequantize` to get a dense one",
                         path=src)
    specs = [TensorSpec(n, target_dtype(i.dtype, dtype), i.shape) for n, i in ck.tensors.items()]
    plan = {s.name: s for s in specs}
    config = config_with_dtype(ck.config, dtype) if ck.config is not None and dtype != "auto" else None

    def tensors():
        for name, t in ck.prefetched(ck.keys()):  # the next tensor is read while this one is cast
            yield name, parallel.cast(t, plan[name].dtype)  # on every core (parallel.py)

    with torch_threads(1, torch.device("cpu")):
        summary = write_checkpoint(
            output, inputs=[src], force=force, specs=specs, tensors=tensors(), side_files=ck.non_weight_files(),
            config=config, provenance=provenance("convert", {"dtype": dtype, "max_shard_size": max_shard_size},
                                               {"checkpoint": src}),
            max_shard_size=max_shard_size, on_tensor=on_tensor)
    summary["tensors"] = len(specs)
    return summary

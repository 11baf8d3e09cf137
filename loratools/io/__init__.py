"""Checkpoint I/O: header-only indexes, tensor-at-a-time reads, planned shard writes, atomic outputs.

The names that need torch are imported on first use (PEP 562), so that the torch-free modules of this
package (sizes, durability, provenance) can be imported by the command line before torch is.
"""
from __future__ import annotations

import importlib

# torch-free, imported now; this also binds `provenance` to the function rather than the submodule
from .provenance import Provenance, provenance, read_provenance, verify_inputs
from .durability import DURABLE, Durability, OutputPath
from .sizes import DEFAULT_MAX_SHARD_SIZE, parse_size

_WHERE = {
    "AtomicOutput": "atomic", "check_output_path": "atomic",
    "Checkpoint": "checkpoint", "load_json": "checkpoint",
    "TensorInfo": "safetensors_format", "read_header": "safetensors_format",
    "config_with_dtype": "sidefiles", "copy_side_files": "sidefiles",
    "ShardWriter": "writer", "TensorSpec": "writer", "save_tensors": "writer", "write_json": "writer",
    "write_adapter_dir": "output", "write_checkpoint": "output",
}
__all__ = [
    "AtomicOutput", "Checkpoint", "DEFAULT_MAX_SHARD_SIZE", "DURABLE", "Durability", "OutputPath", "Provenance",
    "ShardWriter", "TensorInfo", "TensorSpec",
    "check_output_path", "config_with_dtype", "copy_side_files", "load_json", "parse_size", "provenance",
    "read_header", "read_provenance", "save_tensors", "verify_inputs", "write_adapter_dir", "write_checkpoint",
    "write_json",
]


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return __all__

"""Checkpoint I/O: header-only indexes, tensor-at-a-time reads, planned shard writes, atomic outputs."""
from .atomic import AtomicOutput, check_output_path
from .checkpoint import Checkpoint, load_json
from .safetensors_format import TensorInfo, read_header
from .provenance import Provenance, provenance, read_provenance, verify_inputs
from .sidefiles import config_with_dtype, copy_side_files
from .writer import DEFAULT_MAX_SHARD_SIZE, ShardWriter, TensorSpec, parse_size, save_tensors, write_json

__all__ = [
    "AtomicOutput", "Checkpoint", "DEFAULT_MAX_SHARD_SIZE", "ShardWriter", "TensorInfo", "TensorSpec",
    "Provenance", "check_output_path", "config_with_dtype", "copy_side_files", "load_json", "parse_size", "provenance", "read_header",
    "read_provenance", "verify_inputs",
    "save_tensors", "write_json",
]

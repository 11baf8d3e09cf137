"""`loratools convert ADAPTER -o OUT --to FORMAT`: rewrite an adapter in another file format.

The input's format is detected (loratools.formats), the adapter goes through PEFT's form in memory, and the
target format first says whether it can hold it (one line, exit 1, nothing written) before the output is
written atomically.
"""
from __future__ import annotations

import os
from pathlib import Path

from . import formats
from .errors import InputError
from .io.atomic import AtomicOutput, check_output_path
from .io.durability import durability_of
from .io.provenance import provenance


def is_adapter(path: str | os.PathLike) -> bool:
    """Whether `path` is an adapter in a registered format (not a checkpoint)."""
    return formats.detect(path) is not None


def convert_adapter(adapter: str | os.PathLike, output: str | os.PathLike, *, to: str,
                    base: str | os.PathLike | None = None, force: bool = False) -> dict:
    """Convert the adapter at `adapter` into format `to` at `output`.

    Args:
        adapter: an adapter file or directory in any registered format.
        output: the directory to create (an io.OutputPath carries its durability); refused if it exists
            unless `force`.
        to: a registered format name (formats.names()).
        base: the base checkpoint, for formats that need its module list (kohya) or its config.
    Returns:
        {"kind": "adapter_convert", "output", "from", "to", "files", "bytes", "modules", "notes",
        "stale_removed"}; notes list every exact transformation made (scales folded, ranks padded).
    Example:
        >>> convert_adapter("fixtures/llama-lora", "/tmp/llama-lora-mlx", to="mlx")["files"]
        ['adapter_config.json', 'adapters.safetensors']
    """
    target = formats.get(to)
    src = formats.detect(adapter)
    if src is None:
        raise InputError(f"not an adapter in a known format ({', '.join(formats.names())})", path=adapter)
    base_path = Path(base) if base is not None else None
    files = src.read(Path(adapter), base_path)
    target.check(files, base_path)  # before any output exists
    inputs = [adapter] + ([base] if base is not None else [])
    check_output_path(output, inputs, force)
    meta = provenance("convert", {"to": to, "from": src.name}, {"adapter": adapter})
    durability = durability_of(output)
    atomic = AtomicOutput(output, inputs, force, durability)
    with atomic as tmp:
        written = target.write(files, tmp, base_path, provenance=meta, durability=durability)
        nbytes = sum((tmp / f).stat().st_size for f in written)
    return {"kind": "adapter_convert", "output": str(atomic.out), "from": src.name, "to": target.name,
            "files": sorted(written), "bytes": nbytes, "modules": len(formats.parse(files).modules),
            "notes": list(files.notes), "stale_removed": [str(p) for p in atomic.stale_removed]}
